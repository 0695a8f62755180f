package run

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"golang.org/x/sync/errgroup"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/bench/loadgen"
	"github.com/sidelane/sidelane/bench/report"
)

// CNIScaleSizes are the enrolled pod counts cni_add_scale measures ADD at.
var CNIScaleSizes = []int{10, 100, 1000}

// CNIScale is cni_add_scale's result, as written to cni_scale.json:
// sidelane-cni's ADD p99 per repetition at each enrolled pod count, the
// repetitions interleaved across the counts (repetition k measured every
// count in a rotated order), so a paired bootstrap over repetitions gives
// the ratio's interval (report.AddReps of "addP99ms" per
// cni_add_<size> and a ratio over cni_add_1000 / cni_add_10).
type CNIScale struct {
	Sizes []int `json:"sizes"`
	// RepP99ms[i][k] is repetition k's p99 at Sizes[i] (ms).
	RepP99ms [][]float64 `json:"repP99ms"`
	// AgentAddMeanMs[i] is the agent's own mean ADD time at Sizes[i]
	// (sidelane_cni_request_duration_seconds), without the plugin process.
	AgentAddMeanMs []float64 `json:"agentAddMeanMs"`
	// Ratio is mean(RepP99ms[last]) / mean(RepP99ms[0]), the
	// cni_add_p99_1000_over_10 figure (target <= 1.2).
	Ratio  float64 `json:"ratio"`
	Target string  `json:"target"`
}

// scaleRatio is mean(last) / mean(first) of the per-repetition values.
func scaleRatio(reps [][]float64) float64 {
	if len(reps) < 2 {
		return math.NaN()
	}
	return mean(reps[len(reps)-1]) / mean(reps[0])
}

func mean(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

// rotated is 0..n-1 starting at k mod n: repetition k's order of the
// sizes, so no size is always measured first (or last).
func rotated(n, k int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = (i + k) % n
	}
	return out
}

// phaseStat is one histogram's sum, count and cumulative buckets.
type phaseStat struct {
	sum, count float64
	buckets    []bucket
}

// agentAdd is the key of the agent's whole ADD time in parsePhases.
const agentAdd = "agent_total"

// parsePhases reads sidelane_cni_add_phase_seconds{phase} and the agent's
// successful ADD time (under agentAdd) from Prometheus text: sums, counts
// and buckets.
func parsePhases(r io.Reader) (map[string]phaseStat, error) {
	out := map[string]phaseStat{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		name, rest, ok := strings.Cut(line, "{")
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		var key string
		base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_sum"), "_count"), "_bucket")
		switch base {
		case "sidelane_cni_add_phase_seconds":
			key = label(labels, "phase")
		case "sidelane_cni_request_duration_seconds":
			if label(labels, "op") == string(cnirpc.OpAdd) && label(labels, "result") == "ok" {
				key = agentAdd
			}
		}
		if key == "" {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			return nil, fmt.Errorf("metric line %q: %w", line, err)
		}
		st := out[key]
		switch {
		case strings.HasSuffix(name, "_sum"):
			st.sum = v
		case strings.HasSuffix(name, "_count"):
			st.count = v
		case strings.HasSuffix(name, "_bucket"):
			le, err := strconv.ParseFloat(label(labels, "le"), 64)
			if err != nil {
				return nil, fmt.Errorf("metric line %q: le: %w", line, err)
			}
			st.buckets = append(st.buckets, bucket{le: le, count: v})
		default:
			continue
		}
		out[key] = st
	}
	return out, sc.Err()
}

func label(labels, name string) string {
	for _, kv := range strings.Split(labels, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if ok && k == name {
			return strings.Trim(v, `"`)
		}
	}
	return ""
}

// phaseMeans is each phase's mean (ms) over the ADDs between before and
// after (before nil: since the agent started).
func phaseMeans(before, after map[string]phaseStat) map[string]float64 {
	out := map[string]float64{}
	for k, a := range after {
		b := before[k]
		if n := a.count - b.count; n > 0 {
			out[k] = (a.sum - b.sum) / n * 1000
		}
	}
	return out
}

// phaseQuantiles is each histogram's q-quantile over the ADDs between
// before and after (before nil: since the agent started), estimated from
// its buckets (histogramQuantile).
func phaseQuantiles(before, after map[string]phaseStat, q float64) map[string]quantile {
	out := map[string]quantile{}
	for k, a := range after {
		if v, ok := histogramQuantile(q, bucketsDelta(before[k].buckets, a.buckets)); ok {
			out[k] = v
		}
	}
	return out
}

func (c *chain) scrape(ctx context.Context) (map[string]phaseStat, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.metrics, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape agent metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape agent metrics: %s", resp.Status)
	}
	return parsePhases(resp.Body)
}

// addPhases records, for the ADDs the agent measured since before (nil:
// since it started), under scenario s: every phase's mean as
// "phase_<name>_ms" and its p99 as "phase_<name>_p99_ms", the agent's
// whole ADD as "agentAddMeanMs", "agentAddP50ms" and "agentAddP99ms". The
// quantiles are estimated from the histograms' buckets like Prometheus'
// histogram_quantile; each figure's note names the bucket, its resolution.
func (r *Runner) addPhases(ctx context.Context, s string, c *chain, before map[string]phaseStat) error {
	after, err := c.scrape(ctx)
	if err != nil {
		return err
	}
	means := phaseMeans(before, after)
	p50s, p99s := phaseQuantiles(before, after, 0.5), phaseQuantiles(before, after, 0.99)
	keys := make([]string, 0, len(means))
	for k := range means {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var attrs []any
	for _, k := range keys {
		metric := "phase_" + k + "_ms"
		if k == agentAdd {
			metric = "agentAddMeanMs"
		}
		r.res.Add(s, report.Sidelane, metric, means[k], "ms")
		attrs = append(attrs, k, fmt.Sprintf("%.3fms", means[k]))
	}
	if q, ok := p50s[agentAdd]; ok {
		r.res.AddNoted(s, report.Sidelane, "agentAddP50ms", q.value*1000, "ms", q.note())
	}
	for _, k := range keys {
		q, ok := p99s[k]
		if !ok {
			continue
		}
		metric := "phase_" + k + "_p99_ms"
		if k == agentAdd {
			metric = "agentAddP99ms"
		}
		r.res.AddNoted(s, report.Sidelane, metric, q.value*1000, "ms", q.note())
		attrs = append(attrs, k+"_p99", fmt.Sprintf("%.3fms", q.value*1000))
	}
	r.log.Info("agent ADD phases (mean, p99 from buckets)", append([]any{"scenario", s}, attrs...)...)
	return nil
}

// execVersion times n runs of sidelane-cni with CNI_COMMAND=VERSION, p
// at a time: the plugin process's start and exit alone (exec, the Go
// runtime's start, scheduling), under the scenario's concurrency.
func (r *Runner) execVersion(ctx context.Context, n, p int) (loadgen.Percentiles, error) {
	bin := filepath.Join(r.cfg.SidelaneBin, "sidelane-cni")
	d := make([]time.Duration, n)
	err := parallel(n, p, func(i int) error {
		cmd := exec.CommandContext(ctx, bin)
		cmd.Env = append(os.Environ(), "CNI_COMMAND=VERSION")
		cmd.Stdin = bytes.NewBufferString(`{"cniVersion":"1.0.0"}`)
		start := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("sidelane-cni VERSION: %w: %s", err, out)
		}
		d[i] = time.Since(start)
		return nil
	})
	if err != nil {
		return loadgen.Percentiles{}, err
	}
	return loadgen.Summarize(d), nil
}

// samples copies the recorded durations of key from index from on.
func (t *timingExec) samples(key string, from int) []time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.per[key][min(from, len(t.per[key])):])
}

func (t *timingExec) count(key string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.per[key])
}

// cniAddScaleRun is cni_add_scale with the run's repetitions: 30 rounds of
// 30 ADDs per size (3 of 10 in a quick run). 5 rounds of 20 left the
// ratio's interval 0.34 wide (2026-12-01 12:33 run); 10 of 30 left it
// 0.43 wide once sk_lookup made an ADD's p99 ~5 ms (18:00 run), where one
// slow process start moves a round's p99.
func (r *Runner) cniAddScaleRun(ctx context.Context) error {
	reps, perRep := 30, 30
	if r.cfg.Quick {
		reps, perRep = 3, 10
	}
	return r.cniAddScale(ctx, CNIScaleSizes, reps, perRep)
}

// delDepth is how many of cni_add_scale's unmeasured DELs run at once.
const delDepth = 8

// delAll runs del(0..n-1), delDepth at a time, and waits for all of them.
func delAll(n int, del func(int) error) error {
	g := new(errgroup.Group)
	g.SetLimit(delDepth)
	for j := range n {
		g.Go(func() error { return del(j) })
	}
	return g.Wait()
}

// cniAddScale measures sidelane-cni's ADD on nodes with CNIScaleSizes pods
// already enrolled: one agent (real eBPF datapath, own cgroup and pins)
// per size, its pods pre-enrolled through the agent's socket (a netns of
// their own each, inbound capture on lo), then, in reps interleaved
// rounds, perRep pods added one at a time through the whole chain and
// deleted again on every node.
func (r *Runner) cniAddScale(ctx context.Context, sizes []int, reps, perRep int) error {
	chains := make([]*chain, len(sizes))
	for i, size := range sizes {
		c, err := r.newChainWith(ctx, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(216 + i), 0, 0}), 16), chainOpts{ebpf: true})
		if err != nil {
			return err
		}
		chains[i] = c
		t0 := time.Now()
		if err := r.preEnroll(ctx, c, i, size); err != nil {
			return fmt.Errorf("pre-enroll %d pods: %w", size, err)
		}
		r.log.Info("pods pre-enrolled", "pods", size, "took", time.Since(t0).Round(time.Millisecond))
	}
	// The measured pods' namespaces, made up front.
	nss := make([][]ns.NetNS, len(sizes))
	for i := range sizes {
		for range reps * perRep {
			n, err := newNS(r)
			if err != nil {
				return err
			}
			nss[i] = append(nss[i], n)
		}
	}
	before := make([]map[string]phaseStat, len(sizes))
	for i, c := range chains {
		var err error
		if before[i], err = c.scrape(ctx); err != nil {
			return err
		}
	}
	const key = "ADD sidelane-cni"
	res := CNIScale{Sizes: sizes, RepP99ms: make([][]float64, len(sizes)), AgentAddMeanMs: make([]float64, len(sizes)), Target: "<= 1.2"}
	pooled := make([][]time.Duration, len(sizes))
	for k := range reps {
		for _, i := range rotated(len(sizes), k) {
			c := chains[i]
			from := c.exec.count(key)
			pods := nss[i][k*perRep : (k+1)*perRep]
			for j, n := range pods {
				if _, err := c.cni.AddNetworkList(ctx, c.list, c.rt(fmt.Sprintf("scale%d-%03d", k, j), n)); err != nil {
					return fmt.Errorf("ADD at %d pods: %w", sizes[i], err)
				}
			}
			got := c.exec.samples(key, from)
			pooled[i] = append(pooled[i], got...)
			res.RepP99ms[i] = append(res.RepP99ms[i], loadgen.Summarize(got).P99us/1000)
			// DELs are not measured: run them delDepth at once (a DEL,
			// mostly the bridge plugin's veth removal, takes longer than an
			// ADD), all done before the next size's ADDs start.
			if err := delAll(len(pods), func(j int) error {
				return c.cni.DelNetworkList(ctx, c.list, c.rt(fmt.Sprintf("scale%d-%03d", k, j), pods[j]))
			}); err != nil {
				return fmt.Errorf("DEL at %d pods: %w", sizes[i], err)
			}
		}
	}
	for i, size := range sizes {
		s := fmt.Sprintf("cni_add_%d", size)
		p := loadgen.Summarize(pooled[i])
		// Value: the mean of the repetitions' p99s (what the ratio uses).
		r.res.AddReps(s, report.Sidelane, "addP99ms", res.RepP99ms[i], "ms")
		r.res.Add(s, report.Sidelane, "addP99msPooled", p.P99us/1000, "ms")
		r.res.Add(s, report.Sidelane, "addP50ms", p.P50us/1000, "ms")
		if err := r.addPhases(ctx, s, chains[i], before[i]); err != nil {
			r.log.Warn("read the agent's ADD phases", "scenario", s, "error", err)
		}
		if after, err := chains[i].scrape(ctx); err == nil {
			res.AgentAddMeanMs[i] = phaseMeans(before[i], after)[agentAdd]
		}
	}
	res.Ratio = scaleRatio(res.RepP99ms)
	r.res.Add("cni_add_scale", report.Sidelane, fmt.Sprintf("p99_%d_over_%d", sizes[len(sizes)-1], sizes[0]), res.Ratio, "ratio")
	r.log.Info("cni add scale", "sizes", sizes, "repP99ms", res.RepP99ms, "agentAddMeanMs", res.AgentAddMeanMs, "ratio", res.Ratio)
	return r.writeJSON("cni_scale.json", res)
}

func (r *Runner) writeJSON(name string, v any) error {
	if err := os.MkdirAll(r.cfg.OutDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", r.cfg.OutDir, err)
	}
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(r.cfg.OutDir, name), append(data, '\n'), 0o644)
}

func newNS(r *Runner) (ns.NetNS, error) {
	n, err := testutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("create netns: %w", err)
	}
	r.cleanup(func() { n.Close(); _ = testutils.UnmountNS(n) })
	return n, nil
}

// preEnroll adds n pods to c's agent through its socket, as the plugin
// would after the primary plugin: a netns each, an address from the upper
// half of node i's subnet (which host-local, allocating from the bottom,
// does not reach), inbound capture on the netns's lo.
func (r *Runner) preEnroll(ctx context.Context, c *chain, node, n int) error {
	cl := cnirpc.Client{Socket: c.agent.Socket, Timeout: 30 * time.Second}
	nss := make([]ns.NetNS, n)
	for j := range nss {
		var err error
		if nss[j], err = newNS(r); err != nil {
			return err
		}
	}
	return parallel(n, 4, func(j int) error {
		ip := netip.AddrFrom4([4]byte{10, byte(216 + node), byte(128 + j/256), byte(j % 256)})
		id := fmt.Sprintf("pre%05d", j)
		rep, err := cl.Do(ctx, cnirpc.Request{Op: cnirpc.OpAdd, Network: c.name, Netns: nss[j].Path(),
			Attachment: cnirpc.Attachment{ContainerID: id, IfName: "lo"},
			Pod:        cnirpc.PodRef{Namespace: "bench", Name: id},
			IPs:        []netip.Prefix{netip.PrefixFrom(ip, 16)}})
		switch {
		case err != nil:
			return err
		case !rep.OK:
			return fmt.Errorf("ADD %s: %s", id, rep.Error)
		case rep.Mode != "sidecar":
			return fmt.Errorf("ADD %s: mode %q, want sidecar (the agent must enroll for real)", id, rep.Mode)
		}
		return nil
	})
}
