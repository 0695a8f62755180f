package istiod

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/internal/istiodharness"
	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
	"github.com/sidelane/sidelane/policy/controller"
	"github.com/sidelane/sidelane/policy/envoyfilter"
	"github.com/sidelane/sidelane/policy/input"
)

// The pods of the test. api-0 is protected; web-0 (other labels) and
// other/api-0 (same labels, other namespace) must stay untouched.
var (
	apiPod   = istiodharness.Proxy{IP: "10.10.0.10", Pod: "api-0", Namespace: "shop", ServiceAccount: "api", Labels: map[string]string{"app": "api"}}
	webPod   = istiodharness.Proxy{IP: "10.10.0.11", Pod: "web-0", Namespace: "shop", ServiceAccount: "web", Labels: map[string]string{"app": "web"}}
	otherPod = istiodharness.Proxy{IP: "10.10.1.10", Pod: "api-0", Namespace: "other", ServiceAccount: "api", Labels: map[string]string{"app": "api"}}
	// gwPod is an Istio gateway that the policy's selector (and so the
	// EnvoyFilter's workload selector) also catches.
	gwPod = istiodharness.Proxy{Type: "router", IP: "10.10.0.20", Pod: "gw-0", Namespace: "shop", ServiceAccount: "gw", Labels: map[string]string{"app": "api", "istio": "ingressgateway"}}
)

// gateway gives gwPod an HTTP listener on 8080, the protected port number.
const gateway = `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
`

// Container ports of api-0: 8080 (Service port "http": HTTP), 9090
// (Service port "metrics": protocol sniffed), 9091 ("http-admin": HTTP,
// never protected), 7070 (in no Service: istiod gives it no chain of its
// own, its traffic takes the catch-all chains).
const (
	portHTTP      = 8080
	portSniffed   = 9090
	portAdmin     = 9091
	portNoService = 7070
)

// servicePorts are the container ports a Service declares: only they get
// filter chains of their own.
var servicePorts = map[uint32]bool{portHTTP: true, portSniffed: true, portAdmin: true}

// Istio's catch-all (passthrough) chains of the inbound listener.
const (
	catchAllHTTP = "virtualInbound-catchall-http"
	catchAllTCP  = "virtualInbound"
)

const policyV1 = `apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: 8080
      rules:
        - from: [{serviceAccounts: [shop/web]}]
          http: [{method: GET, path: /items}]
`

// policyV2 changes 8080's rules and protects the sniffed port 9090 and
// the port no Service declares.
const policyV2 = `apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: 7070
      rules:
        - from: [{serviceAccounts: [shop/web]}]
          http: [{path: /internal}]
    - port: 8080
      rules:
        - from: [{namespaces: [ops]}]
          http: [{path: /metrics}]
    - port: 9090
      rules:
        - from: [{serviceAccounts: [shop/web]}]
`

// jwtAuthnFilter is Envoy's JWT authentication filter, Istio's authn for
// RequestAuthentication.
const jwtAuthnFilter = "envoy.filters.http.jwt_authn"

// requestAuthn makes Istio add its JWT authn filter to the inbound chains
// (JWKS inline, so istiod fetches nothing).
func requestAuthn(t *testing.T) string {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	jwks, err := json.Marshal(map[string]any{"keys": []any{map[string]any{
		"kty": "RSA", "kid": "test", "alg": "RS256", "use": "sig", "e": "AQAB",
		"n": base64.RawURLEncoding.EncodeToString(key.PublicKey.N.Bytes()),
	}}})
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  jwtRules: [{issuer: "https://issuer.example", jwks: %q}]
`, jwks)
}

const denyAdmin = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
`

// denyGet is an Istio DENY that disagrees with policyMTLS (which lets
// shop/web call Items/Get).
const denyGet = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-get, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/shop.Items/Get"]}}]}]
`

// TestIstiodAppliesL7Policy: L7Policy -> sidelane's policy controller ->
// EnvoyFilter -> real istiod -> the LDS each sidecar gets.
func TestIstiodAppliesL7Policy(t *testing.T) {
	c := kubeharness.Start(t)
	kubectl(t, c, "apply", "--server-side", "-f", testenv.RepoRoot(t)+"/charts/sidelane/crds/sidelane.io_l7policies.yaml")
	kubectl(t, c, "wait", "--for=condition=Established", "--timeout=120s", "crd/l7policies.sidelane.io")
	ist := istiodharness.Start(t, c, "PILOT_ENVOY_FILTER_STATS=true")
	t.Logf("istiod %s (Istio %s), CRDs %s", ist.Version, ist.ProxyVersion, ist.CRDs)

	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	t.Run("istiod's validation accepts the generator's goldens", func(t *testing.T) {
		validateGoldens(ctx, t, ist)
		validateRandom(ctx, t, ist)
	})
	kube := kubernetes.NewForConfigOrDie(c.RESTConfig)
	dyn := dynamic.NewForConfigOrDie(c.RESTConfig)
	for _, ns := range []string{"shop", "other"} {
		if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []istiodharness.Proxy{apiPod, webPod, otherPod, gwPod} {
		createPod(ctx, t, kube, p)
	}
	kubectl(t, c, "apply", "-f", "-", gateway)
	createService(ctx, t, kube, "shop", "api", "api",
		corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromInt32(portHTTP)},
		corev1.ServicePort{Name: "metrics", Port: 9090, TargetPort: intstr.FromInt32(portSniffed)},
		corev1.ServicePort{Name: "http-admin", Port: 81, TargetPort: intstr.FromInt32(portAdmin)})
	createService(ctx, t, kube, "shop", "web", "web", corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromInt32(portHTTP)})
	createService(ctx, t, kube, "other", "api", "api", corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromInt32(portHTTP)})

	// sidelane's policy writer, in-process (no Lease: it is the only one).
	ctrl, err := controller.New(slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})), kube, dyn, "cluster.local", prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	ctrl.Start(runCtx)
	go func() {
		defer close(done)
		if err := ctrl.Run(runCtx); err != nil {
			t.Error(err)
		}
	}()
	t.Cleanup(func() { stop(); <-done })

	e := &env{t: t, ctx: ctx, ist: ist, dyn: dyn}

	// Before any policy: Istio's own inbound chain, for the record.
	before, _ := e.waitChains(apiPod, "inbound chains for 8080", func(h []hcmChain, _ []tcpChain) string {
		if len(inbound(h, portHTTP)) == 0 {
			return "no virtualInbound HTTP chain for port 8080 yet"
		}
		return ""
	})
	for _, ch := range inbound(before, portHTTP) {
		t.Logf("istio, no policy: %s", ch)
	}

	// 1. Create.
	e.apply(policyV1)
	want := e.wantRBAC(portHTTP)
	if !strings.Contains(protojson.Format(want.http[portHTTP]), "spiffe://cluster.local/ns/shop/sa/web") {
		t.Fatalf("compiled rules do not name the caller: %s", protojson.Format(want.http[portHTTP]))
	}
	chains, _ := e.waitChains(apiPod, "sidelane filter on 8080", protectedOn(want))
	for _, ch := range inbound(chains, portHTTP) {
		t.Logf("policy v1: %s", ch)
	}
	e.checkAbsent(webPod, "a pod the selector does not match")
	e.checkAbsent(otherPod, "a pod with the same labels in another namespace")
	e.waitChains(gwPod, "a gateway the selector matches", func(h []hcmChain, tc []tcpChain) string {
		if len(h) == 0 {
			return "the gateway has no HTTP listener yet"
		}
		for _, ch := range h {
			if ch.sidelanes > 0 {
				return fmt.Sprintf("the gateway got the filter: %s", ch)
			}
		}
		for _, ch := range tc {
			if ch.sidelanes > 0 {
				return fmt.Sprintf("the gateway got the network filter: %s", ch)
			}
		}
		return ""
	})

	// 2. Update: new rules on 8080, the sniffed port 9090 protected too.
	e.apply(policyV2)
	wantV2 := e.wantRBAC(portNoService, portHTTP, portSniffed)
	if proto.Equal(wantV2.http[portHTTP], want.http[portHTTP]) {
		t.Fatal("policy v2 compiled to the same rules as v1")
	}
	// Non-HTTP connections to 9090 are allowed by its one rule without an
	// http part (callers from shop/web), and on 8080 by none.
	if got := wantV2.tcp[portSniffed].GetRules().GetPolicies(); len(got) != 1 || !strings.Contains(protojson.Format(wantV2.tcp[portSniffed]), "spiffe://cluster.local/ns/shop/sa/web") {
		t.Errorf("TCP rules for 9090: %s", protojson.Format(wantV2.tcp[portSniffed]))
	}
	if got := wantV2.tcp[portHTTP].GetRules().GetPolicies(); len(got) != 0 {
		t.Errorf("TCP rules for 8080 allow something: %s", protojson.Format(wantV2.tcp[portHTTP]))
	}
	// The catch-all chains carry every protected port's rules, each behind
	// its destination_port, and allow the ports no policy lists.
	catch := wantV2.catchHTTP.GetRules().GetPolicies()
	if r := catch["shop/api/port-7070/rule-0"]; len(catch) != 4 || catch["sidelane/unprotected-ports"] == nil ||
		r.GetPermissions()[0].GetAndRules().GetRules()[0].GetDestinationPort() != portNoService {
		t.Errorf("catch-all HTTP rules: %s", protojson.Format(wantV2.catchHTTP))
	}
	chains, tcp := e.waitChains(apiPod, "updated sidelane filter", protectedOn(wantV2))
	for _, ch := range inbound(chains, portSniffed) {
		t.Logf("policy v2, sniffed port: %s", ch)
	}
	for _, ch := range inboundTCP(tcp, portSniffed) {
		t.Logf("policy v2, sniffed port, TCP: %s", ch)
	}
	// istiod records the previous push's patch results at the next push.
	e.checkMetricApplied()

	// 3. Istio's own DENY AuthorizationPolicy on the same pod: both filters,
	// Istio's first.
	kubectl(t, c, "apply", "-f", "-", denyAdmin)
	kubectl(t, c, "apply", "-f", "-", requestAuthn(t))
	chains, _ = e.waitChains(apiPod, "istio jwt authn, rbac and sidelane", func(h []hcmChain, tc []tcpChain) string {
		if msg := protectedOn(wantV2)(h, tc); msg != "" {
			return msg
		}
		for _, ch := range inbound(h, portHTTP) {
			authn, istio, ours := slices.Index(ch.Filters, jwtAuthnFilter), slices.Index(ch.Filters, wellknown.HTTPRoleBasedAccessControl), slices.Index(ch.Filters, envoyfilter.FilterName)
			if authn < 0 || istio < 0 || authn > ours || istio > ours {
				return fmt.Sprintf("%s: want Istio's %s and %s before %s", ch, jwtAuthnFilter, wellknown.HTTPRoleBasedAccessControl, envoyfilter.FilterName)
			}
		}
		return ""
	})
	for _, ch := range inbound(chains, portHTTP) {
		t.Logf("policy v2 + AuthorizationPolicy DENY + RequestAuthentication: %s", ch)
	}
	kubectl(t, c, "delete", "authorizationpolicy", "-n", "shop", "deny-admin")
	kubectl(t, c, "delete", "requestauthentication", "-n", "shop", "jwt")

	// 4. Semantics: the RBAC istiod sends the sidecar, enforced by grpc-go,
	// gives agent/xds's verdicts for the same policy.
	e.apply(policyMTLS)
	wantMTLS := e.wantRBAC(portHTTP)
	chains, _ = e.waitChains(apiPod, "mTLS policy", protectedOn(wantMTLS))
	t.Run("grpc-go enforces istiod's RBAC", func(t *testing.T) {
		enforce(ctx, t, nil, nil, inbound(chains, portHTTP)[0].Sidelane, verdictsMTLS)
	})

	// 5. An Istio DENY and the L7Policy on the same pod, enforced together
	// as istiod chains them: a request passes only if both allow it, so
	// Istio's DENY wins over an L7Policy allow, and an L7Policy deny wins
	// over Istio's silence.
	kubectl(t, c, "apply", "-f", "-", denyGet)
	chains, _ = e.waitChains(apiPod, "mTLS policy + DENY", func(h []hcmChain, tc []tcpChain) string {
		if msg := protectedOn(wantMTLS)(h, tc); msg != "" {
			return msg
		}
		if inbound(h, portHTTP)[0].IstioRBAC == nil {
			return "no Istio RBAC filter yet"
		}
		return ""
	})
	t.Run("grpc-go enforces Istio's DENY and sidelane's RBAC together", func(t *testing.T) {
		ch := inbound(chains, portHTTP)[0]
		enforce(ctx, t, nil, []*hcmv3.HttpFilter{ch.IstioRBAC}, ch.Sidelane, []verdict{
			{"web", "/shop.Items/Get", codes.PermissionDenied},              // L7Policy allows, Istio denies
			{"web", "/shop.Items/Delete", codes.OK},                         // both allow
			{"prom", "/grpc.health.v1.Health/Check", codes.OK},              // both allow
			{"web", "/grpc.health.v1.Health/Check", codes.PermissionDenied}, // Istio allows, L7Policy denies
			{"prom", "/shop.Items/Get", codes.PermissionDenied},             // both deny
		})
	})
	kubectl(t, c, "delete", "authorizationpolicy", "-n", "shop", "deny-get")

	// 6. The catch-all chains' rules, enforced: the same policy on a port no
	// Service declares (the grpc-go server's own port, so destination_port
	// is what grpc-go sees), taken from istiod's virtualInbound-catchall-http.
	appLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	appPort := uint32(appLis.Addr().(*net.TCPAddr).Port)
	e.apply(strings.Replace(policyMTLS, "port: 8080", fmt.Sprintf("port: %d", appPort), 1))
	wantCatch := e.wantRBAC(appPort)
	chains, _ = e.waitChains(apiPod, "catch-all rules for the grpc port", protectedOn(wantCatch))
	t.Run("grpc-go enforces istiod's catch-all RBAC", func(t *testing.T) {
		for _, ch := range chains {
			if ch.Listener == virtualInbound && ch.Chain == catchAllHTTP {
				enforce(ctx, t, appLis, nil, ch.Sidelane, verdictsMTLS)
				return
			}
		}
		t.Fatal("no catch-all chain")
	})

	// 7. Delete: the filter goes away everywhere.
	if err := dyn.Resource(input.L7PolicyGVR).Namespace("shop").Delete(ctx, "api", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitChains(apiPod, "sidelane filter removed", func(h []hcmChain, tc []tcpChain) string {
		for _, ch := range h {
			if ch.sidelanes > 0 {
				return fmt.Sprintf("still there: %s", ch)
			}
		}
		for _, ch := range tc {
			if ch.sidelanes > 0 {
				return fmt.Sprintf("still there: %s", ch)
			}
		}
		return ""
	})
}

// validateGoldens runs every EnvoyFilter in policy/envoyfilter's golden
// file, and those rendered from policy/compile's test cases, through
// istiod's own validation, and a broken one (a patch without
// a value) to show the validation is really applied.
func validateGoldens(ctx context.Context, t *testing.T, ist *istiodharness.Istiod) {
	b, err := os.ReadFile(testenv.RepoRoot(t) + "/policy/envoyfilter/testdata/envoyfilters.golden.yaml")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	var first *unstructured.Unstructured
	for _, doc := range strings.Split(string(b), "---\n") {
		if strings.TrimSpace(doc) == "" || strings.HasPrefix(doc, "# error") {
			continue
		}
		var u unstructured.Unstructured
		if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
			t.Fatal(err)
		}
		n++
		if first == nil {
			first = u.DeepCopy()
		}
		validateEnvoyFilter(ctx, t, ist, &u)
	}
	if n == 0 {
		t.Fatal("no EnvoyFilter in the golden file")
	}
	// The compiler's golden inputs (every field, combinations, default
	// deny), rendered for sidecars.
	cases, err := filepath.Glob(testenv.RepoRoot(t) + "/policy/compile/testdata/*.yaml")
	if err != nil || len(cases) == 0 {
		t.Fatalf("compiler test cases: %v", err)
	}
	for _, f := range cases {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var tc struct {
			Options   compile.Options     `json:"options"`
			Inventory compile.Inventory   `json:"inventory"`
			Policies  []v1alpha1.L7Policy `json:"policies"`
		}
		if err := yaml.UnmarshalStrict(b, &tc); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		res, err := compile.Compile(tc.Policies, tc.Inventory, compile.Options{Identity: compile.IdentityPeerCertificate, TrustDomain: "cluster.local"})
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		objs, _ := envoyfilter.Build(res, tc.Inventory.Pods, tc.Policies)
		for _, o := range objs {
			n++
			validateEnvoyFilter(ctx, t, ist, o)
		}
	}
	t.Logf("istiod validated %d EnvoyFilters", n)
	patches, _, _ := unstructured.NestedSlice(first.Object, "spec", "configPatches")
	unstructured.RemoveNestedField(patches[0].(map[string]any), "patch", "value")
	if err := unstructured.SetNestedSlice(first.Object, patches, "spec", "configPatches"); err != nil {
		t.Fatal(err)
	}
	allowed, msg, _, err := ist.Validate(ctx, first)
	if err != nil {
		t.Fatal(err)
	}
	if allowed {
		t.Errorf("istiod allowed an INSERT_BEFORE patch without a value")
	}
	t.Logf("istiod on a patch without value: %s", msg)
}

// envoyFilterWarning is the warning istiod gives every EnvoyFilter.
const envoyFilterWarning = "EnvoyFilter exposes internal implementation details that may change at any time."

// validateEnvoyFilter: istiod's validation allows u, with no warning but
// the one every EnvoyFilter gets.
func validateEnvoyFilter(ctx context.Context, t *testing.T, ist *istiodharness.Istiod, u *unstructured.Unstructured) {
	t.Helper()
	allowed, msg, warnings, err := ist.Validate(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	warnings = slices.DeleteFunc(warnings, func(w string) bool { return strings.HasPrefix(w, envoyFilterWarning) })
	if !allowed || len(warnings) > 0 {
		t.Errorf("istiod's validation of EnvoyFilter %s: allowed %t, %q, warnings %q", u.GetName(), allowed, msg, warnings)
	}
}

type env struct {
	t   *testing.T
	ctx context.Context
	ist *istiodharness.Istiod
	dyn dynamic.Interface
}

func (e *env) apply(doc string) {
	e.t.Helper()
	var u unstructured.Unstructured
	if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
		e.t.Fatal(err)
	}
	if _, err := e.dyn.Resource(input.L7PolicyGVR).Namespace(u.GetNamespace()).Apply(e.ctx, u.GetName(), &u, metav1.ApplyOptions{FieldManager: "test", Force: true}); err != nil {
		e.t.Fatal(err)
	}
}

// rules is what istiod must hand the sidecar, unchanged, per port: the
// HTTP RBAC for the HTTP chains and the network RBAC for the TCP chains.
type rules struct {
	http map[uint32]*rbacfilterv3.RBAC
	tcp  map[uint32]*netrbacv3.RBAC
	// catch-all chains (ports no Service declares)
	catchHTTP *rbacfilterv3.RBAC
	catchTCP  *netrbacv3.RBAC
}

// wantRBAC waits for sidelane's EnvoyFilter for the api policy to have an
// HTTP and a network patch per port (each kind in the policy's port order)
// plus one of each for the catch-all chains (matched by listener name), and
// returns their configs. The ports come from the test, not from
// the patches' match, so a wrong match shows up in istiod's output.
func (e *env) wantRBAC(ports ...uint32) rules {
	e.t.Helper()
	var last string
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		ef, err := e.dyn.Resource(controller.EnvoyFilterGVR).Namespace("shop").Get(e.ctx, envoyfilter.Name([]string{"api"}), metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			continue
		}
		validateEnvoyFilter(e.ctx, e.t, e.ist, ef)
		patches, _, _ := unstructured.NestedSlice(ef.Object, "spec", "configPatches")
		out := rules{http: map[uint32]*rbacfilterv3.RBAC{}, tcp: map[uint32]*netrbacv3.RBAC{}}
		var nHTTP, nTCP int
		stale := false
		for _, p := range patches {
			pm := p.(map[string]any)
			typed, _, _ := unstructured.NestedMap(pm, "patch", "value", "typed_config")
			delete(typed, "@type")
			b, err := json.Marshal(typed)
			if err != nil {
				e.t.Fatal(err)
			}
			if name, _, _ := unstructured.NestedString(pm, "match", "listener", "name"); name != "" {
				switch pm["applyTo"] {
				case "HTTP_FILTER":
					out.catchHTTP = &rbacfilterv3.RBAC{}
					if err := protojson.Unmarshal(b, out.catchHTTP); err != nil {
						e.t.Fatalf("catch-all HTTP_FILTER typed_config is not RBAC: %v", err)
					}
				case "NETWORK_FILTER":
					out.catchTCP = &netrbacv3.RBAC{}
					if err := protojson.Unmarshal(b, out.catchTCP); err != nil {
						e.t.Fatalf("catch-all NETWORK_FILTER typed_config is not network RBAC: %v", err)
					}
				}
				continue
			}
			switch pm["applyTo"] {
			case "HTTP_FILTER":
				var r rbacfilterv3.RBAC
				if err := protojson.Unmarshal(b, &r); err != nil {
					e.t.Fatalf("HTTP_FILTER typed_config is not RBAC: %v", err)
				}
				if nHTTP < len(ports) {
					out.http[ports[nHTTP]] = &r
					// The compiler names rules <ns>/<policy>/port-<n>/rule-<i>:
					// a filter still naming another port is a stale one.
					for name := range r.GetRules().GetPolicies() {
						if !strings.Contains(name, fmt.Sprintf("/port-%d/", ports[nHTTP])) {
							stale = true
						}
					}
				}
				nHTTP++
			case "NETWORK_FILTER":
				var r netrbacv3.RBAC
				if err := protojson.Unmarshal(b, &r); err != nil {
					e.t.Fatalf("NETWORK_FILTER typed_config is not network RBAC: %v", err)
				}
				if nTCP < len(ports) {
					out.tcp[ports[nTCP]] = &r
				}
				nTCP++
			}
		}
		if stale {
			last = "the EnvoyFilter still has another policy version's rules"
			continue
		}
		if nHTTP != len(ports) || nTCP != len(ports) || out.catchHTTP == nil || out.catchTCP == nil {
			last = fmt.Sprintf("%d HTTP and %d network patches, want %d of each, and the catch-all pair (present: %t, %t)", nHTTP, nTCP, len(ports), out.catchHTTP != nil, out.catchTCP != nil)
			continue
		}
		return out
	}
	e.t.Fatalf("EnvoyFilter: %s", last)
	return rules{}
}

// waitChains fetches p's listeners from istiod (a new ADS connection each
// time) until cond is satisfied, validates everything istiod sent, and
// returns the HTTP chains.
func (e *env) waitChains(p istiodharness.Proxy, what string, cond func([]hcmChain, []tcpChain) string) ([]hcmChain, []tcpChain) {
	e.t.Helper()
	var last string
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
		ls, err := e.ist.Listeners(e.ctx, p)
		if err != nil {
			last = err.Error()
			continue
		}
		h, tc := view(e.t, ls)
		if last = cond(h, tc); last == "" {
			validateListeners(e.t, ls)
			return h, tc
		}
	}
	e.t.Fatalf("%s for %s: %s", what, p.NodeID(), last)
	return nil, nil
}

// protectedOn: sidelane's HTTP filter, with exactly the given rules, once
// in every inbound HTTP chain of each given port, right before the router
// and after all of Istio's own filters; sidelane's network RBAC filter once
// in every inbound TCP chain of each port, right before tcp_proxy; both in
// the catch-all chains with the catch-all rules; neither in any other chain
// of any listener.
func protectedOn(want rules) func([]hcmChain, []tcpChain) string {
	return func(h []hcmChain, tc []tcpChain) string {
		catchHTTP, catchTCP := 0, 0
		for _, ch := range h {
			if ch.Listener != virtualInbound || ch.Chain != catchAllHTTP {
				continue
			}
			catchHTTP++
			if ch.sidelanes != 1 || slices.Index(ch.Filters, envoyfilter.FilterName) != len(ch.Filters)-2 {
				return fmt.Sprintf("catch-all %s: want %s once, right before the router", ch, envoyfilter.FilterName)
			}
			if !proto.Equal(ch.Sidelane, want.catchHTTP) {
				return fmt.Sprintf("catch-all %s: rules %s, want %s", ch, protojson.Format(ch.Sidelane), protojson.Format(want.catchHTTP))
			}
		}
		for _, ch := range tc {
			if ch.Listener != virtualInbound || ch.Chain != catchAllTCP {
				continue
			}
			catchTCP++
			if ch.sidelanes != 1 || slices.Index(ch.Filters, tcpFilterName) != len(ch.Filters)-2 {
				return fmt.Sprintf("catch-all TCP %s: want %s once, right before tcp_proxy", ch, tcpFilterName)
			}
			if !proto.Equal(ch.Sidelane, want.catchTCP) {
				return fmt.Sprintf("catch-all TCP %s: rules %s, want %s", ch, protojson.Format(ch.Sidelane), protojson.Format(want.catchTCP))
			}
		}
		if catchHTTP == 0 || catchTCP == 0 {
			return fmt.Sprintf("%d catch-all HTTP and %d catch-all TCP chains", catchHTTP, catchTCP)
		}
		for port, r := range want.http {
			if !servicePorts[port] {
				continue // no chain of its own: covered by the catch-all chains
			}
			chains := inbound(h, port)
			if len(chains) == 0 {
				return fmt.Sprintf("no inbound HTTP chain for port %d", port)
			}
			for _, ch := range chains {
				if ch.sidelanes != 1 {
					return fmt.Sprintf("%s: %d sidelane filters, want 1", ch, ch.sidelanes)
				}
				i := slices.Index(ch.Filters, envoyfilter.FilterName)
				if i != len(ch.Filters)-2 || ch.Filters[len(ch.Filters)-1] != wellknown.Router {
					return fmt.Sprintf("%s: want %s right before %s (last)", ch, envoyfilter.FilterName, wellknown.Router)
				}
				if !proto.Equal(ch.Sidelane, r) {
					return fmt.Sprintf("%s: rules %s, want %s", ch, protojson.Format(ch.Sidelane), protojson.Format(r))
				}
			}
			for _, ch := range inboundTCP(tc, port) {
				if ch.sidelanes != 1 {
					return fmt.Sprintf("TCP chain %s: %d sidelane network filters, want 1 (non-HTTP traffic would bypass the policy)", ch, ch.sidelanes)
				}
				i := slices.Index(ch.Filters, tcpFilterName)
				if i != len(ch.Filters)-2 || ch.Filters[len(ch.Filters)-1] != wellknown.TCPProxy {
					return fmt.Sprintf("TCP chain %s: want %s right before %s (last)", ch, tcpFilterName, wellknown.TCPProxy)
				}
				if !proto.Equal(ch.Sidelane, want.tcp[port]) {
					return fmt.Sprintf("TCP chain %s: rules %s, want %s", ch, protojson.Format(ch.Sidelane), protojson.Format(want.tcp[port]))
				}
			}
		}
		for _, ch := range h {
			if _, ok := want.http[ch.Port]; ok && ch.Listener == virtualInbound || ch.Listener == virtualInbound && ch.Chain == catchAllHTTP {
				continue
			}
			if ch.sidelanes > 0 {
				return fmt.Sprintf("sidelane filter where no policy asked for it: %s", ch)
			}
		}
		for _, ch := range tc {
			if _, ok := want.http[ch.Port]; ok && ch.Listener == virtualInbound || ch.Listener == virtualInbound && ch.Chain == catchAllTCP {
				continue
			}
			if ch.sidelanes > 0 {
				return fmt.Sprintf("sidelane network filter where no policy asked for it: %s", ch)
			}
		}
		return ""
	}
}

// checkAbsent: p's listeners carry no sidelane filter (and are there at
// all: p's own inbound chain for 8080 exists).
func (e *env) checkAbsent(p istiodharness.Proxy, why string) {
	e.t.Helper()
	e.waitChains(p, why, func(h []hcmChain, tc []tcpChain) string {
		if len(inbound(h, portHTTP)) == 0 {
			return "no inbound HTTP chain for port 8080"
		}
		for _, ch := range h {
			if ch.sidelanes > 0 {
				return fmt.Sprintf("%s (%s) got the filter: %s", p.NodeID(), why, ch)
			}
		}
		for _, ch := range tc {
			if ch.sidelanes > 0 {
				return fmt.Sprintf("%s (%s) got the network filter: %s", p.NodeID(), why, ch)
			}
		}
		return ""
	})
}

// checkMetricApplied: with PILOT_ENVOY_FILTER_STATS=true istiod reports the
// patch as applied.
func (e *env) checkMetricApplied() {
	e.t.Helper()
	want := fmt.Sprintf(`pilot_envoy_filter_status{name="shop/%s",patch="httpfilter",result="applied"} 1`, envoyfilter.Name([]string{"api"}))
	var last string
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		m, err := e.ist.Metrics(e.ctx)
		if err != nil {
			last = err.Error()
			continue
		}
		if strings.Contains(m, want) {
			return
		}
		var lines []string
		for _, l := range strings.Split(m, "\n") {
			if strings.HasPrefix(l, "pilot_envoy_filter_status") {
				lines = append(lines, l)
			}
		}
		last = strings.Join(lines, "\n")
	}
	e.t.Errorf("istiod metric %s missing; have:\n%s", want, last)
}

// validateListeners runs ValidateAll on every listener istiod sent and
// everything inside their Anys.
func validateListeners(t *testing.T, ls []*listenerv3.Listener) {
	t.Helper()
	var v validation
	for _, l := range ls {
		validateDeep(l, l.GetName(), &v)
	}
	for _, err := range v.errs {
		t.Errorf("istiod sent an invalid resource: %s", err)
	}
	if v.checked < len(ls) {
		t.Errorf("validated %d messages for %d listeners", v.checked, len(ls))
	}
	t.Logf("validated %d messages in %d listeners (%s); Istio-only types not validated: %s", v.checked, len(ls), istiodharness.ListenerNames(ls), v.opaqueTypes())
}

func createPod(ctx context.Context, t *testing.T, kube kubernetes.Interface, p istiodharness.Proxy) {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Pod, Namespace: p.Namespace, Labels: p.Labels},
		Spec: corev1.PodSpec{ServiceAccountName: p.ServiceAccount, NodeName: "node-a", Containers: []corev1.Container{{
			Name: "app", Image: "app",
			Ports: []corev1.ContainerPort{{ContainerPort: portHTTP}, {ContainerPort: portSniffed}, {ContainerPort: portAdmin}, {ContainerPort: portNoService}},
		}}},
	}
	created, err := kube.CoreV1().Pods(p.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	created.Status = corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: p.IP, PodIPs: []corev1.PodIP{{IP: p.IP}}, HostIP: "192.0.2.1",
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
	}
	if _, err := kube.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func createService(ctx context.Context, t *testing.T, kube kubernetes.Interface, ns, name, app string, ports ...corev1.ServicePort) {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": app}, Ports: ports},
	}
	if _, err := kube.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// kubectl runs kubectl against c; a last argument after "-" is its stdin.
func kubectl(t *testing.T, c *kubeharness.Cluster, args ...string) {
	t.Helper()
	var stdin string
	if i := slices.Index(args, "-"); i >= 0 && i == len(args)-2 {
		stdin, args = args[len(args)-1], args[:len(args)-1]
	}
	cmd := exec.Command(c.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
