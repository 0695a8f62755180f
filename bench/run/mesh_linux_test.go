package run

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/bench/report"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
)

// Every contender the benchmark measures really sends the client's traffic
// through both sidecars (haproxy's outbound and inbound listeners count
// it), and the check that guards the benchmark fails for sidecars whose
// pod has no capture: a benchmark cannot silently measure an uncaptured
// path and call it a mesh.
func TestContendersCapture(t *testing.T) {
	testenv.Privileged(t)
	bin := buildBench(t)
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	m := NewMesh(t, MeshConfig{BenchBin: bin, PilotAgent: testenv.RequireTool(t, "pilot-agent"), PinCPUs: true, Log: log})
	if len(m.Pending) > 0 {
		t.Fatalf("contenders not set up: %v", m.Pending)
	}
	want := []string{report.NoMesh, report.Explicit, report.ExplicitUnix, report.IstioIptables, report.IstioNFTables, report.SidelaneIptables,
		report.SidelaneEBPF, AltEBPF(false), report.PerNode}
	var got []string
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, c := range m.Contenders {
		got = append(got, c.Name)
		t.Run(c.Name, func(t *testing.T) {
			pr := m.NewPair(c)
			if err := m.CheckCaptured(ctx, pr); err != nil {
				t.Fatal(err)
			}
			if !c.unix {
				if err := m.CheckCaptured(ctx, m.NewRemoteClient(pr)); err != nil {
					t.Fatalf("cross-node: %v", err)
				}
			}
			// The traffic subcommands work through the path.
			res, err := m.Client(ctx, c, pr.Client, "crr", "-addr", pr.ServerAddr(), "-size", "1024", "-parallel", "2", "-duration", "100ms")
			if err != nil {
				t.Fatal(err)
			}
			if len(res.LatNs) == 0 || res.Errors != 0 {
				t.Fatalf("crr: %d connections, %d errors", len(res.LatNs), res.Errors)
			}
			// A session client alternates batches over the same path and
			// survives a bad command.
			sess, err := m.StartSession(c, pr.Client, pr.ServerAddr(), 1024)
			if err != nil {
				t.Fatal(err)
			}
			defer sess.Close()
			// Pinned as make bench runs it: the client's process (ip netns
			// exec, then taskset, then the client, one pid) is on the
			// client core only.
			if m.pin {
				if got := cpusAllowed(t, sess.cmd.Process.Pid); got != clientCPU {
					t.Fatalf("session client on cores %q, want %q", got, clientCPU)
				}
			}
			for _, cmd := range []string{"rr 50", "stream 20ms", "bogus", "crr 50ms 2", "rr 20"} {
				res, err := sess.Do(cmd)
				if cmd == "bogus" {
					if err == nil {
						t.Fatal("session accepted a bogus command")
					}
					continue
				}
				if err != nil {
					t.Fatalf("session %s: %v", cmd, err)
				}
				if res.CPUUsec <= 0 || res.WindowSec <= 0 {
					t.Fatalf("session %s: CPU %v us in %v s, want both", cmd, res.CPUUsec, res.WindowSec)
				}
			}
			// Its pods and proxies run in its own cgroup, whose CPU time
			// the client reports for the measured window.
			if c.Cgroup == "" || res.CPUUsec <= 0 {
				t.Fatalf("cgroup %q, CPU %v us: want the contender's own cgroup and its CPU time", c.Cgroup, res.CPUUsec)
			}
		})
	}
	if len(got) != len(want) {
		t.Fatalf("contenders = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("contenders = %v, want %v", got, want)
		}
	}

	// Where the eBPF contender's per-connection CPU goes: its programs'
	// run time per connection, by program, under BPF_ENABLE_STATS.
	t.Run("BPF run time per connection", func(t *testing.T) {
		var pr *Pair
		for _, c := range m.Contenders {
			if c.Name == report.SidelaneEBPF {
				pr = m.NewPair(c)
			}
		}
		if pr == nil {
			t.Fatalf("no %s contender", report.SidelaneEBPF)
		}
		r := New(Config{Quick: true}, log)
		r.bpfCost(ctx, m, []*Pair{pr}, []string{report.SidelaneEBPF}, 2, "100ms")
		got := map[string]float64{}
		for _, f := range r.res.Figures {
			if f.Scenario == "crr_8_bpf" && f.Contender == report.SidelaneEBPF {
				got[f.Metric] = f.Value
			}
		}
		// Every connection is a redirected connect and the sockets'
		// sock_ops callbacks; the total is their sum.
		var sum float64
		for k, v := range got {
			if k != "total" {
				sum += v
			}
		}
		if got["sidelane_connect4"] <= 0 || got["sidelane_sockops"] <= 0 || got["total"] <= 0 || math.Abs(sum-got["total"]) > 1e-6*got["total"] {
			t.Fatalf("crr_8_bpf figures = %v (pending %+v), want connect4, sockops and their total", got, r.res.Pending)
		}
	})

	t.Run("uncaptured sidecars are caught", func(t *testing.T) {
		bare := &Contender{Name: "sidecars-without-capture", Sidecar: true, install: func(podnet.TB, *Pod, map[string]string) {}}
		pr := m.NewPair(bare)
		if err := m.CheckCaptured(ctx, pr); err == nil {
			t.Fatal("CheckCaptured passed for pods whose sidecars capture nothing")
		}
		pernode := m.Contenders[len(m.Contenders)-1]
		bareNode := &Contender{Name: "pernode-without-capture", nodeProxy: pernode.nodeProxy, Cgroup: pernode.Cgroup}
		if err := m.CheckCaptured(ctx, m.NewPair(bareNode)); err == nil {
			t.Fatal("CheckCaptured passed for per-node pods that are not enrolled")
		}
	})
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// The explicit proxy's sidecar is the capture sidecar with fixed
// upstreams: no original destination anywhere (which would loop back to
// haproxy itself without capture).
func TestExplicitConfig(t *testing.T) {
	sc := podnet.Sidecar{UID: 1337, GID: 1337, OutPort: 15001, InPort: 15006}
	cfg, err := explicitConfig(sc, netip.MustParseAddrPort("10.1.2.3:15006"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"server orig 10.1.2.3:15006\n", "server orig 127.0.0.1:8080 source 127.0.0.6", "bind 0.0.0.0:15001", "uid 1337"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("config lacks %q:\n%s", want, cfg)
		}
	}
	if strings.Contains(cfg, "0.0.0.0\n") || strings.Contains(cfg, "0.0.0.0 source") {
		t.Errorf("config still proxies to an original destination:\n%s", cfg)
	}
}

// The Unix floor's sidecar has no TCP listener or upstream left: every
// hop is a socket file.
func TestUnixConfig(t *testing.T) {
	sc := podnet.Sidecar{UID: 1337, GID: 1337, OutPort: 15001, InPort: 15006}
	cfg, err := unixConfig(sc, "/p/c", "/p/s")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"bind unix@/p/c/out.sock mode 666\n", "bind unix@/p/c/in.sock mode 666\n",
		"server orig unix@/p/s/in.sock\n", "server orig unix@/p/c/app.sock\n", "uid 1337"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("config lacks %q:\n%s", want, cfg)
		}
	}
	if strings.Contains(cfg, "0.0.0.0") {
		t.Errorf("config still has a TCP address:\n%s", cfg)
	}
}

func TestParseFrontendSessions(t *testing.T) {
	csv := "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin\n" +
		"outbound,FRONTEND,,,0,1,2000,7,100\n" +
		"inbound,FRONTEND,,,0,1,2000,3,100\n" +
		"orig_out,orig,0,0,0,1,,7,100\n"
	got, err := podnet.ParseFrontendSessions(csv)
	if err != nil {
		t.Fatal(err)
	}
	if got["outbound"] != 7 || got["inbound"] != 3 || len(got) != 2 {
		t.Fatalf("got %v", got)
	}
	for _, bad := range []string{"", "pxname,stot\n", "# pxname,svname,stot\nx,FRONTEND,abc\n"} {
		if _, err := podnet.ParseFrontendSessions(bad); err == nil {
			t.Errorf("no error for %q", bad)
		}
	}
}

// cpusAllowed is /proc/<pid>/status's Cpus_allowed_list, after the
// process has exec'd past ip netns exec and taskset.
func cpusAllowed(t *testing.T, pid int) string {
	t.Helper()
	var last string
	for range 100 {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		var name string
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "Name:"); ok {
				name = strings.TrimSpace(v)
			}
			if v, ok := strings.CutPrefix(l, "Cpus_allowed_list:"); ok {
				last = strings.TrimSpace(v)
			}
		}
		if name == "sidelane-bench" {
			return last
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("pid %d never became sidelane-bench (cores %q)", pid, last)
	return ""
}
