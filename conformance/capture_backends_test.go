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

	"github.com/sidelane/sidelane/agent/datapath/iptables"
	"github.com/sidelane/sidelane/agent/store"
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
	out, err := pod.ns.Command(ctx, r.bin, append([]string{"istio-iptables"}, istioFlags(pod)...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("istio-iptables %s: %v\n%s", strings.Join(istioFlags(pod), " "), err, tail(string(out), 20))
	}
	// The namespace (and its rules) go away with the pod.
}

// istioFlags are istio-cni's istio-iptables settings for pod, as flags.
func istioFlags(pod *capPod) []string {
	a := pod.spec.Annotations
	get := func(name, def string) string {
		if v, ok := a[name]; ok {
			return v
		}
		return def
	}
	// istio-cni appends Istio's own ports to excludeInboundPorts.
	excludeIn := strings.TrimSpace(get(capture.AnnotationExcludeInboundPorts, "15020"))
	if excludeIn != "" && !strings.HasSuffix(excludeIn, ",") {
		excludeIn += ","
	}
	excludeIn += "15020,15021,15090"
	var seen []string
	for _, p := range strings.Split(excludeIn, ",") {
		if !contains(seen, p) {
			seen = append(seen, p)
		}
	}
	flags := []string{
		"-p", "15001", "-z", "15006",
		"-u", strconv.Itoa(int(pod.proxyUID)), "-g", strconv.Itoa(int(pod.proxyGID)),
		"-m", get(capture.AnnotationInterceptionMode, "REDIRECT"),
		"-i", get(capture.AnnotationIncludeOutboundIPRanges, "*"),
		"-x", get(capture.AnnotationExcludeOutboundIPRanges, ""),
		"-b", get(capture.AnnotationIncludeInboundPorts, "*"),
		"-d", strings.Join(seen, ","),
		"-o", get(capture.AnnotationExcludeOutboundPorts, "15020"),
		"-q", get(capture.AnnotationIncludeOutboundPorts, ""),
		"-c", get(capture.AnnotationExcludeInterfaces, ""),
	}
	if envBool(pod.spec, capture.EnvDNSCapture) {
		flags = append(flags, "--redirect-dns", "--capture-all-dns")
	}
	if envBool(pod.spec, capture.EnvDualStack) {
		flags = append(flags, "--dual-stack")
	}
	return flags
}

// envBool reads an ISTIO_* knob from the proxy's env, or from the
// proxyMetadata the injector would have turned into env.
func envBool(p capture.Pod, name string) bool {
	v, ok := p.ProxyEnv[name]
	if !ok {
		cfg := p.Annotations[capture.AnnotationProxyConfig]
		if i := strings.Index(cfg, name+":"); i >= 0 {
			v = strings.Trim(strings.Fields(cfg[i+len(name)+1:])[0], `"'`)
		}
	}
	b, _ := strconv.ParseBool(v)
	return b
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// sidelaneIPTables is sidelane's iptables fallback backend, driven the way
// the agent drives it: parse the pod's knobs, Enroll the entry, Verify it.
type sidelaneIPTables struct{ backend *iptables.Backend }

func (*sidelaneIPTables) name() string { return "sidelane-iptables" }

func (s *sidelaneIPTables) setup(t *testing.T) {
	s.backend = iptables.New(slog.New(slog.NewTextHandler(testWriter{t}, nil)))
}

func (s *sidelaneIPTables) install(t *testing.T, pod *capPod) {
	t.Helper()
	settings, warnings, err := capture.ParseOrDefaults(pod.spec)
	if err != nil {
		t.Fatalf("parse capture knobs: %v", err)
	}
	for _, w := range warnings {
		t.Logf("capture warning: %s", w)
	}
	e := store.Entry{
		Key:     store.Key{Network: "capture", ContainerID: pod.ns.Name, IfName: "eth0"},
		Netns:   pod.ns.Path,
		IPs:     []netip.Prefix{netip.PrefixFrom(pod.ns.IP4, 24), netip.PrefixFrom(pod.ns.IP6, 64)},
		Mode:    "sidecar",
		Capture: &settings,
	}
	ctx := context.Background()
	if err := s.backend.Enroll(ctx, &e); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	t.Cleanup(func() {
		if err := s.backend.Unenroll(ctx, e); err != nil {
			t.Errorf("unenroll: %v", err)
		}
	})
	if err := s.backend.Verify(ctx, e); err != nil {
		t.Fatalf("verify right after enroll: %v", err)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
