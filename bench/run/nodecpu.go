package run

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// nodeCPU places the CNI scenarios' processes the way a Kubernetes node
// does: CNI plugins are children of the container runtime, in its cgroup
// (system.slice/containerd.service), and the agent runs in its pod's
// cgroup under kubepods. The CPU controller shares CPU between those
// groups first, so a burst of plugin processes competes with the agent as
// one group, not thread by thread. Without this the bench's agent was one
// task among every plugin process of ten chains, a placement no node has.
//
// The two groups get equal weight (a node's system.slice and kubepods.slice
// are of the same order: 100 against ~80 on a 2-core node's default
// allocatable). Only a hierarchy that already has the cpu controller is
// used: a cgroup v1 "cpu" mount, or cgroup v2 whose root delegates cpu;
// nothing is enabled on the machine's root cgroup.
type nodeCPU struct {
	dir      string // the bench's own parent cgroup
	runtime  string // the runtime's stand-in: this process (and its plugin children)
	agent    string // the agents' pod stand-in
	original string // where this process was, to go back to
}

// newNodeCPU makes the groups and moves this process into the runtime
// one; close moves it back and removes them. err says why it is not
// available (the caller then measures without and says so).
func newNodeCPU() (*nodeCPU, error) {
	mounts, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return nil, err
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	mnt, cur, v2, err := cpuHierarchy(string(mounts), string(self), func(p string) ([]byte, error) { return os.ReadFile(p) })
	if err != nil {
		return nil, err
	}
	n := &nodeCPU{dir: filepath.Join(mnt, uniqueName("sidelane-bench-node-")), original: filepath.Join(mnt, cur)}
	n.runtime, n.agent = filepath.Join(n.dir, "runtime"), filepath.Join(n.dir, "agent")
	for _, d := range []string{n.dir, n.runtime, n.agent} {
		if err := os.Mkdir(d, 0o755); err != nil {
			n.remove()
			return nil, fmt.Errorf("create cpu cgroup: %w", err)
		}
	}
	if v2 {
		if err := os.WriteFile(filepath.Join(n.dir, "cgroup.subtree_control"), []byte("+cpu"), 0); err != nil {
			n.remove()
			return nil, fmt.Errorf("enable cpu in %s: %w", n.dir, err)
		}
	}
	if err := moveProc(n.runtime, os.Getpid()); err != nil {
		n.remove()
		return nil, err
	}
	return n, nil
}

// placeAgent moves an agent process into the agent group.
func (n *nodeCPU) placeAgent(pid int) error { return moveProc(n.agent, pid) }

func (n *nodeCPU) close() {
	_ = moveProc(n.original, os.Getpid())
	n.remove()
}

// remove deletes the groups; a group with a process left (an agent not
// yet reaped) is retried briefly by removeCgroup.
func (n *nodeCPU) remove() {
	for _, d := range []string{n.agent, n.runtime, n.dir} {
		removeCgroup(d)
	}
}

func moveProc(cg string, pid int) error {
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		return fmt.Errorf("move pid %d into %s: %w", pid, cg, err)
	}
	return nil
}

// cpuHierarchy finds the mount of a hierarchy with the cpu controller and
// this process's cgroup in it, from /proc/mounts and /proc/self/cgroup:
// cgroup v1's "cpu" mount first, else cgroup v2 (v2 true) when its root
// delegates cpu to children (read reads its cgroup.subtree_control).
func cpuHierarchy(mounts, self string, read func(string) ([]byte, error)) (mnt, cur string, v2 bool, err error) {
	var v2mnt string
	sc := bufio.NewScanner(strings.NewReader(mounts))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 {
			continue
		}
		switch f[2] {
		case "cgroup":
			if slices.Contains(strings.Split(f[3], ","), "cpu") && mnt == "" {
				mnt = f[1]
			}
		case "cgroup2":
			v2mnt = f[1]
		}
	}
	for _, l := range strings.Split(self, "\n") {
		parts := strings.SplitN(l, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if mnt != "" && slices.Contains(strings.Split(parts[1], ","), "cpu") {
			return mnt, parts[2], false, nil
		}
		if mnt == "" && parts[0] == "0" && parts[1] == "" && v2mnt != "" {
			cur = parts[2]
		}
	}
	if mnt != "" {
		return "", "", false, errors.New("no cpu controller line in /proc/self/cgroup")
	}
	if v2mnt == "" {
		return "", "", false, errors.New("no cgroup with the cpu controller mounted")
	}
	ctl, err := read(filepath.Join(v2mnt, "cgroup.subtree_control"))
	if err != nil {
		return "", "", false, fmt.Errorf("read cgroup v2 root: %w", err)
	}
	if !slices.Contains(strings.Fields(string(ctl)), "cpu") {
		return "", "", false, fmt.Errorf("cgroup v2 at %s does not delegate the cpu controller (its cgroup.subtree_control: %q), and the bench does not change the machine's root cgroup", v2mnt, strings.TrimSpace(string(ctl)))
	}
	if cur == "" {
		return "", "", false, errors.New("no cgroup v2 line in /proc/self/cgroup")
	}
	// The groups go at the top of the hierarchy, beside this process's
	// own, so they need no controller delegated below the root.
	return v2mnt, cur, true, nil
}
