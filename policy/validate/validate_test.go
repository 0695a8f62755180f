package validate

import (
	"strings"
	"testing"
)

const good = `apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: p, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: 8080
      rules:
        - from: [{serviceAccounts: [shop/web]}]
          http: [{method: GET, path: "/items/[0-9]+", headers: [{name: x-a, present: false}]}]
`

func TestDecode(t *testing.T) {
	p, err := Decode([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if p.Spec.Ports[0].Rules[0].HTTP[0].Path != "/items/[0-9]+" || *p.Spec.Ports[0].Rules[0].HTTP[0].Headers[0].Present {
		t.Fatalf("decoded wrong: %+v", p.Spec)
	}
	for _, tc := range []struct{ name, in, want string }{
		{"unknown field", strings.Replace(good, "method: GET", "methods: [GET]", 1), `unknown field "methods"`},
		{"wrong kind", strings.Replace(good, "kind: L7Policy", "kind: NetworkPolicy", 1), `apiVersion/kind`},
		{"wrong version", strings.Replace(good, "v1alpha1", "v1", 1), `apiVersion/kind`},
		{"bad regex", strings.Replace(good, "[0-9]+", "[0-9+", 1), `spec.ports[0].rules[0].http[0].path: Invalid value: "/items/[0-9+": invalid RE2 regex`},
		{"bad port", strings.Replace(good, "8080", "0", 1), `spec.ports[0].port: Invalid value: 0`},
		{"not yaml", "{", `decode l7policy`},
		{"wrong type", strings.Replace(good, "port: 8080", "port: eighty", 1), `decode l7policy`},
		{"trailing", `{"apiVersion":"sidelane.io/v1alpha1"} {}`, `decode l7policy`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Decode([]byte(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) || p != nil {
				t.Fatalf("Decode = %v, %v; want error containing %q", p, err, tc.want)
			}
		})
	}
}

func TestPrincipal(t *testing.T) {
	for s, ok := range map[string]bool{
		"spiffe://cluster.local/ns/a/sa/b": true,
		"spiffe://cluster.local/ns/a/*":    true,
		"spiffe://*":                       true,
		"spiffe://td":                      true,
		"spiffe://":                        false,
		"cluster.local/ns/a/sa/b":          false,
		"spiffe://td/ns/*/sa/b":            false,
		"spiffe://td/ns/a b":               false,
		"spiffe:///ns/*":                   false,
	} {
		if err := Principal(s); (err == nil) != ok {
			t.Errorf("Principal(%q) = %v, want ok=%v", s, err, ok)
		}
	}
}

// FuzzDecode: Decode never panics, and whatever it accepts passes Policy
// validation again after a round trip through the deep copy.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(good))
	f.Add([]byte(`{"apiVersion":"sidelane.io/v1alpha1","kind":"L7Policy","metadata":{"name":"a","namespace":"b"},"spec":{"podSelector":{},"ports":[{"port":1}]}}`))
	f.Add([]byte(strings.Replace(good, "present: false", "regex: \"(a|b\"", 1)))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Decode(data)
		if err != nil {
			if p != nil {
				t.Fatal("policy returned with an error")
			}
			return
		}
		if errs := Policy(p.DeepCopy()); len(errs) > 0 {
			t.Fatalf("accepted policy fails validation: %v", errs)
		}
	})
}
