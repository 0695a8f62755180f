//go:build linux

// Package shortcut measures the sockmap shortcut on its own: one enrolled
// pod (netns + cgroup subtree made by the test), a client and a server on
// its loopback, the same connection kinds under each design, interleaved
// (rotating order per repetition), so ratios are read from one run on a
// shared machine: "off" (plain loopback TCP), "sticky16" (the shipped
// stream run: once joined, TCP after 16 sends in a row without a reply)
// and "always" (redirect every send once joined). Sockets join only after
// request/response traffic (capture.c's JOIN_SEGS), so streams and short
// connections measure the same under every design but "off". Per scenario it logs the median result and, per
// unit of work (a round trip, a MB, a connection), the cgroup's CPU time
// and the client's and the server's context switches. It asserts only that
// the shortcut carried bytes when on and none when off. Run it with
//
//	SIDELANE_SHORTCUT_BENCH=1 go test ./bench/shortcut -run TestShortcutAB -v
//
// and SIDELANE_SHORTCUT_REPS (default 5), SIDELANE_SHORTCUT_SCEN (e.g.
// "stream1024,rr64"), SIDELANE_SHORTCUT_VARIANTS (e.g. "off,always"; also
// "tcp1": TCP after the first send).
package shortcut

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sidelane/sidelane/bench/loadgen"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

const helperEnv = "SIDELANE_SHORTCUT_HELPER"

func TestMain(m *testing.M) {
	if h := os.Getenv(helperEnv); h != "" {
		os.Exit(helper(h, os.Args[1:]))
	}
	os.Exit(m.Run())
}

type result struct {
	BytesPerSec float64 `json:"bytesPerSec,omitempty"`
	P50Ns       int64   `json:"p50Ns,omitempty"`
	PerSec      float64 `json:"perSec,omitempty"`
}

// helper runs one side of the traffic: serve ADDR, or rr|stream|crr ADDR SIZE.
func helper(mode string, args []string) int {
	ctx := context.Background()
	var res result
	var err error
	switch mode {
	case "serve":
		var ln net.Listener
		if ln, err = net.Listen("tcp", args[0]); err == nil {
			err = loadgen.Serve(ctx, ln)
		}
	case "rr":
		size, _ := strconv.Atoi(args[1])
		var lat []time.Duration
		if lat, err = loadgen.RR(ctx, args[0], size, 500, 5000, loadgen.Window{}); err == nil {
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			res.P50Ns = int64(lat[len(lat)/2])
		}
	case "stream":
		size, _ := strconv.Atoi(args[1])
		res.BytesPerSec, err = loadgen.Stream(ctx, args[0], size, time.Second, loadgen.Window{})
	case "crr":
		size, _ := strconv.Atoi(args[1])
		var c loadgen.CRRResult
		if c, err = loadgen.CRR(ctx, args[0], size, 8, time.Second, loadgen.Window{}); err == nil {
			res.PerSec = c.PerSecond
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	_ = json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

type pod struct {
	ns     *podnet.NS
	cgroup string
	cap    *bpf.Capture
	cookie uint64
}

func newPod(t *testing.T) *pod {
	testenv.Privileged(t)
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Skipf("cgroup v2: %v", err)
	}
	cg := testenv.Cgroup(t, mnt, "sidelane-shortcut-")
	n := podnet.New(t).Add("sc")
	c, err := bpf.Load(bpf.Config{Cgroup: cg, PinDir: filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-shortcut-")), EnableShortcut: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Uninstall() })
	cookie, err := bpf.NetnsCookie(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	p, err := bpf.PlanPod([]netip.Prefix{netip.PrefixFrom(n.IP4, 24)}, capture.Settings{
		OutboundPort: capture.OutboundPort, InboundPort: capture.InboundPort,
		ProxyUIDs: []uint32{capture.DefaultProxyUID}, ProxyGIDs: []uint32{capture.DefaultProxyGID},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Put(cookie, p); err != nil {
		t.Fatal(err)
	}
	// As the agent does at ADD: the shortcut's joins enter the pod's netns
	// by the path this records.
	if err := c.AttachInbound(n.Path, cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	return &pod{ns: n, cgroup: cg, cap: c, cookie: cookie}
}

func (p *pod) run(t *testing.T, args ...string) (result, int64) {
	t.Helper()
	self, _ := os.Executable()
	cmd := p.ns.Command(context.Background(), self, args[1:]...)
	cmd.Env = append(os.Environ(), helperEnv+"="+args[0])
	closeCg, err := podnet.InCgroup(cmd, p.cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer closeCg()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%v: %v: %s", args, err, out)
	}
	var r result
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("%v: %q: %v", args, out, err)
	}
	ru, _ := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	var sw int64
	if ru != nil {
		sw = ru.Nvcsw + ru.Nivcsw
	}
	return r, sw
}

// switches sums the context switches of every thread of pid.
func switches(pid int) int64 {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	var n int64
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) == 2 && strings.HasSuffix(f[0], "ctxt_switches:") {
				x, _ := strconv.ParseInt(f[1], 10, 64)
				n += x
			}
		}
	}
	return n
}

func TestShortcutAB(t *testing.T) {
	if os.Getenv("SIDELANE_SHORTCUT_BENCH") == "" {
		t.Skip("a measurement, not a test: set SIDELANE_SHORTCUT_BENCH=1")
	}
	p := newPod(t)
	const addr = "127.0.0.1:9090"
	self, _ := os.Executable()
	srv := exec.Command("ip", "netns", "exec", p.ns.Name, self)
	srv.Env = append(os.Environ(), helperEnv+"=serve")
	srv.Args = append(srv.Args, addr)
	closeCg, err := podnet.InCgroup(srv, p.cgroup)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	closeCg()
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	time.Sleep(300 * time.Millisecond)

	reps := 5
	if s := os.Getenv("SIDELANE_SHORTCUT_REPS"); s != "" {
		reps, _ = strconv.Atoi(s)
	}
	scen := []struct{ mode, size string }{
		{"rr", "64"}, {"rr", "1024"}, {"rr", "65536"}, {"stream", "1024"}, {"stream", "65536"}, {"crr", "1024"},
	}
	if s := os.Getenv("SIDELANE_SHORTCUT_SCEN"); s != "" {
		var keep []struct{ mode, size string }
		for _, sc := range scen {
			if slices.Contains(strings.Split(s, ","), sc.mode+sc.size) {
				keep = append(keep, sc)
			}
		}
		scen = keep
	}
	type variant struct {
		name string
		on   bool
		run  uint32 // sends in a row before a socket goes TCP
	}
	// tcp1 goes TCP after the first send: what being in the sockhash
	// costs on its own (the tcp_bpf send path); not run unless asked for.
	variants := []variant{{"off", false, 0}, {"sticky16", true, 16}, {"always", true, 1<<24 - 1}, {"tcp1", true, 1}}
	if v := os.Getenv("SIDELANE_SHORTCUT_VARIANTS"); v != "" {
		var keep []variant
		for _, x := range variants {
			if slices.Contains(strings.Split(v, ","), x.name) {
				keep = append(keep, x)
			}
		}
		variants = keep
	} else {
		variants = variants[:3]
	}
	for _, sc := range scen {
		vals := map[string][]float64{}
		cpus := map[string][]float64{}
		csws, ssws := map[string][]float64{}, map[string][]float64{}
		for i := range reps {
			for j := range variants {
				v := variants[(i+j)%len(variants)]
				if err := p.cap.SetShortcut(v.on); err != nil {
					t.Fatal(err)
				}
				if err := p.cap.SetShortcutStreamRun(v.run); err != nil {
					t.Fatal(err)
				}
				before, _ := p.cap.Counters(p.cookie)
				u0, s0 := cpuUsec(t, p.cgroup), switches(srv.Process.Pid)
				r, csw := p.run(t, sc.mode, addr, sc.size)
				u1, s1 := cpuUsec(t, p.cgroup), switches(srv.Process.Pid)
				after, _ := p.cap.Counters(p.cookie)
				moved := after.ShortcutBytes - before.ShortcutBytes
				if v.on != (moved > 0) && sc.mode != "crr" {
					t.Errorf("%s %s %s moved %d bytes", sc.mode, sc.size, v.name, moved)
				}
				var x, work float64
				switch sc.mode {
				case "rr":
					x, work = float64(r.P50Ns)/1000, 5500
				case "stream":
					x, work = r.BytesPerSec/1e6, r.BytesPerSec/1e6
				case "crr":
					x, work = r.PerSec, r.PerSec
				}
				vals[v.name] = append(vals[v.name], x)
				cpus[v.name] = append(cpus[v.name], float64(u1-u0)/work)
				csws[v.name] = append(csws[v.name], float64(csw)/work)
				ssws[v.name] = append(ssws[v.name], float64(s1-s0)/work)
			}
		}
		for _, v := range variants {
			t.Logf("%-6s %6s %-9s median %9.1f  per unit: cpu %8.2f us, client switches %7.2f, server switches %7.2f  all %v",
				sc.mode, sc.size, v.name, med(vals[v.name]), med(cpus[v.name]), med(csws[v.name]), med(ssws[v.name]), round(vals[v.name]))
		}
	}
}

func med(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func cpuUsec(t *testing.T, cg string) int64 {
	b, err := os.ReadFile(filepath.Join(cg, "cpu.stat"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "usage_usec" {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n
		}
	}
	return 0
}

func round(v []float64) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(int(x*10)) / 10
	}
	return out
}
