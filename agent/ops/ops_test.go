package ops_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent/metrics"
	"github.com/sidelane/sidelane/agent/ops"
)

type readiness struct {
	ok     bool
	reason string
}

func (r *readiness) Ready() (bool, string) { return r.ok, r.reason }

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	b, _ := io.ReadAll(rec.Body)
	return rec.Code, string(b)
}

func TestHandler(t *testing.T) {
	r := &readiness{reason: "waiting for the Kubernetes cache"}
	m := metrics.New(func() map[string]int { return map[string]int{"sidecar": 2, "none": 1} })
	m.Transition("none", "node")
	m.CNIRequest("add", 3*time.Millisecond, nil)
	m.Decision("sidecar", "sidecar")
	h := ops.Handler(r, m)

	if code, _ := get(t, h, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d", code)
	}
	if code, body := get(t, h, "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, r.reason) {
		t.Errorf("/readyz while not ready = %d %q", code, body)
	}
	r.ok = true
	if code, _ := get(t, h, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz when ready = %d", code)
	}
	code, body := get(t, h, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics = %d", code)
	}
	for _, want := range []string{
		`sidelane_pods{mode="sidecar"} 2`,
		`sidelane_mode_transitions_total{from="none",to="node"} 1`,
		`sidelane_cni_request_duration_seconds_count{op="add",result="ok"} 1`,
		`sidelane_capture_decisions_total{mode="sidecar",rule="sidecar"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}
