// Package agentproc runs the real `sidelane agent` binary as a child process
// for the conformance suite, the benchmarks and the demo.
package agentproc

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sidelane/sidelane/agent/cnirpc"
)

// Proc is one agent process; Start and Stop may be called repeatedly.
type Proc struct {
	Bin      string
	Socket   string
	StateDir string
	Args     []string // extra flags

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	logs bytes.Buffer
}

// New prepares an agent whose socket and state live under dir.
func New(bin, dir string, args ...string) *Proc {
	return &Proc{Bin: bin, Socket: filepath.Join(dir, "cni.sock"), StateDir: filepath.Join(dir, "state"), Args: args}
}

// Start runs the agent and waits until it reports ready.
func (p *Proc) Start(ctx context.Context) error {
	p.mu.Lock()
	args := []string{"agent", "--socket", p.Socket, "--state-dir", p.StateDir, "--log-level", "debug"}
	if !slices.ContainsFunc(p.Args, func(a string) bool { return strings.HasPrefix(strings.TrimLeft(a, "-"), "datapath") }) {
		// Never the default "auto": it attaches to the machine's root
		// cgroup. Callers that want capture pass --datapath and
		// --cgroup-root for a cgroup subtree of their own.
		args = append(args, "--datapath", "noop")
	}
	args = append(args, p.Args...)
	cmd := exec.Command(p.Bin, args...)
	cmd.Stdout = &lockedWriter{mu: &p.mu, w: &p.logs}
	cmd.Stderr = cmd.Stdout
	// No Pdeathsig: it fires when the forking OS thread exits, and Go ends
	// threads that a locked goroutine leaves (as netns helpers do).
	if err := cmd.Start(); err != nil {
		p.mu.Unlock()
		return fmt.Errorf("start agent: %w", err)
	}
	p.cmd = cmd
	p.done = make(chan struct{})
	done := p.done
	p.mu.Unlock()
	go func() { _ = cmd.Wait(); close(done) }()
	if err := p.waitReady(ctx, done); err != nil {
		// The caller registers Stop only after a successful Start: an
		// agent that never became ready (or a cancelled ctx) must not
		// outlive it.
		p.Stop()
		return err
	}
	return nil
}

func (p *Proc) waitReady(ctx context.Context, done <-chan struct{}) error {
	c := cnirpc.Client{Socket: p.Socket, Timeout: time.Second}
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if rep, err := c.Do(ctx, cnirpc.Request{Op: cnirpc.OpStatus}); err == nil && rep.Ready {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("agent exited before ready; logs:\n%s", p.Logs())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("agent not ready after 15s; logs:\n%s", p.Logs())
}

// Stop sends SIGTERM and waits (SIGKILL after 5s).
func (p *Proc) Stop() {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Kill ends the agent at once, as a crash would.
func (p *Proc) Kill() {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-done
}

// PID is the running agent's process id, or 0.
func (p *Proc) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Logs returns everything the agent wrote so far.
func (p *Proc) Logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}
