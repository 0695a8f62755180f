//go:build linux

// Package shortcut measures the sockmap shortcut on its own: one enrolled
// pod (netns + cgroup subtree made by the test), a client and a server on
// its loopback, the same connection kinds with the shortcut on and off,
// interleaved, so the ratio is read from one run on a shared machine. It
// asserts correctness only (the shortcut carried bytes when on, none when
// off); the numbers are logged. Run it with
//
//	SIDELANE_SHORTCUT_BENCH=1 go test ./bench/shortcut -run TestShortcutAB -v
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
	"sort"
	"strconv"
	"strings"
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
		if lat, err = loadgen.RR(ctx, args[0], size, 500, 5000); err == nil {
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			res.P50Ns = int64(lat[len(lat)/2])
		}
	case "stream":
		size, _ := strconv.Atoi(args[1])
		res.BytesPerSec, err = loadgen.Stream(ctx, args[0], size, time.Second)
	case "crr":
		size, _ := strconv.Atoi(args[1])
		var c loadgen.CRRResult
		if c, err = loadgen.CRR(ctx, args[0], size, 8, time.Second); err == nil {
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
	return &pod{ns: n, cgroup: cg, cap: c, cookie: cookie}
}

func (p *pod) run(t *testing.T, args ...string) result {
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
	return r
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
			if strings.Contains(s, sc.mode+sc.size) {
				keep = append(keep, sc)
			}
		}
		scen = keep
	}
	for _, sc := range scen {
		var ratios []float64
		var ons, offs []float64
		for i := range reps {
			val := map[bool]float64{}
			order := []bool{true, false}
			if i%2 == 1 {
				order = []bool{false, true}
			}
			if o := os.Getenv("SIDELANE_SHORTCUT_ONLY"); o != "" {
				order = []bool{o == "on", o == "on"}
			}
			for _, on := range order {
				if err := p.cap.SetShortcut(on); err != nil {
					t.Fatal(err)
				}
				before, _ := p.cap.Counters(p.cookie)
				r := p.run(t, sc.mode, addr, sc.size)
				after, _ := p.cap.Counters(p.cookie)
				moved := after.ShortcutBytes - before.ShortcutBytes
				if on != (moved > 0) && sc.mode != "crr" {
					t.Errorf("%s %s shortcut=%v moved %d bytes", sc.mode, sc.size, on, moved)
				}
				switch sc.mode {
				case "rr":
					val[on] = float64(r.P50Ns) / 1000
				case "stream":
					val[on] = r.BytesPerSec / 1e6
				case "crr":
					val[on] = r.PerSec
				}
			}
			ons, offs = append(ons, val[true]), append(offs, val[false])
			// ratio > 1 means the shortcut is better
			if sc.mode == "rr" {
				ratios = append(ratios, val[false]/val[true])
			} else {
				ratios = append(ratios, val[true]/val[false])
			}
		}
		sort.Float64s(ratios)
		t.Logf("%-6s %6s on=%v off=%v  better-ratio median %.3f (min %.3f max %.3f)", sc.mode, sc.size, round(ons), round(offs), ratios[len(ratios)/2], ratios[0], ratios[len(ratios)-1])
	}
}

func round(v []float64) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(int(x*10)) / 10
	}
	return out
}
