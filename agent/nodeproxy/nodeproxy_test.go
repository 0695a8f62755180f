package nodeproxy

import (
	"net/netip"
	"testing"

	"github.com/sidelane/sidelane/agent/store"
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
