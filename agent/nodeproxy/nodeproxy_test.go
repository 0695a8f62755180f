package nodeproxy

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/policy/compile"
)

func TestInPodListeners(t *testing.T) {
	entries := []store.Entry{
		{PodNamespace: "shop", PodName: "b", Netns: "/var/run/netns/b", Mode: ModeNode, IPs: []netip.Prefix{netip.MustParsePrefix("10.0.0.2/24")}},
		{PodNamespace: "shop", PodName: "sc", Netns: "/var/run/netns/sc", Mode: "sidecar"},
		{PodNamespace: "shop", PodName: "a", Netns: "/var/run/netns/a", Mode: ModeNode, IPs: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/24"), netip.MustParsePrefix("fd00::1/64")}},
		{PodNamespace: "shop", PodName: "gone", Mode: ModeNode}, // no netns: nothing to listen in
	}
	got := inPodListeners(entries)
	if len(got) != 2 || got[0].Pod != "shop/a" || got[1].Pod != "shop/b" {
		t.Fatalf("inPodListeners = %+v, want shop/a then shop/b", got)
	}
	if got[0].Netns != "/var/run/netns/a" || len(got[0].IPs) != 2 || got[0].IPs[1] != netip.MustParseAddr("fd00::1") {
		t.Errorf("shop/a: %+v", got[0])
	}
}

func TestL7For(t *testing.T) {
	res := &compile.Result{Groups: []compile.Group{{
		Namespace: "shop", Policies: []string{"a", "b"},
		Pods:  []compile.PodRef{{Name: "api-0"}},
		Ports: []compile.Port{{Port: 8080}, {Port: 9090}},
	}}}
	got := L7For(res, "shop", "api-0")
	if !slices.Equal(got.Policies, []string{"a", "b"}) || !slices.Equal(got.Ports, []int32{8080, 9090}) {
		t.Errorf("selected pod: %+v", got)
	}
	for _, p := range [][2]string{{"shop", "web-0"}, {"other", "api-0"}} {
		if got := L7For(res, p[0], p[1]); got == nil || len(got.Policies) != 0 || got.Policies == nil {
			t.Errorf("%s/%s: %+v, want an empty (not nil) policy list", p[0], p[1], got)
		}
	}
}
