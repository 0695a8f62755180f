//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/sidelane/sidelane/internal/coalesce"
	"github.com/sidelane/sidelane/internal/keyedlock"
)

// Config says where to attach and pin.
type Config struct {
	// Cgroup is the cgroup v2 directory the programs attach to; every pod's
	// processes must be below it. Required (no default: attaching to the
	// wrong cgroup, or the machine's root, must be a deliberate choice).
	Cgroup string
	// PinDir is a directory on bpffs (DefaultPinDir if empty).
	PinDir string
	// EnableShortcut turns on the sockmap shortcut for same-node pairs
	// (new connections; sockets already shortcut keep it until they close):
	// pairs that carry request/response traffic join it and send socket to
	// socket, streams and short connections never join (see capture.c's
	// pair_joins). The agent turns it on by default (--enable-shortcut).
	EnableShortcut bool
	Log            *slog.Logger

	// spec replaces the embedded object (tests: another version's layout).
	spec *ebpf.CollectionSpec
	// tcInbound gives sidecar pods tc inbound capture, as per-node pods
	// (tests of the tc path's repair and TIME_WAIT handling).
	tcInbound bool
}

// Capture is the loaded and attached capture datapath. Closing it leaves
// the pinned maps and links, so capture continues while the agent is down;
// Uninstall removes them.
type Capture struct {
	cfg   Config
	objs  captureObjects
	cgID  uint64
	atts  []attachment // what links[i] attaches
	links []link.Link
	// mu is held shared by every call that uses the programs and links
	// (per-pod calls, Repair) and exclusively by Close and Uninstall,
	// which release them.
	mu sync.RWMutex
	// pods orders the per-pod calls on one netns (attach, detach, delete,
	// that pod's repair), so a repair never re-attaches a pod being
	// deleted and two attaches never race for one pin. Calls on different
	// netns run in parallel: a burst of CNI ADDs does not queue on one lock
	// for whole attaches (the kernel still takes rtnl for each tcx attach).
	pods keyedlock.Locks[uint64]
	// nodeMu orders node-wide repairs (they replace links).
	nodeMu sync.Mutex
	// rules finds each pod's rule keys without walking the maps.
	rules ruleIndex
	// sweeps batches the walks that remove deleted pods' recorded
	// connections (see sweepConnections); connectionSweeps counts walks.
	sweeps           coalesce.Group[sweepItem]
	connectionSweeps atomic.Uint64
	// inSpec is sidelane_in_lookup with the maps associated: each sidecar
	// pod gets a copy with its netns cookie (see capture.c).
	inSpec  *ebpf.ProgramSpec
	inProgs progIDs
	// joins puts sockets into the shortcut's sockhash when sock_ops asks
	// (see joins_linux.go).
	joins *joiner
	// beforeAttach, when set (tests), runs at the start of every inbound
	// attach, with the locks the attach holds taken.
	beforeAttach func(netns uint64)
}

type attachment struct {
	name string
	prog *ebpf.Program
	at   ebpf.AttachType
}

// Load loads the programs, reusing maps pinned by a previous run (so
// enrolled pods and recorded connections survive an agent restart), and
// attaches them to cfg.Cgroup with bpf_links. A link pinned by a previous
// run is atomically updated to the new program instead of attached again,
// so there is no moment with no program (or two) attached.
func Load(cfg Config) (*Capture, error) {
	if cfg.PinDir == "" {
		cfg.PinDir = DefaultPinDir
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Cgroup == "" {
		return nil, errors.New("cgroup: no attach point configured")
	}
	if err := checkCgroup2(cfg.Cgroup); err != nil {
		return nil, err
	}
	if err := checkBPFFS(cfg.PinDir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.PinDir, 0o700); err != nil {
		return nil, fmt.Errorf("create pin dir: %w", err)
	}
	spec := cfg.spec
	if spec == nil {
		var err error
		if spec, err = loadCapture(); err != nil {
			return nil, fmt.Errorf("parse embedded BPF object: %w", err)
		}
	}
	c := &Capture{cfg: cfg}
	// Pinned maps of an older layout are copied into maps of this one;
	// they take the old pins only once every link runs the new programs.
	mig, err := planMigration(spec, cfg.PinDir, cfg.Log)
	if err != nil {
		return nil, err
	}
	defer mig.abort()
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: cfg.PinDir}, MapReplacements: mig.replacements()}
	if err := spec.LoadAndAssign(&c.objs, opts); err != nil {
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("maps pinned in %s do not match this version's layout: %w", cfg.PinDir, err)
		}
		return nil, fmt.Errorf("load BPF objects: %w", err)
	}
	cgID, err := cgroupID(cfg.Cgroup)
	if err != nil {
		c.objs.Close()
		return nil, err
	}
	if err := c.SetShortcut(cfg.EnableShortcut); err != nil {
		c.objs.Close()
		return nil, err
	}
	// The sockhash holds its verdict program itself (no bpf_link for it
	// before Linux 6.10); attaching replaces a previous run's program.
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: c.objs.SockPairs.FD(), Program: c.objs.SidelaneMsg, Attach: ebpf.AttachSkMsgVerdict,
	}); err != nil {
		c.objs.Close()
		return nil, fmt.Errorf("attach sk_msg to sock_pairs: %w", err)
	}
	c.cgID = cgID
	for _, a := range []attachment{
		{"connect4", c.objs.SidelaneConnect4, ebpf.AttachCGroupInet4Connect},
		{"connect6", c.objs.SidelaneConnect6, ebpf.AttachCGroupInet6Connect},
		{"sockops", c.objs.SidelaneSockops, ebpf.AttachCGroupSockOps},
		{"getsockopt", c.objs.SidelaneGetsockopt, ebpf.AttachCGroupGetsockopt},
		{"getpeername4", c.objs.SidelaneGetpeername4, ebpf.AttachCgroupInet4GetPeername},
		{"getpeername6", c.objs.SidelaneGetpeername6, ebpf.AttachCgroupInet6GetPeername},
		{"sendmsg4", c.objs.SidelaneSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{"sendmsg6", c.objs.SidelaneSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
		{"recvmsg4", c.objs.SidelaneRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
		{"recvmsg6", c.objs.SidelaneRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
		{"sock_release", c.objs.SidelaneSockRelease, ebpf.AttachCgroupInetSockRelease},
	} {
		l, err := c.attach(a, cgID)
		if err != nil {
			c.Close()
			return nil, err
		}
		c.atts = append(c.atts, a)
		c.links = append(c.links, l)
	}
	if err := c.newInLookupSpec(spec); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.setInCapture(); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.updateInbound(); err != nil {
		c.Close()
		return nil, fmt.Errorf("update pinned inbound links: %w", err)
	}
	if err := mig.commit(c.pinnedMaps()); err != nil {
		c.Close()
		return nil, fmt.Errorf("migrate maps: %w", err)
	}
	// Every link runs this version's programs now: an older version's
	// maps that no program of this one uses lose their pins (a program
	// still running holds its map by fd, not by pin). A pin left behind
	// holds an unused map and nothing else, so it does not fail the load
	// (Uninstall retries and reports it).
	if err := c.removeRetiredPins(); err != nil {
		cfg.Log.Warn("remove an older version's unused map pins", "error", err)
	}
	if err := c.startJoins(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// removeRetiredPins removes the pins of maps an older version pinned and
// this one no longer has.
func (c *Capture) removeRetiredPins() error {
	var errs []error
	// accepted: per-socket storage that marked accepted sockets for
	// SO_ORIGINAL_DST, dropped for its per-connection cost (see
	// sidelane_getsockopt).
	for _, name := range []string{"accepted"} {
		if err := os.Remove(filepath.Join(c.cfg.PinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove retired pin %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

func (c *Capture) linkPin(name string) string { return filepath.Join(c.cfg.PinDir, "link_"+name) }

func (c *Capture) attach(a attachment, cgID uint64) (link.Link, error) {
	pin := c.linkPin(a.name)
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		info, ierr := l.Info()
		if ierr != nil {
			l.Close()
			return nil, fmt.Errorf("inspect pinned link %s: %w", pin, ierr)
		}
		if cg := info.Cgroup(); cg == nil || cg.CgroupId != cgID {
			l.Close()
			return nil, fmt.Errorf("pinned link %s is attached to another cgroup than %s: uninstall first", pin, c.cfg.Cgroup)
		}
		if err := l.Update(a.prog); err != nil {
			l.Close()
			return nil, fmt.Errorf("update pinned %s link: %w", a.name, err)
		}
		c.cfg.Log.Debug("reused pinned link", "program", a.name, "pin", pin)
		return l, nil
	case errors.Is(err, os.ErrNotExist):
	default:
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	l, err = link.AttachCgroup(link.CgroupOptions{Path: c.cfg.Cgroup, Attach: a.at, Program: a.prog})
	if err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", a.name, c.cfg.Cgroup, err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin %s link: %w", a.name, err)
	}
	return l, nil
}

// Close releases this process's handles. Pinned maps and links stay, so
// capture goes on (an agent restart drops nothing).
func (c *Capture) Close() error {
	c.stopJoins()
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.close()
}

func (c *Capture) close() error {
	var errs []error
	for _, l := range c.links {
		errs = append(errs, l.Close())
	}
	c.links, c.atts = nil, nil
	errs = append(errs, c.objs.Close())
	return errors.Join(errs...)
}

// Uninstall detaches the programs and removes every pin, then closes c.
// Capture stops for every pod.
func (c *Capture) Uninstall() error {
	c.stopJoins()
	c.mu.Lock()
	defer c.mu.Unlock()
	errs := []error{c.detachInbound(0)}
	for _, l := range c.links {
		errs = append(errs, l.Unpin())
	}
	errs = append(errs, link.RawDetachProgram(link.RawDetachProgramOptions{
		Target: c.objs.SockPairs.FD(), Program: c.objs.SidelaneMsg, Attach: ebpf.AttachSkMsgVerdict,
	}))
	for name, m := range c.pinnedMaps() {
		if m != nil {
			errs = append(errs, m.Unpin())
		}
		// By name too: a migrated map's handle does not know its pin.
		if err := os.Remove(filepath.Join(c.cfg.PinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	errs = append(errs, c.removeRetiredPins(), c.close())
	if err := os.Remove(c.cfg.PinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove pin dir: %w", err))
	}
	return errors.Join(errs...)
}

// SetShortcut turns the sockmap shortcut on or off for new connections.
func (c *Capture) SetShortcut(on bool) error {
	return c.updateSettings(func(v uint32) uint32 {
		if on {
			return v | settingShortcut
		}
		return v &^ settingShortcut
	})
}

// SetShortcutStreamRun sets after how many sends in a row without a reply
// a shortcut socket counts as streaming and goes back to TCP for good
// (0: the built-in 16; at most 1<<24-1, which in practice means "always
// redirect"). Not a user setting: the shortcut benchmark compares designs
// with it in one run.
func (c *Capture) SetShortcutStreamRun(n uint32) error {
	if n >= 1<<(32-settingRunShift) {
		return fmt.Errorf("stream run %d: at most %d", n, 1<<(32-settingRunShift)-1)
	}
	return c.updateSettings(func(v uint32) uint32 {
		return v&(1<<settingRunShift-1) | n<<settingRunShift
	})
}

// settings[0] bits, as capture.c's SETTING_*.
const (
	settingShortcut = 0x1
	settingRunShift = 8
)

func (c *Capture) updateSettings(f func(uint32) uint32) error {
	var zero, v uint32
	if err := c.objs.Settings.Lookup(&zero, &v); err != nil {
		return fmt.Errorf("read settings: %w", err)
	}
	v = f(v)
	if err := c.objs.Settings.Update(&zero, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write settings: %w", err)
	}
	return nil
}

func checkCgroup2(path string) error {
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return fmt.Errorf("cgroup %s: %w", path, err)
	}
	const cgroup2SuperMagic = 0x63677270
	if st.Type != cgroup2SuperMagic {
		return fmt.Errorf("cgroup %s: not on a cgroup v2 filesystem: %w", path, ErrNotSupported)
	}
	return nil
}

// checkBPFFS fails unless dir is on bpffs, or would be created on it (its
// nearest existing ancestor is), so a wrong pin dir creates nothing: maps
// pinned elsewhere could not be pinned at all, and a pin dir on a tmpfs
// would not outlive the agent the way bpffs pins do.
func checkBPFFS(dir string) error {
	p := filepath.Clean(dir)
	for {
		var st syscall.Statfs_t
		err := syscall.Statfs(p, &st)
		if err == nil {
			if st.Type != unix.BPF_FS_MAGIC {
				return fmt.Errorf("pin dir %s: not on a bpf filesystem (%s is not bpffs; mount one with mount -t bpf bpf %s)", dir, p, p)
			}
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) || p == filepath.Dir(p) {
			return fmt.Errorf("pin dir %s: %w", dir, err)
		}
		p = filepath.Dir(p)
	}
}

// cgroupID is the cgroup v2 id, which is the directory's inode number.
func cgroupID(path string) (uint64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("cgroup %s: no inode", path)
	}
	return st.Ino, nil
}

// mapped returns a as 16 bytes, IPv4 v4-mapped, as the programs store it.
func mapped(a netip.Addr) [16]byte {
	return netip.AddrFrom16(a.As16()).As16()
}

func splitCookie(netns uint64) (lo, hi uint32) { return uint32(netns), uint32(netns >> 32) }

func (p Pod) config() capturePodConfig {
	c := capturePodConfig{
		OutboundPort: p.OutboundPort,
		InboundPort:  p.InboundPort,
		DnsPort:      p.DNSPort,
		Flags:        p.Flags | p.emptyKinds(),
		N_uids:       uint32(len(p.ProxyUIDs)),
		N_gids:       uint32(len(p.ProxyGIDs)),
	}
	copy(c.ProxyUids[:], p.ProxyUIDs)
	copy(c.ProxyGids[:], p.ProxyGIDs)
	return c
}

func (p Pod) cidrKeys(netns uint64) ([]captureCidrKey, []uint8) {
	lo, hi := splitCookie(netns)
	keys := make([]captureCidrKey, 0, len(p.CIDRs))
	vals := make([]uint8, 0, len(p.CIDRs))
	for _, r := range p.CIDRs {
		bits := r.Prefix.Bits()
		family := uint8(cidrFamilyV6)
		if r.Prefix.Addr().Is4() {
			bits += 96
			family = cidrFamilyV4
		}
		keys = append(keys, captureCidrKey{Prefixlen: uint32(64 + 8 + 8 + bits), NetnsLo: lo, NetnsHi: hi,
			Kind: r.Kind, Family: family, Addr: mapped(r.Prefix.Addr())})
		vals = append(vals, r.Value)
	}
	return keys, vals
}

func (p Pod) portKeys(netns uint64) []capturePortKey {
	lo, hi := splitCookie(netns)
	keys := make([]capturePortKey, 0, len(p.Ports))
	for _, r := range p.Ports {
		keys = append(keys, capturePortKey{Prefixlen: uint32(64 + 8 + r.Bits), NetnsLo: lo, NetnsHi: hi,
			Kind: r.Kind, Port: [2]uint8{uint8(r.Port >> 8), uint8(r.Port)}})
	}
	return keys
}

// Put enrolls (or re-enrolls) the pod whose netns cookie is netns. The
// exclusions are written first and the pod's config last: the programs
// capture nothing for a netns without a config, so a pod is never captured
// with half of its exclusions. On re-enroll, rules the pod no longer has are
// removed after the new config is in place. When a write fails before the
// config is in place (a full map: ErrMapFull), every entry written is
// removed and every value overwritten is put back, so the maps are as they
// were: a new pod stays unenrolled, an enrolled one keeps its old state.
func (c *Capture) Put(netns uint64, p Pod) (err error) {
	if netns == 0 {
		return errors.New("netns cookie: must not be 0")
	}
	var u undo
	defer func() {
		if err != nil {
			if uerr := u.run(); uerr != nil {
				err = fmt.Errorf("%w (undoing the partial write: %w)", err, uerr)
			}
		}
	}()
	one := uint8(1)
	newCIDRs, vals := p.cidrKeys(netns)
	newPorts := p.portKeys(netns)
	newIPs := make([][16]byte, 0, len(p.IPs))
	for _, ip := range p.IPs {
		newIPs = append(newIPs, mapped(ip))
	}
	if err := c.rules.add(c, netns, newCIDRs, newPorts, newIPs); err != nil {
		return err
	}
	for i, k := range newCIDRs {
		if err := write(&u, c.objs.Cidrs, k, vals[i]); err != nil {
			return mapErr(c.objs.Cidrs, "CIDR rules", fmt.Errorf("write CIDR rule: %w", err))
		}
	}
	for _, k := range newPorts {
		if err := write(&u, c.objs.Ports, k, one); err != nil {
			return mapErr(c.objs.Ports, "port rules", fmt.Errorf("write port rule: %w", err))
		}
	}
	for i, ip := range p.IPs {
		k := newIPs[i]
		if err := write(&u, c.objs.PodIps, k, netns); err != nil {
			return mapErr(c.objs.PodIps, "pod IPs", fmt.Errorf("write pod IP %s: %w", ip, err))
		}
	}
	zero := make([]captureCounters, ebpf.MustPossibleCPU())
	switch err := c.objs.PodCounters.Update(&netns, zero, ebpf.UpdateNoExist); {
	case err == nil:
		u = append(u, func() error { return ignoreNotExist(c.objs.PodCounters.Delete(&netns)) })
	case !errors.Is(err, ebpf.ErrKeyExist):
		return mapErr(c.objs.PodCounters, "pods", fmt.Errorf("create pod counters: %w", err))
	}
	cfg := p.config()
	if err := c.objs.Pods.Update(&netns, &cfg, ebpf.UpdateAny); err != nil {
		return mapErr(c.objs.Pods, "pods", fmt.Errorf("write pod config: %w", err))
	}
	u = nil // the pod's new state is in force
	return c.deleteStale(netns, newCIDRs, newPorts, newIPs)
}

// undo reverts a partial Put, last write first.
type undo []func() error

func (u undo) run() error {
	var errs []error
	for i := len(u) - 1; i >= 0; i-- {
		errs = append(errs, u[i]())
	}
	return errors.Join(errs...)
}

// write sets k to v in m and records how to revert that in u: delete a
// new key, put an overwritten value back.
func write[K, V comparable](u *undo, m *ebpf.Map, k K, v V) error {
	err := m.Update(&k, &v, ebpf.UpdateNoExist)
	if err == nil {
		*u = append(*u, func() error { return ignoreNotExist(m.Delete(&k)) })
		return nil
	}
	if !errors.Is(err, ebpf.ErrKeyExist) {
		return err
	}
	var old V
	if err := m.Lookup(&k, &old); err != nil {
		return err
	}
	if old == v {
		return nil
	}
	if err := m.Update(&k, &v, ebpf.UpdateAny); err != nil {
		return err
	}
	*u = append(*u, func() error { return m.Update(&k, &old, ebpf.UpdateAny) })
	return nil
}

// mapErr names the node's limit when err is m being full (hash maps
// answer E2BIG, LPM tries ENOSPC).
func mapErr(m *ebpf.Map, what string, err error) error {
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("node limit of %d %s reached (map %s full): %w: %w", m.MaxEntries(), what, mapName(m), ErrMapFull, err)
	}
	return err
}

func mapName(m *ebpf.Map) string {
	if info, err := m.Info(); err == nil {
		return info.Name
	}
	return "?"
}

// deleteWhere removes the entries of m that match, collecting the keys
// first. It reads m in batches (BPF_MAP_LOOKUP_BATCH walks the buckets
// with a cursor): a walk by NextKey costs two syscalls an entry and, on a
// hash map, starts over whenever the key it stands on is deleted, as the
// programs do while sockets close, so on a busy node a pod's DEL could
// walk the map many times. Kernels without batch lookup for m's type get
// the NextKey walk.
func deleteWhere[K, V any](m *ebpf.Map, match func(K, V) bool) error {
	stale, err := matchBatched(m, match)
	if errors.Is(err, ebpf.ErrNotSupported) {
		stale, err = matchIterated(m, match)
	}
	errs := []error{err}
	for _, s := range stale {
		errs = append(errs, ignoreNotExist(m.Delete(&s)))
	}
	return errors.Join(errs...)
}

// batchEntries is how many entries deleteWhere reads a syscall.
const batchEntries = 4096

func matchBatched[K, V any](m *ebpf.Map, match func(K, V) bool) ([]K, error) {
	keys, vals := make([]K, batchEntries), make([]V, batchEntries)
	var stale []K
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			if match(keys[i], vals[i]) {
				stale = append(stale, keys[i])
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return stale, nil // the walk is complete
		}
		if err != nil {
			return stale, fmt.Errorf("read %s: %w", m, err)
		}
	}
}

func matchIterated[K, V any](m *ebpf.Map, match func(K, V) bool) ([]K, error) {
	var k K
	var v V
	var stale []K
	it := m.Iterate()
	for it.Next(&k, &v) {
		if match(k, v) {
			stale = append(stale, k)
		}
	}
	return stale, it.Err()
}

func setOf[K comparable](keys []K) map[K]bool {
	m := make(map[K]bool, len(keys))
	for _, k := range keys {
		m[k] = true
	}
	return m
}

func ignoreNotExist(err error) error {
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// Delete stops capturing netns and removes every entry that mentions it:
// config first (capture stops at once), then rules, counters and recorded
// connections. Deleting an unknown netns is not an error.
func (c *Capture) Delete(netns uint64) error {
	defer c.lockPod(netns)()
	c.forgetNetnsPath(netns)
	var errs []error
	errs = append(errs, ignoreNotExist(c.objs.Pods.Delete(&netns)))
	// A per-node pod's connections to the node proxy are keyed by the
	// proxy's netns, not the pod's: find them by the pod's addresses,
	// read before deleteStale removes them.
	podIPs, err := c.ownIPs(netns)
	errs = append(errs, err)
	errs = append(errs, c.detachInbound(netns))
	errs = append(errs, c.deleteStale(netns, nil, nil, nil))
	errs = append(errs, ignoreNotExist(c.objs.PodCounters.Delete(&netns)))
	errs = append(errs, ignoreNotExist(c.objs.TwListeners.Delete(&netns)))
	errs = append(errs, c.sweeps.Do(sweepItem{netns, podIPs}, c.sweepConnections))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete pod %d: %w", netns, err)
	}
	return nil
}

// sweepItem is a deleted pod whose recorded connections go.
type sweepItem struct {
	netns  uint64
	podIPs map[[16]byte]bool
}

// sweepConnections removes the recorded connections of every pod in
// items with one walk of each connection map: a walk costs the same for
// one pod as for many (it reads the whole map), so the DELs that arrive
// while one walks share the next (c.sweeps) instead of walking once each.
func (c *Capture) sweepConnections(items []sweepItem) error {
	netns := make(map[uint64]bool, len(items))
	ips := map[[16]byte]bool{}
	for _, it := range items {
		netns[it.netns] = true
		for ip := range it.podIPs {
			ips[ip] = true
		}
	}
	c.connectionSweeps.Add(1)
	return errors.Join(
		deleteWhere(c.objs.OrigByTuple, func(k captureTupleKey, od captureOrigDst) bool {
			return netns[k.Netns] || (od.Flags&origNode != 0 && ips[k.Src])
		}),
		deleteWhere(c.objs.OrigByCookie, func(_ uint64, od captureOrigDst) bool { return netns[od.Netns] }))
}

// Verify reports whether netns is enrolled exactly as p says.
func (c *Capture) Verify(netns uint64, p Pod) error {
	var got capturePodConfig
	if err := c.objs.Pods.Lookup(&netns, &got); err != nil {
		return fmt.Errorf("pod config for netns %d: %w", netns, err)
	}
	want := p.config()
	// Routes come from the pod's netns at enroll (excludeInterfaces),
	// not from its settings: p may lack them, so their bit is not
	// compared, as the route entries themselves are not.
	got.Flags &^= flagNoRoutes
	want.Flags &^= flagNoRoutes
	if got != want {
		return fmt.Errorf("pod config for netns %d differs from the pod's settings", netns)
	}
	var v uint8
	keys, vals := p.cidrKeys(netns)
	for i, k := range keys {
		if err := c.objs.Cidrs.Lookup(&k, &v); err != nil {
			return fmt.Errorf("CIDR rule %d/%d for netns %d: %w", k.Kind, k.Prefixlen, netns, err)
		}
		if v != vals[i] {
			return fmt.Errorf("CIDR rule %d/%d for netns %d: value %d, want %d", k.Kind, k.Prefixlen, netns, v, vals[i])
		}
	}
	for _, k := range p.portKeys(netns) {
		if err := c.objs.Ports.Lookup(&k, &v); err != nil {
			return fmt.Errorf("port rule %d/%d for netns %d: %w", k.Kind, k.Prefixlen, netns, err)
		}
	}
	return nil
}

// VerifyInbound reports whether inbound capture is attached to ifname of
// the pod with cookie netns: by sk_lookup (see AttachInbound) or tc.
func (c *Capture) VerifyInbound(netns uint64, ifname string) error {
	if c.hasInIface(netns, ifname) {
		if _, err := os.Stat(c.inLookupPin(netns)); err != nil {
			return fmt.Errorf("inbound lookup of netns %d: %w", netns, err)
		}
		return nil
	}
	if _, err := os.Stat(c.inboundPin(netns, ifname)); err != nil {
		return fmt.Errorf("inbound capture on %s: %w", ifname, err)
	}
	if _, err := os.Stat(c.twLookupPin(netns)); err != nil {
		return fmt.Errorf("time-wait lookup of netns %d: %w", netns, err)
	}
	return nil
}

// Enrolled lists the netns cookies that have a pod config, for reconciling
// pinned state with the agent's pods at start.
func (c *Capture) Enrolled() ([]uint64, error) {
	var out []uint64
	var k uint64
	var v capturePodConfig
	it := c.objs.Pods.Iterate()
	for it.Next(&k, &v) {
		out = append(out, k)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list enrolled pods: %w", err)
	}
	slices.Sort(out)
	return out, nil
}

// Counters sums the pod's per-CPU counters.
func (c *Capture) Counters(netns uint64) (Counters, error) {
	var per []captureCounters
	if err := c.objs.PodCounters.Lookup(&netns, &per); err != nil {
		return Counters{}, fmt.Errorf("counters for netns %d: %w", netns, err)
	}
	var s Counters
	for _, p := range per {
		s.RedirectedOutbound += p.RedirectedOut
		s.RedirectedInbound += p.RedirectedIn
		s.RedirectedDNS += p.RedirectedDns
		s.Excluded += p.Excluded
		s.OrigDstAnswered += p.OrigDstAnswered
		s.ShortcutMessages += p.ShortcutMsgs
		s.ShortcutBytes += p.ShortcutBytes
		s.DroppedInbound += p.DroppedIn
		s.ShortcutToTCP += p.ShortcutToTcp
		s.TimeWaitReuse += p.TimewaitReuse
	}
	return s, nil
}
