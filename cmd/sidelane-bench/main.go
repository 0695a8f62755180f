// Command sidelane-bench runs sidelane's benchmarks (`make bench`) and is
// the traffic tool the benchmark starts inside pod network namespaces (and
// cgroups); the traffic subcommands print one JSON object on stdout:
//
//	sidelane-bench run [-quick] [-out bench/out] [-only a,b]
//	sidelane-bench serve -listen ADDR
//	sidelane-bench rr -addr ADDR -size N -count N [-cpu-fds N]
//	sidelane-bench stream -addr ADDR -size N -duration D [-cpu-fds N]
//	sidelane-bench crr -addr ADDR -size N -parallel N -duration D [-cpu-fds N]
//	sidelane-bench connect -addr ADDR -count N
//	sidelane-bench session -addr ADDR -size N [-cpu-fds N]   (commands on stdin, see session)
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sidelane/sidelane/bench/loadgen"
	"github.com/sidelane/sidelane/bench/run"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: sidelane-bench run|serve|rr|stream|crr|connect|session [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	if os.Args[1] == "run" {
		err = runBench(ctx, os.Args[2:])
	} else {
		err = traffic(ctx, os.Args[1], os.Args[2:])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidelane-bench:", err)
		os.Exit(1)
	}
}

// traffic runs one traffic subcommand and prints its run.ClientResult.
func traffic(ctx context.Context, cmd string, args []string) error {
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	listen := fs.String("listen", "0.0.0.0:8080", "listen address (serve)")
	addr := fs.String("addr", "", "server address")
	size := fs.Int("size", 1024, "message or write size in bytes")
	count := fs.Int("count", 1000, "round trips or connections")
	parallel := fs.Int("parallel", 1, "parallel clients (crr)")
	duration := fs.Duration("duration", time.Second, "how long to run (stream, crr)")
	cpuFDs := fs.Int("cpu-fds", 0, "the runner passes this many open cgroup cpu.stat files as fds 3, 4, ...: report their CPU time during the measured window")
	_ = fs.Parse(args)
	var meter run.CPUMeter
	for i := range *cpuFDs {
		meter.Files = append(meter.Files, os.NewFile(uintptr(3+i), fmt.Sprintf("cpu.stat fd %d", 3+i)))
	}
	if cmd == "session" {
		return session(ctx, *addr, *size, meter)
	}
	var res run.ClientResult
	var err error
	w, cpuErr := window(meter, &res)
	switch cmd {
	case "serve":
		var ln net.Listener
		network, address := loadgen.Network(*listen)
		if ln, err = net.Listen(network, address); err != nil {
			return err
		}
		if network == "unix" {
			// The server's sidecar connects as the proxy uid.
			if err = os.Chmod(address, 0o666); err != nil {
				return err
			}
		}
		return loadgen.Serve(ctx, ln)
	case "rr":
		var lat []time.Duration
		lat, err = loadgen.RR(ctx, *addr, *size, *count/10, *count, w)
		res.LatNs = run.Nanos(lat)
	case "stream":
		res.BytesPerSec, err = loadgen.Stream(ctx, *addr, *size, *duration, w)
	case "crr":
		start := time.Now()
		var c loadgen.CRRResult
		c, err = loadgen.CRR(ctx, *addr, *size, *parallel, *duration, w)
		res.LatNs, res.Errors, res.Seconds = run.Nanos(c.Latencies), c.Errors, time.Since(start).Seconds()
	case "connect":
		var lat []time.Duration
		lat, err = loadgen.Connect(ctx, *addr, *count)
		res.LatNs = run.Nanos(lat)
	default:
		return fmt.Errorf("unknown subcommand %q", cmd)
	}
	if err == nil {
		err = *cpuErr
	}
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// window fills res's CPU time and window length from meter over the
// measured window; the returned error is the meter's.
func window(meter run.CPUMeter, res *run.ClientResult) (loadgen.Window, *error) {
	var cpu0 int64
	var t0 time.Time
	cpuErr := new(error)
	return loadgen.Window{
		Begin: func() { cpu0, *cpuErr = meter.Read(); t0 = time.Now() },
		End: func() {
			res.WindowSec = time.Since(t0).Seconds()
			cpu1, err := meter.Read()
			if *cpuErr == nil {
				*cpuErr = err
			}
			res.CPUUsec = float64(cpu1 - cpu0)
		},
	}, cpuErr
}

// session is a long-lived client: it reads commands from stdin, one per
// line, runs each against addr and prints one JSON result line each, so
// the runner can alternate short batches of every contender:
//
//	rr N          N round trips of size bytes on one persistent connection
//	              (dialled, with N/10 warm-up round trips, on first use)
//	stream D      one stream of size-byte writes for duration D
//	crr D P       connection churn for D with P parallel clients
//
// A failed command prints {"error": ...} and the session goes on (an rr
// connection that failed is dialled again).
func session(ctx context.Context, addr string, size int, meter run.CPUMeter) error {
	var rr *loadgen.RRConn
	defer func() {
		if rr != nil {
			rr.Close()
		}
	}()
	enc := json.NewEncoder(os.Stdout)
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		var res run.ClientResult
		w, cpuErr := window(meter, &res)
		err := func() error {
			switch {
			case f[0] == "rr" && len(f) == 2:
				n, err := strconv.Atoi(f[1])
				if err != nil {
					return fmt.Errorf("rr count %q: %w", f[1], err)
				}
				warmup := 0
				if rr == nil {
					if rr, err = loadgen.DialRR(ctx, addr, size); err != nil {
						return err
					}
					warmup = n / 10
				}
				lat, err := rr.Run(ctx, warmup, n, w)
				if err != nil {
					rr.Close()
					rr = nil
					return err
				}
				res.LatNs = run.Nanos(lat)
			case f[0] == "stream" && len(f) == 2:
				d, err := time.ParseDuration(f[1])
				if err != nil {
					return fmt.Errorf("stream duration %q: %w", f[1], err)
				}
				res.BytesPerSec, err = loadgen.Stream(ctx, addr, size, d, w)
				return err
			case f[0] == "crr" && len(f) == 3:
				d, err := time.ParseDuration(f[1])
				if err != nil {
					return fmt.Errorf("crr duration %q: %w", f[1], err)
				}
				p, err := strconv.Atoi(f[2])
				if err != nil {
					return fmt.Errorf("crr parallel %q: %w", f[2], err)
				}
				start := time.Now()
				c, err := loadgen.CRR(ctx, addr, size, p, d, w)
				res.LatNs, res.Errors, res.Seconds = run.Nanos(c.Latencies), c.Errors, time.Since(start).Seconds()
				return err
			default:
				return fmt.Errorf("unknown session command %q", sc.Text())
			}
			return nil
		}()
		if err == nil {
			err = *cpuErr
		}
		if err != nil {
			res = run.ClientResult{Error: err.Error()}
		}
		if err := enc.Encode(res); err != nil {
			return err
		}
	}
	return sc.Err()
}

func runBench(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	quick := fs.Bool("quick", false, "short runs (under 3 minutes)")
	out := fs.String("out", "bench/out", "output directory")
	bin := fs.String("bin", "bin", "directory of the sidelane binaries")
	only := fs.String("only", "", "comma-separated scenarios to run (traffic, cni_burst_100, cni_sequential_20, footprint, policy_update, policy_to_istiod); empty: all")
	pin := fs.Bool("pin-cpus", true, "traffic scenarios: client pods on core 0, server pods on core 1 (fixed placement, steadier batches)")
	tools := fs.String("tools", filepath.Join(os.Getenv("HOME"), ".cache", "sidelane", "bin"), "directory of the reference CNI plugins and pilot-agent")
	_ = fs.Parse(args)
	if os.Geteuid() != 0 {
		return fmt.Errorf("benchmarks need root (network namespaces, bridges, BPF)")
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own binary: %w", err)
	}
	abs := func(p string) string { a, _ := filepath.Abs(p); return a }
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	return run.New(run.Config{Quick: *quick, OutDir: abs(*out), SidelaneBin: abs(*bin), ToolBin: abs(*tools), BenchBin: self, Only: run.ParseOnly(*only), PinCPUs: *pin}, log).Run(ctx)
}
