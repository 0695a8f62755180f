//go:build linux

package conformance

import (
	"context"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/datapath/iptables"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/istioref"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

// istioReference is Istio itself: the real `pilot-agent istio-iptables`,
// run inside the pod's namespace with the flags istio-cni derives from the
// pod (cni/pkg/plugin: NewRedirect and its defaults). It reads the raw
// annotations, not sidelane's parser, so it also checks the parser.
type istioReference struct{ bin string }

func (*istioReference) name() string { return "istio-iptables" }

func (r *istioReference) setup(t *testing.T) { r.bin = testenv.RequireTool(t, "pilot-agent") }

func (r *istioReference) install(t *testing.T, pod *capPod) {
	t.Helper()
	if pod.spec.Annotations[capture.AnnotationInterceptionMode] == capture.ModeNone {
		return // Istio installs no capture at all
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec := pod.spec
	if pod.rejects != "" {
		r.checkRejected(t, ctx, pod)
		spec = istioref.DefaultsPod(spec)
	}
	// (Accepted pods are not run through istioref.Validate: istio-cni
	// refuses includeOutboundPorts ranges, which istio-init's iptables
	// and sidelane accept; see the README.)
	flags := istioFlagsFor(spec)
	out, err := pod.ns.Command(ctx, r.bin, append([]string{"istio-iptables"}, flags...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("istio-iptables %s: %v\n%s", strings.Join(flags, " "), err, tail(string(out), 20))
	}
	// The namespace (and its rules) go away with the pod.
}

// checkRejected checks that Istio refuses pod, as the case says: either
// istio-cni's own validation or, past it, istio-iptables (which must then
// leave no rule behind, its iptables-restore being atomic).
func (r *istioReference) checkRejected(t *testing.T, ctx context.Context, pod *capPod) {
	t.Helper()
	if err := istioref.Validate(pod.spec); err != nil {
		if !strings.Contains(err.Error(), pod.rejects) {
			t.Errorf("istio-cni rejects the pod for another annotation: %v", err)
		}
		return
	}
	flags := istioFlagsFor(pod.spec)
	out, err := pod.ns.Command(ctx, r.bin, append([]string{"istio-iptables"}, flags...)...).CombinedOutput()
	if err == nil {
		t.Fatalf("the case says Istio rejects %s, but istio-cni and istio-iptables %s accept it", pod.rejects, strings.Join(flags, " "))
	}
	t.Logf("istio-iptables refuses the pod (%v): %s", err, tail(string(out), 3))
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		dump, err := pod.ns.Command(ctx, save).Output()
		if err != nil {
			t.Fatalf("%s: %v", save, err)
		}
		if strings.Contains(string(dump), "ISTIO_") {
			t.Fatalf("istio-iptables failed but left rules:\n%s", dump)
		}
	}
}

// istioFlags are istio-cni's istio-iptables flags for pod.
func istioFlags(pod *capPod) []string { return istioFlagsFor(pod.spec) }

// istioFlagsFor is istioref.Flags plus what istio-cni sets for
// INVALID_DROP (its Redirect.invalidDrop: cfg.DropInvalid, i.e.
// --drop-invalid), which istioref does not know.
func istioFlagsFor(spec capture.Pod) []string {
	flags := istioref.Flags(spec)
	if istioref.EnvBool(spec, capture.EnvInvalidDrop) {
		flags = append(flags, "--drop-invalid")
	}
	return flags
}

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
	// What the agent does at ADD (agent/kube.IstioCapture): strict.
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
