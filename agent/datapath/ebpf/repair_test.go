package ebpf

import (
	"slices"
	"testing"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
)

type repairPods struct {
	*fakePods
	got []bpf.Inbound
}

func (r *repairPods) Repair(in []bpf.Inbound) ([]bpf.Repaired, error) {
	r.got = in
	return nil, nil
}

// Repair asks the capture to keep the inbound link of every enrolled
// attachment with an inbound interface, and of no other.
func TestRepairInboundFromEntries(t *testing.T) {
	sidecar, _, noEth0, node, none := moveEntries()
	sidecar.NetnsCookie, noEth0.NetnsCookie, node.NetnsCookie = 11, 12, 13
	node.Netns = "/y"
	neverEnrolled := sidecar
	neverEnrolled.NetnsCookie = 0
	r := &repairPods{fakePods: newFakePods()}
	d := newFakeDatapath(r.fakePods)
	d.pods = r
	if _, err := d.Repair(append([]store.Entry{}, sidecar, noEth0, node, none, neverEnrolled)); err != nil {
		t.Fatal(err)
	}
	want := []bpf.Inbound{{NetnsPath: "/x", Netns: 11, IfName: "eth0"}, {NetnsPath: "/y", Netns: 13, IfName: "eth0"}}
	if !slices.Equal(r.got, want) {
		t.Errorf("Repair asked to keep %v, want %v", r.got, want)
	}
}
