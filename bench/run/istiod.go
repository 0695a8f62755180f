package run

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/sidelane/sidelane/bench/loadgen"
	"github.com/sidelane/sidelane/bench/report"
	"github.com/sidelane/sidelane/internal/istiodharness"
	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/controller"
	"github.com/sidelane/sidelane/policy/envoyfilter"
	"github.com/sidelane/sidelane/policy/input"
)

// scenarioIstiod times an L7Policy write until real istiod pushes the
// protected pod's sidecar an LDS carrying the new rules.
const scenarioIstiod = "policy_to_istiod"

// The protected pod and its HTTP port (a Service port named "http", so
// istiod gives the port an inbound HTTP chain of its own).
var istiodBenchPod = istiodharness.Proxy{IP: "10.10.0.10", Pod: "api-0", Namespace: "shop", ServiceAccount: "api", Labels: map[string]string{"app": "api"}}

const istiodBenchPort = 8080

// virtualInboundListener is the sidecar's inbound listener.
const virtualInboundListener = "virtualInbound"

// policyToIstiod measures L7Policy write -> sidelane's policy controller
// -> EnvoyFilter -> istiod -> LDS push on a long-lived ADS stream held as
// the protected pod's sidecar. It skips (with the reason) when
// kube-apiserver or pilot-discovery are not built: `make bench` does not
// build them (make kube, make istiod).
func (r *Runner) policyToIstiod(ctx context.Context) error {
	bin, reason := istiodPrereqs(r.cfg.ToolBin)
	if reason != "" {
		r.res.Skip(scenarioIstiod, report.Sidelane, "skipped: "+reason)
		r.log.Warn("scenario skipped", "name", scenarioIstiod, "reason", reason)
		return nil
	}
	n := 30
	if r.cfg.Quick {
		n = 8
	}
	root, err := kubeharness.RepoRoot()
	if err != nil {
		return fmt.Errorf("find the L7Policy CRD: %w", err)
	}
	cl, err := kubeharness.Run()
	if err != nil {
		return fmt.Errorf("kube-apiserver: %w", err)
	}
	r.cleanup(cl.Stop)
	crd := filepath.Join(root, "charts", "sidelane", "crds", "sidelane.io_l7policies.yaml")
	if err := kubectl(ctx, cl, "apply", "--server-side", "-f", crd); err != nil {
		return err
	}
	if err := kubectl(ctx, cl, "wait", "--for=condition=Established", "--timeout=120s", "crd/l7policies.sidelane.io"); err != nil {
		return err
	}
	ist, err := istiodharness.Run(cl, istiodharness.Options{Binary: bin})
	if err != nil {
		return fmt.Errorf("istiod: %w", err)
	}
	r.cleanup(ist.Stop)
	kube, err := kubernetes.NewForConfig(cl.RESTConfig)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(cl.RESTConfig)
	if err != nil {
		return err
	}
	if err := createProtectedPod(ctx, kube, istiodBenchPod); err != nil {
		return err
	}

	// sidelane's policy writer in-process, as test/istiod runs it.
	ctrlLog := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("component", "policy-controller")
	ctrl, err := controller.New(ctrlLog, kube, dyn, "cluster.local", prometheus.NewRegistry())
	if err != nil {
		return err
	}
	ctrlCtx, stopCtrl := context.WithCancel(ctx)
	ctrlDone := make(chan struct{})
	ctrl.Start(ctrlCtx)
	go func() {
		defer close(ctrlDone)
		if err := ctrl.Run(ctrlCtx); err != nil {
			r.log.Error("policy controller", "error", err)
		}
	}()
	r.cleanup(func() { stopCtrl(); <-ctrlDone })

	watch, err := ist.WatchListeners(ctx, istiodBenchPod)
	if err != nil {
		return err
	}
	// Every push is read (and stamped) as it arrives, while the loop below
	// writes policies.
	pushes := make(chan istiodharness.Push, 16)
	readerCtx, stopReader := context.WithCancel(ctx)
	readerDone := make(chan error, 1)
	go func() {
		for {
			p, err := watch.Next()
			if err != nil {
				readerDone <- err
				return
			}
			select {
			case pushes <- p:
			case <-readerCtx.Done():
				readerDone <- nil
				return
			}
		}
	}()
	r.cleanup(func() { stopReader(); watch.Close(); <-readerDone })
	next := func(timeout time.Duration) (istiodharness.Push, error) {
		select {
		case p := <-pushes:
			return p, nil
		case err := <-readerDone:
			readerDone <- err
			return istiodharness.Push{}, fmt.Errorf("istiod's ads stream ended: %w", err)
		case <-time.After(timeout):
			return istiodharness.Push{}, errNoPush
		case <-ctx.Done():
			return istiodharness.Push{}, ctx.Err()
		}
	}
	// until reads pushes until one satisfies carries (nil: accepted).
	until := func(what string, timeout time.Duration, carries func([]*listenerv3.Listener) error) (istiodharness.Push, error) {
		deadline := time.Now().Add(timeout)
		last := errNoPush
		for {
			left := time.Until(deadline)
			if left <= 0 {
				return istiodharness.Push{}, fmt.Errorf("%s after %s: %w\nistiod log tail:\n%s", what, timeout, last, ist.Tail(2048))
			}
			p, err := next(left)
			if errors.Is(err, errNoPush) {
				continue // the deadline check reports the last mismatch
			}
			if err != nil {
				return istiodharness.Push{}, err
			}
			if last = carries(p.Listeners); last == nil {
				return p, nil
			}
		}
	}

	if _, err := until("istiod's inbound http chain for the protected port", 2*time.Minute, func(ls []*listenerv3.Listener) error {
		return carriesRules(ls, istiodBenchPort, "")
	}); err != nil {
		return err
	}
	// The EnvoyFilter's changes, stamped as they arrive here (when istiod's
	// informer sees them too), split the time into the controller's share
	// and istiod's.
	efs, err := watchEnvoyFilters(ctx, dyn, istiodBenchPod.Namespace)
	if err != nil {
		return err
	}
	r.cleanup(efs.stop)
	runID := uniqueName("")
	lat := make([]time.Duration, 0, n)
	toEF := make([]time.Duration, 0, n)
	// Write 0 creates the policy (and the EnvoyFilter): not counted; the
	// n timed writes change its rules.
	for i := 0; i <= n; i++ {
		marker := fmt.Sprintf("/bench-%s-%d/", runID, i) // the slash ends it: -1/ is no prefix of -10/
		pol := benchPolicy(istiodBenchPod, istiodBenchPort, marker)
		t0 := time.Now()
		if _, err := dyn.Resource(input.L7PolicyGVR).Namespace(pol.GetNamespace()).Apply(ctx, pol.GetName(), pol, metav1.ApplyOptions{FieldManager: "sidelane-bench", Force: true}); err != nil {
			return fmt.Errorf("apply l7policy: %w", err)
		}
		p, err := until(fmt.Sprintf("write %d: rules with %s", i, marker), time.Minute, func(ls []*listenerv3.Listener) error {
			return carriesRules(ls, istiodBenchPort, marker)
		})
		if err != nil {
			return err
		}
		ef, err := efs.first(marker, 10*time.Second)
		if err != nil {
			return fmt.Errorf("write %d: %w", i, err)
		}
		if i > 0 {
			lat = append(lat, p.At.Sub(t0))
			toEF = append(toEF, ef.Sub(t0))
		}
	}
	ms := func(us float64) float64 { return math.Round(us) / 1000 }
	s, e := loadgen.Summarize(lat), loadgen.Summarize(toEF)
	r.res.Add(scenarioIstiod, report.Sidelane, "policy_to_istiod_p50_ms", ms(s.P50us), "ms")
	r.res.Add(scenarioIstiod, report.Sidelane, "policy_to_istiod_p99_ms", ms(s.P99us), "ms")
	r.res.Add(scenarioIstiod, report.Sidelane, "to_envoyfilter_p50_ms", ms(e.P50us), "ms")
	r.res.Add(scenarioIstiod, report.Sidelane, "to_envoyfilter_p99_ms", ms(e.P99us), "ms")
	r.res.Add(scenarioIstiod, report.Sidelane, "writes", float64(s.Count), "")
	r.log.Info("policy to istiod", "writes", s.Count, "p50ms", ms(s.P50us), "p99ms", ms(s.P99us),
		"envoyfilterP50ms", ms(e.P50us), "envoyfilterP99ms", ms(e.P99us), "istiod", ist.Version)
	return nil
}

// efWatch stamps each change of sidelane's EnvoyFilters as it arrives.
type efWatch struct {
	events chan efEvent
	stop   func()
}

type efEvent struct {
	at   time.Time
	json []byte
}

func watchEnvoyFilters(ctx context.Context, dyn dynamic.Interface, ns string) (*efWatch, error) {
	w, err := dyn.Resource(controller.EnvoyFilterGVR).Namespace(ns).Watch(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("watch envoyfilters: %w", err)
	}
	ew := &efWatch{events: make(chan efEvent, 64)}
	done := make(chan struct{})
	ew.stop = func() { w.Stop(); <-done }
	go func() {
		defer close(done)
		defer close(ew.events)
		for ev := range w.ResultChan() {
			at := time.Now()
			u, ok := ev.Object.(*unstructured.Unstructured)
			if !ok {
				continue
			}
			b, err := u.MarshalJSON()
			if err != nil {
				continue
			}
			select {
			case ew.events <- efEvent{at, b}:
			default: // nobody reads: the run is over
			}
		}
	}()
	return ew, nil
}

// first returns when the first EnvoyFilter change containing marker
// arrived, dropping the changes before it.
func (w *efWatch) first(marker string, timeout time.Duration) (time.Time, error) {
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-w.events:
			if !ok {
				return time.Time{}, errors.New("envoyfilter watch ended")
			}
			if bytes.Contains(ev.json, []byte(marker)) {
				return ev.at, nil
			}
		case <-deadline:
			return time.Time{}, fmt.Errorf("no envoyfilter with %s on the watch", marker)
		}
	}
}

// errNoPush: no LDS push within the wait.
var errNoPush = errors.New("no lds push")

// istiodPrereqs returns pilot-discovery's path, or why the scenario
// cannot run here. Nothing is built: building kube-apiserver and istiod
// takes half an hour on a fresh machine.
func istiodPrereqs(toolBin string) (bin, reason string) {
	if err := kubeharness.Installed(); err != nil {
		return "", err.Error()
	}
	bin = filepath.Join(toolBin, "pilot-discovery")
	if fi, err := os.Stat(bin); err != nil || !fi.Mode().IsRegular() || fi.Mode()&0o111 == 0 {
		return "", fmt.Sprintf("pilot-discovery not in %s (make istiod)", toolBin)
	}
	return bin, ""
}

// benchPolicy is the L7Policy of write marker: on port, GET marker from
// shop/web.
func benchPolicy(p istiodharness.Proxy, port int32, marker string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.Group + "/" + v1alpha1.Version,
		"kind":       "L7Policy",
		"metadata":   map[string]any{"name": "bench", "namespace": p.Namespace},
		"spec": map[string]any{
			"podSelector": map[string]any{"matchLabels": map[string]any{"app": p.Labels["app"]}},
			"ports": []any{map[string]any{
				"port": int64(port),
				"rules": []any{map[string]any{
					"from": []any{map[string]any{"serviceAccounts": []any{p.Namespace + "/web"}}},
					"http": []any{map[string]any{"method": "GET", "path": marker}},
				}},
			}},
		},
	}}
}

// carriesRules checks that ls has at least one inbound HTTP chain for
// port and that every such chain has sidelane's RBAC filter whose config
// contains marker (any sidelane filter when marker is empty: only the
// chain must exist then).
func carriesRules(ls []*listenerv3.Listener, port uint32, marker string) error {
	chains := 0
	for _, l := range ls {
		if l.GetName() != virtualInboundListener {
			continue
		}
		for _, fc := range l.GetFilterChains() {
			if fc.GetFilterChainMatch().GetDestinationPort().GetValue() != port {
				continue
			}
			for _, f := range fc.GetFilters() {
				if f.GetName() != wellknown.HTTPConnectionManager {
					continue
				}
				var h hcmv3.HttpConnectionManager
				if err := f.GetTypedConfig().UnmarshalTo(&h); err != nil {
					return fmt.Errorf("%s/%s: hcm: %w", l.GetName(), fc.GetName(), err)
				}
				chains++
				if marker == "" {
					continue
				}
				i := slices.IndexFunc(h.GetHttpFilters(), func(hf *hcmv3.HttpFilter) bool { return hf.GetName() == envoyfilter.FilterName })
				if i < 0 {
					return fmt.Errorf("%s/%s: no %s filter yet", l.GetName(), fc.GetName(), envoyfilter.FilterName)
				}
				// The path is a string field of the RBAC config: its bytes
				// appear verbatim in the encoded message.
				if !bytes.Contains(h.GetHttpFilters()[i].GetTypedConfig().GetValue(), []byte(marker)) {
					return fmt.Errorf("%s/%s: %s has older rules", l.GetName(), fc.GetName(), envoyfilter.FilterName)
				}
			}
		}
	}
	if chains == 0 {
		return fmt.Errorf("no inbound http chain for port %d", port)
	}
	return nil
}

// createProtectedPod makes p's namespace, a running Pod with p's IP and
// labels, and a Service whose "http" port targets istiodBenchPort.
func createProtectedPod(ctx context.Context, kube kubernetes.Interface, p istiodharness.Proxy) error {
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: p.Namespace}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create namespace %s: %w", p.Namespace, err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Pod, Namespace: p.Namespace, Labels: p.Labels},
		Spec: corev1.PodSpec{ServiceAccountName: p.ServiceAccount, NodeName: "node-a", Containers: []corev1.Container{{
			Name: "app", Image: "app", Ports: []corev1.ContainerPort{{ContainerPort: istiodBenchPort}},
		}}},
	}
	created, err := kube.CoreV1().Pods(p.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create pod %s: %w", p.Pod, err)
	}
	created.Status = corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: p.IP, PodIPs: []corev1.PodIP{{IP: p.IP}}, HostIP: "192.0.2.1",
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
	}
	if _, err := kube.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("pod %s status: %w", p.Pod, err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: p.Labels["app"], Namespace: p.Namespace},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": p.Labels["app"]}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromInt32(istiodBenchPort)},
		}},
	}
	if _, err := kube.CoreV1().Services(p.Namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create service: %w", err)
	}
	return nil
}

// kubectl runs the cluster's kubectl.
func kubectl(ctx context.Context, c *kubeharness.Cluster, args ...string) error {
	cmd := exec.CommandContext(ctx, c.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("kubectl %s: %w: %s", args[0], err, out.String())
	}
	return nil
}
