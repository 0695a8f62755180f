//go:build linux

package run

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/sidelane/sidelane/bench/loadgen"
	"github.com/sidelane/sidelane/bench/report"
	"github.com/sidelane/sidelane/istio/capture"
)

// sizes are the traffic scenarios' lengths.
type sizes struct {
	reps        int
	rrCount     int
	stream, crr time.Duration
	connects    int
	exclusions  []int
}

func (r *Runner) sizes() sizes {
	if r.cfg.Quick {
		return sizes{reps: 3, rrCount: 1000, stream: 250 * time.Millisecond, crr: 300 * time.Millisecond,
			connects: 200, exclusions: []int{10, 1000, 10000}}
	}
	return sizes{reps: 5, rrCount: 10000, stream: 2 * time.Second, crr: 2 * time.Second,
		connects: 2000, exclusions: []int{10, 1000, 10000}}
}

// traffic builds every contender's pods on one node and runs the traffic
// scenarios, alternating contenders inside each repetition (and rotating
// who goes first), so slow drifts of a noisy machine hit all of them alike.
func (r *Runner) traffic(ctx context.Context) error {
	tb := benchTB{r}
	sz := r.sizes()
	m := NewMesh(tb, MeshConfig{BenchBin: r.cfg.BenchBin, PilotAgent: filepath.Join(r.cfg.ToolBin, "pilot-agent"), Log: r.log})
	var pairs []*Pair
	for _, c := range m.Contenders {
		pr := m.NewPair(c)
		if err := m.CheckCaptured(ctx, pr); err != nil {
			m.Pending[c.Name] = "capture check failed, not measured: " + err.Error()
			r.log.Error("capture check", "contender", c.Name, "error", err)
			continue
		}
		pairs = append(pairs, pr)
	}
	// Cross-node clients: the same contenders' servers, called from pods
	// on the second node.
	var remotes []*Pair
	for _, pr := range pairs {
		if pr.C.noRemote != "" {
			r.res.Skip("rr_1k_cross_node", pr.C.Name, pr.C.noRemote)
			continue
		}
		rp := m.NewRemoteClient(pr)
		if err := m.CheckCaptured(ctx, rp); err != nil {
			r.res.Skip("rr_1k_cross_node", pr.C.Name, "capture check failed, not measured: "+err.Error())
			continue
		}
		remotes = append(remotes, rp)
	}
	for name, why := range m.Pending {
		for _, s := range []string{"rr_64", "rr_1k", "rr_64k", "rr_1k_cross_node", "stream_1k", "stream_64k", "crr_1", "crr_8"} {
			r.res.Skip(s, name, why)
		}
	}
	r.log.Info("contenders ready", "measured", len(pairs), "pending", len(m.Pending))

	// client runs one measurement, retrying once: on this shared machine a
	// connection very rarely dies (seen once in several runs: EOF on the
	// first round trip of a cross-node istio-iptables run). The failure is
	// recorded in the results, never hidden.
	client := func(scenario string, pr *Pair, pod *Pod, args ...string) (ClientResult, error) {
		res, err := m.Client(ctx, pr.C, pod, args...)
		if err == nil || ctx.Err() != nil {
			return res, err
		}
		r.transient(scenario, pr.C.Name, err)
		return m.Client(ctx, pr.C, pod, args...)
	}
	// failed records a scenario that could not finish; the others go on.
	failed := func(scenario string, err error) {
		r.res.Skip(scenario, "", "failed: "+err.Error())
		r.log.Error("scenario failed", "name", scenario, "error", err)
	}

	// each runs f for every pair, reps times, rotating the order.
	each := func(pairs []*Pair, f func(rep int, pr *Pair) error) error {
		for rep := range sz.reps {
			for i := range pairs {
				pr := pairs[(i+rep)%len(pairs)]
				if err := f(rep, pr); err != nil {
					return err
				}
			}
		}
		return nil
	}

	for _, s := range []struct {
		name  string
		size  int
		pairs []*Pair
	}{{"rr_64", 64, pairs}, {"rr_1k", 1024, pairs}, {"rr_64k", 65536, pairs}, {"rr_1k_cross_node", 1024, remotes}} {
		lat := map[string][]time.Duration{}
		err := each(s.pairs, func(_ int, pr *Pair) error {
			res, err := client(s.name, pr, pr.Client, "rr", "-addr", pr.ServerAddr(), "-size", strconv.Itoa(s.size), "-count", strconv.Itoa(sz.rrCount))
			lat[pr.C.Name] = append(lat[pr.C.Name], durations(res.LatNs)...)
			return err
		})
		if err != nil {
			failed(s.name, err)
			continue
		}
		for _, pr := range s.pairs {
			p := loadgen.Summarize(lat[pr.C.Name])
			r.res.Add(s.name, pr.C.Name, "p50us", p.P50us, "us")
			r.res.Add(s.name, pr.C.Name, "p90us", p.P90us, "us")
			r.res.Add(s.name, pr.C.Name, "p99us", p.P99us, "us")
		}
		r.log.Info("scenario done", "name", s.name)
	}

	for _, s := range []struct {
		name string
		size int
	}{{"stream_1k", 1024}, {"stream_64k", 65536}} {
		bps := map[string][]float64{}
		err := each(pairs, func(_ int, pr *Pair) error {
			res, err := client(s.name, pr, pr.Client, "stream", "-addr", pr.ServerAddr(), "-size", strconv.Itoa(s.size), "-duration", sz.stream.String())
			bps[pr.C.Name] = append(bps[pr.C.Name], res.BytesPerSec)
			return err
		})
		if err != nil {
			failed(s.name, err)
			continue
		}
		for _, pr := range pairs {
			r.res.Add(s.name, pr.C.Name, "MBps", median(bps[pr.C.Name])/1e6, "MB/s")
		}
		r.log.Info("scenario done", "name", s.name)
	}

	for _, par := range []int{1, 8} {
		name := fmt.Sprintf("crr_%d", par)
		type acc struct {
			lat       []time.Duration
			conns     int
			seconds   float64
			conntrack int
		}
		accs := map[string]*acc{}
		err := each(pairs, func(_ int, pr *Pair) error {
			a := accs[pr.C.Name]
			if a == nil {
				a = &acc{}
				accs[pr.C.Name] = a
			}
			ct0, err := conntrackTotal(pr)
			if err != nil {
				return err
			}
			res, err := client(name, pr, pr.Client, "crr", "-addr", pr.ServerAddr(), "-size", "1024", "-parallel", strconv.Itoa(par), "-duration", sz.crr.String())
			if err != nil {
				return err
			}
			ct1, err := conntrackTotal(pr)
			if err != nil {
				return err
			}
			a.lat = append(a.lat, durations(res.LatNs)...)
			a.conns += len(res.LatNs)
			a.seconds += res.Seconds
			a.conntrack += ct1 - ct0
			return nil
		})
		if err != nil {
			failed(name, err)
			continue
		}
		for _, pr := range pairs {
			a := accs[pr.C.Name]
			p := loadgen.Summarize(a.lat)
			r.res.Add(name, pr.C.Name, "connsPerSec", float64(a.conns)/a.seconds, "conn/s")
			r.res.Add(name, pr.C.Name, "p99us", p.P99us, "us")
			r.res.Add(name, pr.C.Name, "conntrackPerConn", float64(max(a.conntrack, 0))/float64(a.conns), "entries")
		}
		r.log.Info("scenario done", "name", name)
	}

	r.exclusions(ctx, m, pairs, sz)
	return nil
}

// exclusions measures connect latency from a client pod with n excluded
// outbound CIDRs (none of them the server's) to its contender's server.
func (r *Runner) exclusions(ctx context.Context, m *Mesh, pairs []*Pair, sz sizes) {
	var targets []*Pair
	for _, pr := range pairs {
		if pr.C.Name == report.IstioIptables || pr.C.Name == report.SidelaneEBPF {
			targets = append(targets, pr)
		}
	}
	for _, name := range []string{report.IstioIptables, report.SidelaneEBPF} {
		if why, ok := m.Pending[name]; ok {
			for _, n := range sz.exclusions {
				r.res.Skip(fmt.Sprintf("exclusions_%d", n), name, why)
			}
		}
	}
	// Every (size, contender) client pod first, then the measurements
	// interleaved across sizes too: the ratio between sizes must not be
	// the machine's drift between one size's turn and the next.
	type run struct {
		scenario string
		pr       *Pair
		client   *Pod
	}
	var runs []run
	failed := map[string]bool{}
	for _, n := range sz.exclusions {
		scenario := fmt.Sprintf("exclusions_%d", n)
		ann := map[string]string{capture.AnnotationExcludeOutboundIPRanges: ExcludedCIDRs(n)}
		for _, pr := range targets {
			t0 := time.Now()
			c := m.NewPod(pr.C, "bx", ann)
			r.log.Info("exclusion pod ready", "contender", pr.C.Name, "cidrs", n, "setup", time.Since(t0).Round(time.Millisecond))
			if err := m.CheckCaptured(ctx, &Pair{C: pr.C, Client: c, Server: pr.Server}); err != nil {
				r.res.Skip(scenario, pr.C.Name, "capture check failed, not measured: "+err.Error())
				continue
			}
			runs = append(runs, run{scenario, pr, c})
		}
	}
	lat := map[run][]time.Duration{}
	for rep := range sz.reps {
		for i := range runs {
			x := runs[(i+rep)%len(runs)]
			if failed[x.scenario] {
				continue
			}
			args := []string{"connect", "-addr", x.pr.ServerAddr(), "-count", strconv.Itoa(sz.connects)}
			res, err := m.Client(ctx, x.pr.C, x.client, args...)
			if err != nil {
				r.transient(x.scenario, x.pr.C.Name, err)
				res, err = m.Client(ctx, x.pr.C, x.client, args...)
			}
			if err != nil {
				failed[x.scenario] = true
				r.res.Skip(x.scenario, "", "failed: "+err.Error())
				r.log.Error("scenario failed", "name", x.scenario, "error", err)
				continue
			}
			lat[x] = append(lat[x], durations(res.LatNs)...)
		}
	}
	for _, x := range runs {
		if failed[x.scenario] {
			continue
		}
		p := loadgen.Summarize(lat[x])
		r.res.Add(x.scenario, x.pr.C.Name, "connectP50us", p.P50us, "us")
		r.res.Add(x.scenario, x.pr.C.Name, "connectP99us", p.P99us, "us")
	}
	r.log.Info("scenario done", "name", "exclusions")
}

// conntrackTotal is the conntrack entries in both pods of pr.
func conntrackTotal(pr *Pair) (int, error) {
	a, err := conntrackCount(pr.Client)
	if err != nil {
		return 0, err
	}
	b, err := conntrackCount(pr.Server)
	return a + b, err
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
