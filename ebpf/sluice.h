/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Types shared by the eBPF programs (sluice.bpf.c) and the daemon
 * (crates/kernel/src/abi.rs mirrors them with #[repr(C)]).
 *
 * Any change here is an ABI change: bump SLUICE_ABI_VERSION so that a new
 * daemon pins fresh maps instead of reusing maps of the old layout, and update
 * abi.rs (its tests compile this header and compare every offset).
 */
#ifndef SLUICE_H
#define SLUICE_H

#include <linux/types.h>

/* Bumped on every layout change of the structs below. Maps are pinned under
 * <pin_dir>/v<SLUICE_ABI_VERSION>/. */
#define SLUICE_ABI_VERSION 2

/* Size of the connection table (a plain hash: nothing is ever evicted). Every
 * entry belongs to an open agent socket holding one of its sandbox's slots
 * (see sluice_quota), so one sandbox holds at most sluice_tcp_quota entries
 * and SLUICE_CONNTABLE_ENTRIES / quota sandboxes can sit at their quota at
 * once before the table is full (then new connections fail closed). */
#define SLUICE_CONNTABLE_ENTRIES 65536

/* Sandboxes (cgroups) with a slot counter at once. A connect from one more
 * is refused. The daemon removes the counters of cgroups that are gone. */
#define SLUICE_QUOTA_ENTRIES 4096

/* Stopped sandboxes (emergency stop): cgroup ids, plus the key
 * SLUICE_STOP_ALL for "every sandbox". */
#define SLUICE_STOPPED_ENTRIES 4096
/* Key of sluice_stopped meaning "every sandbox" (no cgroup has id 0). */
#define SLUICE_STOP_ALL 0

/* Size of the UDP DNS source table (LRU): agent UDP sockets that sent a DNS
 * query to the resolver, keyed like the connection table. */
#define SLUICE_UDP_SOURCES_ENTRIES 16384

/*
 * What the agent dialed, and who dialed it.
 *
 * Stored per socket (socket storage) by connect4/6 and sendmsg4/6, and
 * copied into the connection table by sockops when the TCP SYN is about to
 * leave.
 */
struct sluice_orig_dst {
	/* Dialed address, network byte order. IPv4 is stored IPv4-mapped
	 * (::ffff:a.b.c.d) whatever the socket family. */
	__u32 addr[4];
	/* Dialed port, host byte order. */
	__u16 port;
	/* Family of the address the agent passed to connect/sendmsg:
	 * AF_INET (2) or AF_INET6 (10, also for ::ffff:a.b.c.d). */
	__u8 family;
	/* IPPROTO_TCP (6) or IPPROTO_UDP (17). */
	__u8 protocol;
	/* Thread-group id (pid) of the task that called connect/sendmsg. */
	__u32 tgid;
	/* cgroup v2 id of that task. */
	__u64 cgroup_id;
	/* Network namespace cookie of the socket. */
	__u64 netns_cookie;
	/* Socket cookie (stable id of the socket for its lifetime). */
	__u64 sock_cookie;
};

/*
 * Connection-table key: the client's local address and port, as the proxy
 * sees them as the peer of an accepted connection, and the port the
 * connection was redirected to (the proxy's or the resolver's): the kernel
 * gives one source port to connections towards different destinations, so
 * (address, port) alone is not unique.
 */
struct sluice_conn_key {
	/* Network byte order; IPv4 as ::ffff:a.b.c.d. */
	__u32 addr[4];
	/* Host byte order. */
	__u16 port;
	/* Redirect port (proxy or resolver), host byte order. Zero in the UDP
	 * source table. */
	__u16 dport;
};

/*
 * Per-sandbox slot counter (sluice_quota, keyed by the cgroup id of the task
 * that called connect). Signed: a counter removed and recreated while sockets
 * still held slots can go below zero, which only ever grants slots.
 */
struct sluice_quota {
	/* TCP sockets of the sandbox that hold a slot (connected or connecting). */
	__s64 used;
	/* Connects refused because the sandbox was at its quota. */
	__u64 refused;
};

/*
 * Per-CPU event counters (sluice_stats, a per-CPU array indexed by these).
 * The daemon sums them over CPUs; they show where a connection lost its
 * table entry, if one ever does.
 */
#define SLUICE_STAT_CONNECT 0            /* connect4/6 ran for a TCP connect */
#define SLUICE_STAT_STORAGE_FAIL 1       /* no socket storage: connect/sendmsg refused */
#define SLUICE_STAT_SLOT_TAKEN 2         /* a TCP socket took a slot */
#define SLUICE_STAT_QUOTA_REFUSED 3      /* connect refused: sandbox at its quota */
#define SLUICE_STAT_QUOTA_FULL 4         /* connect refused: no room for the sandbox's counter */
#define SLUICE_STAT_SOCKOPS_CONNECT 5    /* sockops TCP_CONNECT_CB ran on an agent socket */
#define SLUICE_STAT_SOCKOPS_NO_SLOT 6    /* ... for a socket without storage or slot: no entry */
#define SLUICE_STAT_INSERT_OK 7          /* entry written */
#define SLUICE_STAT_INSERT_RETRIED 8     /* entry written after a failed attempt */
#define SLUICE_STAT_INSERT_FAIL 9        /* every attempt failed: the connection has no entry */
#define SLUICE_STAT_INSERT_ERR_EXIST 10  /* an attempt found the key taken (another socket's entry) */
#define SLUICE_STAT_INSERT_ERR_FULL 11   /* an attempt failed with E2BIG/ENOMEM (table full) */
#define SLUICE_STAT_INSERT_ERR_LOCK 12   /* an attempt failed with EBUSY/EDEADLK/ETIMEDOUT (bucket lock) */
#define SLUICE_STAT_INSERT_ERR_OTHER 13  /* an attempt failed otherwise */
#define SLUICE_STAT_RELEASE_SLOT 14      /* sock_release gave a slot back */
#define SLUICE_STAT_RELEASE_DELETED 15   /* sock_release removed an entry the proxy never took */
#define SLUICE_STAT_COUNT 16

/* Names of the globals the loader overrides (volatile const in the object).
 * Listed here so the daemon and the programs agree. */
#define SLUICE_GLOBAL_PROXY_PORT "sluice_proxy_port"   /* __u16, host order */
#define SLUICE_GLOBAL_DNS_PORT "sluice_dns_port"       /* __u16, host order */
#define SLUICE_GLOBAL_HOST_NETNS "sluice_host_netns"   /* __u64 */
#define SLUICE_GLOBAL_TCP_QUOTA "sluice_tcp_quota"     /* __u32, slots per sandbox */

/* Layout checks; abi.rs asserts the same numbers. */
_Static_assert(sizeof(struct sluice_orig_dst) == 48, "sluice_orig_dst size");
_Static_assert(__builtin_offsetof(struct sluice_orig_dst, addr) == 0, "addr");
_Static_assert(__builtin_offsetof(struct sluice_orig_dst, port) == 16, "port");
_Static_assert(__builtin_offsetof(struct sluice_orig_dst, family) == 18, "family");
_Static_assert(__builtin_offsetof(struct sluice_orig_dst, protocol) == 19, "protocol");
_Static_assert(__builtin_offsetof(struct sluice_orig_dst, tgid) == 20, "tgid");
_Static_assert(__builtin_offsetof(struct sluice_orig_dst, cgroup_id) == 24, "cgroup_id");
_Static_assert(__builtin_offsetof(struct sluice_orig_dst, netns_cookie) == 32, "netns_cookie");
_Static_assert(__builtin_offsetof(struct sluice_orig_dst, sock_cookie) == 40, "sock_cookie");
_Static_assert(sizeof(struct sluice_conn_key) == 20, "sluice_conn_key size");
_Static_assert(__builtin_offsetof(struct sluice_conn_key, addr) == 0, "key addr");
_Static_assert(__builtin_offsetof(struct sluice_conn_key, port) == 16, "key port");
_Static_assert(__builtin_offsetof(struct sluice_conn_key, dport) == 18, "key dport");

_Static_assert(sizeof(struct sluice_quota) == 16, "sluice_quota size");
_Static_assert(__builtin_offsetof(struct sluice_quota, used) == 0, "quota used");
_Static_assert(__builtin_offsetof(struct sluice_quota, refused) == 8, "quota refused");

#endif /* SLUICE_H */
