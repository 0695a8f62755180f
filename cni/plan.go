package cni

import (
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
)

// DefaultOwnConfig is the file name of sidelane's own conflist in ownConfig
// mode. "00-" sorts before the usual primaries (05-cilium, 10-calico,
// 10-flannel); the installer warns when it does not.
const DefaultOwnConfig = "00-sidelane.conflist"

// Write is one file the installer must write atomically.
type Write struct {
	Name string
	Data []byte
	// ModeFrom names the existing file whose mode the new one keeps
	// (itself, or the .conf a .conflist replaces); "" for 0644.
	ModeFrom string
}

// Plan is what must change in the conf dir: writes first, then removals,
// so a runtime reading the dir in between never finds it without a primary.
type Plan struct {
	// Primary is the config the runtime uses, which sidelane chains into.
	Primary string
	// Writes and Removes are empty when the dir is already as it should be.
	Writes   []Write
	Removes  []string
	Warnings []string
}

// Empty reports whether the plan changes nothing.
func (p Plan) Empty() bool { return len(p.Writes) == 0 && len(p.Removes) == 0 }

// Options say how to chain.
type Options struct {
	Entry Entry
	// OwnConfig, when true, leaves the primary's file alone and writes a
	// copy of its list plus sidelane's entry to OwnConfigName.
	OwnConfig bool
	// OwnConfigName is sidelane's own file (DefaultOwnConfig when empty).
	// It is never taken for the primary, in either mode.
	OwnConfigName string
}

func (o Options) ownName() string {
	if o.OwnConfigName == "" {
		return DefaultOwnConfig
	}
	return o.OwnConfigName
}

// SelectPrimary returns the config a runtime uses: the lexicographically
// first file a runtime loads that parses as a valid config, skipping skip.
// Invalid files are reported as warnings, as CRI-O logs and skips them.
// (containerd refuses to load any config while an invalid one sorts first;
// sidelane then still chains into the first valid one.)
func SelectPrimary(files []File, skip string) (File, *List, []string, error) {
	sorted := append([]File(nil), files...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	var warnings []string
	for _, f := range sorted {
		if f.Name == skip || !IsConfigName(f.Name) {
			continue
		}
		l, err := Parse(f.Name, f.Data)
		if err != nil {
			warnings = append(warnings, fmt.Sprintf("skipping invalid CNI config %s: %v", f.Name, err))
			continue
		}
		return f, l, warnings, nil
	}
	return File{}, nil, warnings, ErrNoPrimary
}

// PlanInstall computes the changes that chain sidelane into the dir's
// primary config. Applying the plan and planning again yields an empty plan.
//
// A single-plugin .conf or .json primary becomes convertedName(it), a
// .conflist recording the original (see convertedKey); a list converted
// earlier counts as its original, and a primary that wrote its original
// again is chained anew from the new file.
//
// When the primary chains another mesh's CNI plugin it returns ErrMeshCNI
// together with a plan that removes sidelane's entries (if any), so the
// pods are never captured twice.
func PlanInstall(files []File, o Options) (Plan, error) {
	if err := o.Entry.Validate(); err != nil {
		return Plan{}, err
	}
	own := o.ownName()
	if !IsConfigName(own) || filepath.Ext(own) != ".conflist" || strings.ContainsRune(own, '/') {
		return Plan{}, fmt.Errorf("invalid ownConfigName %q: want a file name ending in .conflist", own)
	}
	byName := map[string][]byte{}
	for _, f := range files {
		byName[f.Name] = f.Data
	}
	primary, list, warnings, err := SelectPrimary(primaryView(files), own)
	p := Plan{Primary: primary.Name, Warnings: warnings}
	if err != nil {
		return p, err
	}
	chained, err := list.Chain(o.Entry)
	if errors.Is(err, ErrMeshCNI) {
		uninstall := PlanUninstall(files, o)
		uninstall.Primary, uninstall.Warnings = p.Primary, append(p.Warnings, uninstall.Warnings...)
		return uninstall, fmt.Errorf("primary CNI config %s: %w", primary.Name, err)
	}
	if err != nil {
		return p, fmt.Errorf("primary CNI config %s: %w", primary.Name, err)
	}
	_, primaryOnDisk := byName[primary.Name]
	single := filepath.Ext(primary.Name) != ".conflist"

	if o.OwnConfig {
		data, err := chained.Encode()
		if err != nil {
			return p, err
		}
		if own > primary.Name {
			p.Warnings = append(p.Warnings, fmt.Sprintf("own config %s sorts after the primary %s, so the runtime keeps using %s without sidelane: choose an ownConfigName that sorts before %s", own, primary.Name, primary.Name, primary.Name))
		}
		if cur, ok := byName[own]; !ok || !SameJSON(cur, data) {
			p.Writes = append(p.Writes, Write{Name: own, Data: data, ModeFrom: modeFrom(byName, own, primary.Name)})
		}
		// What the edit mode left behind would come back the moment the
		// own file goes away: give a converted primary its file back, take
		// a sidelane entry out of a primary list.
		if single && isConverted(byName, primary.Name) {
			if !primaryOnDisk {
				p.Writes = append(p.Writes, Write{Name: primary.Name, Data: primary.Data, ModeFrom: convertedName(primary.Name)})
			}
			p.Removes = append(p.Removes, convertedName(primary.Name))
		} else if unchained, removed := list.Unchain(); removed && !single {
			ud, err := unchained.Encode()
			if err != nil {
				return p, err
			}
			p.Writes = append(p.Writes, Write{Name: primary.Name, Data: ud, ModeFrom: primary.Name})
		}
		return p, nil
	}

	target := primary.Name
	if single {
		target = convertedName(primary.Name)
		chained = chained.withConverted(primary)
		if cur, ok := byName[target]; ok {
			// A leftover of our own earlier conversion may be replaced;
			// someone else's config list may not.
			l, err := Parse(target, cur)
			if err != nil || !l.Has(PluginType) && !isConverted(byName, primary.Name) {
				return p, fmt.Errorf("primary CNI config %s must become a .conflist to chain sidelane-cni, but %s already exists: remove or rename one of them", primary.Name, target)
			}
		}
	}
	data, err := chained.Encode()
	if err != nil {
		return p, err
	}
	if cur, ok := byName[target]; !ok || !SameJSON(cur, data) {
		p.Writes = append(p.Writes, Write{Name: target, Data: data, ModeFrom: modeFrom(byName, primary.Name, target)})
	}
	if single && primaryOnDisk {
		p.Removes = append(p.Removes, primary.Name)
	}
	if _, ok := byName[own]; ok {
		// Left by the ownConfig mode; it sorts first and would shadow the
		// primary's file we now edit.
		p.Removes = append(p.Removes, own)
	}
	return p, nil
}

func modeFrom(byName map[string][]byte, names ...string) string {
	for _, n := range names {
		if _, ok := byName[n]; ok {
			return n
		}
	}
	return ""
}

// PlanUninstall computes the changes that take sidelane out of the dir: its
// entry out of every config list that has one, and its own file removed.
// A list install-cni converted gives back the original it records, under
// the original's name and byte for byte (unless the primary has written
// that file again since: then the newer file stays). A list that would be
// left with no plugin is removed.
func PlanUninstall(files []File, o Options) Plan {
	var p Plan
	own := o.ownName()
	present := map[string]bool{}
	for _, f := range files {
		present[f.Name] = true
	}
	for _, f := range files {
		if !IsConfigName(f.Name) {
			continue
		}
		if f.Name == own {
			p.Removes = append(p.Removes, own)
			continue
		}
		if filepath.Ext(f.Name) != ".conflist" {
			continue
		}
		l, err := Parse(f.Name, f.Data)
		if err != nil {
			continue
		}
		if orig, ok := convertedFrom(f.Name, l); ok {
			if !present[orig.Name] {
				p.Writes = append(p.Writes, Write{Name: orig.Name, Data: orig.Data, ModeFrom: f.Name})
			}
			p.Removes = append(p.Removes, f.Name)
			continue
		}
		unchained, removed := l.Unchain()
		if !removed {
			continue
		}
		if len(unchained.Plugins) == 0 {
			p.Removes = append(p.Removes, f.Name)
			continue
		}
		data, err := unchained.Encode()
		if err != nil {
			p.Warnings = append(p.Warnings, fmt.Sprintf("cannot rewrite %s: %v", f.Name, err))
			continue
		}
		p.Writes = append(p.Writes, Write{Name: f.Name, Data: data, ModeFrom: f.Name})
	}
	return p
}
