//go:build linux

package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// The shortcut's late join (see pair_joins in capture.c): sock_ops asks
// for a socket once its traffic is request/response, and the agent puts
// it into sock_pairs by running sidelane_pair_join in the socket's netns.

// pairJoin is capture.c's struct pair_join.
type pairJoin struct {
	Key    captureTupleKey
	Netns  uint64
	Cookie uint64
}

// joiner reads pair_joins until closed.
type joiner struct {
	rd   *ringbuf.Reader
	done chan struct{}
	// paths are the enrolled pods' netns paths by netns cookie, recorded
	// at their inbound attach: a request names only the cookie.
	paths                   sync.Map
	joined, missed, noNetns atomic.Uint64
}

func (c *Capture) startJoins() error {
	rd, err := ringbuf.NewReader(c.objs.PairJoins)
	if err != nil {
		return fmt.Errorf("read pair_joins: %w", err)
	}
	c.joins = &joiner{rd: rd, done: make(chan struct{})}
	go c.runJoins(c.joins)
	return nil
}

// stopJoins ends the reader and waits for it: it runs programs under c.mu
// shared, so it must be gone before c.mu is taken to close them.
func (c *Capture) stopJoins() {
	j := c.joins
	if j == nil {
		return
	}
	if err := j.rd.Close(); err != nil {
		c.cfg.Log.Warn("close pair_joins reader", "error", err)
	}
	<-j.done
}

// ShortcutJoins reports the shortcut's join requests handled so far.
func (c *Capture) ShortcutJoins() JoinStats {
	j := c.joins
	if j == nil {
		return JoinStats{}
	}
	return JoinStats{Joined: j.joined.Load(), Missed: j.missed.Load(), NoNetns: j.noNetns.Load()}
}

// setNetnsPath records where netns can be entered, for its join requests.
func (c *Capture) setNetnsPath(netns uint64, path string) {
	if c.joins != nil && path != "" {
		c.joins.paths.Store(netns, path)
	}
}

func (c *Capture) forgetNetnsPath(netns uint64) {
	if c.joins != nil {
		c.joins.paths.Delete(netns)
	}
}

func (c *Capture) runJoins(j *joiner) {
	defer close(j.done)
	var rec ringbuf.Record
	for {
		j.rd.SetDeadline(time.Time{})
		if err := j.rd.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return
			}
			c.cfg.Log.Warn("read pair_joins", "error", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		// One entry into each netns for all of its ends waiting now.
		batch := map[uint64][]pairJoin{}
		for {
			var pj pairJoin
			if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &pj); err == nil {
				batch[pj.Netns] = append(batch[pj.Netns], pj)
				if peer, ok := c.peerEnd(pj); ok {
					batch[peer.Netns] = append(batch[peer.Netns], peer)
				} else {
					j.missed.Add(1)
				}
			}
			j.rd.SetDeadline(time.Now())
			if err := j.rd.ReadInto(&rec); err != nil {
				break
			}
		}
		c.joinBatch(j, batch)
	}
}

func (c *Capture) joinBatch(j *joiner, batch map[uint64][]pairJoin) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.atts == nil {
		return
	}
	for netns, reqs := range batch {
		v, ok := j.paths.Load(netns)
		if !ok {
			j.noNetns.Add(uint64(len(reqs)))
			continue
		}
		target, err := ns.GetNS(v.(string))
		if err != nil {
			j.missed.Add(uint64(len(reqs)))
			continue
		}
		err = target.Do(func(ns.NetNS) error {
			for _, r := range reqs {
				ret, err := c.objs.SidelanePairJoin.Run(&ebpf.RunOptions{Data: joinPacket(r)})
				if err != nil {
					j.missed.Add(1)
					return err
				}
				if ret == 1 {
					j.joined.Add(1)
				} else {
					j.missed.Add(1)
				}
			}
			return nil
		})
		target.Close()
		if err != nil {
			c.cfg.Log.Warn("shortcut join", "netns", netns, "error", err)
		}
	}
}

// peerEnd is the accepting end of r's pair (r is the connecting end's
// request): the mirrored tuple, in the same netns for a loopback pair,
// else in the netns of the pod that has the destination address. Its
// pair_cookies value only has to differ from the connecting end's.
func (c *Capture) peerEnd(r pairJoin) (pairJoin, bool) {
	k := r.Key
	p := pairJoin{Netns: r.Netns, Cookie: r.Cookie ^ 1<<63}
	p.Key = captureTupleKey{Netns: k.Netns, Src: k.Dst, Dst: k.Src, Sport: k.Dport, Dport: k.Sport}
	if k.Netns == 0 {
		if err := c.objs.PodIps.Lookup(&k.Dst, &p.Netns); err != nil {
			return pairJoin{}, false
		}
	}
	return p, true
}

// joinPacket is a TCP segment to r's socket from its peer, with an
// Ethernet header as tc programs see packets, then r's netns and socket
// cookies for sidelane_pair_join.
func joinPacket(r pairJoin) []byte {
	k := r.Key
	eth := make([]byte, 14)
	var ip []byte
	if isV4Mapped(k.Src) && isV4Mapped(k.Dst) {
		binary.BigEndian.PutUint16(eth[12:], unix.ETH_P_IP)
		ip = make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], 20+20+16)
		ip[8], ip[9] = 64, unix.IPPROTO_TCP
		copy(ip[12:16], k.Dst[12:])
		copy(ip[16:20], k.Src[12:])
	} else {
		binary.BigEndian.PutUint16(eth[12:], unix.ETH_P_IPV6)
		ip = make([]byte, 40)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], 20+16)
		ip[6], ip[7] = unix.IPPROTO_TCP, 64
		copy(ip[8:24], k.Dst[:])
		copy(ip[24:40], k.Src[:])
	}
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], k.Dport)
	binary.BigEndian.PutUint16(tcp[2:], k.Sport)
	tcp[12], tcp[13] = 5<<4, 0x10 // data offset, ACK
	tail := make([]byte, 16)
	binary.NativeEndian.PutUint64(tail[0:], r.Netns)
	binary.NativeEndian.PutUint64(tail[8:], r.Cookie)
	return append(append(append(eth, ip...), tcp...), tail...)
}

func isV4Mapped(a [16]byte) bool {
	return a[10] == 0xff && a[11] == 0xff && a[0]|a[1]|a[2]|a[3]|a[4]|a[5]|a[6]|a[7]|a[8]|a[9] == 0
}
