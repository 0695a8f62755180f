//go:build linux

package bpf

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// usernsHelper runs in a pod whose netns is owned by its own user
// namespace (Kubernetes hostUsers: false): it waits for the test to enroll
// the netns, connects to addr and prints the outcome.
func usernsHelper(addr string) int {
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		fmt.Println(err)
		return 0
	}
	c.Close()
	fmt.Println("connected")
	return 0
}

// TestOwnerInUserNamespace: in a pod with a user namespace, the proxy's
// uid 1337 is 1337 inside the namespace and something else to the kernel
// (here 201337). iptables' owner match maps the rule's uid through the user
// namespace that owns the pod's netns, so Istio's rules exempt the proxy;
// the eBPF owner check must too, or the proxy's own upstream connections
// are captured back to itself. The app (uid 1000 inside) stays captured.
func TestOwnerInUserNamespace(t *testing.T) {
	e := newEnv(t)
	const hostBase = 200000
	// No route out of the fresh netns: a direct connect fails with "network
	// is unreachable"; a captured one goes to 127.0.0.1:15001, where
	// nothing listens: "connection refused".
	const target = "192.0.2.10:8080"
	// The helper runs as an unprivileged uid: give it a copy of this test
	// binary it may execute (go test's build dir is root-only).
	dir, err := os.MkdirTemp("", "sidelane-userns-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin := filepath.Join(dir, "bpf.test")
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		uid  uint32
		want string
	}{
		{"proxy uid 1337 inside the namespace is the proxy", 1337, "network is unreachable"},
		{"app uid 1000 inside the namespace is captured", 1000, "connection refused"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(bin, "-test.run=^$", target)
			cmd.Env = append(os.Environ(), helperEnv+"=userns")
			cmd.SysProcAttr = &syscall.SysProcAttr{
				Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNET,
				UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: hostBase, Size: 65536}},
				GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: hostBase, Size: 65536}},
				Credential:  &syscall.Credential{Uid: tt.uid, Gid: tt.uid, NoSetGroups: true},
				UseCgroupFD: true, CgroupFD: e.cgfd,
				Pdeathsig: syscall.SIGKILL,
			}
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { cmd.Process.Kill(); cmd.Wait() }()
			r := bufio.NewReader(stdout)
			if l, err := r.ReadString('\n'); err != nil || strings.TrimSpace(l) != "ready" {
				t.Fatalf("helper: %q %v", l, err)
			}
			nsPath := fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid)
			run(t, "nsenter", "--net="+nsPath, "ip", "link", "set", "lo", "up")
			cookie, err := NetnsCookie(nsPath)
			if err != nil {
				t.Fatal(err)
			}
			p, err := PlanPod([]netip.Prefix{netip.MustParsePrefix("10.99.0.2/24")}, defaultSettings())
			if err != nil {
				t.Fatal(err)
			}
			if err := e.cap.Put(cookie, p); err != nil {
				t.Fatal(err)
			}
			defer e.cap.Delete(cookie)
			fmt.Fprintln(stdin)
			out, _ := r.ReadString('\n')
			if !strings.Contains(out, tt.want) {
				t.Errorf("uid %d (kernel uid %d) connecting to %s: %q, want %q", tt.uid, hostBase+tt.uid, target, strings.TrimSpace(out), tt.want)
			}
		})
	}
}
