// Command sidelane-bench runs sidelane's benchmarks (`make bench`) and is
// the traffic tool the benchmark starts inside pod network namespaces (and
// cgroups); the traffic subcommands print one JSON object on stdout:
//
//	sidelane-bench run [-quick] [-out bench/out] [-only a,b]
//	sidelane-bench serve -listen ADDR
//	sidelane-bench rr -addr ADDR -size N -count N
//	sidelane-bench stream -addr ADDR -size N -duration D
//	sidelane-bench crr -addr ADDR -size N -parallel N -duration D
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
	_ = fs.Parse(args)
	var res run.ClientResult
	var err error
	switch cmd {
	case "serve":
		var ln net.Listener
		if ln, err = net.Listen("tcp", *listen); err != nil {
			return err
		}
		return loadgen.Serve(ctx, ln)
	case "rr":
		var lat []time.Duration
		lat, err = loadgen.RR(ctx, *addr, *size, *count/10, *count)
		res.LatNs = run.Nanos(lat)
	case "stream":
		res.BytesPerSec, err = loadgen.Stream(ctx, *addr, *size, *duration)
	case "crr":
		start := time.Now()
		var c loadgen.CRRResult
		c, err = loadgen.CRR(ctx, *addr, *size, *parallel, *duration)
		res.LatNs, res.Errors, res.Seconds = run.Nanos(c.Latencies), c.Errors, time.Since(start).Seconds()
	case "connect":
		var lat []time.Duration
		lat, err = loadgen.Connect(ctx, *addr, *count)
		res.LatNs = run.Nanos(lat)
	default:
		return fmt.Errorf("unknown subcommand %q", cmd)
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
	only := fs.String("only", "", "comma-separated scenarios to run (traffic, cni_burst_100, cni_sequential_20, footprint, policy_update, policy_to_istiod); empty: all")
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
	return run.New(run.Config{Quick: *quick, OutDir: abs(*out), SidelaneBin: abs(*bin), ToolBin: abs(*tools), BenchBin: self, Only: run.ParseOnly(*only)}, log).Run(ctx)
}
