// Package bpfmetrics exports the eBPF datapath's counters (per pod, and the
// per-node mode totals) as Prometheus metrics, read from the BPF maps at
// scrape time so nothing is copied or cached.
package bpfmetrics

import (
	"context"
	"log/slog"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
)

// Source is what the collector reads.
type Source interface {
	Counters(ctx context.Context, e store.Entry) (map[string]uint64, error)
	NodeCounters() (bpf.NodeCounters, error)
}

// Entries lists the attachments to report.
type Entries func() []store.Entry

// Collector implements prometheus.Collector.
type Collector struct {
	src     Source
	entries Entries
	pod     *prometheus.Desc
	node    *prometheus.Desc
	joins   *prometheus.Desc
}

// joinSource is a Source that also reports the shortcut's joins.
type joinSource interface {
	ShortcutJoins() bpf.JoinStats
}

// New makes a collector.
func New(src Source, entries Entries) *Collector {
	return &Collector{
		src: src, entries: entries,
		pod: prometheus.NewDesc("sidelane_pod_capture_total",
			"eBPF capture counters per pod: connects redirected outbound/inbound/DNS, excluded, SO_ORIGINAL_DST answers, shortcut messages and bytes.",
			[]string{"namespace", "pod", "counter"}, nil),
		node: prometheus.NewDesc("sidelane_node_proxy_connects_total",
			"Per-node mode connects: steered to the node proxy (redirected), refused because it was down (refused, fail closed), refused because none is configured (unconfigured).",
			[]string{"outcome"}, nil),
		joins: prometheus.NewDesc("sidelane_shortcut_joins_total",
			"Shortcut join requests (a same-node socket carrying request/response traffic): put into the sockhash (joined), no socket found or the run failed (missed), from a netns the agent has no path for (no_netns).",
			[]string{"outcome"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.pod
	ch <- c.node
	if _, ok := c.src.(joinSource); ok {
		ch <- c.joins
	}
}

// Collect implements prometheus.Collector. The BPF counters are per
// network namespace, and one pod can have several attachments of one netns
// (Multus: eth0, net1, ...) or, while it is recreated, two sandboxes: each
// netns is read once, and a pod's series is the sum over its netns, so no
// two series carry the same labels (a scrape would fail).
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	type podKey struct{ namespace, pod string }
	sums := map[podKey]map[string]uint64{}
	var pods []podKey
	seen := map[uint64]bool{}
	for _, e := range c.entries() {
		if e.Mode == "none" || e.NetnsCookie == 0 || seen[e.NetnsCookie] {
			continue
		}
		m, err := c.src.Counters(ctx, e)
		if err != nil {
			continue
		}
		seen[e.NetnsCookie] = true
		k := podKey{e.PodNamespace, e.PodName}
		if sums[k] == nil {
			sums[k] = map[string]uint64{}
			pods = append(pods, k)
		}
		for name, v := range m {
			sums[k][name] += v
		}
	}
	for _, k := range pods {
		names := make([]string, 0, len(sums[k]))
		for name := range sums[k] {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			ch <- prometheus.MustNewConstMetric(c.pod, prometheus.CounterValue, float64(sums[k][name]), k.namespace, k.pod, name)
		}
	}
	if n, err := c.src.NodeCounters(); err == nil {
		ch <- prometheus.MustNewConstMetric(c.node, prometheus.CounterValue, float64(n.Redirected), "redirected")
		ch <- prometheus.MustNewConstMetric(c.node, prometheus.CounterValue, float64(n.Refused), "refused")
		ch <- prometheus.MustNewConstMetric(c.node, prometheus.CounterValue, float64(n.Unconfigured), "unconfigured")
		ch <- prometheus.MustNewConstMetric(c.node, prometheus.CounterValue, float64(n.Looped), "looped")
	}
	if j, ok := c.src.(joinSource); ok {
		s := j.ShortcutJoins()
		ch <- prometheus.MustNewConstMetric(c.joins, prometheus.CounterValue, float64(s.Joined), "joined")
		ch <- prometheus.MustNewConstMetric(c.joins, prometheus.CounterValue, float64(s.Missed), "missed")
		ch <- prometheus.MustNewConstMetric(c.joins, prometheus.CounterValue, float64(s.NoNetns), "no_netns")
	}
}

// WatchNodeProxy logs whenever per-node connects were refused since the
// last look (the node proxy is down), every interval until ctx ends.
func WatchNodeProxy(ctx context.Context, log *slog.Logger, report func(bpf.NodeCounters) (bpf.NodeCounters, error), interval time.Duration) {
	var prev bpf.NodeCounters
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			cur, err := report(prev)
			if err != nil {
				log.Debug("read node proxy counters", "error", err)
				continue
			}
			prev = cur
		}
	}
}
