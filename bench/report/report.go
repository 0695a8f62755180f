// Package report holds benchmark results, derives the fixed ratios that
// dashboards read, and writes bench/out/results.json and results.md. It is
// pure: the runner measures, this package only computes and formats.
package report

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strings"
)

// Figure is one measured number. Reps, when set, are its values in each
// interleaved repetition (in round order, aligned across contenders) and
// Value is their mean; intervals are bootstrapped from them.
type Figure struct {
	Scenario  string    `json:"scenario"`
	Contender string    `json:"contender"`
	Metric    string    `json:"metric"`
	Value     float64   `json:"value"`
	Unit      string    `json:"unit"`
	Reps      []float64 `json:"reps,omitempty"`
	// Note says how the figure was obtained when its name cannot (e.g.
	// a quantile estimated from histogram buckets, and their resolution).
	Note string `json:"note,omitempty"`
}

// Pending records a scenario/contender that was not measured, and why.
type Pending struct {
	Scenario  string `json:"scenario"`
	Contender string `json:"contender,omitempty"`
	Reason    string `json:"reason"`
}

// Ratio is a derived figure with its 95% interval (Lo, Hi: nil when its
// inputs are single measurements) and its target (empty: informational).
// Met is true only when the whole interval is on the target's side.
type Ratio struct {
	Value   *float64 `json:"value"`
	Lo      *float64 `json:"lo,omitempty"`
	Hi      *float64 `json:"hi,omitempty"`
	Reps    int      `json:"reps,omitempty"`
	Target  string   `json:"target,omitempty"`
	Met     *bool    `json:"met,omitempty"`
	Note    string   `json:"note,omitempty"`
	Pending string   `json:"pending,omitempty"`
}

// Results is the whole run.
type Results struct {
	Machine map[string]string `json:"machine"`
	Quick   bool              `json:"quick"`
	// Alternatives are the eBPF configurations other than the agent's
	// defaults (sidelane-ebpf) measured in the run: every headline ratio is
	// recomputed for each into OtherConfigurations, never the headline.
	Alternatives []string  `json:"alternatives,omitempty"`
	Figures      []Figure  `json:"figures"`
	Pending      []Pending `json:"pending"`
	// Ratios are the fixed ratios, for the default configuration.
	Ratios              map[string]Ratio            `json:"ratios"`
	OtherConfigurations map[string]map[string]Ratio `json:"other_configurations,omitempty"`
	// Floors are the traffic ratios recomputed with a reference
	// contender's figures in sidelane-ebpf's place (FloorContenders): what
	// a capture (or transport) that cost exactly as much would score, so a
	// target even the reference misses is told apart from one sidelane
	// misses.
	Floors map[string]map[string]Ratio `json:"floors,omitempty"`
	// CPU is CPU time per transaction of each contender relative to
	// istio-iptables, per scenario: scenario -> contender -> ratio.
	CPU map[string]map[string]Ratio `json:"cpu_vs_istio_iptables,omitempty"`
}

// Add records a single-measurement figure.
func (r *Results) Add(scenario, contender, metric string, value float64, unit string) {
	r.Figures = append(r.Figures, Figure{Scenario: scenario, Contender: contender, Metric: metric, Value: value, Unit: unit})
}

// AddNoted records a single-measurement figure with a note on how it was
// obtained (shown next to its value in results.md).
func (r *Results) AddNoted(scenario, contender, metric string, value float64, unit, note string) {
	r.Figures = append(r.Figures, Figure{Scenario: scenario, Contender: contender, Metric: metric, Value: value, Unit: unit, Note: note})
}

// AddReps records a figure from its per-repetition values (Value = mean).
func (r *Results) AddReps(scenario, contender, metric string, reps []float64, unit string) {
	r.Figures = append(r.Figures, Figure{Scenario: scenario, Contender: contender, Metric: metric,
		Value: Mean(reps), Unit: unit, Reps: slices.Clone(reps)})
}

// Skip records a figure that could not be measured.
func (r *Results) Skip(scenario, contender, reason string) {
	r.Pending = append(r.Pending, Pending{scenario, contender, reason})
}

func (r *Results) figure(scenario, contender, metric string) (Figure, bool) {
	for _, f := range r.Figures {
		if f.Scenario == scenario && f.Contender == contender && f.Metric == metric {
			return f, true
		}
	}
	return Figure{}, false
}

func (r *Results) get(scenario, contender, metric string) (float64, bool) {
	f, ok := r.figure(scenario, contender, metric)
	return f.Value, ok
}

func (r *Results) why(scenario, contender string) string {
	for _, p := range r.Pending {
		if p.Scenario == scenario && (p.Contender == "" || p.Contender == contender) {
			return p.Reason
		}
	}
	return fmt.Sprintf("%s/%s not measured", scenario, contender)
}

// ref names a figure a ratio needs.
type ref struct{ scenario, contender, metric string }

// ratioDef defines one ratio: its inputs, how to combine them, the target
// ("" for an informational ratio) and an optional extra condition of
// "met" (e.g. no conntrack entries), checked against the contender the
// ratio is computed for.
type ratioDef struct {
	name    string
	inputs  []ref
	compute func(v []float64) float64
	target  string
	require func(r *Results, contender string) (ok bool, note string)
}

// Contender names. SidelaneEBPF is always the agent's defaults;
// EBPFShortcut / EBPFNoShortcut is the other shortcut setting, whichever
// the defaults are not.
const (
	NoMesh           = "nomesh"
	Explicit         = "explicit-proxy"
	ExplicitUnix     = "explicit-unix"
	IstioIptables    = "istio-iptables"
	IstioNFTables    = "istio-nftables"
	SidelaneIptables = "sidelane-iptables"
	SidelaneEBPF     = "sidelane-ebpf"
	EBPFShortcut     = "sidelane-ebpf-shortcut"
	EBPFNoShortcut   = "sidelane-ebpf-noshortcut"
	PerNode          = "pernode"
	Sidelane         = "sidelane"
	Chain            = "chain"
	// NoopPlugin is the CNI project's reference noop plugin in
	// sidelane-cni's place in the CNI bursts, NoopChain that chain.
	NoopPlugin = "noop-plugin"
	NoopChain  = "chain-noop"
)

// FloorContenders are the references for what any capture keeping both
// haproxy sidecars can reach: explicit-proxy (no capture, TCP between
// the hops: a floor for capture methods) and explicit-unix (no capture
// and no TCP/IP at all, Unix sockets between the same processes: the
// transport's cost removed, as a shortcut tries to; not a strict floor,
// an sk_msg redirect of a small message can be cheaper).
var FloorContenders = []string{Explicit, ExplicitUnix}

// MetricCPU is CPU time (user + system of the contender's pods and
// proxies) per transaction: per round trip (rr), per connection (crr),
// per MB (stream).
const MetricCPU = "cpuUsPerTxn"

func ratio(v []float64) float64 { return v[0] / v[1] }

// overhead is (x - floor) / (ref - floor).
func overhead(v []float64) float64 { return (v[0] - v[1]) / (v[2] - v[1]) }

var ratioDefs = []ratioDef{
	{name: "rr_1k_added_latency_ratio",
		inputs:  []ref{{"rr_1k", SidelaneEBPF, "p50us"}, {"rr_1k", NoMesh, "p50us"}, {"rr_1k", IstioIptables, "p50us"}},
		compute: overhead, target: "<= 0.75"},
	{name: "rr_1k_p99_ratio",
		inputs:  []ref{{"rr_1k", SidelaneEBPF, "p99us"}, {"rr_1k", IstioIptables, "p99us"}},
		compute: ratio, target: "<= 1.0"},
	{name: "rr_64_ratio",
		inputs:  []ref{{"rr_64", SidelaneEBPF, "p50us"}, {"rr_64", IstioIptables, "p50us"}},
		compute: ratio},
	{name: "rr_64k_ratio",
		inputs:  []ref{{"rr_64k", SidelaneEBPF, "p50us"}, {"rr_64k", IstioIptables, "p50us"}},
		compute: ratio},
	{name: "stream_1k_ratio",
		inputs:  []ref{{"stream_1k", SidelaneEBPF, "MBps"}, {"stream_1k", IstioIptables, "MBps"}},
		compute: ratio, target: ">= 1.0"},
	{name: "stream_64k_ratio",
		inputs:  []ref{{"stream_64k", SidelaneEBPF, "MBps"}, {"stream_64k", IstioIptables, "MBps"}},
		compute: ratio, target: ">= 2"},
	{name: "crr_8_ratio",
		inputs:  []ref{{"crr_8", SidelaneEBPF, "connsPerSec"}, {"crr_8", IstioIptables, "connsPerSec"}},
		compute: ratio, target: ">= 1.2", require: noConntrack("crr_8")},
	{name: "capture_overhead_ratio",
		inputs:  []ref{{"rr_1k", SidelaneEBPF, "p50us"}, {"rr_1k", Explicit, "p50us"}, {"rr_1k", IstioIptables, "p50us"}},
		compute: overhead, target: "<= 0.25"},
	{name: "capture_overhead_cpu_ratio",
		inputs:  []ref{{"rr_1k", SidelaneEBPF, MetricCPU}, {"rr_1k", Explicit, MetricCPU}, {"rr_1k", IstioIptables, MetricCPU}},
		compute: overhead},
	{name: "rr_1k_cpu_ratio",
		inputs:  []ref{{"rr_1k", SidelaneEBPF, MetricCPU}, {"rr_1k", IstioIptables, MetricCPU}},
		compute: ratio},
	{name: "exclusions_10k_over_10",
		inputs:  []ref{{"exclusions_10000", SidelaneEBPF, "connectP50us"}, {"exclusions_10", SidelaneEBPF, "connectP50us"}},
		compute: ratio, target: "<= 1.1"},
	{name: "cni_add_share_p99",
		inputs:  []ref{{"cni_burst_100", Sidelane, "addP99ms"}, {"cni_burst_100", Chain, "addP99ms"}},
		compute: ratio, target: "<= 0.25"},
	// The same share for a chained plugin that does nothing (the reference
	// noop plugin, same burst): the floor of cni_add_share_p99.
	{name: "cni_add_share_p99_noop_plugin",
		inputs:  []ref{{"cni_burst_100", NoopPlugin, "addP99ms"}, {"cni_burst_100", NoopChain, "addP99ms"}},
		compute: ratio},
	{name: "cni_add_p99_1000_over_10",
		inputs:  []ref{{"cni_add_1000", Sidelane, "addP99ms"}, {"cni_add_10", Sidelane, "addP99ms"}},
		compute: ratio, target: "<= 1.2"},
	{name: "cni_add_p99_ms",
		inputs:  []ref{{"cni_burst_100", Sidelane, "addP99ms"}},
		compute: func(v []float64) float64 { return v[0] }, target: "<= 20"},
	{name: "agent_rss_mb_200_pods",
		inputs:  []ref{{"footprint_200", Sidelane, "rssMB"}},
		compute: func(v []float64) float64 { return v[0] }, target: "<= 60"},
	{name: "policy_update_p99_ms",
		inputs:  []ref{{"policy_update", Sidelane, "p99ms"}},
		compute: func(v []float64) float64 { return v[0] }, target: "<= 100"},
}

// noConntrack requires the contender to leave no conntrack entries in
// scenario (the eBPF path must never touch netfilter).
func noConntrack(scenario string) func(*Results, string) (bool, string) {
	return func(r *Results, contender string) (bool, string) {
		v, ok := r.get(scenario, contender, "conntrackPerConn")
		if !ok {
			return false, "conntrack entries not measured"
		}
		if v != 0 {
			return false, fmt.Sprintf("%.3f conntrack entries per connection (want 0)", v)
		}
		return true, "0 conntrack entries"
	}
}

// TargetContenders are the contenders whose figures in scenario some
// ratio with a target reads. A benchmark can run the other contenders
// (references and other configurations, reported without a target) for
// fewer rounds: compute pairs them with the rest over their rounds.
func TargetContenders(scenario string) []string {
	var out []string
	for _, d := range ratioDefs {
		if d.target == "" {
			continue
		}
		for _, in := range d.inputs {
			if in.scenario == scenario && !slices.Contains(out, in.contender) {
				out = append(out, in.contender)
			}
		}
	}
	slices.Sort(out)
	return out
}

// RatioNames lists the fixed ratio names in order.
func RatioNames() []string {
	var out []string
	for _, d := range ratioDefs {
		out = append(out, d.name)
	}
	return out
}

// ComputeRatios fills Ratios (for sidelane-ebpf, the defaults),
// OtherConfigurations (the same ratios for each alternative) and CPU:
// every name is present, either with a value or with the reason it is
// pending.
func (r *Results) ComputeRatios() {
	r.Ratios = r.ratiosFor(SidelaneEBPF)
	r.OtherConfigurations = nil
	for _, alt := range r.Alternatives {
		if r.OtherConfigurations == nil {
			r.OtherConfigurations = map[string]map[string]Ratio{}
		}
		r.OtherConfigurations[alt] = r.ratiosFor(alt)
	}
	r.Floors = nil
	for _, fl := range FloorContenders {
		for name, ra := range r.ratiosFor(fl) {
			if ra.Pending != "" || strings.HasPrefix(name, "capture_overhead") {
				continue // not measured for floors (exclusions), or a floor against itself
			}
			if r.Floors == nil {
				r.Floors = map[string]map[string]Ratio{}
			}
			if r.Floors[fl] == nil {
				r.Floors[fl] = map[string]Ratio{}
			}
			r.Floors[fl][name] = ra
		}
	}
	r.CPU = nil
	for _, f := range r.Figures {
		if f.Metric != MetricCPU || f.Contender == IstioIptables {
			continue
		}
		if _, ok := r.figure(f.Scenario, IstioIptables, MetricCPU); !ok {
			continue
		}
		if r.CPU == nil {
			r.CPU = map[string]map[string]Ratio{}
		}
		if r.CPU[f.Scenario] == nil {
			r.CPU[f.Scenario] = map[string]Ratio{}
		}
		r.CPU[f.Scenario][f.Contender] = r.compute(ratioDef{name: "cpu", compute: ratio,
			inputs: []ref{{f.Scenario, f.Contender, MetricCPU}, {f.Scenario, IstioIptables, MetricCPU}}}, "")
	}
}

// ratiosFor computes every fixed ratio with sidelane-ebpf's inputs taken
// from contender instead.
func (r *Results) ratiosFor(contender string) map[string]Ratio {
	out := map[string]Ratio{}
	for _, d := range ratioDefs {
		dd := d
		dd.inputs = slices.Clone(d.inputs)
		uses := false
		for i := range dd.inputs {
			if dd.inputs[i].contender == SidelaneEBPF {
				dd.inputs[i].contender = contender
				uses = true
			}
		}
		if contender != SidelaneEBPF && !uses {
			continue
		}
		out[d.name] = r.compute(dd, contender)
	}
	return out
}

func (r *Results) compute(d ratioDef, contender string) Ratio {
	vals := make([]float64, len(d.inputs))
	var reps [][]float64
	var missing []string
	for i, in := range d.inputs {
		f, ok := r.figure(in.scenario, in.contender, in.metric)
		if !ok {
			missing = append(missing, r.why(in.scenario, in.contender))
			continue
		}
		vals[i] = f.Value
		reps = append(reps, f.Reps)
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return Ratio{Target: d.target, Pending: strings.Join(slices.Compact(missing), "; ")}
	}
	// A contender that no targeted ratio reads runs only a scenario's
	// first rounds (TargetContenders): pair it with the others over those
	// rounds, value and interval alike, so both come from the same rounds.
	sharedRounds(vals, reps)
	v := d.compute(vals)
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return Ratio{Target: d.target, Pending: "inputs give no finite ratio"}
	}
	out := Ratio{Value: round3(v), Target: d.target}
	var iv *Interval
	if b, ok := PairedBootstrap(reps, d.compute); ok {
		iv = &b
		out.Lo, out.Hi, out.Reps = round3(b.Lo), round3(b.Hi), len(reps[0])
	} else {
		out.Note = "single measurement, no interval"
	}
	if d.target == "" {
		return out
	}
	t, err := ParseTarget(d.target)
	if err != nil {
		out.Pending = err.Error()
		return out
	}
	met := t.Met(v, iv)
	if d.require != nil {
		ok, note := d.require(r, contender)
		met = met && ok
		out.Note = strings.TrimPrefix(out.Note+"; "+note, "; ")
	}
	out.Met = &met
	return out
}

// sharedRounds cuts every input's reps to the leading rounds all of them
// ran (when each ran at least two) and sets vals[i] to the mean over those.
func sharedRounds(vals []float64, reps [][]float64) {
	shared := -1
	for _, rp := range reps {
		if shared < 0 || len(rp) < shared {
			shared = len(rp)
		}
	}
	if shared < 2 {
		return
	}
	for i, rp := range reps {
		if len(rp) > shared {
			reps[i] = rp[:shared]
			vals[i] = Mean(reps[i])
		}
	}
}

func round3(v float64) *float64 {
	x := math.Round(v*1000) / 1000
	return &x
}

// WriteJSON writes results.json.
func (r *Results) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteMarkdown writes results.md: the ratios with their intervals, the
// other configurations' ratios, the CPU table, then one table per scenario
// with every contender side by side and its ratio to istio-iptables.
func (r *Results) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# sidelane benchmark results\n\n")
	var keys []string
	for k := range r.Machine {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "- %s: %s\n", k, r.Machine[k])
	}
	fmt.Fprintf(&b, "- quick: %v\n\nFigures are from a noisy 2-core VM; compare ratios within one run, not absolute numbers across runs. "+
		"Intervals are 95%% paired bootstrap intervals over the interleaved repetitions; \"met\" means the whole interval is on the target's side.\n\n", r.Quick)

	fmt.Fprintf(&b, "## Ratios (%s = the agent's defaults)\n\n", SidelaneEBPF)
	writeRatios(&b, r.Ratios, RatioNames())
	alts := slices.Sorted(maps.Keys(r.OtherConfigurations))
	for _, alt := range alts {
		fmt.Fprintf(&b, "\n## Other configuration: %s (not the defaults, not the headline)\n\n", alt)
		var names []string
		for _, n := range RatioNames() {
			if _, ok := r.OtherConfigurations[alt][n]; ok {
				names = append(names, n)
			}
		}
		writeRatios(&b, r.OtherConfigurations[alt], names)
	}
	for _, fl := range FloorContenders {
		if len(r.Floors[fl]) == 0 {
			continue
		}
		fmt.Fprintf(&b, "\n## Reference: %s in %s's place (what a capture costing exactly as much would score)\n\n", fl, SidelaneEBPF)
		var names []string
		for _, n := range RatioNames() {
			if _, ok := r.Floors[fl][n]; ok {
				names = append(names, n)
			}
		}
		writeRatios(&b, r.Floors[fl], names)
	}
	if len(r.CPU) > 0 {
		scen := slices.Sorted(maps.Keys(r.CPU))
		var conts []string
		for _, f := range r.Figures {
			if f.Metric == MetricCPU && f.Contender != IstioIptables && !slices.Contains(conts, f.Contender) {
				conts = append(conts, f.Contender)
			}
		}
		fmt.Fprintf(&b, "\n## CPU per transaction vs %s (user + system of the contender's pods and proxies; 95%% interval)\n\n| contender |", IstioIptables)
		for _, s := range scen {
			fmt.Fprintf(&b, " %s |", s)
		}
		b.WriteString("\n|---|" + strings.Repeat("---|", len(scen)) + "\n")
		for _, c := range conts {
			fmt.Fprintf(&b, "| %s |", c)
			for _, s := range scen {
				ra, ok := r.CPU[s][c]
				switch {
				case !ok || ra.Value == nil:
					b.WriteString(" - |")
				default:
					fmt.Fprintf(&b, " %s |", valueInterval(ra))
				}
			}
			b.WriteString("\n")
		}
	}

	var scenarios []string
	for _, f := range r.Figures {
		if !slices.Contains(scenarios, f.Scenario) {
			scenarios = append(scenarios, f.Scenario)
		}
	}
	for _, s := range scenarios {
		fmt.Fprintf(&b, "\n## %s\n\n| contender | metric | value | reps | vs %s |\n|---|---|---|---|---|\n", s, IstioIptables)
		for _, f := range r.Figures {
			if f.Scenario != s {
				continue
			}
			rel := ""
			if bf, ok := r.figure(s, IstioIptables, f.Metric); ok && f.Contender != IstioIptables {
				// Over the rounds both ran, as compute pairs them.
				v := []float64{f.Value, bf.Value}
				sharedRounds(v, [][]float64{f.Reps, bf.Reps})
				if v[1] != 0 {
					rel = fmt.Sprintf("%.2fx", v[0]/v[1])
				}
			}
			reps := ""
			if len(f.Reps) > 0 {
				reps = fmt.Sprint(len(f.Reps))
			}
			note := ""
			if f.Note != "" {
				note = " (" + f.Note + ")"
			}
			fmt.Fprintf(&b, "| %s | %s | %.2f %s%s | %s | %s |\n", f.Contender, f.Metric, f.Value, f.Unit, note, reps, rel)
		}
	}
	if len(r.Pending) > 0 {
		b.WriteString("\n## Pending\n\n")
		for _, p := range r.Pending {
			who := p.Scenario
			if p.Contender != "" {
				who += " / " + p.Contender
			}
			fmt.Fprintf(&b, "- %s: %s\n", who, p.Reason)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func writeRatios(b *strings.Builder, ratios map[string]Ratio, names []string) {
	b.WriteString("| ratio | value | 95% interval | target | met | note |\n|---|---|---|---|---|---|\n")
	for _, name := range names {
		ra := ratios[name]
		target := ra.Target
		if target == "" {
			target = "(info)"
		}
		if ra.Value == nil {
			fmt.Fprintf(b, "| %s | pending | | %s | | %s |\n", name, target, ra.Pending)
			continue
		}
		iv := ""
		if ra.Lo != nil {
			iv = fmt.Sprintf("[%.3f, %.3f] (n=%d)", *ra.Lo, *ra.Hi, ra.Reps)
		}
		met := ""
		if ra.Met != nil {
			met = yesNo(*ra.Met)
		}
		fmt.Fprintf(b, "| %s | %.3f | %s | %s | %s | %s |\n", name, *ra.Value, iv, target, met, ra.Note)
	}
}

func valueInterval(ra Ratio) string {
	if ra.Lo == nil {
		return fmt.Sprintf("%.3f", *ra.Value)
	}
	return fmt.Sprintf("%.3f [%.3f, %.3f]", *ra.Value, *ra.Lo, *ra.Hi)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
