// Package bpf holds sidelane's eBPF programs (capture.c) and the typed Go
// API that loads them, pins their maps and links under bpffs, and writes
// per-pod capture state. Nothing outside this package touches raw map keys.
package bpf

// The flags are fixed so `make verify` regenerates identical objects:
// -g keeps BTF (needed for -type and map definitions), bpf2go strips DWARF.
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type pod_config -type cidr_key -type port_key -type orig_dst -type tuple_key -type counters -type node_proxy -type node_stats -type tw_key -type tw_rec -type in_key -type in_iface_set capture capture.c
