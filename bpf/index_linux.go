//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
)

// ruleIndex remembers which rule keys (CIDR and port rules, pod IPs) each
// netns may have in the maps, so that re-enrolling or deleting one pod
// touches that pod's keys only instead of walking every pod's rules: an
// enroll costs the same at 10 or 10,000 pods. It is a superset of what the
// maps hold (a key is forgotten only once it is deleted), built by one walk
// of the maps on first use (after a restart, the pins hold the previous
// agent's rules), and correct as long as this Capture is the only writer
// of the pod maps, as the agent is.
type ruleIndex struct {
	mu    sync.Mutex
	built bool
	pods  map[uint64]*podKeys
	// walked counts map entries read by full walks (tests: a Put of pod
	// N+1 walks nothing).
	walked atomic.Int64
}

type podKeys struct {
	cidrs map[captureCidrKey]struct{}
	ports map[capturePortKey]struct{}
	ips   map[[16]byte]struct{}
}

func newPodKeys() *podKeys {
	return &podKeys{cidrs: map[captureCidrKey]struct{}{}, ports: map[capturePortKey]struct{}{}, ips: map[[16]byte]struct{}{}}
}

func cookieOf(lo, hi uint32) uint64 { return uint64(hi)<<32 | uint64(lo) }

// buildLocked reads every rule once.
func (x *ruleIndex) buildLocked(c *Capture) error {
	if x.built {
		return nil
	}
	pods := map[uint64]*podKeys{}
	get := func(netns uint64) *podKeys {
		p := pods[netns]
		if p == nil {
			p = newPodKeys()
			pods[netns] = p
		}
		return p
	}
	var ck captureCidrKey
	var cv uint8
	it := c.objs.Cidrs.Iterate()
	for it.Next(&ck, &cv) {
		x.walked.Add(1)
		get(cookieOf(ck.NetnsLo, ck.NetnsHi)).cidrs[ck] = struct{}{}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("index CIDR rules: %w", err)
	}
	var pk capturePortKey
	it = c.objs.Ports.Iterate()
	for it.Next(&pk, &cv) {
		x.walked.Add(1)
		get(cookieOf(pk.NetnsLo, pk.NetnsHi)).ports[pk] = struct{}{}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("index port rules: %w", err)
	}
	var ik [16]byte
	var owner uint64
	it = c.objs.PodIps.Iterate()
	for it.Next(&ik, &owner) {
		x.walked.Add(1)
		get(owner).ips[ik] = struct{}{}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("index pod IPs: %w", err)
	}
	x.pods, x.built = pods, true
	return nil
}

// add records that netns may now have these keys too (before they are
// written, so a failure half-way leaves the index a superset).
func (x *ruleIndex) add(c *Capture, netns uint64, cidrs []captureCidrKey, ports []capturePortKey, ips [][16]byte) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if err := x.buildLocked(c); err != nil {
		return err
	}
	p := x.pods[netns]
	if p == nil {
		p = newPodKeys()
		x.pods[netns] = p
	}
	for _, k := range cidrs {
		p.cidrs[k] = struct{}{}
	}
	for _, k := range ports {
		p.ports[k] = struct{}{}
	}
	for _, k := range ips {
		p.ips[k] = struct{}{}
	}
	return nil
}

// keys returns a copy of what netns may have.
func (x *ruleIndex) keys(c *Capture, netns uint64) (cidrs []captureCidrKey, ports []capturePortKey, ips [][16]byte, err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if err := x.buildLocked(c); err != nil {
		return nil, nil, nil, err
	}
	p := x.pods[netns]
	if p == nil {
		return nil, nil, nil, nil
	}
	for k := range p.cidrs {
		cidrs = append(cidrs, k)
	}
	for k := range p.ports {
		ports = append(ports, k)
	}
	for k := range p.ips {
		ips = append(ips, k)
	}
	return cidrs, ports, ips, nil
}

// forget drops keys of netns that are gone from the maps.
func (x *ruleIndex) forget(netns uint64, cidrs []captureCidrKey, ports []capturePortKey, ips [][16]byte) {
	x.mu.Lock()
	defer x.mu.Unlock()
	p := x.pods[netns]
	if p == nil {
		return
	}
	for _, k := range cidrs {
		delete(p.cidrs, k)
	}
	for _, k := range ports {
		delete(p.ports, k)
	}
	for _, k := range ips {
		delete(p.ips, k)
	}
	if len(p.cidrs)+len(p.ports)+len(p.ips) == 0 {
		delete(x.pods, netns)
	}
}

// deleteStale removes netns's rules that are not in the keep lists, found
// from the index: the pod's own keys only.
func (c *Capture) deleteStale(netns uint64, cidrs []captureCidrKey, ports []capturePortKey, ips [][16]byte) error {
	hadC, hadP, hadIPs, err := c.rules.keys(c, netns)
	if err != nil {
		return fmt.Errorf("remove stale rules: %w", err)
	}
	keepC, keepP, keepIP := setOf(cidrs), setOf(ports), setOf(ips)
	var errs []error
	var goneC []captureCidrKey
	for _, k := range hadC {
		if keepC[k] {
			continue
		}
		if err := ignoreNotExist(c.objs.Cidrs.Delete(&k)); err != nil {
			errs = append(errs, err)
			continue
		}
		goneC = append(goneC, k)
	}
	var goneP []capturePortKey
	for _, k := range hadP {
		if keepP[k] {
			continue
		}
		if err := ignoreNotExist(c.objs.Ports.Delete(&k)); err != nil {
			errs = append(errs, err)
			continue
		}
		goneP = append(goneP, k)
	}
	var goneIPs [][16]byte
	for _, k := range hadIPs {
		if keepIP[k] {
			continue
		}
		// The address may belong to another pod now (reused): only
		// netns's own entry goes.
		var owner uint64
		switch err := c.objs.PodIps.Lookup(&k, &owner); {
		case errors.Is(err, ebpf.ErrKeyNotExist):
		case err != nil:
			errs = append(errs, err)
			continue
		case owner == netns:
			if err := ignoreNotExist(c.objs.PodIps.Delete(&k)); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		goneIPs = append(goneIPs, k)
	}
	c.rules.forget(netns, goneC, goneP, goneIPs)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove stale rules: %w", err)
	}
	return nil
}

// ownIPs are the addresses recorded as netns's (for Delete).
func (c *Capture) ownIPs(netns uint64) (map[[16]byte]bool, error) {
	_, _, ips, err := c.rules.keys(c, netns)
	if err != nil {
		return nil, err
	}
	own := map[[16]byte]bool{}
	for _, k := range ips {
		var owner uint64
		if err := c.objs.PodIps.Lookup(&k, &owner); err == nil && owner == netns {
			own[k] = true
		}
	}
	return own, nil
}
