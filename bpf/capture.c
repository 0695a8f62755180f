//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Copyright sidelane authors.
 *
 * Istio sidecar traffic capture without iptables.
 *
 * Every hook first asks "is this socket's network namespace enrolled?" by
 * looking its netns cookie up in `pods`. The agent writes that entry at CNI
 * ADD, before the pod's first process runs, so capture is deterministic and
 * starts with the very first connection. A socket in a netns that is not
 * enrolled is never touched.
 *
 * Programs:
 *   cgroup/connect4, cgroup/connect6  outbound TCP -> 127.0.0.1:<outbound port>
 *                                     (Istio's ISTIO_OUTPUT semantics), the proxy
 *                                     calling its own pod IP -> <inbound port>,
 *                                     TCP DNS -> <dns port>; records the original
 *                                     dst by socket cookie.
 *   sockops                           when a redirected connection is established,
 *                                     re-keys the original dst by the connection's
 *                                     4-tuple, which the proxy's accepted socket
 *                                     sees mirrored.
 *   cgroup/getsockopt                 answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST
 *                                     for those accepted sockets only.
 *   cgroup/sendmsg4/6, recvmsg4/6     DNS over UDP -> <dns port>, replies show
 *                                     the original server as their source.
 *   cgroup/getpeername4/6             a redirected socket's peer is the original dst.
 *   cgroup/sock_release               forgets a released socket's original dst.
 *   sk_msg (on sock_pairs)            same-node shortcut, socket to socket.
 *   sk_lookup (sidecar pod's netns)   inbound TCP to a captured port, on a captured
 *                                     interface, is assigned to the proxy's
 *                                     <inbound port> listener (a sidelane_in_lookup
 *                                     stub per pod tail-calls sidelane_in_capture;
 *                                     listeners recorded by sock_ops at listen(2)
 *                                     in in_listeners).
 *   tc (tcx ingress on the pod's if)  the same for per-node pods (and pods enrolled
 *                                     by an older agent): bpf_sk_assign from tc.
 *   sk_lookup (tc pods' netns)        a SYN reusing a TIME_WAIT four-tuple gets that
 *                                     listener too (see tw_key).
 */

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

char __license[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* also IP6T_SO_ORIGINAL_DST */

/* pod_config.flags */
#define POD_OUTBOUND_ALL 0x1 /* capture every outbound CIDR not excluded */
#define POD_INBOUND_ALL 0x2  /* capture every inbound port not excluded */
#define POD_DNS 0x4          /* DNS capture to dns_port */
#define POD_LOOPBACK_IN 0x8  /* an included CIDR is loopback: capture the app's lo traffic too */
#define POD_NO_IPV6 0x10     /* leave IPv6 alone (dual-stack pod without ISTIO_DUAL_STACK) */
#define POD_NODE 0x20        /* per-node mode: no sidecar, the node proxy in the host netns */
/* The pod has no rule of a kind: its lookup is skipped (an LPM trie walk
 * per connect). Absent (a pod written by an older agent): looked up. */
#define POD_NO_ROUTES 0x40         /* no CIDR_ROUTE */
#define POD_NO_EXCL_PORTS_OUT 0x80 /* no PORT_EXCLUDE_OUT */
#define POD_NO_EXCL_CIDRS_OUT 0x100 /* no CIDR_EXCLUDE_OUT */
#define POD_NO_INCL_PORTS_OUT 0x200 /* no PORT_INCLUDE_OUT */

#define MAX_IDS 4

#define READ(x) (*(volatile typeof(x) *)&(x))

/* What the agent writes for one enrolled pod (netns). Ports in host order. */
struct pod_config {
	__u16 outbound_port;
	__u16 inbound_port;
	__u16 dns_port;
	__u16 flags;
	__u32 n_uids;
	__u32 n_gids;
	__u32 proxy_uids[MAX_IDS];
	__u32 proxy_gids[MAX_IDS];
};

/* cidr_key.kind */
#define CIDR_EXCLUDE_OUT 1
#define CIDR_INCLUDE_OUT 2
#define CIDR_LOCAL 3 /* the pod's own addresses: Istio's "-o lo" */
#define CIDR_ROUTE 4 /* the pod's routes; value 1: via an excluded interface */

/* LPM key: the pod's netns cookie is always matched in full (64 bits), then
 * the kind (8 bits), the family (8 bits), then the address. IPv4 is stored
 * v4-mapped (::ffff:a.b.c.d) so one trie serves both families; the family
 * byte keeps a range to its own family, as Istio's separate iptables and
 * ip6tables rules do: without it "::/0" would also cover every v4-mapped
 * IPv4 address (excludeOutboundIPRanges "::/0" would send all IPv4 around
 * the sidecar). */
struct cidr_key {
	__u32 prefixlen;
	__u32 netns_lo;
	__u32 netns_hi;
	__u8 kind;
	__u8 family; /* CIDR_FAMILY_* */
	__u8 addr[16];
};

#define CIDR_FAMILY_V4 4
#define CIDR_FAMILY_V6 6
#define CIDR_FULL_PREFIX (64 + 8 + 8 + 128)

/* port_key.kind */
#define PORT_EXCLUDE_OUT 1
#define PORT_INCLUDE_OUT 2
#define PORT_EXCLUDE_IN 3
#define PORT_INCLUDE_IN 4

/* Port ranges are decomposed into prefixes by the agent, so any range costs
 * one lookup. port is big-endian so prefixes are its high bits. */
struct port_key {
	__u32 prefixlen;
	__u32 netns_lo;
	__u32 netns_hi;
	__u8 kind;
	__u8 port[2];
};

/* The destination a connection had before we rewrote it. addr is
 * v4-mapped for IPv4; port in host order. netns is the cookie of the netns
 * whose proxy accepts the redirected connection. */
struct orig_dst {
	__u8 addr[16];
	__u16 port;
	__u16 family;
	__u32 flags; /* ORIG_* */
	__u64 netns;
};

/* orig_dst.flags */
#define ORIG_NODE 0x1 /* redirected to the node proxy (per-node mode) */

/* Per-node mode: where the node proxy listens and which netns it lives in.
 * Written by the agent (node_proxy_cfg[0]); all zero means "no node proxy
 * configured", and per-node pods' connects then fail (EPERM) rather than
 * go out uncaptured. Addresses in network order. */
struct node_proxy {
	__u64 netns;   /* cookie of the netns the proxy's sockets are in (the host's) */
	__u32 ip4;     /* outbound listener address (IPv4), reachable from pods */
	__u32 ip6[4];  /* same for IPv6; all zero: IPv6 connects of per-node pods fail */
	__u16 port;    /* outbound listener port (host order) */
	__u16 pad;
};

/* Per-node mode counters (per CPU; the agent sums them). */
struct node_stats {
	__u64 redirected;   /* connects steered to the node proxy */
	__u64 refused;      /* of those, never established: proxy down (fail closed) */
	__u64 unconfigured; /* connects denied because no node proxy is configured */
	__u64 looped;       /* connects to the node proxy's listener itself, denied */
};

/* A connection as the connecting socket sees it. Ports in host order. */
struct tuple_key {
	__u64 netns;
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u32 pad;
};

/* Per-pod counters (per CPU; the agent sums them). */
struct counters {
	__u64 redirected_out;
	__u64 redirected_in;
	__u64 redirected_dns;
	__u64 excluded;
	__u64 orig_dst_answered;
	__u64 shortcut_msgs;
	__u64 shortcut_bytes;
	__u64 dropped_in; /* inbound packets dropped to fail closed (see sidelane_inbound) */
	__u64 shortcut_to_tcp; /* shortcut sockets that went back to TCP for good (streaming, or no peer) */
	__u64 timewait_reuse;  /* captured SYNs that reused a TIME_WAIT four-tuple (see tw_key) */
};

/* settings[0] bits. */
#define SETTING_SHORTCUT 0x1
/* Bits 8-31, if not 0, replace STREAM_RUN (benchmarks compare designs in one
 * run with it: a huge value is "always redirect"). */
#define SETTING_RUN_SHIFT 8

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct pod_config);
} pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_key);
	__type(value, __u8);
} cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 1 << 18);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct port_key);
	__type(value, __u8);
} ports SEC(".maps");

/* Pod IP (v4-mapped for IPv4) -> netns cookie, for inbound capture in tc. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 65536);
	__type(key, __u8[16]);
	__type(value, __u64);
} pod_ips SEC(".maps");

/* Socket cookie of a redirected connecting socket -> original dst, from
 * connect until the socket closes (getpeername answers from it). LRU: a
 * connect that never completes must not leak an entry forever. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct orig_dst);
} orig_by_cookie SEC(".maps");

/* Established redirected connection -> original dst, for getsockopt on the
 * proxy's accepted socket; removed when that accepted socket closes (or the
 * connect never establishes). LRU bounds what a proxy outside the attach
 * cgroup (never watched) would leave. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 262144);
	__type(key, struct tuple_key);
	__type(value, struct orig_dst);
} orig_by_tuple SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct counters);
} pod_counters SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_proxy);
} node_proxy_cfg SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_stats);
} node_counters SEC(".maps");

/* Global switches written by the agent (settings[0]). */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} settings SEC(".maps");

/* Same-node established sockets eligible for the shortcut, keyed by their
 * own 4-tuple (netns set for loopback tuples, 0 for pod IPs, which are
 * unique on the node). */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple_key);
	__type(value, __u64);
} sock_pairs SEC(".maps");

/* The same keys -> socket cookie. sk_msg cannot read its own socket's
 * cookie, so it compares the cookie stored under its own tuple with the one
 * under its peer's: equal means the "peer" is the sending socket itself
 * (a self-connected socket, or tuples made symmetric by leftover NAT), and
 * redirecting would loop its writes into itself. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple_key);
	__type(value, __u64);
} pair_cookies SEC(".maps");

/* Per-socket shortcut mode, created by sock_ops when it asks the agent to
 * put the socket into sock_pairs (see pair_joins), freed with the socket.
 * MODE_TCP: the socket's last send went the TCP way (it starts so), for
 * the shortcut_to_tcp counter, which counts switches from redirect to TCP.
 * A socket may switch both ways: redirect -> TCP is safe because a redirect
 * is in the peer's queue before sendmsg returns and the peer drains that
 * queue before it reads TCP; TCP -> redirect only once the peer has read
 * every byte the socket sent by TCP (pair_seen), since the peer reads its
 * redirect queue first and a redirect would otherwise overtake them. */
#define MODE_TCP 0x1

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} pair_mode SEC(".maps");

/* Sends in a row from the socket of this tuple since its peer last sent.
 * A socket that sends more than STREAM_RUN messages without hearing back is
 * streaming: measured, a redirect costs more per message than loopback TCP
 * (a lock on the peer and a wakeup for every message, where TCP coalesces),
 * so it goes back to TCP for good. Request/response keeps the shortcut. LRU:
 * losing an entry only restarts a count. */
#define STREAM_RUN 16

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple_key);
	__type(value, __u32);
} pair_runs SEC(".maps");

/* The socket of this tuple's copied_seq (how far its application has read
 * the TCP byte stream) at its last send. Its peer may redirect only while
 * this equals the peer's own write_seq: every byte the peer ever sent by
 * TCP has been read, so nothing of it is left for a redirect to overtake.
 * Both are in the same sequence space (the two ends of one same-node
 * connection, no NAT rewrites sequence numbers on it). copied_seq only
 * grows, so a stale record only sends a message by TCP. LRU: a lost
 * record does the same. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple_key);
	__type(value, __u32);
} pair_seen SEC(".maps");

/* Sockets sock_ops asks the agent to put into sock_pairs. A socket joins
 * only once it carries request/response traffic (JOIN_SEGS data segments
 * each way): being in a sockhash costs every send of the socket (the
 * tcp_bpf send path copies into an sk_msg, then pushes it to TCP) and every
 * connection its insert and teardown, which streams and short connections
 * would pay for nothing. sock_ops may only insert at the established
 * callbacks, before the traffic is known, so the agent inserts later by
 * running sidelane_pair_join in the socket's netns. A full ring loses the
 * request: the socket stays on TCP. */
struct pair_join {
	struct tuple_key key; /* the socket's own tuple, netns as in sock_pairs */
	__u64 netns;          /* the socket's netns cookie */
	__u64 cookie;         /* the socket's cookie (pair_cookies) */
};

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} pair_joins SEC(".maps");

#define JOIN_SEGS 4
/* A socket still short of JOIN_SEGS one way after this many data segments
 * in all streams: its RTT callbacks stop. */
#define JOIN_GIVEUP_SEGS 256

/* TIME_WAIT reuse (see sidelane_inbound and sidelane_tw_lookup). A SYN
 * whose four-tuple finds the pod's side of an earlier captured connection
 * in TIME_WAIT cannot be bpf_sk_assign'ed to the proxy's listener: the
 * request socket the listener makes is refused by the kernel's duplicate
 * check against that TIME_WAIT socket (inet_ehash_insert), and every SYN
 * retransmit is dropped until TIME_WAIT ends (60 s). So tc assigns the
 * TIME_WAIT socket itself: the stack then takes its TCP_TW_SYN path, which
 * ends the TIME_WAIT socket and looks a listener up for the packet's
 * destination, and that lookup runs sidelane_tw_lookup (sk_lookup, attached
 * to the pod's netns), which answers with the proxy's listener that tc
 * found. sk_lookup cannot read its netns cookie (bpf_get_netns_cookie is
 * not offered to it), so tc records the SYN by its tuple and interface
 * here, with the pod's netns cookie as the value. */
struct tw_key {
	__u8 src[16]; /* the SYN's source and destination, v4-mapped for IPv4 */
	__u8 dst[16];
	__u16 sport; /* host order */
	__u16 dport;
	__u32 ifindex; /* the interface the SYN arrived on */
};

struct tw_rec {
	__u64 netns; /* the pod's netns cookie: key of its listener in tw_listeners */
	__u64 at;    /* bpf_ktime_get_ns when tc recorded it */
};

/* tc and the listener lookup run for one packet one after the other
 * (microseconds). A record older than this is stale (its SYN's lookup never
 * came: the TIME_WAIT socket answered with an ACK): a lookup that matches
 * it is dropped, never left to the kernel. Another netns matches a record
 * only with the same addresses, ports and interface index, within this. */
#define TW_REC_NS (1000ULL * 1000 * 1000)

/* Records are not deleted when used: two SYNs of one tuple in flight on
 * two CPUs each need theirs. LRU: an entry evicted between tc and the
 * lookup would leave that lookup to the kernel (the app's listener), which
 * would take more than max_entries other reuses within microseconds. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 65536);
	__type(key, struct tw_key);
	__type(value, struct tw_rec);
} tw_pending SEC(".maps");

/* Pod netns cookie -> the proxy's inbound listener, written by tc on a
 * TIME_WAIT reuse (sk_lookup can only hand out sockets from a sockmap).
 * An entry goes away when its listener closes. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} tw_listeners SEC(".maps");

/* Sidecar pods' inbound listeners (see sidelane_in_lookup), recorded by
 * sock_ops when a socket of an enrolled sidecar pod starts listening on the
 * pod's inbound port (or by sidelane_in_record, for one that listened
 * before). Envoy opens one SO_REUSEPORT listener per worker
 * (per family): IN_SLOTS of them are kept, any one lets the kernel pick
 * within the group; an entry goes away when its socket closes. */
#define IN_SLOTS 4

struct in_key {
	__u64 netns;
	__u16 family; /* AF_INET, AF_INET6 */
	__u16 slot;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 65536);
	__type(key, struct in_key);
	__type(value, __u64);
} in_listeners SEC(".maps");

/* A sidecar pod's captured interfaces (ifindex in its netns; the names for
 * the agent's DetachInbound), written by AttachInbound. */
#define MAX_IN_IFACES 4

struct in_iface_set {
	__u32 ifindex[MAX_IN_IFACES]; /* 0: free */
	__u8 name[MAX_IN_IFACES][16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct in_iface_set);
} in_ifaces SEC(".maps");

enum verdict {
	PASS = 0,
	PASS_EXCLUDED,
	REDIRECT_OUT,
	REDIRECT_IN_SELF, /* the proxy calling its own pod IP: Istio's ISTIO_IN_REDIRECT */
	REDIRECT_DNS,
	REDIRECT_NODE, /* per-node mode: to the node proxy in the host netns */
	DENY,          /* refuse the connect (per-node pod, no node proxy configured) */
	DENY_LOOP,     /* refuse the connect: it targets the node proxy's listener itself */
};

static __always_inline struct node_proxy *get_node_proxy(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&node_proxy_cfg, &zero);
}

#define NODE_REDIRECTED 0
#define NODE_REFUSED 1
#define NODE_UNCONFIGURED 2
#define NODE_LOOPED 3

static __always_inline void node_count(int field)
{
	__u32 zero = 0;
	struct node_stats *s = bpf_map_lookup_elem(&node_counters, &zero);
	if (!s)
		return;
	if (field == NODE_REDIRECTED)
		s->redirected++;
	else if (field == NODE_REFUSED)
		s->refused++;
	else if (field == NODE_LOOPED)
		s->looped++;
	else
		s->unconfigured++;
}


static __always_inline void count(__u64 netns, int field)
{
	struct counters *c = bpf_map_lookup_elem(&pod_counters, &netns);
	if (!c)
		return;
	switch (field) {
	case REDIRECT_OUT:
		c->redirected_out++;
		break;
	case REDIRECT_IN_SELF:
		c->redirected_in++;
		break;
	case REDIRECT_DNS:
		c->redirected_dns++;
		break;
	case PASS_EXCLUDED:
		c->excluded++;
		break;
	}
}

static __always_inline int is_v4mapped(const __u8 a[16]);

static __always_inline int cidr_match(__u64 netns, __u8 kind, const __u8 addr[16])
{
	struct cidr_key k = {
		.prefixlen = CIDR_FULL_PREFIX,
		.netns_lo = (__u32)netns,
		.netns_hi = (__u32)(netns >> 32),
		.kind = kind,
		.family = is_v4mapped(addr) ? CIDR_FAMILY_V4 : CIDR_FAMILY_V6,
	};
	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&cidrs, &k) != NULL;
}

/* Istio's "-o <excludeInterfaces> -j RETURN": the pod's routing table
 * (written at enroll when interfaces are excluded) says which interface a
 * destination leaves by; the longest matching route decides. */
static __always_inline int route_excluded(__u64 netns, const __u8 addr[16])
{
	struct cidr_key k = {
		.prefixlen = CIDR_FULL_PREFIX,
		.netns_lo = (__u32)netns,
		.netns_hi = (__u32)(netns >> 32),
		.kind = CIDR_ROUTE,
		.family = is_v4mapped(addr) ? CIDR_FAMILY_V4 : CIDR_FAMILY_V6,
	};
	__builtin_memcpy(k.addr, addr, 16);
	__u8 *v = bpf_map_lookup_elem(&cidrs, &k);
	return v && *v == 1;
}

static __always_inline int port_match(__u64 netns, __u8 kind, __u16 port)
{
	struct port_key k = {
		.prefixlen = 64 + 8 + 16,
		.netns_lo = (__u32)netns,
		.netns_hi = (__u32)(netns >> 32),
		.kind = kind,
		.port = {port >> 8, port & 0xff},
	};
	return bpf_map_lookup_elem(&ports, &k) != NULL;
}

static __always_inline int is_v4mapped(const __u8 a[16])
{
	const __u32 *w = (const __u32 *)a;
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

static __always_inline int is_loopback(const __u8 a[16])
{
	const __u32 *w = (const __u32 *)a;
	if (is_v4mapped(a))
		return a[12] == 127;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1);
}

/* 127.0.0.1 or ::1: Istio's "-d 127.0.0.1/32 -j RETURN". */
static __always_inline int is_localhost(const __u8 a[16])
{
	const __u32 *w = (const __u32 *)a;
	if (is_v4mapped(a))
		return w[3] == bpf_htonl(0x7f000001);
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1);
}

/* Envoy's inbound passthrough source: 127.0.0.6, or ::6 for IPv6. */
static __always_inline int is_passthrough_src(const __u8 a[16])
{
	const __u32 *w = (const __u32 *)a;
	if (is_v4mapped(a))
		return w[3] == bpf_htonl(0x7f000006);
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(6);
}

/* is_node_proxy: a is the node proxy's address (v4-mapped for IPv4). */
static __always_inline int is_node_proxy(const struct node_proxy *np, const __u8 a[16])
{
	const __u32 *w = (const __u32 *)a;
	if (!np)
		return 0;
	if (is_v4mapped(a))
		return np->ip4 && w[3] == np->ip4;
	return (np->ip6[0] | np->ip6[1] | np->ip6[2] | np->ip6[3]) && w[0] == np->ip6[0] && w[1] == np->ip6[1] &&
	       w[2] == np->ip6[2] && w[3] == np->ip6[3];
}

/* The connect hooks send every redirected connection to 127.0.0.1 or ::1
 * (the pod's proxy) or to the node proxy, so only a socket whose peer is
 * one of those can have an orig_by_cookie entry. Hooks that run for every
 * socket check this first: the node proxy config is one hot array slot,
 * the LRU map's bucket for a new socket a cold miss. */
static __always_inline int maybe_redirected(const __u8 peer[16])
{
	return is_localhost(peer) || is_node_proxy(get_node_proxy(), peer);
}

/* The socket's owner, as iptables' owner match sees it: the fsuid/fsgid of
 * the credentials the socket's file was opened with, which can differ from
 * the calling task's ids (setfsuid, sockets passed between processes).
 * Minimal CO-RE views of the kernel structs; libbpf-style ___ suffixes
 * match the kernel's struct names, field offsets come from the kernel BTF. */
typedef struct {
	__u32 val;
} kuid_t;
typedef struct {
	__u32 val;
} kgid_t;
struct cred___sl {
	kuid_t fsuid;
	kgid_t fsgid;
} __attribute__((preserve_access_index));
struct file___sl {
	const struct cred___sl *f_cred;
} __attribute__((preserve_access_index));
struct socket___sl {
	struct file___sl *file;
} __attribute__((preserve_access_index));
/* User namespaces (pods with hostUsers: false). iptables' owner match
 * compares the socket's fsuid with the rule's uid mapped into the user
 * namespace that owns the pod's netns; so the owner check maps the kernel
 * uid back into that namespace (the kernel's from_kuid). Up to 5 extents
 * are stored inline, which is what container runtimes write (one). */
struct uid_gid_extent___sl {
	__u32 first;
	__u32 lower_first;
	__u32 count;
} __attribute__((preserve_access_index));
struct uid_gid_map___sl {
	struct uid_gid_extent___sl extent[5];
	__u32 nr_extents;
} __attribute__((preserve_access_index));
struct user_namespace___sl {
	struct uid_gid_map___sl uid_map;
	struct uid_gid_map___sl gid_map;
} __attribute__((preserve_access_index));
struct netns_bpf___sl {
	void *run_array[2]; /* [NETNS_BPF_SK_LOOKUP]: the attached sk_lookup programs */
} __attribute__((preserve_access_index));
struct net___sl {
	__u64 net_cookie;
	struct user_namespace___sl *user_ns;
	struct netns_bpf___sl bpf;
} __attribute__((preserve_access_index));
struct possible_net_t___sl {
	struct net___sl *net;
} __attribute__((preserve_access_index));
struct sock_common___sl {
	struct possible_net_t___sl skc_net;
} __attribute__((preserve_access_index));
struct sock___sl {
	struct sock_common___sl __sk_common;
	struct socket___sl *sk_socket;
} __attribute__((preserve_access_index));

#define ID_UNMAPPED ((__u32)-1) /* the kernel's overflow id: matches no proxy id */

/* from_kuid / from_kgid: the id kid has inside the namespace map m. */
static __always_inline __u32 map_id_up(const struct uid_gid_map___sl *m, __u32 kid)
{
	__u32 n = m->nr_extents;
#pragma unroll
	for (int i = 0; i < 5; i++) {
		__u32 first = m->extent[i].first, lower = m->extent[i].lower_first, count = m->extent[i].count;
		if (i < n && kid >= lower && kid - lower < count)
			return first + (kid - lower);
	}
	return ID_UNMAPPED; /* not mapped, or more than 5 extents */
}

static __always_inline __u64 ids_in_netns_userns(struct sock___sl *sk, __u64 ugid)
{
	if (!sk)
		return ugid;
	struct net___sl *net = sk->__sk_common.skc_net.net;
	if (!net)
		return ugid;
	struct user_namespace___sl *ns = net->user_ns;
	if (!ns)
		return ugid;
	__u64 uid = map_id_up(&ns->uid_map, (__u32)ugid);
	__u64 gid = map_id_up(&ns->gid_map, (__u32)(ugid >> 32));
	return gid << 32 | uid;
}

struct bpf_sock_addr_kern___sl {
	struct sock___sl *sk;
} __attribute__((preserve_access_index));
struct bpf_sock___sl; /* opaque */

/* The kernel's context behind a sock_addr program's ctx (Linux 6.2+). */
extern void *bpf_cast_to_kern_ctx(void *) __ksym;

/* owner_ids returns the socket owner's uid in the low and gid in the high
 * half, like bpf_get_current_uid_gid (the fallback while the socket has no
 * file). Pointer walks through BTF-typed kernel memory are checked loads. */
static __always_inline __u64 owner_ids(struct bpf_sock_addr *ctx)
{
	struct bpf_sock_addr_kern___sl *k = bpf_cast_to_kern_ctx(ctx);
	struct sock___sl *sk = k->sk;
	if (sk) {
		struct socket___sl *sock = sk->sk_socket;
		if (sock) {
			struct file___sl *file = sock->file;
			if (file) {
				const struct cred___sl *cred = file->f_cred;
				if (cred)
					return ids_in_netns_userns(sk, (__u64)cred->fsgid.val << 32 | cred->fsuid.val);
			}
		}
	}
	return ids_in_netns_userns(sk, bpf_get_current_uid_gid());
}

static __always_inline int id_in(__u32 id, const __u32 *ids, __u32 n)
{
#pragma unroll
	for (int i = 0; i < MAX_IDS; i++)
		if (i < n && ids[i] == id)
			return 1;
	return 0;
}

/* The order is istio-iptables' ISTIO_OUTPUT chain, rule by rule:
 *   excluded ports                                   RETURN
 *   -o lo -s 127.0.0.6                               RETURN
 *   per proxy uid, then per proxy gid:
 *     -o lo ! -d 127.0.0.1 ! --dport 15008 (,53 for uids with DNS)  IN_REDIRECT
 *     -o lo ! owner (! --dport 53 with DNS; absent when a loopback
 *       range is included)                           RETURN
 *     owner                                          RETURN
 *   DNS capture: --dport 53                          REDIRECT 15053
 *   -d 127.0.0.1                                     RETURN
 *   excluded CIDRs                                   RETURN
 *   included ports                                   REDIRECT
 *   included CIDRs (or all)                          REDIRECT
 * "-o lo" means the destination is local: loopback or one of the pod's own
 * addresses. As with iptables and several proxy uids, only the first uid's
 * rules can match a connection to a local address. */
static __always_inline enum verdict owner_rules(const struct pod_config *pod, const __u32 *ids, __u32 n, __u32 id,
						int local, const __u8 dst[16], __u16 dport, int dns_aware, int *done)
{
	int dns = pod->flags & POD_DNS;
	*done = 1;
	for (int i = 0; i < MAX_IDS; i++) { /* bounded: the verifier accepts it */
		if (i >= n)
			break;
		int owner = ids[i] == id;
		if (local && owner && !is_localhost(dst) && dport != 15008 && !(dns && dns_aware && dport == 53))
			return REDIRECT_IN_SELF;
		if (local && !owner && !(pod->flags & POD_LOOPBACK_IN) && !(dns && dport == 53))
			return PASS;
		if (owner)
			return PASS;
	}
	*done = 0;
	return PASS;
}

static __always_inline enum verdict decide_outbound(__u64 netns, const struct pod_config *pod, __u64 ugid,
						    const __u8 src[16], const __u8 dst[16], __u16 dport)
{
	int local = is_loopback(dst) || cidr_match(netns, CIDR_LOCAL, dst);
	int done;
	enum verdict v;

	if ((pod->flags & POD_NO_IPV6) && !is_v4mapped(dst))
		return PASS;
	/* The proxy's own connect to a destination outside the pod: every
	 * rule that can match it (excluded port, excluded route, "owner
	 * RETURN") returns, so skip the exclusion lookups. Only the
	 * "excluded" counter differs, and it counts the app's connections
	 * that bypass the proxy, not the proxy's. */
	if (!local && (id_in((__u32)ugid, pod->proxy_uids, pod->n_uids) ||
		       id_in((__u32)(ugid >> 32), pod->proxy_gids, pod->n_gids)))
		return PASS;
	if (!local && !(pod->flags & POD_NO_ROUTES) && route_excluded(netns, dst))
		return PASS_EXCLUDED;
	if (!(pod->flags & POD_NO_EXCL_PORTS_OUT) && port_match(netns, PORT_EXCLUDE_OUT, dport))
		return PASS_EXCLUDED;
	if (local && is_passthrough_src(src))
		return PASS;
	v = owner_rules(pod, pod->proxy_uids, pod->n_uids, (__u32)ugid, local, dst, dport, 1, &done);
	if (done)
		return v;
	v = owner_rules(pod, pod->proxy_gids, pod->n_gids, (__u32)(ugid >> 32), local, dst, dport, 0, &done);
	if (done)
		return v;
	if ((pod->flags & POD_DNS) && dport == 53)
		return REDIRECT_DNS;
	if (is_localhost(dst))
		return PASS;
	if (!(pod->flags & POD_NO_EXCL_CIDRS_OUT) && cidr_match(netns, CIDR_EXCLUDE_OUT, dst))
		return PASS_EXCLUDED;
	if (!(pod->flags & POD_NO_INCL_PORTS_OUT) && port_match(netns, PORT_INCLUDE_OUT, dport))
		return REDIRECT_OUT;
	if ((pod->flags & POD_OUTBOUND_ALL) || cidr_match(netns, CIDR_INCLUDE_OUT, dst))
		return REDIRECT_OUT;
	return PASS_EXCLUDED;
}

/* Whether Istio's ISTIO_INBOUND captures dport. Ports 15008/15090/15021/15020
 * arrive in PORT_EXCLUDE_IN from the Settings. */
static __always_inline int inbound_captured(__u64 netns, const struct pod_config *pod, __u16 dport)
{
	if (dport == pod->inbound_port)
		return 0;
	if (port_match(netns, PORT_EXCLUDE_IN, dport))
		return 0;
	if (pod->flags & POD_INBOUND_ALL)
		return 1;
	return port_match(netns, PORT_INCLUDE_IN, dport);
}

/* Inbound: Istio's ISTIO_INBOUND. A connection to a captured port of the pod
 * is handed to the listener on the inbound port with bpf_sk_assign, from tc
 * ingress on the pod's interface. Unlike rewriting the destination at the
 * client's connect(), this works for clients on other nodes (and for
 * same-node clients in any netns or cgroup) and leaves both ends' view of
 * the connection intact: the proxy's accepted socket has the original
 * destination as its local address (what Envoy and haproxy fall back to
 * when SO_ORIGINAL_DST has no answer), and the client still sees the port it
 * dialed.
 *
 * The pod is the netns the program runs in (its netns cookie), not the
 * packet's destination address: like Istio's "-p tcp -j ISTIO_INBOUND" in
 * the pod's PREROUTING, every TCP packet arriving on the interface counts,
 * whatever address it is sent to (the interface's fe80:: link-local
 * address, a secondary address). Headers are read with bpf_skb_load_bytes,
 * so non-linear packets parse too, and what cannot be parsed is dropped
 * (fail closed), never delivered around the proxy:
 *   - IPv6 extension headers (hop-by-hop, routing, destination options,
 *     fragment, AH) are walked, at most MAX_EXT_HDRS of them; more is
 *     dropped. ip6tables' "-p tcp" matches TCP behind extension headers too.
 *   - A truncated IPv4/IPv6/TCP header to an enrolled pod is dropped.
 *   - Fragments: a first fragment of TCP to a captured port that belongs to
 *     no established connection (a fragmented SYN) is dropped: bpf_sk_assign
 *     on a fragment does not reliably survive reassembly. Later fragments
 *     carry no ports and cannot open a connection without their first one.
 * Every drop is counted (dropped_in). */
#define MAX_EXT_HDRS 8
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* What tc inbound returns for a packet it leaves alone: TCX_NEXT, so a
 * tcx program attached after sidelane's still sees it (TC_ACT_UNSPEC, the
 * same "go on" for a cls_bpf filter). A packet handed to the proxy ends
 * the chain (TC_ACT_OK) and a dropped one is dropped (TC_ACT_SHOT): no
 * later program can undo either. */
#define IN_NEXT (-1)

#define IN_PASS 0
#define IN_DROP 1
#define IN_TCP 2

struct inbound_pkt {
	struct bpf_sock_tuple t;
	__u32 tlen;
	__u8 src[16]; /* v4-mapped for IPv4 */
	__u8 dst[16];
	__u16 dport;   /* host order */
	__u8 flags;    /* TCP flags byte (SYN 0x02, ACK 0x10) */
	__u8 fragment; /* first fragment of a fragmented packet */
};

static __always_inline int parse_inbound(struct __sk_buff *skb, struct inbound_pkt *p)
{
	__u8 tcp[14]; /* ports, seq, ack, data offset, flags */
	__u32 off;
	__u32 *s = (__u32 *)p->src, *d = (__u32 *)p->dst;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return IN_DROP;
		if (ip.protocol != IPPROTO_TCP)
			return IN_PASS;
		if (ip.ihl < 5)
			return IN_DROP;
		__u16 frag = bpf_ntohs(ip.frag_off);
		if (frag & IP_OFFSET)
			return IN_PASS; /* not a first fragment: no ports */
		p->fragment = !!(frag & IP_MF);
		off = ETH_HLEN + ip.ihl * 4;
		s[2] = bpf_htonl(0xffff);
		s[3] = ip.saddr;
		d[2] = bpf_htonl(0xffff);
		d[3] = ip.daddr;
		p->t.ipv4.saddr = ip.saddr;
		p->t.ipv4.daddr = ip.daddr;
		p->tlen = sizeof(p->t.ipv4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return IN_DROP;
		__u8 nh = ip6.nexthdr;
		off = ETH_HLEN + sizeof(ip6);
		int i;
		for (i = 0; i < MAX_EXT_HDRS; i++) {
			__u8 ext[4];
			if (nh == IPPROTO_TCP)
				break;
			if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS &&
			    nh != IPPROTO_FRAGMENT && nh != IPPROTO_AH)
				return IN_PASS; /* UDP, ICMPv6, ESP, no next header, ...: not TCP */
			if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)))
				return IN_DROP;
			if (nh == IPPROTO_FRAGMENT) {
				if ((ext[2] << 8 | ext[3]) & 0xfff8)
					return IN_PASS; /* not a first fragment */
				p->fragment = 1;
				off += 8;
			} else if (nh == IPPROTO_AH) {
				off += (ext[1] + 2) * 4;
			} else {
				off += (ext[1] + 1) * 8;
			}
			nh = ext[0];
		}
		if (nh != IPPROTO_TCP)
			return IN_DROP; /* more extension headers than we walk */
		__builtin_memcpy(p->src, &ip6.saddr, 16);
		__builtin_memcpy(p->dst, &ip6.daddr, 16);
		__builtin_memcpy(p->t.ipv6.saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->t.ipv6.daddr, &ip6.daddr, 16);
		p->tlen = sizeof(p->t.ipv6);
	} else {
		return IN_PASS;
	}
	if (bpf_skb_load_bytes(skb, off, tcp, sizeof(tcp)))
		return IN_DROP;
	__u16 sport = (__u16)tcp[0] | (__u16)tcp[1] << 8; /* network order, as stored */
	__u16 dport = (__u16)tcp[2] | (__u16)tcp[3] << 8;
	if (p->tlen == sizeof(p->t.ipv4)) {
		p->t.ipv4.sport = sport;
		p->t.ipv4.dport = dport;
	} else {
		p->t.ipv6.sport = sport;
		p->t.ipv6.dport = dport;
	}
	p->dport = bpf_ntohs(dport);
	p->flags = tcp[13];
	return IN_TCP;
}

/* Constant tuple sizes per branch: the verifier needs a bounded length. */
static __always_inline struct bpf_sock *lookup_tcp(struct __sk_buff *skb, struct inbound_pkt *p)
{
	if (p->tlen == sizeof(p->t.ipv4))
		return bpf_skc_lookup_tcp(skb, &p->t, sizeof(p->t.ipv4), BPF_F_CURRENT_NETNS, 0);
	return bpf_skc_lookup_tcp(skb, &p->t, sizeof(p->t.ipv6), BPF_F_CURRENT_NETNS, 0);
}

/* The netns cookie of the device a packet arrived on. bpf_get_netns_cookie
 * in tc answers from skb->sk, which is not set on ingress (the init netns
 * then), so the cookie is read from the device's netns through the
 * kernel's skb (Linux 6.2+, as owner_ids). */
struct net_device___sl {
	struct possible_net_t___sl nd_net;
} __attribute__((preserve_access_index));
struct sk_buff___sl {
	struct net_device___sl *dev;
} __attribute__((preserve_access_index));

static __always_inline __u64 dev_netns_cookie(struct __sk_buff *skb)
{
	struct sk_buff___sl *k = bpf_cast_to_kern_ctx(skb);
	struct net_device___sl *dev = k->dev;
	if (!dev)
		return 0;
	struct net___sl *net = dev->nd_net.net;
	if (!net)
		return 0;
	return net->net_cookie;
}

/* Whether the netns of the device a packet arrived on runs sk_lookup
 * programs (sidelane_tw_lookup; the kernel's NETNS_BPF_SK_LOOKUP = 1). */
#define NETNS_BPF_SK_LOOKUP___sl 1
static __always_inline int dev_netns_sk_lookup(struct __sk_buff *skb)
{
	struct sk_buff___sl *k = bpf_cast_to_kern_ctx(skb);
	struct net_device___sl *dev = k->dev;
	if (!dev)
		return 0;
	struct net___sl *net = dev->nd_net.net;
	if (!net)
		return 0;
	return net->bpf.run_array[NETNS_BPF_SK_LOOKUP___sl] != NULL;
}

static __always_inline int drop_in(__u64 netns)
{
	struct counters *c = bpf_map_lookup_elem(&pod_counters, &netns);
	if (c)
		c->dropped_in++;
	return TC_ACT_SHOT;
}

SEC("tc")
int sidelane_inbound(struct __sk_buff *skb)
{
	__u64 netns = dev_netns_cookie(skb);
	struct pod_config *pod = bpf_map_lookup_elem(&pods, &netns);
	if (!pod)
		return IN_NEXT;
	struct inbound_pkt p = {};
	int r = parse_inbound(skb, &p);
	if (r == IN_PASS)
		return IN_NEXT;
	if (r == IN_DROP)
		return drop_in(netns);
	if ((pod->flags & POD_NO_IPV6) && p.tlen != sizeof(p.t.ipv4))
		return IN_NEXT;
	__u16 dport = p.dport;
	int syn = (p.flags & 0x02) && !(p.flags & 0x10);
	/* Per-node pods: the inbound port belongs to the node proxy's listener
	 * in this netns, which only ever gets connections handed to it here
	 * (with their original port). A connection made to it directly has no
	 * original destination, and the proxy would forward it to itself. */
	if ((pod->flags & POD_NODE) && dport == pod->inbound_port && syn)
		return drop_in(netns);
	if (!inbound_captured(netns, pod, dport))
		return IN_NEXT;
	/* Per-node pods: connections from the node proxy's address are the
	 * proxy's own upstream legs, made from the host netns (Envoy opens
	 * upstream connections in its own netns even for a listener inside the
	 * pod's) or come from other host-network processes (kubelet probes),
	 * which are trusted like the proxy itself. The proxy's inbound leg has
	 * passed this pod's inbound listener already; its outbound leg to a
	 * same-node per-node pod carries that pod's L7 policy in the outbound
	 * listener (agent/xds), since it is not captured again here. Everything
	 * else (other nodes, other pods, sidecars) goes to the node proxy's
	 * inbound listener in this pod's netns. */
	if ((pod->flags & POD_NODE) && is_node_proxy(get_node_proxy(), p.src))
		return IN_NEXT;

	/* A packet of an existing connection (or handshake) goes where the
	 * stack would send it. Except a SYN that finds a TIME_WAIT socket:
	 * the stack may open a new connection from it, and would look up the
	 * app's listener for that (a way around the proxy), so it goes to the
	 * proxy like any new connection, by way of the TIME_WAIT socket and
	 * sidelane_tw_lookup (see tw_key). */
	struct bpf_sock *tw = lookup_tcp(skb, &p);
	if (tw) {
		__u32 state = tw->state;
		/* Without sidelane_tw_lookup in the pod's netns (an agent that
		 * has not attached it yet) the TIME_WAIT path would find the
		 * app's listener: then the SYN goes to the proxy's listener
		 * and is dropped until TIME_WAIT ends, as before. */
		int reuse = state == BPF_TCP_TIME_WAIT && syn;
		if (!reuse || !dev_netns_sk_lookup(skb)) {
			bpf_sk_release(tw);
			if (state != BPF_TCP_LISTEN && !reuse)
				return IN_NEXT;
			tw = NULL;
		}
	}
	if (p.fragment) {
		if (tw)
			bpf_sk_release(tw);
		return drop_in(netns);
	}
	__be16 orig_dport = p.tlen == sizeof(p.t.ipv4) ? p.t.ipv4.dport : p.t.ipv6.dport;
	if (p.tlen == sizeof(p.t.ipv4))
		p.t.ipv4.dport = bpf_htons(pod->inbound_port);
	else
		p.t.ipv6.dport = bpf_htons(pod->inbound_port);
	struct bpf_sock *sk = lookup_tcp(skb, &p);
	if (!sk || sk->state != BPF_TCP_LISTEN) {
		if (sk)
			bpf_sk_release(sk);
		if (tw)
			bpf_sk_release(tw);
		return drop_in(netns); /* fail closed: never deliver around the proxy */
	}
	long err;
	if (tw) {
		/* TIME_WAIT reuse (see tw_key): record the listener and the SYN
		 * for the TCP_TW_SYN path's lookup, then hand the packet to the
		 * TIME_WAIT socket. Without a record that lookup would find
		 * the app's listener, so failing to record drops. */
		struct tw_key k = {.ifindex = skb->ingress_ifindex};
		__builtin_memcpy(k.src, p.src, 16);
		__builtin_memcpy(k.dst, p.dst, 16);
		k.sport = bpf_ntohs(p.tlen == sizeof(p.t.ipv4) ? p.t.ipv4.sport : p.t.ipv6.sport);
		k.dport = bpf_ntohs(orig_dport);
		struct tw_rec rec = {.netns = netns, .at = bpf_ktime_get_ns()};
		err = bpf_map_update_elem(&tw_listeners, &netns, sk, BPF_ANY);
		bpf_sk_release(sk);
		if (!err)
			err = bpf_map_update_elem(&tw_pending, &k, &rec, BPF_ANY);
		if (err) {
			bpf_sk_release(tw);
			return drop_in(netns);
		}
		err = bpf_sk_assign(skb, tw, 0);
		bpf_sk_release(tw);
		if (err) {
			bpf_map_delete_elem(&tw_pending, &k);
			return drop_in(netns);
		}
		struct counters *c = bpf_map_lookup_elem(&pod_counters, &netns);
		if (c)
			c->timewait_reuse++;
	} else {
		err = bpf_sk_assign(skb, sk, 0);
		bpf_sk_release(sk);
		if (err)
			return drop_in(netns);
	}
	/* No original-destination record: after bpf_sk_assign the accepted
	 * socket's local address is the original destination, and
	 * SO_ORIGINAL_DST answers it from the socket itself (see
	 * sidelane_getsockopt).
	 * Writing a record per SYN would let anyone who can send SYNs to a pod
	 * (a scan from anywhere) flood the node-wide LRU and evict other pods'
	 * outbound records before their proxy reads them. */
	if (syn)
		count(netns, REDIRECT_IN_SELF);
	return TC_ACT_OK;
}

/* The listener lookup of the TCP_TW_SYN path of a SYN tc recorded (see
 * tw_key): the proxy's listener, or nowhere (SK_DROP: the TIME_WAIT socket
 * then answers with an ACK, as it does when no listener is found). -1: not
 * a recorded SYN's lookup. */
static __always_inline int tw_recorded(struct bpf_sk_lookup *ctx)
{
	/* Each field is read on its own (READ): the verifier refuses a
	 * context pointer the compiler moved. */
	struct tw_key k = {
		.sport = bpf_ntohs(READ(ctx->remote_port)),
		.dport = READ(ctx->local_port),
		.ifindex = READ(ctx->ingress_ifindex),
	};
	__u32 *src = (__u32 *)k.src, *dst = (__u32 *)k.dst;
	__u32 remote4 = READ(ctx->remote_ip4), local4 = READ(ctx->local_ip4);
	__u32 family = READ(ctx->family);
	if (family == AF_INET) {
		src[2] = dst[2] = bpf_htonl(0xffff);
		src[3] = remote4;
		dst[3] = local4;
	} else if (family == AF_INET6) {
		src[0] = READ(ctx->remote_ip6[0]);
		src[1] = READ(ctx->remote_ip6[1]);
		src[2] = READ(ctx->remote_ip6[2]);
		src[3] = READ(ctx->remote_ip6[3]);
		dst[0] = READ(ctx->local_ip6[0]);
		dst[1] = READ(ctx->local_ip6[1]);
		dst[2] = READ(ctx->local_ip6[2]);
		dst[3] = READ(ctx->local_ip6[3]);
	} else {
		return -1;
	}
	struct tw_rec *rec = bpf_map_lookup_elem(&tw_pending, &k);
	if (!rec)
		return -1;
	__u64 netns = rec->netns;
	if (bpf_ktime_get_ns() - rec->at > TW_REC_NS) {
		bpf_map_delete_elem(&tw_pending, &k);
		return SK_DROP;
	}
	struct bpf_sock *sk = bpf_map_lookup_elem(&tw_listeners, &netns);
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

/* sk_lookup, attached to the netns of each pod whose inbound capture is
 * tc's (per-node pods, pods enrolled by an older agent): the listener
 * lookup of the TCP_TW_SYN path (see tw_key). Only the lookup of the
 * packet tc recorded is changed; every other lookup (the proxy's
 * passthrough to the app, excluded ports, UDP) is the kernel's own. */
SEC("sk_lookup")
int sidelane_tw_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	int r = tw_recorded(ctx);
	return r < 0 ? SK_PASS : r;
}

/* Inbound capture of sidecar pods: Istio's ISTIO_INBOUND as the kernel's
 * listener lookup. sk_lookup runs in the pod's netns for every TCP packet
 * that belongs to no established socket (a SYN, or a SYN that ends a
 * TIME_WAIT socket: the TCP_TW_SYN path looks a listener up too), after
 * the stack has reassembled fragments and walked IPv6 extension headers,
 * so there is no parsing of ours that could differ from the kernel's. A
 * lookup on a captured interface (in_ifaces; never loopback: traffic
 * inside the pod is the connect hooks' job) to a captured port gets the
 * proxy's listener on the inbound port (in_listeners) or nothing: SK_DROP
 * (the kernel answers RST) and dropped_in, never the app's listener.
 *
 * Why not tc: attaching tcx takes rtnl and waits for an RCU grace period
 * (12-14 ms measured, serializing every CNI ADD on the node), a netns link
 * attaches in tens of microseconds without rtnl.
 *
 * sk_lookup may not call bpf_get_netns_cookie, and nothing it can read
 * names its netns (ifindexes repeat in every netns; the destination address
 * may be the interface's link-local one). So each pod's netns gets its own
 * tiny program, sidelane_in_lookup, its netns cookie patched into the
 * instruction below (bpf/inbound_linux.go: IN_NETNS_MAGIC), which puts the
 * cookie in a per-CPU slot and tail-calls the one shared program,
 * sidelane_in_capture (in_progs[0]). Loading a copy of the whole capture
 * program per pod was measured at 1.3-1.9 ms (the verifier), the stub at
 * a fraction of that. */
#define IN_NETNS_MAGIC 0x5ce1a4e0c00c1e00ULL

static __always_inline __u64 this_netns(void)
{
	__u64 v;
	asm volatile("%0 = 0x5ce1a4e0c00c1e00 ll" : "=r"(v));
	return v;
}

/* The netns cookie of the pod whose sidelane_in_lookup runs on this CPU
 * (sk_lookup runs with migration disabled, stub and tail call back to
 * back). Pinned: stubs loaded by an earlier agent and the current shared
 * program must use the same one. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} in_netns SEC(".maps");

/* [0]: sidelane_in_capture (set by the agent at load). Pinned, so it keeps
 * its entry while the agent is down. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} in_progs SEC(".maps");

SEC("sk_lookup")
int sidelane_in_lookup(struct bpf_sk_lookup *ctx)
{
	/* Loopback is never captured here (see sidelane_in_capture): the
	 * app's redirected connect to its sidecar leaves before the tail
	 * call. */
	if (ctx->protocol != IPPROTO_TCP || READ(ctx->ingress_ifindex) <= 1)
		return SK_PASS;
	__u32 zero = 0;
	__u64 *slot = bpf_map_lookup_elem(&in_netns, &zero);
	if (!slot)
		return SK_DROP;
	*slot = this_netns();
	bpf_tail_call(ctx, &in_progs, 0);
	return SK_DROP; /* no capture program: fail closed */
}

/* ifindex > 1: the caller has left out loopback and 0 (an empty slot). */
static __always_inline int iface_captured(__u64 netns, __u32 ifindex)
{
	struct in_iface_set *in = bpf_map_lookup_elem(&in_ifaces, &netns);
	if (!in)
		return 0;
#pragma unroll
	for (int i = 0; i < MAX_IN_IFACES; i++)
		if (in->ifindex[i] == ifindex)
			return 1;
	return 0;
}

/* assign_listener hands the lookup to the first of netns's recorded
 * listeners of family that accepts it (a reuseport member: the kernel then
 * picks within its group). An AF_INET6 listener serves AF_INET lookups
 * unless it is v6only (-EAFNOSUPPORT: try the next). */
static __always_inline int assign_listener(struct bpf_sk_lookup *ctx, __u64 netns, __u16 family)
{
	struct in_key k = {.netns = netns, .family = family};
#pragma unroll
	for (int i = 0; i < IN_SLOTS; i++) {
		k.slot = i;
		struct bpf_sock *sk = bpf_map_lookup_elem(&in_listeners, &k);
		if (!sk)
			continue;
		long err = bpf_sk_assign(ctx, sk, 0);
		bpf_sk_release(sk);
		if (!err)
			return 1;
	}
	return 0;
}

static __always_inline int drop_lookup(__u64 netns)
{
	struct counters *c = bpf_map_lookup_elem(&pod_counters, &netns);
	if (c)
		c->dropped_in++;
	return SK_DROP;
}

SEC("sk_lookup")
int sidelane_in_capture(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	/* Loopback (the app's redirected connect to its sidecar) is never
	 * captured here, and tc records only what crossed the pod's
	 * interface: leave before any map lookup. */
	__u32 ifindex = READ(ctx->ingress_ifindex);
	if (ifindex <= 1) /* 1: loopback */
		return SK_PASS;
	__u32 family = READ(ctx->family);
	__u8 src[16] = {};
	__u32 *s = (__u32 *)src;
	__u32 remote4 = READ(ctx->remote_ip4);
	if (family == AF_INET) {
		s[2] = bpf_htonl(0xffff);
		s[3] = remote4;
	} else {
		s[0] = READ(ctx->remote_ip6[0]);
		s[1] = READ(ctx->remote_ip6[1]);
		s[2] = READ(ctx->remote_ip6[2]);
		s[3] = READ(ctx->remote_ip6[3]);
	}
	/* From the pod itself (its proxy's passthrough from 127.0.0.6 or ::6,
	 * the app calling its own pod IP): the stack reports the interface
	 * that owns the destination address as ingress_ifindex for those
	 * too, but they never crossed it and tc never saw them. A packet from
	 * outside with such a source cannot open a connection: the SYN-ACK
	 * goes to the pod's own address and never leaves it. */
	int from_pod = is_loopback(src) || is_passthrough_src(src);
	/* A SYN recorded by tc (a pod that moved here from tc capture and
	 * still has it) first. tc records what crossed the interface, never
	 * a lookup from the pod itself: every connection the proxy passes to
	 * the app skips that map. */
	if (!from_pod) {
		int r = tw_recorded(ctx);
		if (r >= 0)
			return r;
	}
	__u32 zero = 0;
	__u64 *slot = bpf_map_lookup_elem(&in_netns, &zero);
	if (!slot || !*slot)
		return SK_DROP; /* not called by a pod's stub: fail closed */
	__u64 netns = *slot;
	struct pod_config *pod = bpf_map_lookup_elem(&pods, &netns);
	if (!pod)
		return SK_PASS; /* not enrolled (any more) */
	if (!iface_captured(netns, ifindex))
		return SK_PASS;
	if ((pod->flags & POD_NO_IPV6) && family != AF_INET)
		return SK_PASS;
	__u16 dport = (__u16)READ(ctx->local_port);
	/* Per-node pods (a pod that moved to per-node mode, until its tc
	 * program is attached): the same rules as sidelane_inbound. */
	if ((pod->flags & POD_NODE) && dport == pod->inbound_port)
		return drop_lookup(netns);
	if (from_pod)
		return SK_PASS;
	if (!inbound_captured(netns, pod, dport) || cidr_match(netns, CIDR_LOCAL, src))
		return SK_PASS;
	if ((pod->flags & POD_NODE) && is_node_proxy(get_node_proxy(), src))
		return SK_PASS;
	if (assign_listener(ctx, netns, family) || (family == AF_INET && assign_listener(ctx, netns, AF_INET6))) {
		count(netns, REDIRECT_IN_SELF);
		return SK_PASS;
	}
	return drop_lookup(netns); /* fail closed: never deliver around the proxy */
}

/* sidelane_in_record is never attached: the agent runs it (BPF_PROG_TEST_RUN,
 * from a thread in the pod's netns, whose loopback device the test packet
 * then comes from) with a TCP packet to find the pod's listener on the
 * inbound port the way tc does and record it in in_listeners (programs of
 * this type may put sockets into a sockhash), for a proxy that was
 * listening before the pod was enrolled (sock_ops records later ones at
 * listen(2)). The packet's source port picks the slot and, for a
 * SO_REUSEPORT group, by its hash the member. Returns 1 when it recorded a
 * listener. */
SEC("tc")
int sidelane_in_record(struct __sk_buff *skb)
{
	__u64 netns = dev_netns_cookie(skb);
	struct pod_config *pod = bpf_map_lookup_elem(&pods, &netns);
	if (!pod || (pod->flags & POD_NODE))
		return 0;
	struct inbound_pkt p = {};
	if (parse_inbound(skb, &p) != IN_TCP)
		return 0;
	__u16 sport;
	if (p.tlen == sizeof(p.t.ipv4)) {
		sport = bpf_ntohs(p.t.ipv4.sport);
		p.t.ipv4.dport = bpf_htons(pod->inbound_port);
	} else {
		sport = bpf_ntohs(p.t.ipv6.sport);
		p.t.ipv6.dport = bpf_htons(pod->inbound_port);
	}
	struct bpf_sock *sk = lookup_tcp(skb, &p);
	if (!sk)
		return 0;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return 0;
	}
	struct in_key k = {.netns = netns, .family = (__u16)sk->family, .slot = sport % IN_SLOTS};
	long err = bpf_map_update_elem(&in_listeners, &k, sk, BPF_ANY);
	bpf_sk_release(sk);
	return err == 0;
}

static __always_inline void record_flags(void *ctx, const __u8 dst[16], __u16 dport, __u16 family, __u64 netns,
					 __u32 flags)
{
	struct orig_dst o = {.port = dport, .family = family, .flags = flags, .netns = netns};
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(o.addr, dst, 16);
	bpf_map_update_elem(&orig_by_cookie, &cookie, &o, BPF_ANY);
}

static __always_inline void record(void *ctx, const __u8 dst[16], __u16 dport, __u16 family, __u64 netns)
{
	record_flags(ctx, dst, dport, family, netns, 0);
}

/* Per-node mode, outbound. The pod has no proxy of its own, so there are no
 * owner rules: everything leaving the pod goes to the node proxy except
 * traffic that stays inside the pod (loopback, its own IPs) and the pod's
 * exclusions. A connect to the node proxy's listener itself is refused: it
 * would carry no original destination, and the proxy would forward it to
 * itself until its file descriptors run out. Every other port of the node
 * proxy's address is a host service like any other destination, and
 * captured (not a way around the proxy). The node proxy's own
 * upstream connections are never captured because they are made in the
 * host netns, which is never enrolled: the proxy is identified by where it
 * runs, not by a uid, so no uid is reserved on the node and a host process
 * that happens to run as 1337 gains nothing. */
static __always_inline enum verdict decide_node(__u64 netns, const struct pod_config *pod,
						const struct node_proxy *np, const __u8 dst[16], __u16 dport)
{
	if (is_node_proxy(np, dst) && dport == np->port)
		return DENY_LOOP;
	if (is_loopback(dst) || cidr_match(netns, CIDR_LOCAL, dst))
		return PASS;
	if ((!(pod->flags & POD_NO_EXCL_PORTS_OUT) && port_match(netns, PORT_EXCLUDE_OUT, dport)) ||
	    (!(pod->flags & POD_NO_EXCL_CIDRS_OUT) && cidr_match(netns, CIDR_EXCLUDE_OUT, dst)))
		return PASS_EXCLUDED;
	return REDIRECT_OUT;
}

/* connect_common decides for one TCP connect. It returns the verdict and, for
 * redirects, the new port; the caller rewrites the address. */
static __always_inline enum verdict connect_common(struct bpf_sock_addr *ctx, const __u8 src[16], const __u8 dst[16],
						   __u16 dport, __u16 family, __u16 *new_port)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct pod_config *pod = bpf_map_lookup_elem(&pods, &netns);
	if (!pod)
		return PASS;
	if (pod->flags & POD_NODE) {
		struct node_proxy *np = get_node_proxy();
		enum verdict v = decide_node(netns, pod, np, dst, dport);
		if (v == DENY_LOOP) {
			node_count(NODE_LOOPED);
			return DENY;
		}
		count(netns, v);
		if (v != REDIRECT_OUT)
			return v;
		/* Fail closed: without a configured node proxy (for this
		 * family) the connect is refused, never sent uncaptured. */
		if (!np || !np->netns || !np->port ||
		    (family == AF_INET ? !np->ip4 : !(np->ip6[0] | np->ip6[1] | np->ip6[2] | np->ip6[3]))) {
			node_count(NODE_UNCONFIGURED);
			return DENY;
		}
		*new_port = np->port;
		/* Keyed by the host netns: that is where the proxy's accepted
		 * socket asks for SO_ORIGINAL_DST. */
		record_flags(ctx, dst, dport, family, np->netns, ORIG_NODE);
		node_count(NODE_REDIRECTED);
		return REDIRECT_NODE;
	}
	enum verdict v = decide_outbound(netns, pod, owner_ids(ctx), src, dst, dport);
	count(netns, v);
	switch (v) {
	case REDIRECT_OUT:
		*new_port = pod->outbound_port;
		break;
	case REDIRECT_IN_SELF:
		*new_port = pod->inbound_port;
		break;
	case REDIRECT_DNS:
		*new_port = pod->dns_port;
		break;
	default:
		return v;
	}
	record(ctx, dst, dport, family, netns);
	return v;
}

/* DNS over UDP (Istio's "-p udp --dport 53" REDIRECT to the agent's DNS
 * proxy, proxy uid/gid exempt). Connected sockets are rewritten at connect,
 * unconnected ones at every sendmsg; recvmsg puts the original server back
 * as the reply's source, as conntrack's reverse NAT does, so resolvers
 * accept the answer. */
static __always_inline int dns_udp(struct bpf_sock_addr *ctx, int v6)
{
	if (bpf_ntohs((__u16)ctx->user_port) != 53)
		return 0;
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct pod_config *pod = bpf_map_lookup_elem(&pods, &netns);
	if (!pod || !(pod->flags & POD_DNS))
		return 0;
	__u64 ugid = owner_ids(ctx);
	if (id_in((__u32)ugid, pod->proxy_uids, pod->n_uids) || id_in((__u32)(ugid >> 32), pod->proxy_gids, pod->n_gids))
		return 0;
	if (port_match(netns, PORT_EXCLUDE_OUT, 53))
		return 0;
	__u8 dst[16] = {};
	__u32 *d = (__u32 *)dst;
	if (v6) {
		d[0] = READ(ctx->user_ip6[0]);
		d[1] = READ(ctx->user_ip6[1]);
		d[2] = READ(ctx->user_ip6[2]);
		d[3] = READ(ctx->user_ip6[3]);
	} else {
		d[2] = bpf_htonl(0xffff);
		d[3] = ctx->user_ip4;
	}
	int mapped = is_v4mapped(dst);
	if (!mapped && (pod->flags & POD_NO_IPV6))
		return 0;
	if (!is_loopback(dst) && !cidr_match(netns, CIDR_LOCAL, dst) && route_excluded(netns, dst))
		return 0;
	record(ctx, dst, 53, mapped ? AF_INET : AF_INET6, netns);
	count(netns, REDIRECT_DNS);
	if (v6) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
		ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
	} else {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
	}
	ctx->user_port = bpf_htons(pod->dns_port);
	return 1;
}

SEC("cgroup/sendmsg4")
int sidelane_sendmsg4(struct bpf_sock_addr *ctx)
{
	dns_udp(ctx, 0);
	return 1;
}

SEC("cgroup/sendmsg6")
int sidelane_sendmsg6(struct bpf_sock_addr *ctx)
{
	dns_udp(ctx, 1);
	return 1;
}

static __always_inline int from_dns_proxy(struct bpf_sock_addr *ctx, struct orig_dst **out)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct pod_config *pod = bpf_map_lookup_elem(&pods, &netns);
	if (!pod || !(pod->flags & POD_DNS) || bpf_ntohs((__u16)ctx->user_port) != pod->dns_port)
		return 0;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	*out = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	return *out != NULL;
}

SEC("cgroup/recvmsg4")
int sidelane_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *o = NULL;
	if (ctx->user_ip4 != bpf_htonl(0x7f000001) || !from_dns_proxy(ctx, &o) || !o || o->family != AF_INET)
		return 1;
	ctx->user_ip4 = ((__u32 *)o->addr)[3];
	ctx->user_port = bpf_htons(o->port);
	return 1;
}

SEC("cgroup/recvmsg6")
int sidelane_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *o = NULL;
	__u8 src[16] = {};
	__u32 *w = (__u32 *)src;
	w[0] = READ(ctx->user_ip6[0]);
	w[1] = READ(ctx->user_ip6[1]);
	w[2] = READ(ctx->user_ip6[2]);
	w[3] = READ(ctx->user_ip6[3]);
	if (!is_localhost(src) || !from_dns_proxy(ctx, &o) || !o)
		return 1;
	__u32 *a = (__u32 *)o->addr;
	ctx->user_ip6[0] = a[0];
	ctx->user_ip6[1] = a[1];
	ctx->user_ip6[2] = a[2];
	ctx->user_ip6[3] = a[3];
	ctx->user_port = bpf_htons(o->port);
	return 1;
}

/* Forget a UDP socket's original destination when it is released. TCP
 * sockets are forgotten by sock_ops when they reach TCP_CLOSE, which for a
 * closed socket comes after release. */
SEC("cgroup/sock_release")
int sidelane_sock_release(struct bpf_sock *sk)
{
	if (sk->protocol == IPPROTO_TCP)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(sk);
	bpf_map_delete_elem(&orig_by_cookie, &cookie);
	return 1;
}

SEC("cgroup/connect4")
int sidelane_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_UDP) {
		dns_udp(ctx, 0);
		return 1;
	}
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	__u8 dst[16] = {}, src[16] = {};
	__u32 *d = (__u32 *)dst, *s = (__u32 *)src;
	d[2] = bpf_htonl(0xffff);
	d[3] = ctx->user_ip4;
	s[2] = bpf_htonl(0xffff);
	struct bpf_sock *sk = ctx->sk;
	if (sk)
		s[3] = READ(sk->src_ip4);
	__u16 dport = bpf_ntohs((__u16)ctx->user_port);
	__u16 new_port = 0;
	enum verdict v = connect_common(ctx, src, dst, dport, AF_INET, &new_port);
	if (v == DENY)
		return 0;
	if (v < REDIRECT_OUT)
		return 1;
	if (v == REDIRECT_NODE) {
		struct node_proxy *np = get_node_proxy();
		if (!np)
			return 0;
		ctx->user_ip4 = np->ip4;
		ctx->user_port = bpf_htons(new_port);
		return 1;
	}
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(new_port);
	return 1;
}

SEC("cgroup/connect6")
int sidelane_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_UDP) {
		dns_udp(ctx, 1);
		return 1;
	}
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	__u8 dst[16] = {}, src[16] = {};
	__u32 *d = (__u32 *)dst, *s = (__u32 *)src;
	d[0] = READ(ctx->user_ip6[0]);
	d[1] = READ(ctx->user_ip6[1]);
	d[2] = READ(ctx->user_ip6[2]);
	d[3] = READ(ctx->user_ip6[3]);
	struct bpf_sock *sk = ctx->sk;
	if (sk) {
		s[0] = READ(sk->src_ip6[0]);
		s[1] = READ(sk->src_ip6[1]);
		s[2] = READ(sk->src_ip6[2]);
		s[3] = READ(sk->src_ip6[3]);
	}
	__u16 dport = bpf_ntohs((__u16)ctx->user_port);
	__u16 new_port = 0;
	int mapped = is_v4mapped(dst);
	enum verdict v = connect_common(ctx, src, dst, dport, mapped ? AF_INET : AF_INET6, &new_port);
	if (v == DENY)
		return 0;
	if (v < REDIRECT_OUT)
		return 1;
	if (v == REDIRECT_NODE) {
		struct node_proxy *np = get_node_proxy();
		if (!np)
			return 0;
		if (mapped) {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = bpf_htonl(0xffff);
			ctx->user_ip6[3] = np->ip4;
		} else {
			ctx->user_ip6[0] = np->ip6[0];
			ctx->user_ip6[1] = np->ip6[1];
			ctx->user_ip6[2] = np->ip6[2];
			ctx->user_ip6[3] = np->ip6[3];
		}
		ctx->user_port = bpf_htons(new_port);
		return 1;
	}
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
	ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
	ctx->user_port = bpf_htons(new_port);
	return 1;
}

static __always_inline void load_addr(__u8 out[16], __u32 family, __u32 ip4, const __u32 *ip6)
{
	__u32 *w = (__u32 *)out;
	if (family == AF_INET) {
		w[0] = 0;
		w[1] = 0;
		w[2] = bpf_htonl(0xffff);
		w[3] = ip4;
	} else {
		w[0] = ip6[0];
		w[1] = ip6[1];
		w[2] = ip6[2];
		w[3] = ip6[3];
	}
}

/* The socket's own tuple, as sock_ops sees it. */
static __always_inline void sockops_tuple(struct bpf_sock_ops *skops, struct tuple_key *k)
{
	/* Read every field unconditionally with volatile loads: the verifier
	 * rejects the pointer arithmetic clang emits when it merges branches
	 * that read different ctx fields. */
	__u32 family = READ(skops->family);
	__u32 l4 = READ(skops->local_ip4), r4 = READ(skops->remote_ip4);
	__u32 l6[4] = {READ(skops->local_ip6[0]), READ(skops->local_ip6[1]), READ(skops->local_ip6[2]),
		       READ(skops->local_ip6[3])};
	__u32 r6[4] = {READ(skops->remote_ip6[0]), READ(skops->remote_ip6[1]), READ(skops->remote_ip6[2]),
		       READ(skops->remote_ip6[3])};
	load_addr(k->src, family, l4, l6);
	load_addr(k->dst, family, r4, r6);
	k->sport = (__u16)READ(skops->local_port);
	/* remote_port holds the big-endian port in its upper half on
	 * little-endian machines; ntohl yields the port either way. */
	k->dport = (__u16)bpf_ntohl(READ(skops->remote_port));
}

/* mirrored is the connecting side's tuple for an accepted socket's own. */
static __always_inline struct tuple_key mirrored(const struct tuple_key *k, __u64 netns)
{
	struct tuple_key m = {.netns = netns, .sport = k->dport, .dport = k->sport};
	__builtin_memcpy(m.src, k->dst, 16);
	__builtin_memcpy(m.dst, k->src, 16);
	return m;
}

/* pair_netns is the netns part of a shortcut key: a tuple with a loopback
 * address repeats in every netns, one of two pod IPs does not. */
static __always_inline __u64 pair_netns(const struct tuple_key *k, __u64 netns)
{
	return is_loopback(k->src) || is_loopback(k->dst) ? netns : 0;
}

static __always_inline int shortcut_enabled(void)
{
	__u32 zero = 0;
	__u32 *v = bpf_map_lookup_elem(&settings, &zero);
	return v && (*v & SETTING_SHORTCUT);
}

/* A same-node pair: both ends loopback in an enrolled pod (app <-> its own
 * sidecar), the sidecar's inbound passthrough from a loopback address
 * (127.0.0.6) to its own pod's IP (sidecar -> app, over lo), or both ends
 * pod IPs on this node (sidecar <-> sidecar). The
 * connecting end is watched (RTT callbacks, one per ACK of new data) until
 * its traffic says whether the pair should join the shortcut
 * (shortcut_rtt); the agent then joins both ends, so the accepting end is
 * never watched. */
static __always_inline void maybe_shortcut(struct bpf_sock_ops *skops, struct tuple_key *k, __u64 netns)
{
	if (!shortcut_enabled() || !bpf_map_lookup_elem(&pods, &netns))
		return;
	int lo_src = is_loopback(k->src), lo_dst = is_loopback(k->dst);
	if (!(lo_src && lo_dst)) {
		if (lo_dst)
			return;
		__u64 *dst_pod = bpf_map_lookup_elem(&pod_ips, k->dst);
		if (!dst_pod || (lo_src ? *dst_pod != netns : !bpf_map_lookup_elem(&pod_ips, k->src)))
			return;
	}
	bpf_sock_ops_cb_flags_set(skops, READ(skops->bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_RTT_CB_FLAG);
}

/* An ACK of new data on a watched socket: once data went both ways
 * JOIN_SEGS times, ask the agent to put the pair into sock_pairs (this
 * end's mode storage first, which marks it for the pair entries' cleanup
 * at close, hence the state callbacks) and stop watching; a socket that
 * only streams stops being watched after JOIN_GIVEUP_SEGS. */
static __always_inline void shortcut_rtt(struct bpf_sock_ops *skops)
{
	__u32 in = READ(skops->data_segs_in), out = READ(skops->data_segs_out);
	__u32 flags = READ(skops->bpf_sock_ops_cb_flags) & ~BPF_SOCK_OPS_RTT_CB_FLAG;
	if (in < JOIN_SEGS || out < JOIN_SEGS) {
		if (in + out > JOIN_GIVEUP_SEGS)
			bpf_sock_ops_cb_flags_set(skops, flags);
		return;
	}
	struct bpf_sock *sk = skops->sk;
	__u32 init = MODE_TCP;
	if (shortcut_enabled() && sk && bpf_sk_storage_get(&pair_mode, sk, &init, BPF_SK_STORAGE_GET_F_CREATE)) {
		struct pair_join *j = bpf_ringbuf_reserve(&pair_joins, sizeof(*j), 0);
		if (j) {
			__u64 netns = bpf_get_netns_cookie(skops);
			__builtin_memset(&j->key, 0, sizeof(j->key));
			sockops_tuple(skops, &j->key);
			j->key.netns = pair_netns(&j->key, netns);
			j->netns = netns;
			j->cookie = bpf_get_socket_cookie(skops);
			bpf_ringbuf_submit(j, 0);
			flags |= BPF_SOCK_OPS_STATE_CB_FLAG;
		}
	}
	bpf_sock_ops_cb_flags_set(skops, flags);
}

/* A sidecar pod's proxy starts listening on the inbound port: record the
 * socket for sidelane_in_lookup in the first free slot (all taken: the
 * last slot's entry is replaced; see in_listeners). A socket that cannot
 * join a sockhash (an MPTCP listener's subflow) is not recorded, and the
 * pod's captured ports are then refused (fail closed). */
static __always_inline void record_listener(struct bpf_sock_ops *skops, __u64 netns)
{
	struct pod_config *pod = bpf_map_lookup_elem(&pods, &netns);
	if (!pod || (pod->flags & POD_NODE) || READ(skops->local_port) != pod->inbound_port)
		return;
	struct in_key k = {.netns = netns, .family = (__u16)READ(skops->family)};
#pragma unroll
	for (int i = 0; i < IN_SLOTS; i++) {
		k.slot = i;
		if (bpf_sock_hash_update(skops, &in_listeners, &k, BPF_NOEXIST) == 0)
			return;
	}
	k.slot = IN_SLOTS - 1;
	bpf_sock_hash_update(skops, &in_listeners, &k, BPF_ANY);
}

SEC("sockops")
int sidelane_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	/* Every TCP socket of the cgroup also gets the init callbacks
	 * (timeouts, window, ECN, base RTT) and, once watched, each state
	 * change: leave those before the helpers below, which only the ops
	 * handled here need. */
	switch (op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			break;
		return 1;
	case BPF_SOCK_OPS_RTT_CB:
		shortcut_rtt(skops);
		return 1;
	default:
		return 1;
	}
	struct tuple_key k = {};
	__u64 netns = bpf_get_netns_cookie(skops);
	/* Listening and accepted sockets need no cookie here. */
	__u64 cookie = op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_TCP_LISTEN_CB
			       ? 0
			       : bpf_get_socket_cookie(skops);

	switch (op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		record_listener(skops, netns);
		break;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Redirected: watch state changes from the SYN on, so the
		 * entries go even if the connection never establishes. Only a
		 * socket connecting to a redirect target can be one (the
		 * sidecars' own upstream connects skip a cold map miss). */
		sockops_tuple(skops, &k);
		if (maybe_redirected(k.dst) && bpf_map_lookup_elem(&orig_by_cookie, &cookie))
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		sockops_tuple(skops, &k);
		/* A redirected socket is connected to a redirect target, and
		 * CONNECT_CB above watched it (either is enough: the node
		 * proxy may have moved since the connect). */
		int watched = READ(skops->bpf_sock_ops_cb_flags) & BPF_SOCK_OPS_STATE_CB_FLAG;
		struct orig_dst *o =
			watched || maybe_redirected(k.dst) ? bpf_map_lookup_elem(&orig_by_cookie, &cookie) : NULL;
		if (o) {
			/* Redirected by connect: re-key the original dst by the
			 * tuple the proxy's accepted socket will see mirrored. */
			struct tuple_key tk = k;
			tk.netns = o->netns;
			struct orig_dst v = *o;
			bpf_map_update_elem(&orig_by_tuple, &tk, &v, BPF_ANY);
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		}
		maybe_shortcut(skops, &k, netns);
		break;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
		sockops_tuple(skops, &k);
		/* An accepted socket with a recorded original destination
		 * forgets it when it closes. Only connect redirects record one
		 * (ACTIVE_ESTABLISHED above), so only a socket accepted on a
		 * redirect target can have one: the sidecar's inbound accepts
		 * (sk_lookup) and the app's skip a cold map miss. */
		struct tuple_key m = mirrored(&k, netns);
		if (maybe_redirected(k.src) && bpf_map_lookup_elem(&orig_by_tuple, &m))
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	}
	case BPF_SOCK_OPS_STATE_CB: /* to BPF_TCP_CLOSE: the others left above */
		sockops_tuple(skops, &k);
		struct orig_dst *o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
		if (o) {
			/* A connect to the node proxy that closes without ever
			 * being established: the proxy is down (RST) or
			 * unreachable. The pod got an error, not a direct
			 * connection; count it for the agent's metric. */
			if ((o->flags & ORIG_NODE) && skops->args[0] == BPF_TCP_SYN_SENT)
				node_count(NODE_REFUSED);
			/* Once established, the tuple record belongs to the
			 * proxy's accepted socket, which may ask for it after
			 * this side is gone (connect, write, close before the
			 * proxy accepts): that socket's close removes it. */
			if (skops->args[0] == BPF_TCP_SYN_SENT) {
				struct tuple_key tk = k;
				tk.netns = o->netns;
				bpf_map_delete_elem(&orig_by_tuple, &tk);
			}
			bpf_map_delete_elem(&orig_by_cookie, &cookie);
		} else {
			/* A connecting socket is never the accepting end a
			 * record is keyed for. */
			struct tuple_key m = mirrored(&k, netns);
			bpf_map_delete_elem(&orig_by_tuple, &m);
		}
		/* Only a socket asked to join the shortcut has pair entries
		 * (shortcut_rtt made its pair_mode first): the others skip
		 * three LRU deletes per close. */
		struct bpf_sock *sk = skops->sk;
		if (sk && bpf_sk_storage_get(&pair_mode, sk, 0, 0)) {
			k.netns = pair_netns(&k, netns);
			bpf_map_delete_elem(&pair_cookies, &k);
			bpf_map_delete_elem(&pair_runs, &k);
			bpf_map_delete_elem(&pair_seen, &k);
		}
		break;
	}
	return 1;
}

/* to_tcp sends this message the TCP way (see pair_mode). */
static __always_inline int to_tcp(__u32 *mode, __u64 netns)
{
	if (!(*mode & MODE_TCP)) {
		*mode |= MODE_TCP;
		struct counters *c = bpf_map_lookup_elem(&pod_counters, &netns);
		if (c)
			c->shortcut_to_tcp++;
	}
	return SK_PASS;
}

/* The kernel's tcp_sock, for the two sequence numbers pair_seen compares. */
struct tcp_sock___sl {
	__u32 write_seq;
	__u32 copied_seq;
} __attribute__((preserve_access_index));

SEC("sk_msg")
int sidelane_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	if (!sk)
		return SK_PASS;
	__u32 *mode = bpf_sk_storage_get(&pair_mode, sk, 0, 0);
	if (!mode)
		return SK_PASS;

	struct tuple_key self = {}, peer = {};
	__u64 netns = bpf_get_netns_cookie(msg);
	__u32 family = READ(msg->family);
	__u32 l4 = READ(msg->local_ip4), r4 = READ(msg->remote_ip4);
	__u32 l6[4] = {READ(msg->local_ip6[0]), READ(msg->local_ip6[1]), READ(msg->local_ip6[2]),
		       READ(msg->local_ip6[3])};
	__u32 r6[4] = {READ(msg->remote_ip6[0]), READ(msg->remote_ip6[1]), READ(msg->remote_ip6[2]),
		       READ(msg->remote_ip6[3])};
	load_addr(self.src, family, l4, l6);
	load_addr(self.dst, family, r4, r6);
	self.sport = (__u16)READ(msg->local_port);
	self.dport = (__u16)bpf_ntohl(READ(msg->remote_port));
	self.netns = pair_netns(&self, netns);
	__builtin_memcpy(peer.src, self.dst, 16);
	__builtin_memcpy(peer.dst, self.src, 16);
	peer.sport = self.dport;
	peer.dport = self.sport;
	peer.netns = self.netns;

	/* How far this socket has read, for its peer's check (below). */
	struct tcp_sock___sl *tp = (struct tcp_sock___sl *)bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return to_tcp(mode, netns);
	__u32 wseq = tp->write_seq, cseq = tp->copied_seq;
	__u32 *seen = bpf_map_lookup_elem(&pair_seen, &self);
	if (seen)
		*seen = cseq;
	else
		bpf_map_update_elem(&pair_seen, &self, &cseq, BPF_ANY);

	/* No peer in sock_pairs yet (or the guard): TCP. */
	__u64 *own = bpf_map_lookup_elem(&pair_cookies, &self);
	__u64 *other = bpf_map_lookup_elem(&pair_cookies, &peer);
	if (!own || !other || *own == *other)
		return to_tcp(mode, netns);

	/* This send answers the peer: its run ends. */
	__u32 *prun = bpf_map_lookup_elem(&pair_runs, &peer);
	if (prun)
		*prun = 0;
	__u32 zero = 0, limit = STREAM_RUN;
	__u32 *set = bpf_map_lookup_elem(&settings, &zero);
	if (set && (*set >> SETTING_RUN_SHIFT))
		limit = *set >> SETTING_RUN_SHIFT;
	__u32 *run = bpf_map_lookup_elem(&pair_runs, &self);
	if (run) {
		if (++*run > limit)
			return to_tcp(mode, netns);
	} else {
		__u32 one = 1;
		bpf_map_update_elem(&pair_runs, &self, &one, BPF_ANY);
	}
	/* Bytes this socket sent by TCP that the peer has not read (or not
	 * shown that it read, by sending since): a redirect would overtake
	 * them. */
	__u32 *pseen = bpf_map_lookup_elem(&pair_seen, &peer);
	if (!pseen || *pseen != wseq)
		return to_tcp(mode, netns);
	/* On failure (the peer just closed) the helper leaves no redirect and
	 * SK_PASS sends the bytes the normal way: never drop. */
	if (bpf_msg_redirect_hash(msg, &sock_pairs, &peer, BPF_F_INGRESS) != SK_PASS)
		return to_tcp(mode, netns);
	*mode &= ~MODE_TCP;
	struct counters *c = bpf_map_lookup_elem(&pod_counters, &netns);
	if (c) {
		c->shortcut_msgs++;
		c->shortcut_bytes += msg->size;
	}
	return SK_PASS;
}

/* sidelane_pair_join is never attached: the agent runs it
 * (BPF_PROG_TEST_RUN, from a thread in the socket's netns) for each end of
 * a pair_joins request's pair, with a TCP packet as that end's peer would
 * send it, followed by the end's netns cookie and the cookie to record
 * (pair_cookies). It puts the established socket the packet's tuple finds
 * into sock_pairs (programs of this type may put sockets into a sockhash;
 * sock_ops only at the established callbacks), with its mode storage (the
 * accepting end has none yet) and without a previous socket's pair_seen
 * and pair_runs under the same tuple (the accepting end's entries are not
 * removed at close: it has no state callbacks, and LRU maps forget).
 * Returns 1 when the socket joined. */
SEC("tc")
int sidelane_pair_join(struct __sk_buff *skb)
{
	struct {
		__u64 netns;
		__u64 cookie;
	} want;
	if (skb->len < sizeof(want) || bpf_skb_load_bytes(skb, skb->len - sizeof(want), &want, sizeof(want)))
		return 0;
	__u64 netns = dev_netns_cookie(skb);
	/* The path the agent entered may name another netns by now. */
	if (!netns || netns != want.netns || !bpf_map_lookup_elem(&pods, &netns))
		return 0;
	struct inbound_pkt p = {};
	if (parse_inbound(skb, &p) != IN_TCP)
		return 0;
	struct tuple_key k = {.sport = p.dport};
	k.dport = bpf_ntohs(p.tlen == sizeof(p.t.ipv4) ? p.t.ipv4.sport : p.t.ipv6.sport);
	__builtin_memcpy(k.src, p.dst, 16);
	__builtin_memcpy(k.dst, p.src, 16);
	k.netns = pair_netns(&k, netns);
	struct bpf_sock *sk = lookup_tcp(skb, &p);
	if (!sk)
		return 0;
	struct bpf_sock *fsk = bpf_sk_fullsock(sk);
	__u32 init = MODE_TCP;
	if (!fsk || fsk->state != BPF_TCP_ESTABLISHED ||
	    !bpf_sk_storage_get(&pair_mode, fsk, &init, BPF_SK_STORAGE_GET_F_CREATE)) {
		bpf_sk_release(sk);
		return 0;
	}
	bpf_map_delete_elem(&pair_seen, &k);
	bpf_map_delete_elem(&pair_runs, &k);
	long err = bpf_map_update_elem(&sock_pairs, &k, sk, BPF_NOEXIST);
	bpf_sk_release(sk);
	if (err)
		return 0;
	bpf_map_update_elem(&pair_cookies, &k, &want.cookie, BPF_ANY);
	return 1;
}

/* getpeername on a redirected socket answers the original destination, as
 * conntrack's reverse NAT makes it for Istio's REDIRECT. */
SEC("cgroup/getpeername4")
int sidelane_getpeername4(struct bpf_sock_addr *ctx)
{
	/* Also runs for accept(2)'s peer address: most sockets asked are not
	 * redirected ones. */
	__u8 peer[16] = {};
	__u32 *p = (__u32 *)peer;
	p[2] = bpf_htonl(0xffff);
	p[3] = ctx->user_ip4;
	if (!maybe_redirected(peer))
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (!o || o->family != AF_INET)
		return 1;
	ctx->user_ip4 = ((__u32 *)o->addr)[3];
	ctx->user_port = bpf_htons(o->port);
	return 1;
}

SEC("cgroup/getpeername6")
int sidelane_getpeername6(struct bpf_sock_addr *ctx)
{
	__u8 peer[16] = {};
	__u32 *p = (__u32 *)peer;
	p[0] = READ(ctx->user_ip6[0]);
	p[1] = READ(ctx->user_ip6[1]);
	p[2] = READ(ctx->user_ip6[2]);
	p[3] = READ(ctx->user_ip6[3]);
	if (!maybe_redirected(peer))
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (!o)
		return 1;
	__u32 *a = (__u32 *)o->addr;
	ctx->user_ip6[0] = a[0];
	ctx->user_ip6[1] = a[1];
	ctx->user_ip6[2] = a[2];
	ctx->user_ip6[3] = a[3];
	ctx->user_port = bpf_htons(o->port);
	return 1;
}

struct sockaddr_in_ {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

struct sockaddr_in6_ {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u8 addr[16];
	__u32 scope_id;
};

SEC("cgroup/getsockopt")
int sidelane_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;

	/* The accepted socket sees the connection mirrored: its peer is the
	 * connecting socket's source. */
	struct tuple_key k = {.netns = bpf_get_netns_cookie(ctx)};
	__u32 family = READ(sk->family);
	__u32 s4 = READ(sk->src_ip4), d4 = READ(sk->dst_ip4);
	__u32 s6[4] = {READ(sk->src_ip6[0]), READ(sk->src_ip6[1]), READ(sk->src_ip6[2]), READ(sk->src_ip6[3])};
	__u32 d6[4] = {READ(sk->dst_ip6[0]), READ(sk->dst_ip6[1]), READ(sk->dst_ip6[2]), READ(sk->dst_ip6[3])};
	load_addr(k.src, family, d4, d6);
	load_addr(k.dst, family, s4, s6);
	k.sport = bpf_ntohs(READ(sk->dst_port));
	k.dport = (__u16)READ(sk->src_port);
	struct orig_dst local = {};
	/* Records are keyed by a redirect target (see sock_ops): a socket
	 * accepted on another address (sk_lookup's inbound capture) skips
	 * the lookup. */
	struct orig_dst *o = maybe_redirected(k.dst) ? bpf_map_lookup_elem(&orig_by_tuple, &k) : NULL;
	if (!o) {
		if (!bpf_map_lookup_elem(&pods, &k.netns))
			return 1;
		/* A socket of an enrolled pod, not redirected by connect: its
		 * own local address (k.dst/k.dport are the connecting side's
		 * view), as conntrack answers for an accepted connection that
		 * was not NATed; after bpf_sk_assign that is the original
		 * destination. Not told apart from a connected socket, which
		 * conntrack would answer with its peer: per-socket storage
		 * made at every accept to tell them apart cost ~4 us of CPU
		 * per connection (alloc, memcg charge, free under a lock),
		 * and proxies ask accepted sockets only. */
		__builtin_memcpy(local.addr, k.dst, 16);
		local.port = k.dport;
		local.family = is_v4mapped(k.dst) ? AF_INET : AF_INET6;
		o = &local;
	}

	void *optval = ctx->optval, *end = ctx->optval_end;
	if (ctx->level == SOL_IP && o->family == AF_INET) {
		struct sockaddr_in_ *sa = optval;
		if ((void *)(sa + 1) > end || ctx->optlen < (int)sizeof(*sa))
			return 1;
		__builtin_memset(sa, 0, sizeof(*sa));
		sa->family = AF_INET;
		sa->port = bpf_htons(o->port);
		sa->addr = ((__u32 *)o->addr)[3];
		ctx->optlen = sizeof(*sa);
	} else if (ctx->level == SOL_IPV6 && o->family == AF_INET6) {
		struct sockaddr_in6_ *sa = optval;
		if ((void *)(sa + 1) > end || ctx->optlen < (int)sizeof(*sa))
			return 1;
		__builtin_memset(sa, 0, sizeof(*sa));
		sa->family = AF_INET6;
		sa->port = bpf_htons(o->port);
		__builtin_memcpy(sa->addr, o->addr, 16);
		ctx->optlen = sizeof(*sa);
	} else {
		return 1;
	}
	ctx->retval = 0;
	struct counters *c = bpf_map_lookup_elem(&pod_counters, &k.netns);
	if (c)
		c->orig_dst_answered++;
	return 1;
}
