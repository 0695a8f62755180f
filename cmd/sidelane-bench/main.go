// Command sidelane-bench runs sidelane's benchmarks (`make bench`) and is
// the traffic tool the benchmark starts inside pod network namespaces:
//
//	sidelane-bench run [-quick] [-out bench/out]
//	sidelane-bench serve -listen ADDR
//	sidelane-bench rr -addr ADDR -size N -count N
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

	"github.com/sidelane/sidelane/bench/loadgen"
	"github.com/sidelane/sidelane/bench/run"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: sidelane-bench run|serve|rr [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "run":
		err = runBench(ctx, os.Args[2:])
	case "serve":
		fs := flag.NewFlagSet("serve", flag.ExitOnError)
		addr := fs.String("listen", "127.0.0.1:8080", "listen address")
		_ = fs.Parse(os.Args[2:])
		var ln net.Listener
		if ln, err = net.Listen("tcp", *addr); err == nil {
			err = loadgen.Serve(ctx, ln)
		}
	case "rr":
		fs := flag.NewFlagSet("rr", flag.ExitOnError)
		addr := fs.String("addr", "", "server address")
		size := fs.Int("size", 1024, "message size")
		count := fs.Int("count", 1000, "round trips")
		_ = fs.Parse(os.Args[2:])
		lat, rerr := loadgen.RR(ctx, *addr, *size, *count/10, *count)
		if err = rerr; err == nil {
			err = json.NewEncoder(os.Stdout).Encode(loadgen.Summarize(lat))
		}
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidelane-bench:", err)
		os.Exit(1)
	}
}

func runBench(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	quick := fs.Bool("quick", false, "short runs (under 3 minutes)")
	out := fs.String("out", "bench/out", "output directory")
	bin := fs.String("bin", "bin", "directory of the sidelane binaries")
	tools := fs.String("tools", filepath.Join(os.Getenv("HOME"), ".cache", "sidelane", "bin"), "directory of the reference CNI plugins and pilot-agent")
	_ = fs.Parse(args)
	if os.Geteuid() != 0 {
		return fmt.Errorf("benchmarks need root (network namespaces, bridges, BPF)")
	}
	abs := func(p string) string { a, _ := filepath.Abs(p); return a }
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	return run.New(run.Config{Quick: *quick, OutDir: abs(*out), SidelaneBin: abs(*bin), ToolBin: abs(*tools)}, log).Run(ctx)
}
