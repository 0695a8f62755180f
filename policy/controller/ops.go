package controller

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/discovery"
)

// APIs are the group versions the controller needs: sidelane's L7Policy
// and Istio's EnvoyFilter.
var APIs = []string{"sidelane.io/v1alpha1", "networking.istio.io/v1alpha3"}

// WaitForAPIs returns once the API server serves every group version in
// APIs, polling every interval (the CRDs may be installed after the
// controller); it logs once what is missing.
func WaitForAPIs(ctx context.Context, log *slog.Logger, d discovery.DiscoveryInterface, interval time.Duration) error {
	warned := false
	for {
		missing := ""
		for _, gv := range APIs {
			if _, err := d.ServerResourcesForGroupVersion(gv); err != nil {
				missing = fmt.Sprintf("%s: %v", gv, err)
				break
			}
		}
		if missing == "" {
			return nil
		}
		if !warned {
			log.Warn("waiting for an API group to be served (install the chart's CRDs and Istio's)", "missing", missing)
			warned = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// Handler serves the controller's operator endpoints: /healthz (alive),
// /readyz (503 with the reason until ready reports true) and /metrics.
func Handler(ready func() (bool, string), g prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ok, reason := ready(); !ok {
			http.Error(w, "not ready: "+reason, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	return mux
}
