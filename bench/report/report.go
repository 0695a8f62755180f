// Package report holds benchmark results, derives the fixed ratios that
// dashboards read, and writes bench/out/results.json and results.md. It is
// pure: the runner measures, this package only computes and formats.
package report

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
)

// Figure is one measured number.
type Figure struct {
	Scenario  string  `json:"scenario"`
	Contender string  `json:"contender"`
	Metric    string  `json:"metric"`
	Value     float64 `json:"value"`
	Unit      string  `json:"unit"`
}

// Pending records a scenario/contender that was not measured, and why.
type Pending struct {
	Scenario  string `json:"scenario"`
	Contender string `json:"contender,omitempty"`
	Reason    string `json:"reason"`
}

// Ratio is a derived figure with its target.
type Ratio struct {
	Value   *float64 `json:"value"`
	Target  string   `json:"target"`
	Met     *bool    `json:"met,omitempty"`
	Pending string   `json:"pending,omitempty"`
}

// Results is the whole run.
type Results struct {
	Machine map[string]string `json:"machine"`
	Quick   bool              `json:"quick"`
	Figures []Figure          `json:"figures"`
	Pending []Pending         `json:"pending"`
	Ratios  map[string]Ratio  `json:"ratios"`
}

// Add records a figure.
func (r *Results) Add(scenario, contender, metric string, value float64, unit string) {
	r.Figures = append(r.Figures, Figure{scenario, contender, metric, value, unit})
}

// Skip records a figure that could not be measured.
func (r *Results) Skip(scenario, contender, reason string) {
	r.Pending = append(r.Pending, Pending{scenario, contender, reason})
}

func (r *Results) get(scenario, contender, metric string) (float64, bool) {
	for _, f := range r.Figures {
		if f.Scenario == scenario && f.Contender == contender && f.Metric == metric {
			return f.Value, true
		}
	}
	return 0, false
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

// ratioDef defines one ratio: its inputs, how to combine them, the target.
type ratioDef struct {
	name    string
	inputs  []ref
	compute func(v []float64) float64
	target  string
	met     func(float64) bool
}

// Contender names.
const (
	NoMesh           = "nomesh"
	IstioIptables    = "istio-iptables"
	SidelaneIptables = "sidelane-iptables"
	SidelaneEBPF     = "sidelane-ebpf"
	EBPFNoShortcut   = "sidelane-ebpf-noshortcut"
	PerNode          = "pernode"
	Sidelane         = "sidelane"
)

var ratioDefs = []ratioDef{
	{"rr_1k_added_latency_ratio",
		[]ref{{"rr_1k", SidelaneEBPF, "p50us"}, {"rr_1k", NoMesh, "p50us"}, {"rr_1k", IstioIptables, "p50us"}},
		func(v []float64) float64 { return (v[0] - v[1]) / (v[2] - v[1]) },
		"<= 0.75", func(x float64) bool { return x <= 0.75 }},
	{"rr_1k_p99_ratio",
		[]ref{{"rr_1k", SidelaneEBPF, "p99us"}, {"rr_1k", IstioIptables, "p99us"}},
		func(v []float64) float64 { return v[0] / v[1] },
		"<= 1.0", func(x float64) bool { return x <= 1.0 }},
	{"stream_1k_ratio",
		[]ref{{"stream_1k", SidelaneEBPF, "MBps"}, {"stream_1k", IstioIptables, "MBps"}},
		func(v []float64) float64 { return v[0] / v[1] },
		">= 1.0", func(x float64) bool { return x >= 1.0 }},
	{"stream_64k_ratio",
		[]ref{{"stream_64k", SidelaneEBPF, "MBps"}, {"stream_64k", IstioIptables, "MBps"}},
		func(v []float64) float64 { return v[0] / v[1] },
		">= 2", func(x float64) bool { return x >= 2 }},
	{"crr_8_ratio",
		[]ref{{"crr_8", SidelaneEBPF, "connsPerSec"}, {"crr_8", IstioIptables, "connsPerSec"}},
		func(v []float64) float64 { return v[0] / v[1] },
		">= 1.2", func(x float64) bool { return x >= 1.2 }},
	{"exclusions_10k_over_10",
		[]ref{{"exclusions_10000", SidelaneEBPF, "connectP50us"}, {"exclusions_10", SidelaneEBPF, "connectP50us"}},
		func(v []float64) float64 { return v[0] / v[1] },
		"<= 1.1", func(x float64) bool { return x <= 1.1 }},
	{"cni_add_p99_ms",
		[]ref{{"cni_burst_100", Sidelane, "addP99ms"}},
		func(v []float64) float64 { return v[0] },
		"<= 20", func(x float64) bool { return x <= 20 }},
	{"agent_rss_mb_200_pods",
		[]ref{{"footprint_200", Sidelane, "rssMB"}},
		func(v []float64) float64 { return v[0] },
		"<= 60", func(x float64) bool { return x <= 60 }},
	{"policy_update_p99_ms",
		[]ref{{"policy_update", Sidelane, "p99ms"}},
		func(v []float64) float64 { return v[0] },
		"<= 100", func(x float64) bool { return x <= 100 }},
}

// RatioNames lists the fixed ratio names in order.
func RatioNames() []string {
	var out []string
	for _, d := range ratioDefs {
		out = append(out, d.name)
	}
	return out
}

// ComputeRatios fills Ratios: every name is present, either with a value or
// with the reason it is pending.
func (r *Results) ComputeRatios() {
	r.Ratios = map[string]Ratio{}
	for _, d := range ratioDefs {
		vals := make([]float64, len(d.inputs))
		var missing []string
		for i, in := range d.inputs {
			v, ok := r.get(in.scenario, in.contender, in.metric)
			if !ok {
				missing = append(missing, r.why(in.scenario, in.contender))
				continue
			}
			vals[i] = v
		}
		if len(missing) > 0 {
			slices.Sort(missing)
			r.Ratios[d.name] = Ratio{Target: d.target, Pending: strings.Join(slices.Compact(missing), "; ")}
			continue
		}
		v := d.compute(vals)
		if math.IsNaN(v) || math.IsInf(v, 0) {
			r.Ratios[d.name] = Ratio{Target: d.target, Pending: "inputs give no finite ratio"}
			continue
		}
		v = math.Round(v*1000) / 1000
		met := d.met(v)
		r.Ratios[d.name] = Ratio{Value: &v, Target: d.target, Met: &met}
	}
}

// WriteJSON writes results.json.
func (r *Results) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteMarkdown writes results.md: the ratios, then one table per scenario
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
	fmt.Fprintf(&b, "- quick: %v\n\nFigures are from a noisy 2-core VM; compare ratios within one run, not absolute numbers across runs.\n\n", r.Quick)

	b.WriteString("## Ratios\n\n| ratio | value | target | met |\n|---|---|---|---|\n")
	for _, name := range RatioNames() {
		ra := r.Ratios[name]
		if ra.Value == nil {
			fmt.Fprintf(&b, "| %s | pending | %s | %s |\n", name, ra.Target, ra.Pending)
			continue
		}
		fmt.Fprintf(&b, "| %s | %.3f | %s | %v |\n", name, *ra.Value, ra.Target, yesNo(*ra.Met))
	}

	var scenarios []string
	for _, f := range r.Figures {
		if !slices.Contains(scenarios, f.Scenario) {
			scenarios = append(scenarios, f.Scenario)
		}
	}
	for _, s := range scenarios {
		fmt.Fprintf(&b, "\n## %s\n\n| contender | metric | value | vs %s |\n|---|---|---|---|\n", s, IstioIptables)
		for _, f := range r.Figures {
			if f.Scenario != s {
				continue
			}
			rel := ""
			if base, ok := r.get(s, IstioIptables, f.Metric); ok && base != 0 && f.Contender != IstioIptables {
				rel = fmt.Sprintf("%.2fx", f.Value/base)
			}
			fmt.Fprintf(&b, "| %s | %s | %.2f %s | %s |\n", f.Contender, f.Metric, f.Value, f.Unit, rel)
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

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
