// Package store keeps the agent's record of every pod attachment it was told
// about at CNI ADD. Each attachment is persisted to its own file on every
// change, so an agent restart (crash or upgrade) neither forgets pods nor
// needs CNI to replay, and a change costs the same at 10 or 1,000 pods.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sidelane/sidelane/istio/capture"
)

// Key is CNI's identity of an attachment: network name, container ID and
// interface name.
type Key struct {
	Network     string `json:"network"`
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

func (k Key) String() string { return k.Network + "/" + k.ContainerID + "/" + k.IfName }

// Entry is one attachment.
type Entry struct {
	Key
	Netns        string         `json:"netns"`
	PodNamespace string         `json:"podNamespace,omitempty"`
	PodName      string         `json:"podName,omitempty"`
	PodUID       string         `json:"podUID,omitempty"`
	IPs          []netip.Prefix `json:"ips,omitempty"`
	// Mode is the datapath mode in force (e.g. "sidecar", "none"), and
	// Reason why the classifier chose it.
	Mode   string `json:"mode,omitempty"`
	Reason string `json:"reason,omitempty"`
	// Rule is the classifier's rule code when the attachment was added
	// (istio/classify's Rule). It says which labels may still move the
	// running pod (classify.Live); empty in records from older agents.
	Rule string `json:"rule,omitempty"`
	// Capture is what the datapath captures in sidecar mode.
	Capture *capture.Settings `json:"capture,omitempty"`
	// NetnsCookie identifies the pod's network namespace to the datapath.
	NetnsCookie uint64 `json:"netnsCookie,omitempty"`
	// NetnsDev and NetnsIno are the identity of the netns Netns named at
	// ADD (NetnsIdentity), so a re-opened path that names another
	// namespace is noticed (CheckNetns). 0: not known.
	NetnsDev uint64    `json:"netnsDev,omitempty"`
	NetnsIno uint64    `json:"netnsIno,omitempty"`
	Added    time.Time `json:"added"`
}

// fileFormat is the legacy single state file (state.json) of agents
// before per-attachment records; Open migrates it.
type fileFormat struct {
	Version int     `json:"version"`
	Entries []Entry `json:"entries"`
}

const fileVersion = 1

// recordFormat is one attachment's file in the records directory.
type recordFormat struct {
	Version int   `json:"version"`
	Entry   Entry `json:"entry"`
}

const recordVersion = 1

// tmpPrefix starts the names of records being written (left behind only by
// an agent killed between create and rename; Open removes old ones).
const tmpPrefix = ".tmp-"

// staleTmp is the age after which Open removes a temp record: no write
// takes that long, so its writer is gone.
const staleTmp = time.Minute

// Store is safe for concurrent use. Every attachment is one small file in
// the records directory, written to a temp file and renamed over the old
// one, so a change costs the same whatever the node's pod count, and an
// agent killed at any point leaves each record either old or new, never
// half. Changes to different attachments write different files and do not
// wait for each other; changes to one attachment are ordered by its lock
// stripe.
type Store struct {
	legacy string // the pre-records state file, migrated at Open
	dir    string // one file per attachment

	// stripes order the file write and the memory update of changes to
	// one key (two racing Puts of a key must leave file and memory agreeing).
	stripes [64]sync.Mutex

	mu          sync.Mutex
	entries     map[Key]Entry
	byContainer map[string]map[Key]struct{}
	// written counts record bytes written (tests: a change costs O(1)).
	written int64
}

// RecordsDir is where the store at path keeps its per-attachment records:
// "state.json" -> "state.d".
func RecordsDir(path string) string {
	return strings.TrimSuffix(path, filepath.Ext(path)) + ".d"
}

// Open loads the store kept at path: the records in RecordsDir(path) and,
// when a legacy single state file exists at path (an older agent's), its
// entries, which are then written as records and the file removed. It
// starts empty when neither exists. A corrupt record or file is an error:
// silently starting empty would forget pods that are still captured.
func Open(path string) (*Store, error) {
	s := &Store{legacy: path, dir: RecordsDir(path), entries: map[Key]Entry{}, byContainer: map[string]map[Key]struct{}{}}
	if err := s.loadRecords(); err != nil {
		return nil, err
	}
	if err := s.migrateLegacy(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Store) loadRecords() error {
	des, err := os.ReadDir(s.dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read state dir %s: %w", s.dir, err)
	}
	for _, de := range des {
		name := de.Name()
		p := filepath.Join(s.dir, name)
		if strings.HasPrefix(name, tmpPrefix) {
			// A write cut short (its rename never happened), or one
			// in flight when another process reads the store (tests,
			// tools): only an old one is removed.
			if fi, err := de.Info(); err == nil && time.Since(fi.ModTime()) > staleTmp {
				_ = os.Remove(p)
			}
			continue
		}
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("read state %s: %w", p, err)
		}
		var r recordFormat
		if err := json.Unmarshal(data, &r); err != nil {
			return fmt.Errorf("parse state %s: %w", p, err)
		}
		if r.Version != recordVersion {
			return fmt.Errorf("state %s: unsupported version %d", p, r.Version)
		}
		if want := recordName(r.Entry.Key); name != want {
			return fmt.Errorf("state %s: holds attachment %s, whose record is %s", p, r.Entry.Key, want)
		}
		s.setLocked(r.Entry)
	}
	return nil
}

// migrateLegacy moves a single state file into records. The file is the
// newest truth when it exists: an older agent wrote it after this one's
// records (a rollback, then this agent again), or this agent wrote it as
// its shutdown snapshot (WriteLegacy), or a migration was cut short (the
// records then match it). So its entries overwrite the records, records
// it lacks go, and the file goes last, once the records say what it says:
// an agent killed half-way migrates again at its next start.
func (s *Store) migrateLegacy() error {
	data, err := os.ReadFile(s.legacy)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read state %s: %w", s.legacy, err)
	}
	var f fileFormat
	if err := json.Unmarshal(data, &f); err != nil {
		return fmt.Errorf("parse state %s: %w", s.legacy, err)
	}
	if f.Version != fileVersion {
		return fmt.Errorf("state %s: unsupported version %d", s.legacy, f.Version)
	}
	keep := map[Key]bool{}
	for _, e := range f.Entries {
		keep[e.Key] = true
		if err := s.writeRecord(e); err != nil {
			return fmt.Errorf("migrate state %s: %w", s.legacy, err)
		}
		s.setLocked(e)
	}
	for k := range s.entries {
		if keep[k] {
			continue
		}
		if err := os.Remove(s.RecordPath(k)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("migrate state %s: %w", s.legacy, err)
		}
		s.unsetLocked(k)
	}
	if err := os.Remove(s.legacy); err != nil {
		return fmt.Errorf("migrate state %s: %w", s.legacy, err)
	}
	return nil
}

// WriteLegacy writes every entry to the single state file of older agents
// (temp file + rename), so that an agent rolled back to a version before
// records still finds every pod. The agent calls it on shutdown, never on
// the ADD path (it costs O(pods)); the next Open of this version migrates
// the file back (it is the newest truth then, see migrateLegacy).
func (s *Store) WriteLegacy() error {
	data, err := json.Marshal(fileFormat{Version: fileVersion, Entries: s.List()})
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	return replaceFile(filepath.Dir(s.legacy), ".state-*", s.legacy, data)
}

// Get returns the entry for k.
func (s *Store) Get(k Key) (Entry, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[k]
	return e, ok
}

// Put adds or replaces an entry and persists it (its record only). On
// error nothing changed, in memory or on disk.
func (s *Store) Put(e Entry) error {
	st := s.stripe(e.Key)
	st.Lock()
	defer st.Unlock()
	if err := s.writeRecord(e); err != nil {
		return err
	}
	s.mu.Lock()
	s.setLocked(e)
	s.mu.Unlock()
	return nil
}

// Delete removes k and its record. Deleting a missing key is not an
// error: CNI DEL must be idempotent.
func (s *Store) Delete(k Key) (Entry, bool, error) {
	st := s.stripe(k)
	st.Lock()
	defer st.Unlock()
	e, ok := s.Get(k)
	if !ok {
		return Entry{}, false, nil
	}
	if err := os.Remove(filepath.Join(s.dir, recordName(k))); err != nil && !errors.Is(err, os.ErrNotExist) {
		return Entry{}, false, fmt.Errorf("remove state of %s: %w", k, err)
	}
	s.mu.Lock()
	s.unsetLocked(k)
	s.mu.Unlock()
	return e, true, nil
}

func (s *Store) unsetLocked(k Key) {
	delete(s.entries, k)
	if c := s.byContainer[k.ContainerID]; c != nil {
		delete(c, k)
		if len(c) == 0 {
			delete(s.byContainer, k.ContainerID)
		}
	}
}

// List returns all entries sorted by key.
func (s *Store) List() []Entry {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Entry, 0, len(s.entries))
	for _, e := range s.entries {
		out = append(out, e)
	}
	sortEntries(out)
	return out
}

// Container returns the entries of one sandbox (container ID), sorted by
// key: the attachments a meta-plugin such as Multus made for it. Its cost
// does not grow with the node's pod count.
func (s *Store) Container(id string) []Entry {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := s.byContainer[id]
	out := make([]Entry, 0, len(keys))
	for k := range keys {
		out = append(out, s.entries[k])
	}
	sortEntries(out)
	return out
}

// Written is the number of record bytes the store wrote so far.
func (s *Store) Written() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.written
}

func sortEntries(es []Entry) {
	slices.SortFunc(es, func(a, b Entry) int { return strings.Compare(a.Key.String(), b.Key.String()) })
}

func (s *Store) setLocked(e Entry) {
	s.entries[e.Key] = e
	c := s.byContainer[e.ContainerID]
	if c == nil {
		c = map[Key]struct{}{}
		s.byContainer[e.ContainerID] = c
	}
	c[e.Key] = struct{}{}
}

func (s *Store) stripe(k Key) *sync.Mutex {
	h := fnv.New32a()
	h.Write([]byte(k.String()))
	return &s.stripes[h.Sum32()%uint32(len(s.stripes))]
}

// RecordPath is the file holding k's record.
func (s *Store) RecordPath(k Key) string { return filepath.Join(s.dir, recordName(k)) }

// recordName is k's record file: its fields escaped and joined by "~",
// readable for the usual names and never a path separator.
func recordName(k Key) string {
	return escapeName(k.Network) + "~" + escapeName(k.ContainerID) + "~" + escapeName(k.IfName) + ".json"
}

func escapeName(v string) string {
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.' && i > 0:
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// writeRecord writes e's record to a temp file and renames it over the old
// one, so an agent crash leaves either the old or the new record, never
// half. No fsync: the state lives on /var/run (tmpfs), which a node crash
// wipes together with the pods it describes, and fsync on every CNI ADD
// would put disk latency on the pod-start path.
func (s *Store) writeRecord(e Entry) error {
	data, err := json.Marshal(recordFormat{Version: recordVersion, Entry: e})
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	if err := replaceFile(s.dir, tmpPrefix+"*", filepath.Join(s.dir, recordName(e.Key)), data); err != nil {
		return err
	}
	s.mu.Lock()
	s.written += int64(len(data))
	s.mu.Unlock()
	return nil
}

// replaceFile writes data to dst in dir through a temp file (pattern) and a
// rename, so a reader sees the old or the new content, never half.
func replaceFile(dir, pattern, dst string, data []byte) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	tmp, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("replace state %s: %w", dst, err)
	}
	return nil
}
