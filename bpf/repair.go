package bpf

// What Repair puts back (the `what` label of sidelane_datapath_repairs_total).
const (
	RepairCgroupLink = "cgroup_link" // a cgroup program's bpf_link
	RepairTCLink     = "tc_link"     // a pod's inbound tcx link
	RepairNetnsLink  = "netns_link"  // a pod's inbound or time-wait lookup (sk_lookup) link
	RepairSkMsg      = "sk_msg"      // the shortcut's verdict program on the sockhash
	RepairProgArray  = "prog_array"  // sidecar pods' inbound capture program in in_progs
	RepairPin        = "pin"         // a map's or link's pin under the pin dir
)

// Repaired is one thing Repair found broken and put back.
type Repaired struct {
	What   string // RepairCgroupLink, RepairTCLink, RepairNetnsLink, RepairSkMsg, RepairProgArray or RepairPin
	Name   string // the program, map, pod interface ("<netns cookie>/<ifname>") or pod ("<netns cookie>")
	Reason string // "detached", "replaced", "unpinned"
}

func (r Repaired) String() string { return r.What + " " + r.Name + ": " + r.Reason }

// Inbound is one pod interface whose inbound capture Repair keeps attached.
type Inbound struct {
	NetnsPath string
	Netns     uint64
	IfName    string
}
