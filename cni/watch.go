package cni

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/fsnotify/fsnotify"
)

// WatchOptions tune Run. Zero values take the defaults.
type WatchOptions struct {
	// Debounce waits for a burst of file events to settle: installers
	// often write a file in several steps.
	Debounce time.Duration
	// RepairBurst and RepairEvery rate-limit repairs (writes).
	RepairBurst int
	RepairEvery time.Duration
	// Resync re-checks everything even without events, in case an event
	// was lost (e.g. the dir was replaced by a mount).
	Resync time.Duration
	// CleanupOnExit uninstalls when ctx ends.
	CleanupOnExit bool
	// Synced, when set, is called after each check with its outcome.
	Synced func(Plan, error)
}

func (o *WatchOptions) defaults() {
	if o.Debounce == 0 {
		o.Debounce = 100 * time.Millisecond
	}
	if o.RepairBurst == 0 {
		o.RepairBurst = 5
	}
	if o.RepairEvery == 0 {
		o.RepairEvery = 2 * time.Second
	}
	if o.Resync == 0 {
		o.Resync = time.Minute
	}
}

// Run installs and then keeps the install in place until ctx ends: it
// watches the conf dir (a primary rewriting or replacing its file, a
// missing primary appearing), the bin dir (the binary removed or
// replaced) and the token dir (token rotation), and repairs only what is
// missing or wrong.
func (i *Installer) Run(ctx context.Context, o WatchOptions) error {
	o.defaults()
	for _, d := range []string{i.cfg.ConfDir, i.cfg.BinDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("start file watcher: %w", err)
	}
	defer w.Close()
	for _, d := range []string{i.cfg.ConfDir, i.cfg.BinDir, i.tokenDir()} {
		if d == "" {
			continue
		}
		if err := w.Add(d); err != nil {
			return fmt.Errorf("watch %s: %w", d, err)
		}
	}

	lim := newLimiter(o.RepairBurst, o.RepairEvery)
	timer := time.NewTimer(0) // first check at once
	defer timer.Stop()
	resync := time.NewTicker(o.Resync)
	defer resync.Stop()
	waiting, steppedBack := false, false
	for {
		select {
		case <-ctx.Done():
			if o.CleanupOnExit {
				i.log.Info("uninstalling on exit")
				return i.Uninstall()
			}
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("file watcher closed")
			}
			i.log.Debug("file event", "name", ev.Name, "op", ev.Op.String())
			timer.Reset(o.Debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("file watcher closed")
			}
			// An overflow loses events: check everything.
			i.log.Warn("file watcher error; re-checking", "error", err)
			timer.Reset(o.Debounce)
		case <-resync.C:
			timer.Reset(0)
		case <-timer.C:
			p, err := i.check(lim, timer)
			switch {
			case errors.Is(err, ErrNoPrimary):
				if !waiting {
					i.log.Info("waiting for the primary CNI plugin to write its config", "dir", i.cfg.ConfDir)
				}
				waiting, steppedBack = true, false
			case errors.Is(err, ErrMeshCNI):
				// Said once per episode; the check keeps sidelane's entry
				// out on every event until the other mesh's plugin is gone.
				if !steppedBack {
					i.log.Warn("stepping back: sidelane's entry is out of the CNI config while another mesh's CNI plugin is chained; waiting until it is gone", "error", err.Error())
				}
				waiting, steppedBack = false, true
			default:
				waiting, steppedBack = false, false
				if err != nil {
					i.log.Error("install check", "error", err)
				}
			}
			if o.Synced != nil {
				o.Synced(p, err)
			}
		}
	}
}

func (i *Installer) tokenDir() string {
	if i.cfg.KubeconfigPath == "" {
		return ""
	}
	return i.cfg.TokenDir
}

// check repairs what is missing or wrong, within the rate limit; over the
// limit it re-arms timer for when the next repair is allowed.
func (i *Installer) check(lim *limiter, timer *time.Timer) (Plan, error) {
	if _, err := i.WriteKubeconfig(); err != nil {
		i.log.Error("kubeconfig", "error", err)
	}
	binOK := sameFile(i.cfg.SourceBinary, i.BinaryPath())
	p, planErr := i.Plan()
	if binOK && p.Empty() {
		return p, planErr
	}
	if ok, wait := lim.allow(time.Now()); !ok {
		i.log.Warn("repair rate limit reached; another installer may be rewriting the CNI config", "retryIn", wait.String(), "primary", p.Primary)
		timer.Reset(wait)
		return Plan{Primary: p.Primary}, planErr
	}
	if !binOK {
		if _, err := i.InstallBinary(); err != nil {
			return p, err
		}
	}
	if p.Empty() {
		return p, planErr
	}
	i.log.Info("repairing CNI config", "primary", p.Primary)
	return i.SyncConfig()
}
