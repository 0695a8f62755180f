//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
)

// Feature names, as Probe reports them and ProbeConfig.ForceMissing takes them.
const (
	FeatureCgroupV2 = "cgroup-v2"
	FeatureLoad     = "load:programs"
)

type feature struct {
	name  string
	check func() error
}

func kernelFeatures(cgroup string) []feature {
	prog := func(pt ebpf.ProgramType) func() error { return func() error { return features.HaveProgramType(pt) } }
	helper := func(pt ebpf.ProgramType, fn asm.BuiltinFunc) func() error {
		return func() error { return features.HaveProgramHelper(pt, fn) }
	}
	mapType := func(mt ebpf.MapType) func() error { return func() error { return features.HaveMapType(mt) } }
	return []feature{
		{FeatureCgroupV2, func() error { return checkCgroup2(cgroup) }},
		{"prog:cgroup_sock_addr", prog(ebpf.CGroupSockAddr)},
		{"prog:sock_ops", prog(ebpf.SockOps)},
		{"prog:cgroup_sockopt", prog(ebpf.CGroupSockopt)},
		{"helper:cgroup_sock_addr:get_netns_cookie", helper(ebpf.CGroupSockAddr, asm.FnGetNetnsCookie)},
		{"helper:cgroup_sock_addr:get_socket_cookie", helper(ebpf.CGroupSockAddr, asm.FnGetSocketCookie)},
		{"helper:cgroup_sock_addr:get_current_uid_gid", helper(ebpf.CGroupSockAddr, asm.FnGetCurrentUidGid)},
		{"helper:sock_ops:get_socket_cookie", helper(ebpf.SockOps, asm.FnGetSocketCookie)},
		{"helper:cgroup_sockopt:get_netns_cookie", helper(ebpf.CGroupSockopt, asm.FnGetNetnsCookie)},
		{"map:lpm_trie", mapType(ebpf.LPMTrie)},
		{"map:lru_hash", mapType(ebpf.LRUHash)},
		{"map:percpu_hash", mapType(ebpf.PerCPUHash)},
		{"map:sockhash", mapType(ebpf.SockHash)},
		// Sidecar pods' inbound capture (Linux 5.9); per-node pods' is tc
		// (tcx, Linux 6.6), checked when their program loads.
		{"prog:sk_lookup", prog(ebpf.SkLookup)},
		{"helper:sk_lookup:sk_assign", helper(ebpf.SkLookup, asm.FnSkAssign)},
		// Last, the real thing: the verifier accepts every program on this
		// kernel (kfuncs, CO-RE relocations, helpers in context).
		{FeatureLoad, loadAll},
	}
}

// loadAll loads every program with fresh, unpinned maps, attaches nothing.
func loadAll() error {
	spec, err := loadCapture()
	if err != nil {
		return err
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	var objs captureObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) || errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%w: %w", ErrNotSupported, err)
		}
		return err
	}
	return objs.Close()
}

// ProbeConfig tunes Probe.
type ProbeConfig struct {
	// Cgroup is the attach point to check for cgroup v2.
	Cgroup string
	// ForceMissing names features to report missing whatever the kernel
	// says: tests use it to drive the agent's iptables fallback.
	ForceMissing []string
}

// ProbeResult lists what is missing; empty means the eBPF datapath can run.
type ProbeResult struct {
	Missing []string
}

// Err is nil when nothing is missing, else an error naming every missing
// feature and wrapping ErrNotSupported.
func (r ProbeResult) Err() error {
	if len(r.Missing) == 0 {
		return nil
	}
	return fmt.Errorf("kernel lacks %v: %w", r.Missing, ErrNotSupported)
}

// Probe checks every kernel feature the capture programs use. Errors other
// than "not supported" (e.g. EPERM) are returned, since they say nothing
// about the kernel.
func Probe(cfg ProbeConfig) (ProbeResult, error) {
	var res ProbeResult
	for _, f := range kernelFeatures(cfg.Cgroup) {
		if slices.Contains(cfg.ForceMissing, f.name) {
			res.Missing = append(res.Missing, f.name+" (forced)")
			continue
		}
		err := f.check()
		switch {
		case err == nil:
		case errors.Is(err, ebpf.ErrNotSupported), errors.Is(err, ErrNotSupported):
			res.Missing = append(res.Missing, f.name)
		default:
			return ProbeResult{}, fmt.Errorf("probe %s: %w", f.name, err)
		}
	}
	return res, nil
}
