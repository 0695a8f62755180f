// Command sidelane is the node agent, the cluster-wide controller and the
// operator's tool:
//
//	sidelane agent        run the node agent (node-local duties, one per node)
//	sidelane controller   run the cluster-wide L7 policy controller (EnvoyFilters, policy status)
//	sidelane explain      explain a pod's mode (asks the local agent)
//	sidelane install-cni  install sidelane-cni into the node's CNI config
//	sidelane version      print the version
//
// Each subcommand's flags are listed by "sidelane <subcommand> -h".
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/sidelane/sidelane/internal/buildinfo"
)

type subcommand struct {
	name, summary string
	run           func(ctx context.Context, args []string) error
}

func subcommands() []subcommand {
	return []subcommand{
		{"agent", "run the node agent", runAgent},
		{"controller", "run the cluster-wide L7 policy controller (EnvoyFilters, policy status)", runController},
		{"explain", "explain a pod's datapath mode: sidelane explain <namespace>/<pod>", runExplain},
		{"install-cni", "install sidelane-cni into the node's CNI config and keep it there", runInstallCNI},
		{"version", "print the version", func(context.Context, []string) error {
			fmt.Println("sidelane", buildinfo.Version)
			return nil
		}},
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: sidelane <subcommand> [flags]")
	for _, c := range subcommands() {
		fmt.Fprintf(os.Stderr, "  %-14s %s\n", c.name, c.summary)
	}
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	for _, c := range subcommands() {
		if c.name == os.Args[1] {
			if err := c.run(ctx, os.Args[2:]); err != nil {
				fmt.Fprintf(os.Stderr, "sidelane %s: %v\n", c.name, err)
				os.Exit(1)
			}
			return
		}
	}
	usage()
	os.Exit(2)
}
