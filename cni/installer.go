package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
)

// Config says where the installer works. Paths are as the installer sees
// them (in the DaemonSet: the host's dirs mounted under /host).
type Config struct {
	// ConfDir is the runtime's CNI conf dir (host /etc/cni/net.d).
	ConfDir string
	// BinDir is the runtime's CNI bin dir (host /opt/cni/bin).
	BinDir string
	// SourceBinary is the sidelane-cni binary to install.
	SourceBinary string
	// Options say how to chain.
	Options Options
	// KubeconfigPath is where the kubeconfig goes; "" writes none. It must
	// be outside ConfDir: a runtime would try to load a .conf-named file,
	// and the conf dir is often world-readable.
	KubeconfigPath string
	// TokenDir holds the service account's token and ca.crt.
	TokenDir string
	// Server is the API server URL written into the kubeconfig.
	Server string
	// CNICacheDir is libcni's cache (host /var/lib/cni); "" skips the check
	// that keeps the binary while cached attachments still name it.
	CNICacheDir string
	Log         *slog.Logger
}

// Installer installs, repairs and uninstalls sidelane-cni on one node.
type Installer struct {
	cfg Config
	log *slog.Logger
}

// New checks cfg; bad settings are an error naming the setting.
func New(cfg Config) (*Installer, error) {
	for name, p := range map[string]string{"conf dir": cfg.ConfDir, "bin dir": cfg.BinDir, "plugin binary": cfg.SourceBinary} {
		if !filepath.IsAbs(p) {
			return nil, fmt.Errorf("invalid %s %q: must be an absolute path", name, p)
		}
	}
	if cfg.KubeconfigPath != "" {
		if !filepath.IsAbs(cfg.KubeconfigPath) {
			return nil, fmt.Errorf("invalid kubeconfig path %q: must be an absolute path", cfg.KubeconfigPath)
		}
		if within(cfg.KubeconfigPath, cfg.ConfDir) {
			return nil, fmt.Errorf("invalid kubeconfig path %q: must be outside the CNI conf dir %s", cfg.KubeconfigPath, cfg.ConfDir)
		}
	}
	if err := cfg.Options.Entry.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Installer{cfg: cfg, log: log}, nil
}

func within(path, dir string) bool {
	rel, err := filepath.Rel(filepath.Clean(dir), filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// BinaryPath is where the plugin binary is installed.
func (i *Installer) BinaryPath() string { return filepath.Join(i.cfg.BinDir, PluginType) }

// InstallBinary copies the plugin binary into the bin dir atomically,
// unless an identical one is already there. It reports whether it wrote.
func (i *Installer) InstallBinary() (bool, error) {
	dst := i.BinaryPath()
	if sameFile(i.cfg.SourceBinary, dst) && fileMode(dst, 0) == 0o755 {
		return false, nil
	}
	data, err := os.ReadFile(i.cfg.SourceBinary)
	if err != nil {
		return false, fmt.Errorf("read plugin binary: %w", err)
	}
	if err := os.MkdirAll(i.cfg.BinDir, 0o755); err != nil {
		return false, fmt.Errorf("create CNI bin dir: %w", err)
	}
	if err := writeAtomic(i.cfg.BinDir, PluginType, data, 0o755); err != nil {
		return false, fmt.Errorf("install plugin binary: %w", err)
	}
	i.log.Info("installed plugin binary", "path", dst)
	return true, nil
}

// Plan computes what SyncConfig would change.
func (i *Installer) Plan() (Plan, error) {
	if err := os.MkdirAll(i.cfg.ConfDir, 0o755); err != nil {
		return Plan{}, fmt.Errorf("create CNI conf dir: %w", err)
	}
	files, err := readConfDir(i.cfg.ConfDir)
	if err != nil {
		return Plan{}, err
	}
	return PlanInstall(files, i.cfg.Options)
}

// SyncConfig chains sidelane into the primary config when its entry is
// missing or wrong and reports what it changed. With ErrMeshCNI it has
// taken sidelane's entry out instead.
func (i *Installer) SyncConfig() (Plan, error) {
	p, err := i.Plan()
	for _, w := range p.Warnings {
		i.log.Warn(w)
	}
	if applyErr := i.apply(p); applyErr != nil {
		return p, applyErr
	}
	return p, err
}

func (i *Installer) apply(p Plan) error {
	for _, w := range p.Writes {
		mode := fs.FileMode(0o644)
		if w.ModeFrom != "" {
			mode = fileMode(filepath.Join(i.cfg.ConfDir, w.ModeFrom), mode)
		}
		if err := writeAtomic(i.cfg.ConfDir, w.Name, w.Data, mode); err != nil {
			return err
		}
		i.log.Info("wrote CNI config", "file", w.Name, "primary", p.Primary)
	}
	for _, name := range p.Removes {
		if err := os.Remove(filepath.Join(i.cfg.ConfDir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", name, err)
		}
		i.log.Info("removed CNI config", "file", name)
	}
	return nil
}

// WriteKubeconfig writes the kubeconfig (mode 0600) from the current token
// when it differs from the file; it reports whether it wrote.
func (i *Installer) WriteKubeconfig() (bool, error) {
	if i.cfg.KubeconfigPath == "" {
		return false, nil
	}
	token, err := os.ReadFile(filepath.Join(i.cfg.TokenDir, "token"))
	if err != nil {
		return false, fmt.Errorf("read service-account token: %w", err)
	}
	ca, err := os.ReadFile(filepath.Join(i.cfg.TokenDir, "ca.crt"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("read service-account CA: %w", err)
	}
	data, err := Kubeconfig(i.cfg.Server, ca, token)
	if err != nil {
		return false, err
	}
	if cur, err := os.ReadFile(i.cfg.KubeconfigPath); err == nil && string(cur) == string(data) && fileMode(i.cfg.KubeconfigPath, 0) == 0o600 {
		return false, nil
	}
	dir := filepath.Dir(i.cfg.KubeconfigPath)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("create kubeconfig dir: %w", err)
	}
	if err := writeAtomic(dir, filepath.Base(i.cfg.KubeconfigPath), data, 0o600); err != nil {
		return false, err
	}
	i.log.Info("wrote kubeconfig", "path", i.cfg.KubeconfigPath)
	return true, nil
}

// Sync does the whole install once: binary, kubeconfig, config.
func (i *Installer) Sync() (Plan, error) {
	if _, err := i.InstallBinary(); err != nil {
		return Plan{}, err
	}
	if _, err := i.WriteKubeconfig(); err != nil {
		return Plan{}, err
	}
	return i.SyncConfig()
}

// Uninstall removes sidelane's entries first (so no new pod gets the
// plugin), then the kubeconfig, then the binary last. The binary stays
// when libcni's cache still holds a config that chains sidelane-cni: a
// runtime that tears pods down from the cached config (CRI-O) needs the
// binary for their DEL.
func (i *Installer) Uninstall() error {
	files, err := readConfDir(i.cfg.ConfDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	p := PlanUninstall(files, i.cfg.Options)
	for _, w := range p.Warnings {
		i.log.Warn(w)
	}
	if err := i.apply(p); err != nil {
		return err
	}
	if i.cfg.KubeconfigPath != "" {
		if err := os.Remove(i.cfg.KubeconfigPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove kubeconfig: %w", err)
		}
	}
	if n := cachedAttachments(i.cfg.CNICacheDir); n > 0 {
		i.log.Warn("keeping the plugin binary: cached attachments still name sidelane-cni and may need it for DEL", "attachments", n, "path", i.BinaryPath())
		return nil
	}
	if err := os.Remove(i.BinaryPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove plugin binary: %w", err)
	}
	i.log.Info("uninstalled", "binary", i.BinaryPath())
	return nil
}

// cachedAttachments counts libcni cache entries (results/*) whose cached
// network config chains sidelane-cni.
func cachedAttachments(cacheDir string) int {
	if cacheDir == "" {
		return 0
	}
	dir := filepath.Join(cacheDir, "results")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		data, err := readFileLimited(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var cached struct {
			Config []byte `json:"config"`
		}
		if json.Unmarshal(data, &cached) != nil || len(cached.Config) == 0 {
			continue
		}
		if l, err := Parse(".conflist", cached.Config); err == nil && l.Has(PluginType) {
			n++
		} else if err != nil && pluginType(cached.Config) == PluginType {
			n++
		}
	}
	return n
}
