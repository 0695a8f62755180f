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
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.pod
	ch <- c.node
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, e := range c.entries() {
		if e.Mode == "none" || e.NetnsCookie == 0 {
			continue
		}
		m, err := c.src.Counters(ctx, e)
		if err != nil {
			continue
		}
		names := make([]string, 0, len(m))
		for k := range m {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			ch <- prometheus.MustNewConstMetric(c.pod, prometheus.CounterValue, float64(m[k]), e.PodNamespace, e.PodName, k)
		}
	}
	if n, err := c.src.NodeCounters(); err == nil {
		ch <- prometheus.MustNewConstMetric(c.node, prometheus.CounterValue, float64(n.Redirected), "redirected")
		ch <- prometheus.MustNewConstMetric(c.node, prometheus.CounterValue, float64(n.Refused), "refused")
		ch <- prometheus.MustNewConstMetric(c.node, prometheus.CounterValue, float64(n.Unconfigured), "unconfigured")
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
