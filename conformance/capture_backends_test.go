//go:build linux

package conformance

import (
	"context"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/datapath/iptables"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/istio/capture"
)

// sidelaneIPTables is sidelane's iptables fallback backend, driven the way
// the agent drives it: parse the pod's knobs, Enroll the entry, Verify it.
type sidelaneIPTables struct{ backend *iptables.Backend }

func (*sidelaneIPTables) name() string { return "sidelane-iptables" }

func (s *sidelaneIPTables) setup(t *testing.T) {
	s.backend = iptables.New(slog.New(slog.NewTextHandler(testWriter{t}, nil)))
}

func (s *sidelaneIPTables) install(t *testing.T, pod *capPod) { enroll(t, s.backend, pod) }

// enroll does what the agent does for a sidecar pod: parse the pod's
// knobs, Enroll the entry, Verify it; Unenroll at cleanup.
func enroll(t *testing.T, dp datapath.Datapath, pod *capPod) {
	t.Helper()
	// What the agent does at ADD (agent/kube.IstioCapture, on the
	// injected pod): strict.
	settings, warnings, err := capture.Parse(pod.spec)
	switch {
	case pod.rejects == "" && err != nil:
		t.Fatalf("sidelane rejects a pod Istio accepts: %v", err)
	case pod.rejects != "" && err == nil:
		t.Fatalf("sidelane accepts a pod Istio rejects for %s", pod.rejects)
	case pod.rejects != "":
		// The agent fails the ADD with this error; it must name the
		// annotation and the value. Then check the fallback.
		v := pod.spec.Annotations[pod.rejects]
		if !strings.Contains(err.Error(), pod.rejects) || !strings.Contains(err.Error(), strconv.Quote(v)) {
			t.Errorf("error %q does not name %s=%q", err, pod.rejects, v)
		}
		settings, warnings, _ = capture.ParseOrDefaults(pod.spec)
	}
	for _, w := range warnings {
		t.Logf("capture warning: %s", w)
	}
	e := store.Entry{
		Key:     store.Key{Network: "capture", ContainerID: pod.ns.Name, IfName: "eth0"},
		Netns:   pod.ns.Path,
		IPs:     podIPs(pod),
		Mode:    "sidecar",
		Capture: &settings,
	}
	ctx := context.Background()
	if err := dp.Enroll(ctx, &e); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	t.Cleanup(func() {
		if err := dp.Unenroll(ctx, e); err != nil {
			t.Errorf("unenroll: %v", err)
		}
	})
	if err := dp.Verify(ctx, e); err != nil {
		t.Fatalf("verify right after enroll: %v", err)
	}
}

func podIPs(pod *capPod) []netip.Prefix {
	var ips []netip.Prefix
	if pod.ns.IP4.IsValid() {
		ips = append(ips, netip.PrefixFrom(pod.ns.IP4, 24))
	}
	return append(ips, netip.PrefixFrom(pod.ns.IP6, 64))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
