package istiod

import (
	"strings"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbacfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// TestValidateDeepLooksInsideAny: an invalid RBAC two Anys deep (listener
// -> HCM -> HTTP filter) passes the listener's own ValidateAll but not
// validateDeep.
func TestValidateDeepLooksInsideAny(t *testing.T) {
	bad := &rbacfilterv3.RBAC{Rules: &rbacv3.RBAC{Policies: map[string]*rbacv3.Policy{"p": {
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
		Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{
			PrincipalName: &matcherv3.StringMatcher{}, // no match pattern: invalid
		}}}},
	}}}}
	rbacAny, err := anypb.New(bad)
	if err != nil {
		t.Fatal(err)
	}
	hcm, err := anypb.New(&hcmv3.HttpConnectionManager{
		StatPrefix:     "x",
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: "r"}},
		HttpFilters:    []*hcmv3.HttpFilter{{Name: "rbac", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: rbacAny}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	l := &listenerv3.Listener{Name: "l", FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
		Name: "hcm", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: hcm},
	}}}}}
	if err := l.ValidateAll(); err != nil {
		t.Fatalf("the listener alone should validate (ValidateAll does not unpack Any): %v", err)
	}
	var v validation
	validateDeep(l, "l", &v)
	if len(v.errs) != 1 || !strings.Contains(v.errs[0], "PrincipalName") {
		t.Fatalf("want one error about the principal matcher, got %q", v.errs)
	}
	if v.checked != 3 {
		t.Errorf("ValidateAll ran on %d messages, want 3 (listener, HCM, RBAC)", v.checked)
	}
}
