package bpfmetrics_test

import (
	"context"
	"errors"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/sidelane/sidelane/agent/bpfmetrics"
	"github.com/sidelane/sidelane/agent/metrics"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
)

// source has counters per netns cookie, as the BPF maps do.
type source map[uint64]map[string]uint64

func (s source) Counters(_ context.Context, e store.Entry) (map[string]uint64, error) {
	c, ok := s[e.NetnsCookie]
	if !ok {
		return nil, errors.New("no counters")
	}
	return c, nil
}
func (s source) NodeCounters() (bpf.NodeCounters, error) { return bpf.NodeCounters{Redirected: 1}, nil }

func att(cid, ifname, ns, pod string, cookie uint64) store.Entry {
	return store.Entry{Key: store.Key{Network: "n-" + ifname, ContainerID: cid, IfName: ifname}, PodNamespace: ns, PodName: pod, Mode: "sidecar", NetnsCookie: cookie}
}

// TestScrapeWithSharedNetns is finding 10 of the security review: two
// attachments of one netns (Multus) report the same pod, and a pod being
// recreated has two sandboxes for a moment; /metrics must still answer,
// with each netns's counters counted once.
func TestScrapeWithSharedNetns(t *testing.T) {
	src := source{
		1: {"redirected_outbound": 3, "excluded": 1},
		2: {"redirected_outbound": 5, "excluded": 0},
		3: {"redirected_outbound": 7, "excluded": 2},
	}
	entries := []store.Entry{
		att("sb1", "eth0", "shop", "web", 1),
		att("sb1", "net1", "shop", "web", 1), // Multus: same netns
		att("sb2", "eth0", "shop", "web", 2), // the pod's next sandbox
		att("sb3", "eth0", "shop", "cart", 3),
		att("sb3", "net1", "shop", "cart", 3),
	}
	m := metrics.New(nil)
	if err := m.Register(bpfmetrics.New(src, func() []store.Entry { return entries })); err != nil {
		t.Fatal(err)
	}
	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	got := map[string]float64{}
	nodeSeries := 0
	for _, f := range families {
		switch f.GetName() {
		case "sidelane_pod_capture_total":
			for _, mt := range f.GetMetric() {
				got[labels(mt)] = mt.GetCounter().GetValue()
			}
		case "sidelane_node_proxy_connects_total":
			nodeSeries = len(f.GetMetric())
		}
	}
	want := map[string]float64{
		"shop/web/redirected_outbound": 8, "shop/web/excluded": 1,
		"shop/cart/redirected_outbound": 7, "shop/cart/excluded": 2,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("series %v, want %v", got, want)
	}
	if nodeSeries != 4 {
		t.Errorf("node proxy series: %d, want 4", nodeSeries)
	}
}

func labels(m *dto.Metric) string {
	v := map[string]string{}
	for _, l := range m.GetLabel() {
		v[l.GetName()] = l.GetValue()
	}
	return v["namespace"] + "/" + v["pod"] + "/" + v["counter"]
}

// joinsSource also reports the shortcut's joins.
type joinsSource struct{ source }

func (joinsSource) ShortcutJoins() bpf.JoinStats {
	return bpf.JoinStats{Joined: 4, Missed: 1, NoNetns: 2}
}

// The shortcut's join outcomes are exported when the datapath reports them.
func TestShortcutJoinsExported(t *testing.T) {
	m := metrics.New(nil)
	if err := m.Register(bpfmetrics.New(joinsSource{source{}}, func() []store.Entry { return nil })); err != nil {
		t.Fatal(err)
	}
	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		if f.GetName() == "sidelane_shortcut_joins_total" {
			for _, mt := range f.GetMetric() {
				got[mt.GetLabel()[0].GetValue()] = mt.GetCounter().GetValue()
			}
		}
	}
	if want := map[string]float64{"joined": 4, "missed": 1, "no_netns": 2}; len(got) != 3 || got["joined"] != 4 || got["missed"] != 1 || got["no_netns"] != 2 {
		t.Errorf("sidelane_shortcut_joins_total = %v, want %v", got, want)
	}
}
