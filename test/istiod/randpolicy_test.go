package istiod

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sidelane/sidelane/internal/istiodharness"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
	"github.com/sidelane/sidelane/policy/envoyfilter"
	"github.com/sidelane/sidelane/policy/validate"
)

// randomPolicies is a deterministic corpus of policies the validator
// accepts, built from every field of the API in random combinations (a
// seeded generator rather than go-fuzz's corpus: the fuzzer spends its
// time on inputs that do not decode, and istiod must see valid ones).
func randomPolicies(n int) []v1alpha1.L7Policy {
	r := rand.New(rand.NewPCG(16, 20))
	pick := func(xs ...string) string { return xs[r.IntN(len(xs))] }
	ptr := func(s string) *string { return &s }
	var out []v1alpha1.L7Policy
	for i := 0; len(out) < n; i++ {
		p := v1alpha1.L7Policy{
			TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.Group + "/" + v1alpha1.Version, Kind: v1alpha1.Kind},
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("rand-%d", i), Namespace: "shop"},
			Spec:       v1alpha1.L7PolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "api"}}},
		}
		used := map[int32]bool{}
		for range 1 + r.IntN(3) {
			port := []int32{8080, 9090, 15000, 1, 65535}[r.IntN(5)]
			if used[port] {
				continue
			}
			used[port] = true
			pr := v1alpha1.PortRules{Port: port}
			for range r.IntN(4) {
				var rule v1alpha1.Rule
				for range r.IntN(3) {
					var peer v1alpha1.Peer
					switch r.IntN(5) {
					case 0:
						peer.Principals = []string{pick("spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/ops/*", "spiffe://td/*")}
					case 1:
						peer.Namespaces = []string{pick("shop", "ops", "kube-system")}
					case 2:
						peer.ServiceAccounts = []string{pick("shop/web", "ops/prometheus")}
					case 3:
						peer.PodSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"app": pick("web", "api", "none")}}
					case 4:
						peer.NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"team": pick("infra", "shop")}}
					}
					rule.From = append(rule.From, peer)
				}
				for range r.IntN(3) {
					h := v1alpha1.HTTPRule{}
					if r.IntN(2) == 0 {
						h.Method = pick("GET", "GET|HEAD", "POST", "[A-Z]+")
					}
					if r.IntN(2) == 0 {
						h.Path = pick("/healthz", "/api/.*", "/shop\\.Items/(Get|List)", "/a(b|c)*")
					}
					if r.IntN(3) == 0 {
						h.Host = pick("api", "api(:[0-9]+)?", ".*\\.shop\\.svc")
					}
					for range r.IntN(3) {
						hm := v1alpha1.HeaderMatch{Name: pick("x-tenant", "x-request-id", "authorization")}
						switch r.IntN(3) {
						case 0:
							hm.Exact = ptr(pick("acme", "1"))
						case 1:
							hm.Regex = ptr(pick("[0-9]+", "Bearer .*"))
						case 2:
							b := r.IntN(2) == 0
							hm.Present = &b
						}
						h.Headers = append(h.Headers, hm)
					}
					rule.HTTP = append(rule.HTTP, h)
				}
				pr.Rules = append(pr.Rules, rule)
			}
			p.Spec.Ports = append(p.Spec.Ports, pr)
		}
		if len(p.Spec.Ports) == 0 || len(validate.Policy(&p)) > 0 {
			continue
		}
		out = append(out, p)
	}
	return out
}

// validateRandom: istiod's own EnvoyFilter validation allows what the
// generator writes for each of the random policies, alone.
func validateRandom(ctx context.Context, t *testing.T, ist *istiodharness.Istiod) {
	t.Helper()
	inv := compile.Inventory{
		Namespaces: []compile.Namespace{{Name: "shop", Labels: map[string]string{"team": "shop"}}, {Name: "ops", Labels: map[string]string{"team": "infra"}}},
		Pods: []compile.Pod{
			{Namespace: "shop", Name: "api-0", Labels: map[string]string{"app": "api"}, ServiceAccount: "api", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
			{Namespace: "shop", Name: "web-0", Labels: map[string]string{"app": "web"}, ServiceAccount: "web", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
			{Namespace: "ops", Name: "prom-0", Labels: map[string]string{"app": "prometheus"}, ServiceAccount: "prometheus", IPs: []netip.Addr{netip.MustParseAddr("10.0.1.2")}},
		},
	}
	n := 0
	for _, p := range randomPolicies(40) {
		res, err := compile.Compile([]v1alpha1.L7Policy{p}, inv, compile.Options{Identity: compile.IdentityPeerCertificate, TrustDomain: "cluster.local"})
		if err != nil {
			t.Fatalf("%s: %v", p.Name, err)
		}
		objs, _ := envoyfilter.Build(res, inv.Pods, []v1alpha1.L7Policy{p})
		for _, o := range objs {
			n++
			validateEnvoyFilter(ctx, t, ist, o)
		}
	}
	if n < 40 {
		t.Errorf("only %d EnvoyFilters from 40 random policies", n)
	}
	t.Logf("istiod validated %d EnvoyFilters of random policies", n)
}
