package compile

import (
	"net/netip"
	"testing"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/validate"
)

// FuzzCompile: every policy the validator accepts compiles, in both identity
// modes, to RBAC configs the Envoy protos accept (Compile returns an error
// only when ValidateAll rejects its own output).
func FuzzCompile(f *testing.F) {
	f.Add([]byte(`apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: p, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: 8080
      rules:
        - from: [{serviceAccounts: [shop/web], namespaces: [shop]}, {principals: ["spiffe://td/*"]}, {namespaceSelector: {}}]
          http: [{method: GET, path: "/a(b|c)*", host: "h", headers: [{name: x, regex: "y+"}, {name: z, present: false}]}]
    - port: 9090
`))
	f.Add([]byte(`{"apiVersion":"sidelane.io/v1alpha1","kind":"L7Policy","metadata":{"name":"a","namespace":"shop"},"spec":{"podSelector":{},"ports":[{"port":1,"rules":[{}]}]}}`))
	inv := Inventory{
		Namespaces: []Namespace{{Name: "shop", Labels: map[string]string{"a": "b"}}},
		Pods: []Pod{
			{Namespace: "shop", Name: "api", Labels: map[string]string{"app": "api"}, ServiceAccount: "api", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")}},
			{Namespace: "shop", Name: "web", Labels: map[string]string{"app": "web"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
		},
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := validate.Decode(data)
		if err != nil {
			return
		}
		p.Namespace = "shop" // make it select the inventory's pods
		for _, id := range []Identity{IdentityPeerCertificate, IdentitySourceIP} {
			res, err := Compile([]v1alpha1.L7Policy{*p}, inv, Options{Identity: id, TrustDomain: "cluster.local"})
			if err != nil {
				t.Fatalf("%s: valid policy does not compile: %v", id, err)
			}
			if res.Policies[0].Err != nil {
				t.Fatalf("decoded policy reported invalid: %v", res.Policies[0].Err)
			}
		}
	})
}
