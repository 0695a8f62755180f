//go:build !linux

package ebpf

import (
	"fmt"
	"log/slog"

	"github.com/sidelane/sidelane/bpf"
)

// Options configures Open.
type Options struct {
	Cgroup         string
	PinDir         string
	EnableShortcut bool
	ForceMissing   []string
	Log            *slog.Logger
}

// Open needs Linux.
func Open(Options) (*Datapath, *bpf.Capture, error) {
	return nil, nil, fmt.Errorf("eBPF datapath: %w", bpf.ErrNotSupported)
}
