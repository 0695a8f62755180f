// Package metrics holds the agent's Prometheus metrics. Everything is
// registered on a registry passed in (never the global one), and every
// method is safe on a nil *Metrics so tests and callers without metrics
// need no special case.
package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

const namespace = "sidelane"

// Metrics is the agent's set of instruments.
type Metrics struct {
	Registry    *prometheus.Registry
	decisions   *prometheus.CounterVec
	transitions *prometheus.CounterVec
	errors      *prometheus.CounterVec
	cniLatency  *prometheus.HistogramVec
	addPhases   *prometheus.HistogramVec
	repairs     *prometheus.CounterVec
}

// PodCounter reports how many attachments are in each mode, read at scrape
// time so the gauge can never drift from the agent's store.
type PodCounter func() map[string]int

// New registers the agent's metrics, plus Go and process collectors, on a
// new registry. pods may be nil.
func New(pods PodCounter) *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		Registry: reg,
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "capture_decisions_total",
			Help: "Pod classifications by resulting mode and the rule that decided.",
		}, []string{"mode", "rule"}),
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "mode_transitions_total",
			Help: "Live moves of running pods between datapath modes.",
		}, []string{"from", "to"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "errors_total",
			Help: "Errors by operation (add, del, check, gc, reclassify, reconcile, taint, ...).",
		}, []string{"op"}),
		cniLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "cni_request_duration_seconds",
			Help:    "Time the agent took to answer one CNI plugin request, by operation and result.",
			Buckets: append(addLatencyBuckets(.0005), .25, .5, 1, 2.5, 5),
		}, []string{"op", "result"}),
		addPhases: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "cni_add_phase_seconds",
			Help:    "Time one CNI ADD spent in each phase inside the agent: netns (identity of the pod's netns), classify, lock_wait (waiting for the sandbox's lock), enroll (the whole datapath enroll; the eBPF backend also reports its parts ebpf_netns_cookie, ebpf_routes, ebpf_put, ebpf_inbound_attach), state_write.",
			Buckets: append(addLatencyBuckets(.00005, .0001, .00025, .0005), .25, 1),
		}, []string{"phase"}),
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "datapath_repairs_total",
			Help: "Datapath attachments the agent found broken by someone else and put back, by kind (cgroup_link, tc_link, netns_link, sk_msg, pin).",
		}, []string{"what"}),
	}
	reg.MustRegister(m.decisions, m.transitions, m.errors, m.cniLatency, m.addPhases, m.repairs,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if pods != nil {
		reg.MustRegister(&podCollector{pods: pods, desc: prometheus.NewDesc(
			namespace+"_pods", "Pod attachments the agent manages, by datapath mode.", []string{"mode"}, nil)})
	}
	return m
}

// addLatencyBuckets is below (bounds under 1 ms) then 1 ms to 200 ms in
// steps of at most 1.5x: an ADD takes 1-200 ms, and a quantile read from
// the buckets (histogram_quantile interpolates inside one) is only as
// precise as its bucket, so a p99 lands in e.g. (20, 30] ms, not (25, 50].
func addLatencyBuckets(below ...float64) []float64 {
	return append(below, .001, .0015, .002, .003, .004, .005, .0075, .01, .015, .02, .03, .04, .05, .075, .1, .15, .2)
}

// Register adds another collector, e.g. the eBPF datapath's map counters.
func (m *Metrics) Register(c prometheus.Collector) error {
	if m == nil {
		return nil
	}
	return m.Registry.Register(c)
}

// Decision counts one classification.
func (m *Metrics) Decision(mode, rule string) {
	if m != nil {
		m.decisions.WithLabelValues(mode, rule).Inc()
	}
}

// Transition counts one live mode change.
func (m *Metrics) Transition(from, to string) {
	if m != nil {
		m.transitions.WithLabelValues(from, to).Inc()
	}
}

// Error counts one failed operation.
func (m *Metrics) Error(op string) {
	if m != nil {
		m.errors.WithLabelValues(op).Inc()
	}
}

// DatapathRepair counts one attachment put back (what: bpf.RepairCgroupLink, ...).
func (m *Metrics) DatapathRepair(what string) {
	if m != nil {
		m.repairs.WithLabelValues(what).Inc()
	}
}

// CNIRequest records one plugin request's latency and outcome.
func (m *Metrics) CNIRequest(op string, d time.Duration, err error) {
	if m == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = "error"
		m.errors.WithLabelValues(op).Inc()
	}
	m.cniLatency.WithLabelValues(op, result).Observe(d.Seconds())
}

// CNIAddPhase records how long one phase of a CNI ADD took.
func (m *Metrics) CNIAddPhase(phase string, d time.Duration) {
	if m != nil {
		m.addPhases.WithLabelValues(phase).Observe(d.Seconds())
	}
}

type podCollector struct {
	pods PodCounter
	desc *prometheus.Desc
}

func (c *podCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *podCollector) Collect(ch chan<- prometheus.Metric) {
	for mode, n := range c.pods() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), mode)
	}
}
