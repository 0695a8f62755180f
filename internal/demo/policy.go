package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/agent/xds"
	"github.com/sidelane/sidelane/internal/grpcrbac"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
	"github.com/sidelane/sidelane/policy/controller"
	"github.com/sidelane/sidelane/policy/envoyfilter"
	"github.com/sidelane/sidelane/policy/input"
)

// samplePolicy protects the backend's port 8080: anyone may health-check
// it, only the pods labelled role=<caller> may call the Orders service.
// (gRPC always sends POST, so the rules name paths, not methods.)
const samplePolicy = `apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: backend-orders, namespace: %s}
spec:
  podSelector: {matchLabels: {role: backend}}
  ports:
    - port: 8080
      rules:
        - http: [{path: '/grpc\.health\.v1\.Health/Check'}]
        - from: [{podSelector: {matchLabels: {role: %s}}}]
          http: [{path: '/shop\.Orders/.*'}]
`

const (
	healthCheck = "/grpc.health.v1.Health/Check"
	listOrders  = "/shop.Orders/List"
)

func (r *run) stepPolicy(ctx context.Context) error {
	if r.server == nil || r.reports == nil {
		return errors.New("steps 1 and 2 did not bring up their pods")
	}
	dyn, err := dynamic.NewForConfig(r.restConfig)
	if err != nil {
		return err
	}
	if err := r.startController(ctx); err != nil {
		return err
	}
	apply := func(caller string) (*v1alpha1.L7Policy, error) {
		src := fmt.Sprintf(samplePolicy, r.scNS, caller)
		r.say("  kubectl apply -f - <<EOF")
		for _, l := range strings.Split(strings.TrimRight(src, "\n"), "\n") {
			r.say("    %s", l)
		}
		r.say("  EOF")
		if _, err := r.kubectlRun(ctx, src, "apply", "-f", "-"); err != nil {
			return nil, err
		}
		u, err := dyn.Resource(input.L7PolicyGVR).Namespace(r.scNS).Get(ctx, "backend-orders", metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		var p v1alpha1.L7Policy
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p); err != nil {
			return nil, err
		}
		return &p, nil
	}

	// The protected gRPC server plays the backend's proxy, the client the
	// callers: grpc-go's own xDS clients, fed by sidelane's xDS server.
	pair, err := r.startGRPCPair(ctx)
	if err != nil {
		return err
	}
	r.say("  grpc-go xDS server on %s (RBAC HTTP filter from the xDS listener) and grpc-go xDS client (target xds:///%s),", pair.Addr(), grpcrbac.Target)
	r.say("  both fed by sidelane's xDS server; they run in a scratch netns holding the pods' addresses on lo, so the")
	r.say("  compilation's source-IP identities apply as they are (the frontend and reports call from their pod IPs)")

	for round, c := range []struct {
		caller  string
		verdict map[*podRef]codes.Code
	}{
		{"frontend", map[*podRef]codes.Code{r.client: codes.OK, r.reports: codes.PermissionDenied}},
		{"reports", map[*podRef]codes.Code{r.client: codes.PermissionDenied, r.reports: codes.OK}},
	} {
		if round == 1 {
			r.say("  the policy changes: the Orders service now only for role=reports")
		}
		pol, err := apply(c.caller)
		if err != nil {
			return err
		}
		gen := pol.Generation
		// The controller's EnvoyFilter, read back from the API until its
		// spec is what the demo compiles in process from the same policy.
		var ef *unstructured.Unstructured
		name := envoyfilter.Name([]string{"backend-orders"})
		err = r.eventually(ctx, func() bool { return r.refetchMatches(ctx, dyn, name, pol, &ef) })
		if !r.check(ef != nil, "`sidelane controller` wrote EnvoyFilter %s/%s (read back from the API)", r.scNS, name) {
			return nil
		}
		r.check(err == nil, "its spec equals the in-process compilation of generation %d (compile + envoyfilter.Build)", gen)
		if round == 0 {
			r.printEnvoyFilter(ef)
			r.check(r.hasWorkloadSelector(ef, "backend"), "its workloadSelector picks role=backend and its RBAC names the Orders paths")
		}
		err = r.eventually(ctx, func() bool {
			u, err := dyn.Resource(input.L7PolicyGVR).Namespace(r.scNS).Get(ctx, "backend-orders", metav1.GetOptions{})
			if err != nil {
				return false
			}
			var p v1alpha1.L7Policy
			if runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p) != nil {
				return false
			}
			ok, _ := controller.SidecarEnforcement(&p)
			return ok && p.Status.ObservedGeneration >= gen
		})
		r.check(err == nil, "L7Policy status: Enforced by the controller (generation %d)", gen)

		// The same policy, compiled for source-IP identities (what the
		// node agents serve their node proxies), configures the pair.
		res, err := r.compile(ctx, pol, compile.IdentitySourceIP)
		if err != nil {
			return err
		}
		v, err := pair.Apply(ctx, res)
		if err != nil {
			return err
		}
		r.say("  xDS listener %q with the RBAC of this compilation ACKed by the grpc-go server (version %s):", fmt.Sprintf(xds.GRPCServerListenerTemplate, pair.Addr()), v)
		for _, l := range rbacSummary(res, pair.Addr()) {
			r.say("    %s", l)
		}
		for _, call := range []struct {
			from   *podRef
			method string
			want   codes.Code
		}{
			{r.client, healthCheck, codes.OK},
			{r.reports, healthCheck, codes.OK},
			{r.client, listOrders, c.verdict[r.client]},
			{r.reports, listOrders, c.verdict[r.reports]},
		} {
			from := netip.MustParseAddr(call.from.pod.Status.PodIP)
			got, err := r.callUntil(ctx, pair, from, call.method, call.want)
			r.check(err == nil && got == call.want, "%s (%s) calls %s: %v (want %v)", call.from.pod.Name, from, call.method, got, call.want)
		}
	}
	return nil
}

// callUntil retries a call on new connections for a few seconds: grpc-go
// applies an ACKed listener to the connections it accepts from then on.
func (r *run) callUntil(ctx context.Context, pair *grpcrbac.Pair, from netip.Addr, method string, want codes.Code) (codes.Code, error) {
	var got codes.Code
	for range 30 {
		var err error
		if got, err = pair.Call(ctx, from, method); err != nil || got == want {
			return got, err
		}
		select {
		case <-ctx.Done():
			return got, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return got, nil
}

// compile compiles pol against the demo namespace's real pods.
func (r *run) compile(ctx context.Context, pol *v1alpha1.L7Policy, id compile.Identity) (*compile.Result, error) {
	inv, err := r.inventory(ctx)
	if err != nil {
		return nil, err
	}
	res, err := compile.Compile([]v1alpha1.L7Policy{*pol}, inv, compile.Options{Identity: id, TrustDomain: "cluster.local"})
	if err != nil {
		return nil, fmt.Errorf("compile: %w", err)
	}
	for _, p := range res.Policies {
		if p.Err != nil {
			return nil, fmt.Errorf("policy %s: %w", p.Name, p.Err)
		}
	}
	return res, nil
}

func (r *run) inventory(ctx context.Context) (compile.Inventory, error) {
	pl, err := r.cs.CoreV1().Pods(r.scNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		return compile.Inventory{}, err
	}
	nsObj, err := r.cs.CoreV1().Namespaces().Get(ctx, r.scNS, metav1.GetOptions{})
	if err != nil {
		return compile.Inventory{}, err
	}
	var pods []*corev1.Pod
	for i := range pl.Items {
		pods = append(pods, &pl.Items[i])
	}
	return input.Inventory(pods, []*corev1.Namespace{nsObj}), nil
}

// efMatches: the EnvoyFilter's spec is what the demo compiles in process
// from the same policy and pods (peer-certificate identities, as the
// controller does for sidecars).
func (r *run) efMatches(ctx context.Context, ef *unstructured.Unstructured, pol *v1alpha1.L7Policy) bool {
	if ef == nil {
		return false
	}
	res, err := r.compile(ctx, pol, compile.IdentityPeerCertificate)
	if err != nil {
		return false
	}
	inv, err := r.inventory(ctx)
	if err != nil {
		return false
	}
	objs, gerrs := envoyfilter.Build(res, inv.Pods, []v1alpha1.L7Policy{*pol})
	if len(objs) != 1 || len(gerrs) != 0 {
		return false
	}
	ok := sameJSON(objs[0].Object["spec"], ef.Object["spec"])
	return ok
}

// sameJSON compares two values by their JSON (numbers read back from the
// API are int64 or float64, Build's may be other types).
func sameJSON(a, b any) bool {
	norm := func(v any) any {
		j, err := json.Marshal(v)
		if err != nil {
			return err
		}
		var out any
		if err := json.Unmarshal(j, &out); err != nil {
			return err
		}
		return out
	}
	return reflect.DeepEqual(norm(a), norm(b))
}

func (r *run) refetchMatches(ctx context.Context, dyn dynamic.Interface, name string, pol *v1alpha1.L7Policy, ef **unstructured.Unstructured) bool {
	u, err := dyn.Resource(controller.EnvoyFilterGVR).Namespace(r.scNS).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return false
	}
	*ef = u
	return r.efMatches(ctx, u, pol)
}

func (r *run) hasWorkloadSelector(ef *unstructured.Unstructured, role string) bool {
	b, err := sigsyaml.Marshal(ef.Object["spec"])
	return err == nil && strings.Contains(string(b), "role: "+role) && strings.Contains(string(b), `/shop\.Orders/.*`)
}

func (r *run) printEnvoyFilter(ef *unstructured.Unstructured) {
	obj := ef.DeepCopy()
	unstructured.RemoveNestedField(obj.Object, "metadata", "managedFields")
	b, err := sigsyaml.Marshal(obj.Object)
	if err != nil {
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	const maxLines = 40
	if len(lines) > maxLines {
		r.say("  kubectl get envoyfilter -n %s %s -o yaml   (first %d of %d lines)", r.scNS, ef.GetName(), maxLines, len(lines))
	} else {
		r.say("  kubectl get envoyfilter -n %s %s -o yaml", r.scNS, ef.GetName())
	}
	for _, l := range lines[:min(maxLines, len(lines))] {
		r.say("    %s", l)
	}
}

// startController runs `sidelane controller` as its own process against
// the demo's API server (issue 15: the cluster-wide writer is not the
// node agent).
func (r *run) startController(ctx context.Context) error {
	logPath := filepath.Join(r.fp.WorkDir, "controller.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	args := []string{"controller", "--kubeconfig", r.kubeconfig, "--namespace", "default", "--identity", "demo", "--metrics-addr", ""}
	cmd := exec.Command(filepath.Join(r.opts.Bin, "sidelane"), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("sidelane controller: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(exited) }()
	r.defer_(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	err = r.eventually(ctx, func() bool {
		b, _ := os.ReadFile(logPath)
		return strings.Contains(string(b), "l7 policy controller started")
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	r.check(err == nil, "`sidelane controller --kubeconfig %s --namespace default --identity demo --metrics-addr \"\"` running as its own process (pid %d)", r.kubeconfig, cmd.Process.Pid)
	if err != nil {
		b, _ := os.ReadFile(logPath)
		return fmt.Errorf("controller not started: %w\n%s", err, tail(string(b), 2000))
	}
	return nil
}

// startGRPCPair makes a scratch netns holding the backend's, frontend's
// and reports' pod IPs on lo and starts the grpc-go pair in it: the server
// on backend:8080, the client's connections from a caller's pod IP.
func (r *run) startGRPCPair(ctx context.Context) (*grpcrbac.Pair, error) {
	name := podnet.UniqueName("sidelane-demo-l7-")
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", name, err, out)
	}
	r.fp.Netns = append(r.fp.Netns, name)
	r.defer_(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ips := []string{r.server.pod.Status.PodIP, r.client.pod.Status.PodIP, r.reports.pod.Status.PodIP}
	cmds := [][]string{{"link", "set", "lo", "up"}}
	for _, ip := range ips {
		cmds = append(cmds, []string{"addr", "add", ip + "/32", "dev", "lo"})
	}
	for _, c := range cmds {
		if out, err := exec.Command("ip", append([]string{"-n", name}, c...)...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("ip -n %s %s: %w: %s", name, strings.Join(c, " "), err, out)
		}
	}
	netns, err := ns.GetNS("/var/run/netns/" + name)
	if err != nil {
		return nil, err
	}
	r.defer_(func() { netns.Close() })
	var lis net.Listener
	err = netns.Do(func(ns.NetNS) error {
		var err error
		lis, err = net.Listen("tcp4", r.server.pod.Status.PodIP+":8080")
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("grpc server listener: %w", err)
	}
	pair, err := grpcrbac.Start(ctx, grpcrbac.Options{Log: r.opts.Log, Listener: lis,
		Dial: func(ctx context.Context, src netip.Addr, addr string) (net.Conn, error) {
			if !slices.Contains(ips, src.String()) {
				return nil, fmt.Errorf("no pod address %s in the scratch netns", src)
			}
			var c net.Conn
			err := netns.Do(func(ns.NetNS) error {
				d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
				var err error
				c, err = d.DialContext(ctx, "tcp4", addr)
				return err
			})
			return c, err
		}})
	if err != nil {
		lis.Close()
		return nil, err
	}
	r.defer_(pair.Close)
	return pair, nil
}

// rbacSummary lists the RBAC policies the compilation gives dst, each with
// the source addresses its principals name ("any source" without).
func rbacSummary(res *compile.Result, dst netip.AddrPort) []string {
	var out []string
	for _, d := range xds.Destinations(res) {
		if d.Addr != dst || d.RBAC.GetRules() == nil {
			continue
		}
		names := slices.Sorted(maps.Keys(d.RBAC.GetRules().GetPolicies()))
		for _, n := range names {
			pol := d.RBAC.GetRules().GetPolicies()[n]
			var srcs []string
			for _, pr := range pol.GetPrincipals() {
				b, _ := protojson.Marshal(pr)
				for _, m := range prefixRE.FindAllStringSubmatch(string(b), -1) {
					srcs = append(srcs, m[1])
				}
			}
			who := "any source"
			if len(srcs) > 0 {
				who = "from " + strings.Join(srcs, ", ")
			}
			out = append(out, fmt.Sprintf("%s: %s", n, who))
		}
	}
	return out
}

var prefixRE = regexp.MustCompile(`"addressPrefix":"([^"]+)"`)
