package cni

import (
	"encoding/json"
	"path/filepath"
	"strings"
)

// convertedKey is the top-level key of a .conflist that install-cni made
// from a single-plugin .conf or .json: it records the original's file name
// and exact bytes, so uninstall gives the primary its file back as it wrote
// it (Multus, for one, removes only the file name it wrote when it exits)
// and a rewrite of the original is recognised as the primary's. Runtimes
// ignore top-level keys they do not know.
const convertedKey = "sidelaneConvertedFrom"

type convertedRecord struct {
	File string `json:"file"`
	Data string `json:"data"`
}

// convertedName is the .conflist a single-plugin config becomes: its own
// name with "list" (a .conf) or ".conflist" (a .json) appended. Starting
// with the original's name, it sorts right after it, so when the primary
// writes its file again the runtime loads that new file at once (never a
// stale converted copy) until install-cni has chained it again.
func convertedName(name string) string {
	if filepath.Ext(name) == ".conf" {
		return name + "list"
	}
	return name + ".conflist"
}

// withConverted returns l recording orig as the file it was made from.
func (l *List) withConverted(orig File) *List {
	out := *l
	out.fields = make(map[string]json.RawMessage, len(l.fields)+1)
	for k, v := range l.fields {
		out.fields[k] = v
	}
	raw, _ := json.Marshal(convertedRecord{File: orig.Name, Data: string(orig.Data)})
	out.fields[convertedKey] = raw
	return &out
}

// convertedFrom returns the original a converted list records. The record
// is trusted only when it names a single-plugin config in the same dir
// whose converted name is this list's and whose bytes parse as a config:
// uninstall writes that file, so a record naming any other file (a path,
// another list) is ignored and the list treated like any other.
func convertedFrom(name string, l *List) (File, bool) {
	raw, ok := l.fields[convertedKey]
	if !ok {
		return File{}, false
	}
	var rec convertedRecord
	if json.Unmarshal(raw, &rec) != nil {
		return File{}, false
	}
	if strings.ContainsRune(rec.File, '/') || !IsConfigName(rec.File) || filepath.Ext(rec.File) == ".conflist" || convertedName(rec.File) != name {
		return File{}, false
	}
	if _, err := Parse(rec.File, []byte(rec.Data)); err != nil {
		return File{}, false
	}
	return File{Name: rec.File, Data: []byte(rec.Data)}, true
}

// primaryView is the conf dir as the primaries wrote it: every list
// install-cni converted is replaced by the original it records, or dropped
// when the primary has written that original again since (the newer file
// wins; the converted copy is stale).
func primaryView(files []File) []File {
	present := map[string]bool{}
	for _, f := range files {
		present[f.Name] = true
	}
	var out []File
	for _, f := range files {
		if filepath.Ext(f.Name) == ".conflist" {
			if l, err := Parse(f.Name, f.Data); err == nil {
				if orig, ok := convertedFrom(f.Name, l); ok {
					if !present[orig.Name] {
						out = append(out, orig)
					}
					continue
				}
			}
		}
		out = append(out, f)
	}
	return out
}

// isConverted reports whether byName holds a list install-cni converted
// from orig.
func isConverted(byName map[string][]byte, orig string) bool {
	name := convertedName(orig)
	data, ok := byName[name]
	if !ok {
		return false
	}
	l, err := Parse(name, data)
	if err != nil {
		return false
	}
	// (a.json and a.json.conf both become a.json.conflist: compare names.)
	rec, ok := convertedFrom(name, l)
	return ok && rec.Name == orig
}
