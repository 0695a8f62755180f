package run

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/sidelane/sidelane/bench/report"
)

// parallel runs f(0..n-1) with at most p at a time and returns the first
// error.
func parallel(n, p int, f func(i int) error) error {
	sem := make(chan struct{}, p)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			errs[i] = f(i)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// footprint grows the node to each pod count and records the agent's RSS
// and the CPU time it spent serving the ADDs.
func (r *Runner) footprint(ctx context.Context, counts []int) error {
	c, err := r.newChain(ctx, netip.MustParsePrefix("10.214.0.0/16"))
	if err != nil {
		return err
	}
	type pod struct {
		netns ns.NetNS
		rt    *libcni.RuntimeConf
	}
	var pods []pod
	added := 0
	// The node is thrown away afterwards, and DEL is not what this
	// measures: removing the namespaces (and with them the veths) is the
	// teardown; the chain's cleanup removes the bridge and the agent's and
	// IPAM's state. DELs one by one would dominate a quick run.
	r.cleanup(func() {
		_ = parallel(len(pods), 10, func(i int) error {
			pods[i].netns.Close()
			return testutils.UnmountNS(pods[i].netns)
		})
	})
	for _, want := range counts {
		cpu0, err := cpuSeconds(c.agent.PID())
		if err != nil {
			return err
		}
		for len(pods) < want {
			n, err := testutils.NewNS()
			if err != nil {
				return fmt.Errorf("create netns: %w", err)
			}
			pods = append(pods, pod{netns: n, rt: c.rt(fmt.Sprintf("fp%03d", len(pods)+1), n)})
		}
		// Pods arrive 10 at a time, as a busy node's kubelet starts them.
		from := added
		err = parallel(want-from, 10, func(j int) error {
			i := from + j
			if _, err := c.cni.AddNetworkList(ctx, c.list, pods[i].rt); err != nil {
				return fmt.Errorf("add pod %d: %w", i+1, err)
			}
			return nil
		})
		added = want
		if err != nil {
			return err
		}
		time.Sleep(500 * time.Millisecond) // let the agent settle
		cpu1, err := cpuSeconds(c.agent.PID())
		if err != nil {
			return err
		}
		mem, err := rssMB(c.agent.PID())
		if err != nil {
			return err
		}
		rss := mem["VmRSS"]
		s := fmt.Sprintf("footprint_%d", want)
		r.res.Add(s, report.Sidelane, "rssMB", rss, "MiB")
		// VmRSS's file-backed part is the binary's mapped pages, and how
		// many of those one page fault maps depends on how the page cache
		// holds the file (a freshly linked binary: 43 MB of RssFile; a cp
		// of it: 34 MB), not on the agent: the anonymous part is its own.
		r.res.Add(s, report.Sidelane, "rssAnonMB", mem["RssAnon"], "MiB")
		r.res.Add(s, report.Sidelane, "rssFileMB", mem["RssFile"], "MiB")
		r.res.Add(s, report.Sidelane, "cpuSeconds", cpu1-cpu0, "s")
		r.log.Info("agent footprint", "pods", want, "rssMB", rss, "cpuSeconds", cpu1-cpu0)
	}
	return nil
}

// rssMB reads pid's VmRSS, RssAnon and RssFile in MiB.
func rssMB(pid int) (map[string]float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, fmt.Errorf("agent status: %w", err)
	}
	defer f.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "RssAnon" && k != "RssFile") {
			continue
		}
		kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
		if err != nil {
			return nil, fmt.Errorf("parse %s %q: %w", k, v, err)
		}
		out[k] = kb / 1024
	}
	if _, ok := out["VmRSS"]; !ok {
		return nil, fmt.Errorf("no VmRSS for pid %d", pid)
	}
	return out, nil
}

// cpuSeconds is utime+stime of pid (clock ticks are 100 Hz on Linux).
func cpuSeconds(pid int) (float64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("agent stat: %w", err)
	}
	// Fields after the parenthesised command name; utime and stime are
	// fields 14 and 15 of the whole line.
	s := string(data)
	rest := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(rest) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseFloat(rest[11], 64)
	st, _ := strconv.ParseFloat(rest[12], 64)
	return (ut + st) / 100, nil
}
