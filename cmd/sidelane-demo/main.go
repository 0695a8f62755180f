// Command sidelane-demo runs `make demo` (see internal/demo); run it as
// root from the repository root. Ctrl-C stops it and cleans up.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/sidelane/sidelane/internal/demo"
)

func main() {
	home, _ := os.UserHomeDir()
	bin := flag.String("bin", "bin", "directory with sidelane, sidelane-cni and sidelane-bench")
	tools := flag.String("tools", filepath.Join(home, ".cache", "sidelane", "bin"), "directory with the reference CNI plugins")
	repo := flag.String("repo", ".", "repository root (fixtures, CRDs)")
	noBench := flag.Bool("no-bench", false, "leave out step 4's side-by-side latency run (`sidelane-bench run -quick`, about 80 s)")
	flag.Parse()
	absBin, _ := filepath.Abs(*bin)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	_, err := demo.Run(ctx, demo.Options{Out: os.Stdout, Repo: *repo, Bin: absBin, Tools: *tools, NoBench: *noBench})
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("demo: all checks passed")
}
