// Package hack holds the repository's scripts; its tests run them against
// throw-away inputs (a temporary git repository, stub apt tools) so a
// broken check fails `make unit` instead of letting a regression through.
package hack

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func run(t *testing.T, dir string, env []string, name string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func script(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestLintChecksLargeFiles: `make lint` runs check-large-files.sh, which
// fails on a tracked file over 1 MiB and names it, and lets a generated
// BPF object of that size through.
func TestLintChecksLargeFiles(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Fatal("git not installed")
	}
	out, err := run(t, "..", nil, "make", "-n", "lint")
	if err != nil {
		t.Fatalf("make -n lint: %v\n%s", err, out)
	}
	if !strings.Contains(out, "hack/check-large-files.sh") {
		t.Fatalf("make lint does not run hack/check-large-files.sh:\n%s", out)
	}

	check := script(t, "check-large-files.sh")
	big := bytes.Repeat([]byte{0x7f}, 2<<20)
	for _, tc := range []struct {
		name  string
		files map[string][]byte
		fail  string // "" when the check must pass
	}{
		{"small files", map[string][]byte{"main.go": []byte("package main\n"), "one-mib": bytes.Repeat([]byte{1}, 1<<20)}, ""},
		{"a committed binary", map[string][]byte{"main.go": []byte("package main\n"), "sidelane": big}, "sidelane"},
		{"a binary in a subdir", map[string][]byte{"cmd/x/x.tar.gz": big}, "cmd/x/x.tar.gz"},
		{"the generated BPF object", map[string][]byte{"bpf/capture_bpfel.o": big}, ""},
		{"an object that only looks generated", map[string][]byte{"bpf/capture_bpfel.o.bak": big}, "bpf/capture_bpfel.o.bak"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			repo := t.TempDir()
			if out, err := run(t, repo, nil, "git", "init", "-q"); err != nil {
				t.Fatalf("git init: %v\n%s", err, out)
			}
			for name, data := range tc.files {
				p := filepath.Join(repo, name)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, data, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if out, err := run(t, repo, nil, "git", "add", "-A"); err != nil {
				t.Fatalf("git add: %v\n%s", err, out)
			}
			out, err := run(t, repo, nil, check)
			switch {
			case tc.fail == "" && err != nil:
				t.Errorf("check failed, want pass: %v\n%s", err, out)
			case tc.fail != "" && err == nil:
				t.Errorf("check passed with %s tracked, want a failure:\n%s", tc.fail, out)
			case tc.fail != "" && !strings.Contains(out, "large tracked file: "+tc.fail):
				t.Errorf("failure does not name %s:\n%s", tc.fail, out)
			}
		})
	}
}

// stubTools puts fake id, dpkg-query and apt-get first on PATH: dpkg-query
// reports the packages in installed, apt-get logs its arguments to log.
func stubTools(t *testing.T, uid int, installed []string) (env []string, log string) {
	t.Helper()
	dir := t.TempDir()
	log = filepath.Join(dir, "apt.log")
	stubs := map[string]string{
		"id": "#!/bin/sh\necho " + strconv.Itoa(uid) + "\n",
		"dpkg-query": `#!/bin/sh
pkg="$3"
for p in ` + strings.Join(installed, " ") + `; do
  if [ "$p" = "$pkg" ]; then
    case "$2" in *Status*) printf 'install ok installed' ;; *) printf '1.0' ;; esac
    exit 0
  fi
done
exit 1
`,
		"apt-get": "#!/bin/sh\necho \"apt-get $*\" >> " + log + "\n",
		"mount":   "#!/bin/sh\necho \"mount $*\" >> " + log + "\n",
	}
	for name, body := range stubs {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mounts := filepath.Join(dir, "mounts")
	if err := os.WriteFile(mounts, []byte("bpf /sys/fs/bpf bpf rw 0 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return []string{"PATH=" + dir + ":" + os.Getenv("PATH"), "INSTALL_DEPS_MOUNTS=" + mounts}, log
}

// TestInstallDeps: with every package present the script changes nothing;
// as root it installs exactly what is missing after one apt-get update;
// otherwise it fails and prints the one command that installs them.
func TestInstallDeps(t *testing.T) {
	if _, err := os.Stat("/etc/debian_version"); err != nil {
		t.Skip("not a Debian machine")
	}
	deps := script(t, "install-deps.sh")
	demo := []string{"iproute2", "iptables", "util-linux", "procps", "socat", "haproxy", "etcd-server"}

	env, log := stubTools(t, 0, demo)
	if out, err := run(t, ".", env, deps, "demo"); err != nil {
		t.Fatalf("all present: %v\n%s", err, out)
	}
	if _, err := os.Stat(log); err == nil {
		t.Error("apt-get ran although every package is present")
	}

	env, log = stubTools(t, 0, demo[2:])
	out, err := run(t, ".", env, deps, "demo")
	if err != nil {
		t.Fatalf("as root with packages missing: %v\n%s", err, out)
	}
	got, _ := os.ReadFile(log)
	lines := strings.Split(strings.TrimSpace(string(got)), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "apt-get update") || !strings.HasSuffix(lines[1], "install -y -qq iproute2 iptables") {
		t.Errorf("apt-get calls:\n%s\nwant one update, then install of iproute2 iptables", got)
	}

	env, log = stubTools(t, 1, demo[1:])
	out, err = run(t, ".", env, deps, "test")
	if err == nil {
		t.Fatalf("not root with iproute2 missing: exit 0\n%s", out)
	}
	if !strings.Contains(out, "missing packages: iproute2") || !strings.Contains(out, "install-deps.sh test") {
		t.Errorf("output does not name the package and the command:\n%s", out)
	}
	if _, err := os.Stat(log); err == nil {
		t.Error("apt-get ran without root")
	}

	// No bpffs: mounted as root, the command printed otherwise.
	for _, uid := range []int{0, 1} {
		env, log = stubTools(t, uid, demo)
		if err := os.WriteFile(strings.TrimPrefix(env[1], "INSTALL_DEPS_MOUNTS="), []byte("proc /proc proc rw 0 0\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := run(t, ".", env, deps, "demo")
		got, _ := os.ReadFile(log)
		if uid == 0 && (err != nil || strings.TrimSpace(string(got)) != "mount -t bpf bpf /sys/fs/bpf") {
			t.Errorf("root without bpffs: %v, calls %q\n%s", err, got, out)
		}
		if uid != 0 && (err == nil || len(got) != 0 || !strings.Contains(out, "mount -t bpf bpf /sys/fs/bpf")) {
			t.Errorf("not root without bpffs: %v, calls %q\n%s", err, got, out)
		}
	}

	// `make node-e2e` alone on a fresh machine: its node's apiserver runs
	// on etcd, its sidecars are haproxy, so the node group holds test's.
	out, err = run(t, ".", nil, deps, "--list", "node")
	if err != nil {
		t.Fatalf("--list node: %v\n%s", err, out)
	}
	for _, p := range []string{"etcd-server", "haproxy", "containerd", "podman"} {
		if !strings.Contains(out, "\n"+p+" ") {
			t.Errorf("install-deps.sh node does not install %s:\n%s", p, out)
		}
	}

	// --check never installs, even as root.
	env, log = stubTools(t, 0, nil)
	if out, err := run(t, ".", env, deps, "--check", "all"); err == nil {
		t.Errorf("--check with nothing installed: exit 0\n%s", out)
	}
	if _, err := os.Stat(log); err == nil {
		t.Error("apt-get ran with --check")
	}
}

// TestDepsCheckedBeforeLongBuilds: `make demo` and `make test` (and the
// test targets) run install-deps.sh with their group before building the
// tools and kube-apiserver (~15 min on a fresh machine), so a missing
// package stops them at once instead of after the builds.
func TestDepsCheckedBeforeLongBuilds(t *testing.T) {
	for target, group := range map[string]string{"demo": "demo", "test": "test node", "node-e2e": "node", "image": "image", "unit": "test", "e2e": "test", "conformance": "test", "chart": "test", "generate": "generate"} {
		out, err := run(t, "..", nil, "make", "-n", target)
		if err != nil {
			t.Fatalf("make -n %s: %v\n%s", target, err, out)
		}
		check := strings.Index(out, "hack/install-deps.sh "+group+"\n")
		if check < 0 {
			t.Errorf("make %s does not run hack/install-deps.sh %s:\n%s", target, group, out)
			continue
		}
		for _, long := range []string{"hack/install-tools.sh", "hack/build-kube-apiserver.sh", "go build", "go test"} {
			if i := strings.Index(out, long); i >= 0 && i < check {
				t.Errorf("make %s runs %s before the prerequisites check", target, long)
			}
		}
	}
	// Building the tools alone needs no apt package: it checks nothing.
	out, err := run(t, "..", nil, "make", "-n", "kube")
	if err != nil || strings.Contains(out, "install-deps.sh") {
		t.Errorf("make -n kube: %v\n%s", err, out)
	}
}
