package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/version"
)

// Version bounds for chaining. Before 0.3.0 a plugin gets no prevResult, so
// chaining does not exist; maxVersion is the newest version sidelane-cni
// speaks (plugin.supportedVersions; TestMaxVersionMatchesPlugin checks it).
const (
	minVersion = "0.3.0"
	maxVersion = "1.1.0"
)

// ErrNoPrimary means the conf dir holds no valid primary config yet: the
// primary CNI has not installed itself. The installer waits for one.
var ErrNoPrimary = errors.New("no valid primary CNI config")

// ErrMeshCNI means the primary config already chains another service
// mesh's traffic-redirecting CNI plugin (istio-cni, linkerd-cni, ...).
var ErrMeshCNI = errors.New("another mesh's CNI plugin is chained")

// File is one file of a CNI conf dir.
type File struct {
	Name string
	Data []byte
}

// IsConfigName reports whether a runtime loads the file: containerd and
// CRI-O read .conf, .conflist and .json (the last two as in libcni).
func IsConfigName(name string) bool {
	switch filepath.Ext(name) {
	case ".conf", ".conflist", ".json":
		return !strings.HasPrefix(name, ".")
	}
	return false
}

// List is a network config list kept as raw JSON, so fields and plugin
// entries sidelane does not know survive an edit byte for byte (modulo
// indentation).
type List struct {
	Name       string
	CNIVersion string
	// fields are the top-level keys other than plugins.
	fields  map[string]json.RawMessage
	Plugins []json.RawMessage
}

// Parse reads a config file the way the runtimes do (libcni): a .conflist is
// a list, a .conf or .json is one plugin that becomes a one-entry list with
// the plugin's own name and cniVersion (never a forced older version).
func Parse(name string, data []byte) (*List, error) {
	if filepath.Ext(name) == ".conflist" {
		return parseList(data)
	}
	return parseSingle(data)
}

func parseList(data []byte) (*List, error) {
	nl, err := libcni.NetworkConfFromBytes(data)
	if err != nil {
		return nil, err
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, fmt.Errorf("parse config list: %w", err)
	}
	var plugins []json.RawMessage
	if raw, ok := top["plugins"]; ok {
		if err := json.Unmarshal(raw, &plugins); err != nil {
			return nil, fmt.Errorf("parse config list: plugins: %w", err)
		}
	}
	if len(plugins) == 0 {
		// libcni would go looking for plugin files (loadOnlyInlinedPlugins);
		// the runtimes reject such a list as having no plugins.
		return nil, errors.New("config list: no plugins in list")
	}
	delete(top, "plugins")
	return &List{Name: nl.Name, CNIVersion: nl.CNIVersion, fields: top, Plugins: plugins}, nil
}

func parseSingle(data []byte) (*List, error) {
	pc, err := libcni.NetworkPluginConfFromBytes(data)
	if err != nil {
		return nil, err
	}
	if pc.Network.Name == "" {
		return nil, errors.New("config: name is required")
	}
	// The list carries name and cniVersion; the runtime injects both into
	// every plugin, so the copies in the plugin entry are redundant.
	entry, err := dropKeys(data, "name", "cniVersion")
	if err != nil {
		return nil, fmt.Errorf("parse config: %w", err)
	}
	fields := map[string]json.RawMessage{}
	for k, v := range map[string]string{"name": pc.Network.Name, "cniVersion": pc.Network.CNIVersion} {
		if v == "" {
			continue
		}
		b, _ := json.Marshal(v)
		fields[k] = b
	}
	return &List{Name: pc.Network.Name, CNIVersion: pc.Network.CNIVersion, fields: fields, Plugins: []json.RawMessage{entry}}, nil
}

// pluginType reads an entry's "type"; "" when it has none.
func pluginType(raw json.RawMessage) string {
	var p struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(raw, &p)
	return p.Type
}

// Has reports whether the list contains a plugin of type typ.
func (l *List) Has(typ string) bool {
	for _, p := range l.Plugins {
		if pluginType(p) == typ {
			return true
		}
	}
	return false
}

// Types lists the plugin types in order.
func (l *List) Types() []string {
	var ts []string
	for _, p := range l.Plugins {
		ts = append(ts, pluginType(p))
	}
	return ts
}

// Unchain returns a copy without sidelane's entries and whether any was
// removed.
func (l *List) Unchain() (*List, bool) {
	out := *l
	out.Plugins = nil
	for _, p := range l.Plugins {
		if pluginType(p) != PluginType {
			out.Plugins = append(out.Plugins, p)
		}
	}
	return &out, len(out.Plugins) != len(l.Plugins)
}

// Chain returns a copy with sidelane's entry last and no other sidelane
// entry. It refuses lists whose cniVersion cannot chain sidelane-cni and
// lists that already chain another mesh's CNI plugin (meshCNI).
func (l *List) Chain(e Entry) (*List, error) {
	for _, typ := range l.Types() {
		if mesh, remedy, ok := meshCNI(typ); ok {
			return nil, fmt.Errorf("network %q: %w: %s's CNI plugin (%s) already redirects the pods' traffic to its proxy, and sidelane-cni would capture it a second time (double capture); %s, or do not install sidelane", l.Name, ErrMeshCNI, mesh, typ, remedy)
		}
	}
	if err := chainableVersion(l.CNIVersion); err != nil {
		return nil, fmt.Errorf("network %q: %w", l.Name, err)
	}
	raw, err := e.raw()
	if err != nil {
		return nil, err
	}
	out, _ := l.Unchain()
	if len(out.Plugins) == 0 {
		return nil, fmt.Errorf("network %q: no plugin besides sidelane-cni; it needs a primary plugin before it", l.Name)
	}
	out.Plugins = append(out.Plugins, raw)
	return out, nil
}

func chainableVersion(v string) error {
	if v == "" {
		return fmt.Errorf("cniVersion is missing (that means 0.1.0); chaining needs %s or later", minVersion)
	}
	ok, err := version.GreaterThanOrEqualTo(v, minVersion)
	if err != nil {
		return fmt.Errorf("invalid cniVersion %q: %w", v, err)
	}
	if !ok {
		return fmt.Errorf("cniVersion %q: chaining needs %s or later (no prevResult before it)", v, minVersion)
	}
	if newer, _ := version.GreaterThan(v, maxVersion); newer {
		return fmt.Errorf("cniVersion %q: sidelane-cni speaks CNI up to %s", v, maxVersion)
	}
	return nil
}

// Encode writes the list as indented JSON: cniVersion and name first,
// other keys sorted, plugins last, each plugin keeping its own key order.
func (l *List) Encode() ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteString("{\n")
	keys := make([]string, 0, len(l.fields))
	for k := range l.fields {
		if k != "cniVersion" && k != "name" {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range append([]string{"cniVersion", "name"}, keys...) {
		v, ok := l.fields[k]
		if !ok {
			continue
		}
		kb, _ := json.Marshal(k)
		fmt.Fprintf(&buf, "  %s: ", kb)
		if err := json.Indent(&buf, v, "  ", "  "); err != nil {
			return nil, fmt.Errorf("encode %s: %w", k, err)
		}
		buf.WriteString(",\n")
	}
	buf.WriteString("  \"plugins\": [")
	for i, p := range l.Plugins {
		if i > 0 {
			buf.WriteString(",")
		}
		buf.WriteString("\n    ")
		if err := json.Indent(&buf, p, "    ", "  "); err != nil {
			return nil, fmt.Errorf("encode plugin %d: %w", i, err)
		}
	}
	buf.WriteString("\n  ]\n}\n")
	return buf.Bytes(), nil
}

// SameJSON reports whether a and b hold the same JSON value, ignoring
// formatting and key order. Invalid JSON is never the same.
func SameJSON(a, b []byte) bool {
	var va, vb any
	if json.Unmarshal(a, &va) != nil || json.Unmarshal(b, &vb) != nil {
		return false
	}
	return reflect.DeepEqual(va, vb)
}

// dropKeys returns the JSON object obj without keys, keeping the order of
// the others, so a converted .conf reads like the original.
func dropKeys(obj []byte, keys ...string) (json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(obj))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, fmt.Errorf("not a JSON object")
	}
	var buf bytes.Buffer
	buf.WriteByte('{')
	first := true
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		if slices.Contains(keys, key) {
			continue
		}
		if !first {
			buf.WriteByte(',')
		}
		first = false
		kb, _ := json.Marshal(key)
		buf.Write(kb)
		buf.WriteByte(':')
		buf.Write(v)
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}
