// Package store keeps the agent's record of every pod attachment it was told
// about at CNI ADD. It is persisted to a file on every change so an agent
// restart (crash or upgrade) neither forgets pods nor needs CNI to replay.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
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
	NetnsCookie uint64    `json:"netnsCookie,omitempty"`
	Added       time.Time `json:"added"`
}

type fileFormat struct {
	Version int     `json:"version"`
	Entries []Entry `json:"entries"`
}

const fileVersion = 1

// Store is safe for concurrent use.
type Store struct {
	path string

	mu      sync.Mutex
	entries map[Key]Entry
}

// Open loads the store from path, or starts empty when the file does not
// exist. A corrupt file is an error: silently starting empty would forget
// pods that are still captured.
func Open(path string) (*Store, error) {
	s := &Store{path: path, entries: map[Key]Entry{}}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state %s: %w", path, err)
	}
	var f fileFormat
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("parse state %s: %w", path, err)
	}
	if f.Version != fileVersion {
		return nil, fmt.Errorf("state %s: unsupported version %d", path, f.Version)
	}
	for _, e := range f.Entries {
		s.entries[e.Key] = e
	}
	return s, nil
}

// Get returns the entry for k.
func (s *Store) Get(k Key) (Entry, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[k]
	return e, ok
}

// Put adds or replaces an entry and persists the store.
func (s *Store) Put(e Entry) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, had := s.entries[e.Key]
	s.entries[e.Key] = e
	if err := s.saveLocked(); err != nil {
		if had {
			s.entries[e.Key] = old
		} else {
			delete(s.entries, e.Key)
		}
		return err
	}
	return nil
}

// Delete removes k and persists the store. Deleting a missing key is not an
// error: CNI DEL must be idempotent.
func (s *Store) Delete(k Key) (Entry, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[k]
	if !ok {
		return Entry{}, false, nil
	}
	delete(s.entries, k)
	if err := s.saveLocked(); err != nil {
		s.entries[k] = e
		return Entry{}, false, err
	}
	return e, true, nil
}

// List returns all entries sorted by key.
func (s *Store) List() []Entry {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.listLocked()
}

func (s *Store) listLocked() []Entry {
	out := make([]Entry, 0, len(s.entries))
	for _, e := range s.entries {
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b Entry) int { return strings.Compare(a.Key.String(), b.Key.String()) })
	return out
}

// saveLocked writes the whole store to a temp file and renames it over the
// old one, so an agent crash leaves either the old or the new state, never
// half. No fsync: the state lives on /var/run (tmpfs), which a node crash
// wipes together with the pods it describes, and fsync on every CNI ADD
// would put disk latency on the pod-start path.
func (s *Store) saveLocked() error {
	data, err := json.Marshal(fileFormat{Version: fileVersion, Entries: s.listLocked()})
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	dir := filepath.Dir(s.path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".state-*")
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
	if err := os.Rename(tmp.Name(), s.path); err != nil {
		return fmt.Errorf("replace state %s: %w", s.path, err)
	}
	return nil
}
