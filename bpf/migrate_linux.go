//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"

	"github.com/cilium/ebpf"
)

// migration carries the maps whose pinned layout differs from this
// version's: for each, the old pinned map and a new map of the new layout
// holding a copy of its entries. Load runs the new programs on the new
// maps, moves the links, then commits (the new maps take the old pins).
type migration struct {
	pinDir string
	log    *slog.Logger
	old    map[string]*ebpf.Map
	new    map[string]*ebpf.Map
}

// planMigration opens every pinned map spec pins by name and, where the
// pinned map does not match spec, creates the new layout's map and copies
// the entries into it. A layout is migrated when the map type and key size
// are the same and the value is as large or larger (new fields appended,
// zero-filled), with any max_entries that holds the entries (per-CPU maps
// too); sockhashes (whose sockets user space cannot copy) and other
// changes fail with ebpf.ErrMapIncompatible, as before. Nothing pinned is
// changed.
func planMigration(spec *ebpf.CollectionSpec, pinDir string, log *slog.Logger) (*migration, error) {
	mg := &migration{pinDir: pinDir, log: log, old: map[string]*ebpf.Map{}, new: map[string]*ebpf.Map{}}
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		old, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			mg.abort()
			return nil, fmt.Errorf("load pinned map %s: %w", name, err)
		}
		cerr := ms.Compatible(old)
		if cerr == nil {
			old.Close()
			continue
		}
		if err := migratable(ms, old); err != nil {
			old.Close()
			mg.abort()
			return nil, fmt.Errorf("map %s pinned in %s: %w (%w)", name, pinDir, err, cerr)
		}
		ns := ms.Copy()
		ns.Pinning = ebpf.PinNone
		nm, err := ebpf.NewMap(ns)
		if err != nil {
			old.Close()
			mg.abort()
			return nil, fmt.Errorf("create map %s in its new layout: %w", name, err)
		}
		mg.old[name], mg.new[name] = old, nm
		n, err := copyEntries(nm, old, ebpf.UpdateAny)
		if err != nil {
			mg.abort()
			return nil, fmt.Errorf("copy map %s into its new layout: %w", name, err)
		}
		log.Info("migrating map to a new layout", "map", name, "entries", n,
			"oldMaxEntries", old.MaxEntries(), "newMaxEntries", nm.MaxEntries(), "oldValueSize", old.ValueSize(), "newValueSize", nm.ValueSize())
	}
	return mg, nil
}

func migratable(ms *ebpf.MapSpec, old *ebpf.Map) error {
	switch {
	case old.Type() != ms.Type:
		return fmt.Errorf("type changed from %s to %s: %w", old.Type(), ms.Type, ebpf.ErrMapIncompatible)
	case old.KeySize() != ms.KeySize:
		return fmt.Errorf("key size changed from %d to %d: %w", old.KeySize(), ms.KeySize, ebpf.ErrMapIncompatible)
	case old.ValueSize() > ms.ValueSize:
		return fmt.Errorf("value shrank from %d to %d bytes: %w", old.ValueSize(), ms.ValueSize, ebpf.ErrMapIncompatible)
	case old.Flags() != ms.Flags:
		return fmt.Errorf("flags changed: %w", ebpf.ErrMapIncompatible)
	}
	switch ms.Type {
	case ebpf.SockHash, ebpf.SockMap:
		return fmt.Errorf("a %s cannot be copied into a new layout: %w", ms.Type, ebpf.ErrMapIncompatible)
	}
	return nil
}

// copyEntries copies src's entries into dst, zero-extending values.
func copyEntries(dst, src *ebpf.Map, flags ebpf.MapUpdateFlags) (int, error) {
	if isPerCPU(src.Type()) {
		return copyPerCPU(dst, src, flags)
	}
	var k, v []byte
	wide := make([]byte, dst.ValueSize())
	n := 0
	it := src.Iterate()
	for it.Next(&k, &v) {
		copy(wide, v)
		clear(wide[len(v):])
		err := dst.Update(k, wide, flags)
		if errors.Is(err, ebpf.ErrKeyExist) {
			continue
		}
		if err != nil {
			return n, mapErr(dst, "entries", err)
		}
		n++
	}
	return n, it.Err()
}

func (mg *migration) replacements() map[string]*ebpf.Map {
	if len(mg.new) == 0 {
		return nil
	}
	return mg.new
}

// commit runs once the links run the new programs: entries the old
// programs wrote since the first copy are copied too (never overwriting),
// then each new map takes its old pin in one rename, so there is no moment
// without a pin. objs' clones of the new maps are the ones pinned.
func (mg *migration) commit(objs map[string]*ebpf.Map) error {
	var errs []error
	for name, old := range mg.old {
		cur := objs[name]
		if _, err := copyEntries(cur, old, ebpf.UpdateNoExist); err != nil {
			errs = append(errs, fmt.Errorf("copy late entries of map %s: %w", name, err))
			continue
		}
		pin := filepath.Join(mg.pinDir, name)
		tmp := filepath.Join(mg.pinDir, "migrating_"+name) // bpffs refuses names with a dot
		_ = os.Remove(tmp)
		if err := cur.Pin(tmp); err != nil {
			errs = append(errs, fmt.Errorf("pin map %s: %w", name, err))
			continue
		}
		if err := os.Rename(tmp, pin); err != nil {
			errs = append(errs, fmt.Errorf("replace pin of map %s: %w", name, err))
			continue
		}
		// cur's handle still names tmp; forget it (the pin is at pin).
		errs = append(errs, cur.Unpin())
		mg.log.Info("map migrated to its new layout", "map", name)
	}
	mg.abort()
	return errors.Join(errs...)
}

// abort closes the handles; the old pins are untouched unless committed.
func (mg *migration) abort() {
	for _, m := range mg.old {
		m.Close()
	}
	for _, m := range mg.new {
		m.Close()
	}
	mg.old, mg.new = map[string]*ebpf.Map{}, map[string]*ebpf.Map{}
}

func isPerCPU(t ebpf.MapType) bool {
	return t == ebpf.PerCPUHash || t == ebpf.PerCPUArray || t == ebpf.LRUCPUHash
}

// copyPerCPU copies a per-CPU map: each value is one fixed-size element
// per possible CPU, so the element types are made at run time.
func copyPerCPU(dst, src *ebpf.Map, flags ebpf.MapUpdateFlags) (int, error) {
	byteT := reflect.TypeFor[byte]()
	oldT := reflect.SliceOf(reflect.ArrayOf(int(src.ValueSize()), byteT))
	newT := reflect.SliceOf(reflect.ArrayOf(int(dst.ValueSize()), byteT))
	var k []byte
	v := reflect.New(oldT)
	n := 0
	it := src.Iterate()
	for it.Next(&k, v.Interface()) {
		per := v.Elem()
		wide := reflect.MakeSlice(newT, per.Len(), per.Len())
		for i := range per.Len() {
			reflect.Copy(wide.Index(i), per.Index(i)) // the rest stays zero
		}
		err := dst.Update(k, wide.Interface(), flags)
		if errors.Is(err, ebpf.ErrKeyExist) {
			continue
		}
		if err != nil {
			return n, mapErr(dst, "entries", err)
		}
		n++
	}
	return n, it.Err()
}
