// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * sluice kernel redirect: every program is attached (as a bpf_link) to the
 * agents' cgroup v2, so it applies to every process below it.
 *
 *   sock_create   only TCP and UDP inet sockets, only in the host netns
 *   connect4/6    TCP -> proxy (TCP/53 -> resolver), UDP/53 -> resolver,
 *                 everything else refused; the dialed address is kept in
 *                 socket storage
 *                 A TCP socket also takes one of its sandbox's slots here
 *                 (sluice_quota): over the quota the connect is refused
 *   sockops       at TCP_CONNECT_CB (source port bound, SYN not yet sent):
 *                 socket storage -> connection table keyed by the client's
 *                 local (address, port), which the proxy reads after accept
 *   sock_release  the socket's slot back; its entry removed if the proxy
 *                 never took it
 *   sendmsg4/6    unconnected UDP: DNS only, to the resolver
 *                 connect4/6 and sendmsg4/6 refuse (EPERM) every socket of a
 *                 sandbox in sluice_stopped (emergency stop), or of any
 *                 sandbox while its SLUICE_STOP_ALL key is set
 *   recvmsg4/6    replies from the resolver show the server the agent asked
 *   getpeername4/6  the agent sees the address it dialed
 *   bind4/6       agents cannot bind the proxy's or the resolver's port
 *   egress        backstop: only loopback packets leave an agent socket;
 *                 a UDP packet to the resolver records its source (address,
 *                 port) -> socket storage in sluice_udp_srcs, so the resolver
 *                 knows which sandbox asked (UDP has no connection table)
 *
 * Return values: 1 = allow, 0 = deny (EPERM to the caller). recvmsg and
 * getpeername programs must return 1.
 *
 * Verifier note: clang may fold ctx reads into pointer arithmetic, which the
 * verifier refuses ("dereference of modified ctx ptr"). Every program reads
 * the ctx fields it needs into locals first, then branches.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sluice.h"

#define SL_AF_INET 2
#define SL_AF_INET6 10
#define SL_SOCK_STREAM 1
#define SL_SOCK_DGRAM 2
#define SL_IPPROTO_TCP 6
#define SL_IPPROTO_UDP 17
#define SL_DNS_PORT 53

#define SL_ALLOW 1
#define SL_DENY 0

#define SL_LOOPBACK4 0x7f000001 /* 127.0.0.1, host order */

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader (override_global). Zero means "not configured": every
 * program then refuses, so a mis-loaded object fails closed. */
volatile const __u16 sluice_proxy_port = 0;
volatile const __u16 sluice_dns_port = 0;
volatile const __u64 sluice_host_netns = 0;
/* TCP sockets one sandbox may hold connected or connecting at once. */
volatile const __u32 sluice_tcp_quota = 0;

/* Per-socket state (socket storage; never seen by the daemon). */
struct sluice_sock {
	/* What the agent dialed: the connection table's value. */
	struct sluice_orig_dst dst;
	/* The key this socket's entry was written under, while in_table. */
	struct sluice_conn_key key;
	__u32 in_table;
	/* The cgroup charged for the slot (the caller of the first connect). */
	__u64 slot_cgroup;
	/* 1 while the socket holds a slot; swapped to 0 exactly once, at release. */
	__u32 slot;
	/* The port connect4/6 redirected to (the key's dport). */
	__u16 target;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sluice_sock);
} sluice_socks SEC(".maps");

/*
 * Client (local address, port) -> original destination, for the proxy.
 *
 * Fairness between sandboxes: a plain (preallocated) hash, so no insert ever
 * evicts another entry, and every entry belongs to a socket holding one of
 * its sandbox's slots (at most sluice_tcp_quota per sandbox, counted in
 * sluice_quota). An entry leaves the table when the proxy takes it (lookup
 * and delete) or when its socket is released before that (sock_release), so
 * a connection that never reached accept does not leak. A flooding sandbox is
 * refused at connect once at its quota; it cannot push out, overwrite or use
 * up another sandbox's entries unless more than ENTRIES / quota sandboxes are
 * at their quota at once (then new connections fail closed).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_CONNTABLE_ENTRIES);
	__type(key, struct sluice_conn_key);
	__type(value, struct sluice_orig_dst);
} sluice_conns SEC(".maps");

/* cgroup id -> slots in use; see struct sluice_quota. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_QUOTA_ENTRIES);
	__type(key, __u64);
	__type(value, struct sluice_quota);
} sluice_quota SEC(".maps");

/* Event counters, per CPU; see SLUICE_STAT_* in sluice.h. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SLUICE_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} sluice_stats SEC(".maps");

/* UDP source (local address, port) -> the sending socket's record, for the
 * resolver: written by the egress program before the packet is delivered, so
 * the entry exists by the time the resolver reads the datagram. Never
 * deleted; a reused source port overwrites it with its new owner. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SLUICE_UDP_SOURCES_ENTRIES);
	__type(key, struct sluice_conn_key);
	__type(value, struct sluice_orig_dst);
} sluice_udp_srcs SEC(".maps");

/*
 * Emergency stop: cgroup id -> 1 (that sandbox is stopped), SLUICE_STOP_ALL
 * -> 1 (every sandbox is stopped). Written only by the daemon; pinned, so a
 * stop holds while no daemon runs. Full: the daemon stops everything rather
 * than leave a sandbox out.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_STOPPED_ENTRIES);
	__type(key, __u64);
	__type(value, __u32);
} sluice_stopped SEC(".maps");

static __always_inline int configured(void)
{
	return sluice_proxy_port != 0 && sluice_dns_port != 0 && sluice_host_netns != 0 &&
	       sluice_tcp_quota != 0;
}

static __always_inline void stat(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&sluice_stats, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

/* 1 when the sandbox `cg` (or every sandbox) is under an emergency stop. */
static __always_inline int stopped(__u64 cg)
{
	__u64 all = SLUICE_STOP_ALL;

	return bpf_map_lookup_elem(&sluice_stopped, &all) != 0 ||
	       bpf_map_lookup_elem(&sluice_stopped, &cg) != 0;
}

/*
 * Takes one of the sandbox `cg`'s slots. 0: refuse the connect (at quota, or
 * no room for the sandbox's counter).
 */
static __always_inline int take_slot(__u64 cg)
{
	struct sluice_quota *q = bpf_map_lookup_elem(&sluice_quota, &cg);
	struct sluice_quota zero = {};
	__s64 used;

	if (!q) {
		/* EEXIST (created meanwhile on another CPU) is fine; a full map is not. */
		bpf_map_update_elem(&sluice_quota, &cg, &zero, BPF_NOEXIST);
		q = bpf_map_lookup_elem(&sluice_quota, &cg);
		if (!q) {
			stat(SLUICE_STAT_QUOTA_FULL);
			return 0;
		}
	}
	used = __sync_fetch_and_add(&q->used, 1);
	if (used >= (__s64)sluice_tcp_quota) {
		__sync_fetch_and_add(&q->used, -1);
		__sync_fetch_and_add(&q->refused, 1);
		stat(SLUICE_STAT_QUOTA_REFUSED);
		return 0;
	}
	stat(SLUICE_STAT_SLOT_TAKEN);
	return 1;
}

static __always_inline void give_slot(__u64 cg)
{
	struct sluice_quota *q = bpf_map_lookup_elem(&sluice_quota, &cg);

	/* Gone: the daemon removed the counter of a cgroup that no longer exists. */
	if (q)
		__sync_fetch_and_add(&q->used, -1);
	stat(SLUICE_STAT_RELEASE_SLOT);
}

static __always_inline int is_mapped(__u32 a0, __u32 a1, __u32 a2)
{
	return a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff);
}

static __always_inline int is_loopback6(__u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
	return a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1);
}

/*
 * Decide where a connect/sendmsg goes and record the original destination in
 * socket storage. Returns the local port to rewrite to, or 0 to refuse.
 */
static __always_inline __u16 record(void *ctx, struct bpf_sock *sk, __u32 a0, __u32 a1,
				    __u32 a2, __u32 a3, __u16 port, __u8 family, __u32 type,
				    __u32 protocol, int connect)
{
	__u16 target;
	__u64 netns;
	__u64 cgroup;
	int tcp = 0;
	struct sluice_sock *st;

	if (!configured())
		return 0;
	netns = bpf_get_netns_cookie(ctx);
	if (netns != sluice_host_netns)
		return 0;

	if (connect && type == SL_SOCK_STREAM && protocol == SL_IPPROTO_TCP) {
		target = port == SL_DNS_PORT ? sluice_dns_port : sluice_proxy_port;
		tcp = 1;
		stat(SLUICE_STAT_CONNECT);
	} else if (type == SL_SOCK_DGRAM && protocol == SL_IPPROTO_UDP && port == SL_DNS_PORT)
		target = sluice_dns_port;
	else
		return 0;

	if (!sk)
		return 0;
	st = bpf_sk_storage_get(&sluice_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		stat(SLUICE_STAT_STORAGE_FAIL);
		return 0;
	}
	cgroup = bpf_get_current_cgroup_id();
	/* Emergency stop: refused before a slot is taken or anything recorded. */
	if (stopped(cgroup))
		return 0;
	/* The slot is taken before anything is rewritten or recorded, once per
	 * socket (a second connect on the same socket reuses it). */
	if (tcp && !st->slot) {
		if (!take_slot(cgroup))
			return 0;
		st->slot_cgroup = cgroup;
		st->slot = 1;
	}

	st->dst.addr[0] = a0;
	st->dst.addr[1] = a1;
	st->dst.addr[2] = a2;
	st->dst.addr[3] = a3;
	st->dst.port = port;
	st->dst.family = family;
	st->dst.protocol = (__u8)protocol;
	st->dst.tgid = (__u32)(bpf_get_current_pid_tgid() >> 32);
	st->dst.cgroup_id = cgroup;
	st->dst.netns_cookie = netns;
	st->dst.sock_cookie = bpf_get_socket_cookie(ctx);
	st->target = target;
	return target;
}

static __always_inline int redirect4(struct bpf_sock_addr *ctx, int connect)
{
	__u32 ip = ctx->user_ip4;
	__u32 port_n = ctx->user_port;
	__u32 type = ctx->type;
	__u32 protocol = ctx->protocol;
	struct bpf_sock *sk = ctx->sk;
	__u16 target;

	target = record(ctx, sk, 0, 0, bpf_htonl(0xffff), ip, bpf_ntohs((__u16)port_n), SL_AF_INET,
			type, protocol, connect);
	if (!target)
		return SL_DENY;
	ctx->user_ip4 = bpf_htonl(SL_LOOPBACK4);
	ctx->user_port = bpf_htons(target);
	return SL_ALLOW;
}

static __always_inline int redirect6(struct bpf_sock_addr *ctx, int connect)
{
	__u32 a0 = ctx->user_ip6[0];
	__u32 a1 = ctx->user_ip6[1];
	__u32 a2 = ctx->user_ip6[2];
	__u32 a3 = ctx->user_ip6[3];
	__u32 port_n = ctx->user_port;
	__u32 type = ctx->type;
	__u32 protocol = ctx->protocol;
	struct bpf_sock *sk = ctx->sk;
	int mapped = is_mapped(a0, a1, a2);
	__u16 target;

	target = record(ctx, sk, a0, a1, a2, a3, bpf_ntohs((__u16)port_n), SL_AF_INET6, type,
			protocol, connect);
	if (!target)
		return SL_DENY;
	/* ::ffff:a.b.c.d is handed to IPv4 by the kernel later: keep it
	 * mapped so the connection stays IPv4 (to 127.0.0.1). */
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	if (mapped) {
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = bpf_htonl(SL_LOOPBACK4);
	} else {
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(target);
	return SL_ALLOW;
}

SEC("cgroup/connect4")
int sl_connect4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx, 1);
}

SEC("cgroup/connect6")
int sl_connect6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx, 1);
}

SEC("cgroup/sendmsg4")
int sl_sendmsg4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx, 0);
}

SEC("cgroup/sendmsg6")
int sl_sendmsg6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx, 0);
}

SEC("sockops")
int sl_sockops(struct bpf_sock_ops *ctx)
{
	__u32 op = ctx->op;
	__u32 family = ctx->family;
	__u32 l4 = ctx->local_ip4;
	__u32 l6_0 = ctx->local_ip6[0];
	__u32 l6_1 = ctx->local_ip6[1];
	__u32 l6_2 = ctx->local_ip6[2];
	__u32 l6_3 = ctx->local_ip6[3];
	__u32 lport = ctx->local_port;
	struct bpf_sock *sk = ctx->sk;
	struct sluice_sock *st;
	struct sluice_conn_key key = {};
	long err;
	int i;

	/* TCP_CONNECT_CB is always called: no callback flag to enable. */
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB || !sk)
		return 1;
	stat(SLUICE_STAT_SOCKOPS_CONNECT);
	st = bpf_sk_storage_get(&sluice_socks, sk, 0, 0);
	/* No slot: connect4/6 did not let this socket through (it cannot get
	 * here then), or it was connected before this version was installed.
	 * No entry: the proxy closes the connection. */
	if (!st || !st->slot) {
		stat(SLUICE_STAT_SOCKOPS_NO_SLOT);
		return 1;
	}

	/* The connection is IPv4 on the wire when the socket is AF_INET or
	 * the agent dialed a mapped address on an AF_INET6 socket. */
	if (family == SL_AF_INET || is_mapped(st->dst.addr[0], st->dst.addr[1], st->dst.addr[2])) {
		key.addr[2] = bpf_htonl(0xffff);
		key.addr[3] = l4;
	} else {
		key.addr[0] = l6_0;
		key.addr[1] = l6_1;
		key.addr[2] = l6_2;
		key.addr[3] = l6_3;
	}
	key.port = (__u16)lport;
	key.dport = st->target;
	/* A socket connecting again (after a failed connect) has a new source
	 * port: its previous entry goes first. */
	if (st->in_table) {
		bpf_map_delete_elem(&sluice_conns, &st->key);
		st->in_table = 0;
	}
	/* BPF_NOEXIST: an entry under this key belongs to another live socket;
	 * it is never overwritten (with the redirect port in the key, the kernel
	 * never gives two live connections the same one). A missing entry fails closed (the proxy closes the
	 * connection). A failed insert is counted by cause, and retried. */
	for (i = 0; i < 3; i++) {
		err = bpf_map_update_elem(&sluice_conns, &key, &st->dst, BPF_NOEXIST);
		if (err == 0) {
			st->key = key;
			st->in_table = 1;
			stat(i == 0 ? SLUICE_STAT_INSERT_OK : SLUICE_STAT_INSERT_RETRIED);
			return 1;
		}
		if (err == -17 /* EEXIST */) {
			stat(SLUICE_STAT_INSERT_ERR_EXIST);
			break;
		}
		if (err == -7 /* E2BIG */ || err == -12 /* ENOMEM */)
			stat(SLUICE_STAT_INSERT_ERR_FULL);
		else if (err == -16 /* EBUSY */ || err == -35 /* EDEADLK */ || err == -110 /* ETIMEDOUT */)
			stat(SLUICE_STAT_INSERT_ERR_LOCK);
		else
			stat(SLUICE_STAT_INSERT_ERR_OTHER);
	}
	stat(SLUICE_STAT_INSERT_FAIL);
	return 1;
}

/* The last close of an agent socket (inet_release; runs once per socket). */
SEC("cgroup/sock_release")
int sl_sock_release(struct bpf_sock *ctx)
{
	struct sluice_sock *st;
	struct sluice_orig_dst *entry;

	st = bpf_sk_storage_get(&sluice_socks, ctx, 0, 0);
	if (!st)
		return 1;
	if (st->in_table) {
		/* Still there: the proxy never took it. Only ours is removed (an
		 * entry of another socket under the same key is left alone). */
		entry = bpf_map_lookup_elem(&sluice_conns, &st->key);
		if (entry && entry->sock_cookie == st->dst.sock_cookie &&
		    bpf_map_delete_elem(&sluice_conns, &st->key) == 0)
			stat(SLUICE_STAT_RELEASE_DELETED);
		st->in_table = 0;
	}
	/* Exactly once per slot, even if release ran twice. */
	if (__sync_lock_test_and_set(&st->slot, 0))
		give_slot(st->slot_cgroup);
	return 1;
}

SEC("cgroup/recvmsg4")
int sl_recvmsg4(struct bpf_sock_addr *ctx)
{
	__u32 ip = ctx->user_ip4;
	__u32 port_n = ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	struct sluice_orig_dst *st;
	struct sluice_sock *ss;

	if (!sk || ip != bpf_htonl(SL_LOOPBACK4) || bpf_ntohs((__u16)port_n) != sluice_dns_port)
		return 1;
	ss = bpf_sk_storage_get(&sluice_socks, sk, 0, 0);
	if (!ss)
		return 1;
	st = &ss->dst;
	if (st->protocol != SL_IPPROTO_UDP || !is_mapped(st->addr[0], st->addr[1], st->addr[2]))
		return 1;
	ctx->user_ip4 = st->addr[3];
	ctx->user_port = bpf_htons(st->port);
	return 1;
}

/* Replies to AF_INET6 sockets, including those that sent to a mapped
 * address (the send went through sendmsg4, the reply comes here). */
SEC("cgroup/recvmsg6")
int sl_recvmsg6(struct bpf_sock_addr *ctx)
{
	__u32 a0 = ctx->user_ip6[0];
	__u32 a1 = ctx->user_ip6[1];
	__u32 a2 = ctx->user_ip6[2];
	__u32 a3 = ctx->user_ip6[3];
	__u32 port_n = ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	struct sluice_orig_dst *st;
	struct sluice_sock *ss;
	int from_resolver;

	from_resolver = is_loopback6(a0, a1, a2, a3) ||
			(is_mapped(a0, a1, a2) && a3 == bpf_htonl(SL_LOOPBACK4));
	if (!sk || !from_resolver || bpf_ntohs((__u16)port_n) != sluice_dns_port)
		return 1;
	ss = bpf_sk_storage_get(&sluice_socks, sk, 0, 0);
	if (!ss)
		return 1;
	st = &ss->dst;
	if (st->protocol != SL_IPPROTO_UDP)
		return 1;
	ctx->user_ip6[0] = st->addr[0];
	ctx->user_ip6[1] = st->addr[1];
	ctx->user_ip6[2] = st->addr[2];
	ctx->user_ip6[3] = st->addr[3];
	ctx->user_port = bpf_htons(st->port);
	return 1;
}

static __always_inline int redirected_port(__u16 port)
{
	return port == sluice_proxy_port || port == sluice_dns_port;
}

SEC("cgroup/getpeername4")
int sl_getpeer4(struct bpf_sock_addr *ctx)
{
	__u32 ip = ctx->user_ip4;
	__u32 port_n = ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	struct sluice_orig_dst *st;
	struct sluice_sock *ss;

	if (!sk || ip != bpf_htonl(SL_LOOPBACK4) || !redirected_port(bpf_ntohs((__u16)port_n)))
		return 1;
	ss = bpf_sk_storage_get(&sluice_socks, sk, 0, 0);
	if (!ss)
		return 1;
	st = &ss->dst;
	if (!is_mapped(st->addr[0], st->addr[1], st->addr[2]))
		return 1;
	ctx->user_ip4 = st->addr[3];
	ctx->user_port = bpf_htons(st->port);
	return 1;
}

SEC("cgroup/getpeername6")
int sl_getpeer6(struct bpf_sock_addr *ctx)
{
	__u32 a0 = ctx->user_ip6[0];
	__u32 a1 = ctx->user_ip6[1];
	__u32 a2 = ctx->user_ip6[2];
	__u32 a3 = ctx->user_ip6[3];
	__u32 port_n = ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	struct sluice_orig_dst *st;
	struct sluice_sock *ss;
	int to_us;

	to_us = is_loopback6(a0, a1, a2, a3) ||
		(is_mapped(a0, a1, a2) && a3 == bpf_htonl(SL_LOOPBACK4));
	if (!sk || !to_us || !redirected_port(bpf_ntohs((__u16)port_n)))
		return 1;
	ss = bpf_sk_storage_get(&sluice_socks, sk, 0, 0);
	if (!ss)
		return 1;
	st = &ss->dst;
	ctx->user_ip6[0] = st->addr[0];
	ctx->user_ip6[1] = st->addr[1];
	ctx->user_ip6[2] = st->addr[2];
	ctx->user_ip6[3] = st->addr[3];
	ctx->user_port = bpf_htons(st->port);
	return 1;
}

/* Only sees AF_INET/AF_INET6 (inet_create): raw, ICMP, SCTP, MPTCP and
 * UDP-Lite are refused here. AF_PACKET and netlink never reach this hook. */
SEC("cgroup/sock_create")
int sl_sock_create(struct bpf_sock *ctx)
{
	__u32 family = ctx->family;
	__u32 type = ctx->type;
	__u32 protocol = ctx->protocol;
	__u64 netns;

	if (!configured())
		return SL_DENY;
	netns = bpf_get_netns_cookie(ctx);
	if (netns != sluice_host_netns)
		return SL_DENY;
	if (family != SL_AF_INET && family != SL_AF_INET6)
		return SL_DENY;
	if (type == SL_SOCK_STREAM && protocol == SL_IPPROTO_TCP)
		return SL_ALLOW;
	if (type == SL_SOCK_DGRAM && protocol == SL_IPPROTO_UDP)
		return SL_ALLOW;
	return SL_DENY;
}

static __always_inline int bind_check(struct bpf_sock_addr *ctx)
{
	__u32 port_n = ctx->user_port;

	if (!configured())
		return SL_DENY;
	if (redirected_port(bpf_ntohs((__u16)port_n)))
		return SL_DENY;
	return SL_ALLOW;
}

SEC("cgroup/bind4")
int sl_bind4(struct bpf_sock_addr *ctx)
{
	return bind_check(ctx);
}

SEC("cgroup/bind6")
int sl_bind6(struct bpf_sock_addr *ctx)
{
	return bind_check(ctx);
}

/* For a UDP packet to the resolver port, record its source -> the sending
 * socket's storage. hdr_len is the IP header length; key.addr is filled. */
static __always_inline void note_udp_source(struct __sk_buff *skb, struct sluice_conn_key *key, __u32 hdr_len)
{
	__u16 ports[2] = {};
	struct bpf_sock *sk = skb->sk;
	struct sluice_sock *st;

	if (bpf_skb_load_bytes(skb, hdr_len, ports, sizeof(ports)))
		return;
	if (bpf_ntohs(ports[1]) != sluice_dns_port)
		return;
	if (!sk)
		return;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return;
	st = bpf_sk_storage_get(&sluice_socks, sk, 0, 0);
	if (!st)
		return;
	key->port = bpf_ntohs(ports[0]);
	key->dport = 0;
	bpf_map_update_elem(&sluice_udp_srcs, key, &st->dst, BPF_ANY);
}

/* Backstop: whatever the hooks above missed, a packet from an agent socket
 * leaves only towards 127.0.0.0/8 or ::1. */
SEC("cgroup_skb/egress")
int sl_egress(struct __sk_buff *skb)
{
	__u8 first = 0;
	__u8 dst4 = 0;
	__u8 proto = 0;
	__u32 src4 = 0;
	__u32 dst6[4] = {};
	struct sluice_conn_key key = {};

	if (bpf_skb_load_bytes(skb, 0, &first, 1))
		return SL_DENY;
	if ((first >> 4) == 4) {
		/* IPv4 destination address starts at byte 16. */
		if (bpf_skb_load_bytes(skb, 16, &dst4, 1))
			return SL_DENY;
		if (dst4 != 127)
			return SL_DENY;
		if (!bpf_skb_load_bytes(skb, 9, &proto, 1) && proto == SL_IPPROTO_UDP &&
		    !bpf_skb_load_bytes(skb, 12, &src4, 4)) {
			key.addr[2] = bpf_htonl(0xffff);
			key.addr[3] = src4;
			note_udp_source(skb, &key, (__u32)(first & 0x0f) * 4);
		}
		return SL_ALLOW;
	}
	if ((first >> 4) == 6) {
		/* IPv6 destination address starts at byte 24. */
		if (bpf_skb_load_bytes(skb, 24, dst6, sizeof(dst6)))
			return SL_DENY;
		if (!is_loopback6(dst6[0], dst6[1], dst6[2], dst6[3]))
			return SL_DENY;
		/* Next header at byte 6; UDP directly after the fixed header (an
		 * agent's DNS never carries extension headers; if it did, the
		 * resolver simply would not know the sender and stay silent). */
		if (!bpf_skb_load_bytes(skb, 6, &proto, 1) && proto == SL_IPPROTO_UDP &&
		    !bpf_skb_load_bytes(skb, 8, key.addr, sizeof(key.addr)))
			note_udp_source(skb, &key, 40);
		return SL_ALLOW;
	}
	return SL_DENY;
}
