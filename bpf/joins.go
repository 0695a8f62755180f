package bpf

// JoinStats counts the shortcut's join requests since the agent started.
type JoinStats struct {
	// Joined sockets were put into the shortcut's sockhash.
	Joined uint64
	// Missed requests found no socket to join (it closed, or its netns is
	// no longer enrolled) or could not be run (see the agent's log).
	Missed uint64
	// NoNetns requests came from a netns whose path the agent does not
	// know (a pod enrolled without an inbound attach).
	NoNetns uint64
}
