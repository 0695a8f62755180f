package node

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/internal/testenv"
)

// chartImage is the image the chart deploys by default: values.yaml's
// image.repository and image.tag, the chart's appVersion when the tag is "".
func chartImage(t *testing.T) string {
	t.Helper()
	root := testenv.RepoRoot(t)
	var chart struct {
		AppVersion string `json:"appVersion"`
	}
	var values struct {
		Image struct {
			Repository string `json:"repository"`
			Tag        string `json:"tag"`
		} `json:"image"`
	}
	for f, v := range map[string]any{"Chart.yaml": &chart, "values.yaml": &values} {
		b, err := os.ReadFile(filepath.Join(root, "charts", "sidelane", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(b, v); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
	}
	tag := values.Image.Tag
	if tag == "" {
		tag = chart.AppVersion
	}
	return values.Image.Repository + ":" + tag
}

// imageArchive is what make image wrote.
func imageArchive(t *testing.T) string {
	t.Helper()
	p := filepath.Join(filepath.Dir(testenv.ToolBin(t)), "sidelane-image.tar")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("image archive missing (run make image): %v", err)
	}
	return p
}

type archiveManifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// TestImageArchive: the archive make image wrote is the chart's default
// image, carries the OCI labels, and its root file system holds both
// static binaries next to iptables and nftables; sidelane version runs in
// it (chroot into the unpacked layers: podman run cannot start containers
// in this sandbox, see ENVIRONMENT.md; the node test runs the image for
// real under containerd).
func TestImageArchive(t *testing.T) {
	testenv.Privileged(t)
	files, err := readTar(imageArchive(t))
	if err != nil {
		t.Fatal(err)
	}
	var manifests []archiveManifest
	if err := json.Unmarshal(files["manifest.json"], &manifests); err != nil || len(manifests) != 1 {
		t.Fatalf("manifest.json: %v (%d images)", err, len(manifests))
	}
	m := manifests[0]
	want := chartImage(t)
	if !slices.ContainsFunc(m.RepoTags, func(s string) bool { return s == want || s == "docker.io/"+want }) {
		t.Errorf("archive tags %v, the chart deploys %s", m.RepoTags, want)
	}
	var cfg struct {
		Config struct {
			Labels     map[string]string
			Entrypoint []string
		} `json:"config"`
	}
	if err := json.Unmarshal(files[m.Config], &cfg); err != nil {
		t.Fatalf("image config %s: %v", m.Config, err)
	}
	for _, l := range []string{"org.opencontainers.image.version", "org.opencontainers.image.source"} {
		if cfg.Config.Labels[l] == "" {
			t.Errorf("label %s missing; labels: %v", l, cfg.Config.Labels)
		}
	}

	rootfs := t.TempDir()
	for _, l := range m.Layers {
		if err := unpackLayer(files[l], rootfs); err != nil {
			t.Fatalf("layer %s: %v", l, err)
		}
	}
	for _, c := range [][]string{
		{"/usr/local/bin/sidelane", "version"},
		{"/usr/local/bin/sidelane-cni", "--help"},
		{"/usr/sbin/iptables", "--version"},
		{"/usr/sbin/nft", "--version"},
	} {
		out, err := exec.Command("chroot", append([]string{rootfs}, c...)...).CombinedOutput()
		if c[0] == "/usr/local/bin/sidelane-cni" {
			// A CNI plugin without CNI_COMMAND prints its "about" text.
			if !strings.Contains(string(out), "sidelane") {
				t.Errorf("%v in the image: %v\n%s", c, err, out)
			}
			continue
		}
		if err != nil {
			t.Errorf("%v in the image: %v\n%s", c, err, out)
			continue
		}
		if c[1] == "version" && !strings.HasPrefix(string(out), "sidelane ") {
			t.Errorf("sidelane version printed %q", out)
		}
		if c[1] == "version" && strings.TrimSpace(strings.TrimPrefix(string(out), "sidelane ")) != cfg.Config.Labels["org.opencontainers.image.version"] {
			t.Errorf("sidelane version %q, label says %q", out, cfg.Config.Labels["org.opencontainers.image.version"])
		}
	}
}

// readTar reads a (small enough) tar archive into memory, by name.
func readTar(path string) (map[string][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	files := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", path, err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			return nil, fmt.Errorf("read %s in %s: %w", h.Name, path, err)
		}
		files[h.Name] = b
	}
}

// unpackLayer applies one uncompressed layer tar to dir: regular files,
// directories, symlinks, hard links and whiteouts; nothing outside dir.
func unpackLayer(layer []byte, dir string) error {
	tr := tar.NewReader(strings.NewReader(string(layer)))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		name := filepath.Clean("/" + h.Name)
		target := filepath.Join(dir, name)
		base := filepath.Base(name)
		if strings.HasPrefix(base, ".wh.") {
			if base == ".wh..wh..opq" {
				entries, _ := os.ReadDir(filepath.Dir(target))
				for _, e := range entries {
					_ = os.RemoveAll(filepath.Join(filepath.Dir(target), e.Name()))
				}
			} else {
				_ = os.RemoveAll(filepath.Join(filepath.Dir(target), strings.TrimPrefix(base, ".wh.")))
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(target, os.FileMode(h.Mode).Perm()); err != nil {
				return err
			}
		case tar.TypeReg:
			_ = os.RemoveAll(target)
			f, err := os.OpenFile(target, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode).Perm())
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		case tar.TypeSymlink:
			_ = os.RemoveAll(target)
			if err := os.Symlink(h.Linkname, target); err != nil {
				return err
			}
		case tar.TypeLink:
			_ = os.RemoveAll(target)
			if err := os.Link(filepath.Join(dir, filepath.Clean("/"+h.Linkname)), target); err != nil {
				return err
			}
		}
	}
}
