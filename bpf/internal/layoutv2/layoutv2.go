package layoutv2

import "github.com/cilium/ebpf"

// Spec is the changed layout's collection.
func Spec() (*ebpf.CollectionSpec, error) { return loadCapturev2() }
