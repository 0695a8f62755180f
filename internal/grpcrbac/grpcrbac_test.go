package grpcrbac

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
)

const policyYAML = `metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: PORT
      rules:
        - http: [{path: '/grpc\.health\.v1\.Health/Check'}]
        - from: [{podSelector: {matchLabels: {app: FROM}}}]
          http: [{path: '/shop\.Orders/.*'}]`

// TestPairEnforcesAndFollowsPolicy: an allowed call succeeds, a denied
// one gets PermissionDenied, and a policy change flips the verdict.
func TestPairEnforcesAndFollowsPolicy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p, err := Start(ctx, Options{Listener: lis})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	web, job := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3")
	inv := compile.Inventory{Pods: []compile.Pod{
		{Namespace: "shop", Name: "api", Labels: map[string]string{"app": "api"}, IPs: []netip.Addr{p.Addr().Addr()}},
		{Namespace: "shop", Name: "web", Labels: map[string]string{"app": "web"}, IPs: []netip.Addr{web}},
		{Namespace: "shop", Name: "job", Labels: map[string]string{"app": "job"}, IPs: []netip.Addr{job}},
	}}
	apply := func(from string) {
		t.Helper()
		doc := strings.NewReplacer("PORT", fmt.Sprint(p.Addr().Port()), "FROM", from).Replace(policyYAML)
		var pol v1alpha1.L7Policy
		if err := yaml.UnmarshalStrict([]byte(doc), &pol); err != nil {
			t.Fatal(err)
		}
		res, err := compile.Compile([]v1alpha1.L7Policy{pol}, inv, compile.Options{Identity: compile.IdentitySourceIP, TrustDomain: "cluster.local"})
		if err != nil || res.Policies[0].Err != nil {
			t.Fatalf("compile: %v %v", err, res.Policies[0].Err)
		}
		if _, err := p.Apply(ctx, res); err != nil {
			t.Fatal(err)
		}
	}
	expect := func(src netip.Addr, method string, want codes.Code) {
		t.Helper()
		var got codes.Code
		for range 50 { // a new listener applies to new connections once ACKed
			var err error
			if got, err = p.Call(ctx, src, method); err != nil {
				t.Fatal(err)
			}
			if got == want {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("%s from %s: %v, want %v", method, src, got, want)
	}
	// Unprotected before any policy.
	expect(job, "/shop.Orders/List", codes.OK)
	apply("web")
	expect(job, "/grpc.health.v1.Health/Check", codes.OK)
	expect(web, "/shop.Orders/List", codes.OK)
	expect(job, "/shop.Orders/List", codes.PermissionDenied)
	apply("job")
	expect(job, "/shop.Orders/List", codes.OK)
	expect(web, "/shop.Orders/List", codes.PermissionDenied)
}

func TestStartRefusesWildcardListener(t *testing.T) {
	lis, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	if _, err := Start(context.Background(), Options{Listener: lis}); err == nil {
		t.Fatal("Start accepted a wildcard listener")
	}
}
