package run

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/sidelane/sidelane/bench/report"
	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/envoyfilter"
)

// inboundChain is a virtualInbound HTTP chain for port whose sidelane
// filter (when path is not empty) allows exactly that path.
func inboundChain(t *testing.T, port uint32, path string) *listenerv3.FilterChain {
	t.Helper()
	h := &hcmv3.HttpConnectionManager{}
	if path != "" {
		rbac := &rbacfilterv3.RBAC{Rules: &rbacv3.RBAC{Policies: map[string]*rbacv3.Policy{"shop/bench/port-8080/rule-0": {
			Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{
				Rule: &matcherv3.PathMatcher_Path{Path: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: path}}},
			}}}},
			Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
		}}}}
		h.HttpFilters = append(h.HttpFilters, &hcmv3.HttpFilter{Name: envoyfilter.FilterName, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, rbac)}})
	}
	h.HttpFilters = append(h.HttpFilters, &hcmv3.HttpFilter{Name: wellknown.Router})
	h.RouteSpecifier = &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{Name: "inbound|8080||"}}
	return &listenerv3.FilterChain{
		Name:             "0.0.0.0_8080",
		FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(port)},
		Filters:          []*listenerv3.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, h)}}},
	}
}

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestCarriesRules(t *testing.T) {
	const marker = "/bench-x-1/"
	inbound := func(chains ...*listenerv3.FilterChain) []*listenerv3.Listener {
		return []*listenerv3.Listener{
			{Name: "0.0.0.0_80", Address: &corev3.Address{}, FilterChains: []*listenerv3.FilterChain{inboundChain(t, 80, marker)}},
			{Name: virtualInboundListener, FilterChains: chains},
		}
	}
	for _, tc := range []struct {
		name    string
		ls      []*listenerv3.Listener
		marker  string
		wantErr string
	}{
		{"new rules in every chain", inbound(inboundChain(t, 8080, marker), inboundChain(t, 8080, marker)), marker, ""},
		{"no listeners", nil, marker, "no inbound http chain for port 8080"},
		{"only another port (and another listener) has them", inbound(inboundChain(t, 9090, marker)), marker, "no inbound http chain for port 8080"},
		{"no sidelane filter yet", inbound(inboundChain(t, 8080, "")), marker, "no sidelane.l7policy filter yet"},
		{"older rules", inbound(inboundChain(t, 8080, "/bench-x-0/")), marker, "older rules"},
		{"a longer marker is not this one", inbound(inboundChain(t, 8080, "/bench-x-10/")), marker, "older rules"},
		{"one chain still old", inbound(inboundChain(t, 8080, marker), inboundChain(t, 8080, "/bench-x-0/")), marker, "older rules"},
		{"empty marker: the chain is enough", inbound(inboundChain(t, 8080, "")), "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := carriesRules(tc.ls, 8080, tc.marker)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("carriesRules = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("carriesRules = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// The policy the scenario writes is a valid L7Policy protecting the
// benchmark's port with the marker as its path.
func TestBenchPolicy(t *testing.T) {
	u := benchPolicy(istiodBenchPod, istiodBenchPort, "/bench-x-3/")
	var p v1alpha1.L7Policy
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, &p, true); err != nil {
		t.Fatal(err)
	}
	if p.Namespace != "shop" || p.Spec.PodSelector.MatchLabels["app"] != "api" || len(p.Spec.Ports) != 1 || p.Spec.Ports[0].Port != istiodBenchPort ||
		p.Spec.Ports[0].Rules[0].HTTP[0].Path != "/bench-x-3/" {
		t.Fatalf("policy %+v", p)
	}
}

// Without kube-apiserver or pilot-discovery the scenario records a skip
// with the reason and does not fail the run.
func TestPolicyToIstiodSkips(t *testing.T) {
	empty := t.TempDir()
	t.Setenv("SIDELANE_CACHE", empty) // no kube-apiserver there
	r := New(Config{Quick: true, ToolBin: empty}, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err := r.policyToIstiod(context.Background()); err != nil {
		t.Fatalf("policyToIstiod = %v, want a skip", err)
	}
	if len(r.res.Figures) != 0 || len(r.res.Pending) != 1 {
		t.Fatalf("figures %v, pending %v", r.res.Figures, r.res.Pending)
	}
	p := r.res.Pending[0]
	if p.Scenario != scenarioIstiod || p.Contender != report.Sidelane || !strings.HasPrefix(p.Reason, "skipped: ") {
		t.Fatalf("pending %+v", p)
	}
	if !strings.Contains(p.Reason, "kube-apiserver") && !strings.Contains(p.Reason, "etcd") {
		t.Errorf("reason %q names neither kube-apiserver nor etcd", p.Reason)
	}

	// kube-apiserver present (fake), pilot-discovery missing.
	k8s := kubeharness.BinDir()
	if err := os.MkdirAll(k8s, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"kube-apiserver", "kubectl"} {
		if err := os.WriteFile(filepath.Join(k8s, b), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if _, reason := istiodPrereqs(empty); !strings.Contains(reason, "pilot-discovery not in "+empty) && !strings.Contains(reason, "etcd") {
		t.Errorf("reason %q does not name pilot-discovery's directory", reason)
	}
}

func TestOnly(t *testing.T) {
	only := ParseOnly(" policy_to_istiod, ,footprint")
	if len(only) != 2 || only[0] != "policy_to_istiod" || only[1] != "footprint" {
		t.Fatalf("ParseOnly = %q", only)
	}
	if !selected(only, "footprint") || selected(only, "traffic") || !selected(ParseOnly(""), "traffic") {
		t.Fatal("selected")
	}
}
