package cni

import (
	"bytes"
	"flag"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

// copyDir copies the fixture tree src into a fresh temp dir.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), data, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

// snapshot maps every file under dir (relative path) to its content.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		m[rel] = string(data)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func sameSnapshot(t *testing.T, what string, got, want map[string]string) {
	t.Helper()
	var names []string
	for n := range got {
		names = append(names, n)
	}
	for n := range want {
		if _, ok := got[n]; !ok {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		g, gok := got[n]
		w, wok := want[n]
		switch {
		case !gok:
			t.Errorf("%s: %s missing", what, n)
		case !wok:
			t.Errorf("%s: unexpected file %s:\n%s", what, n, g)
		case g != w:
			t.Errorf("%s: %s differs:\n--- got\n%s\n--- want\n%s", what, n, g, w)
		}
	}
}

// golden compares the tree dir with testdata/golden/name, or rewrites the
// golden tree with -update.
func golden(t *testing.T, name, dir string) {
	t.Helper()
	g := filepath.Join("testdata", "golden", name)
	if *update {
		if err := os.RemoveAll(g); err != nil {
			t.Fatal(err)
		}
		for rel, data := range snapshot(t, dir) {
			p := filepath.Join(g, rel)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return
	}
	if _, err := os.Stat(g); err != nil {
		t.Fatalf("golden tree %s missing (run go test ./cni -update): %v", g, err)
	}
	sameSnapshot(t, "golden "+name, snapshot(t, dir), snapshot(t, g))
}

// applyPlan applies p to an in-memory conf dir.
func applyPlan(files []File, p Plan) []File {
	m := map[string][]byte{}
	for _, f := range files {
		m[f.Name] = f.Data
	}
	for _, w := range p.Writes {
		m[w.Name] = w.Data
	}
	for _, r := range p.Removes {
		delete(m, r)
	}
	var out []File
	for n, d := range m {
		out = append(out, File{Name: n, Data: d})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func countType(l *List, typ string) int {
	n := 0
	for _, ty := range l.Types() {
		if ty == typ {
			n++
		}
	}
	return n
}

func containsSidelane(data string) bool { return bytes.Contains([]byte(data), []byte(PluginType)) }
