// Command sidelane-bench runs sidelane's benchmarks (`make bench`) and is
// the traffic tool the benchmark starts inside pod network namespaces (and
// cgroups); the traffic subcommands print one JSON object on stdout:
//
//	sidelane-bench run [-quick] [-out bench/out]
//	sidelane-bench serve -listen ADDR
//	sidelane-bench rr -addr ADDR -size N -count N [-cpu-fds N]
//	sidelane-bench stream -addr ADDR -size N -duration D [-cpu-fds N]
//	sidelane-bench crr -addr ADDR -size N -parallel N -duration D [-cpu-fds N]
//	sidelane-bench connect -addr ADDR -count N
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sidelane/sidelane/bench/loadgen"
	"github.com/sidelane/sidelane/bench/run"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: sidelane-bench run|serve|rr|stream|crr|connect [flags]")
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
	var res run.ClientResult
	var err error
	var meter run.CPUMeter
	for i := range *cpuFDs {
		meter.Files = append(meter.Files, os.NewFile(uintptr(3+i), fmt.Sprintf("cpu.stat fd %d", 3+i)))
	}
	var cpu0 int64
	var t0 time.Time
	var cpuErr error
	w := loadgen.Window{
		Begin: func() { cpu0, cpuErr = meter.Read(); t0 = time.Now() },
		End: func() {
			res.WindowSec = time.Since(t0).Seconds()
			cpu1, err := meter.Read()
			if cpuErr == nil {
				cpuErr = err
			}
			res.CPUUsec = float64(cpu1 - cpu0)
		},
	}
	switch cmd {
	case "serve":
		var ln net.Listener
		if ln, err = net.Listen("tcp", *listen); err != nil {
			return err
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
		err = cpuErr
	}
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

func runBench(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	quick := fs.Bool("quick", false, "short runs (under 3 minutes)")
	out := fs.String("out", "bench/out", "output directory")
	bin := fs.String("bin", "bin", "directory of the sidelane binaries")
	tools := fs.String("tools", filepath.Join(os.Getenv("HOME"), ".cache", "sidelane", "bin"), "directory of the reference CNI plugins and pilot-agent")
	only := fs.String("only", "", "comma-separated scenarios to run (traffic, cni_burst_100, cni_sequential_20, footprint, policy_update, ...); default all")
	_ = fs.Parse(args)
	var onlyList []string
	if *only != "" {
		onlyList = strings.Split(*only, ",")
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("benchmarks need root (network namespaces, bridges, BPF)")
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own binary: %w", err)
	}
	abs := func(p string) string { a, _ := filepath.Abs(p); return a }
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	return run.New(run.Config{Quick: *quick, Only: onlyList, OutDir: abs(*out), SidelaneBin: abs(*bin), ToolBin: abs(*tools), BenchBin: self}, log).Run(ctx)
}
