// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * sluice Unix-domain socket filter: which named Unix sockets an agent may
 * reach. Attached (as pinned bpf_links) to the agents' cgroup v2, next to the
 * programs of sluice.bpf.c, so it applies to every socket created below it.
 *
 *   connect_unix  connect(2) of stream, seqpacket and datagram sockets
 *   sendmsg_unix  sendto/sendmsg(2) of datagram sockets with an address
 *
 * Both allow a destination only if it is
 *   1. listed by the operator (`[sandbox] unix_allow`): an exact match of the
 *      whole address in sl_unix_allow (a path, or an abstract name), or
 *   2. a path inside the sandbox's own directory: sl_unix_dirs maps the
 *      cgroup id of the calling task to the directory's path (ending in '/'),
 *      the path starts with it and has no "." or ".." component,
 * and only while the calling task is in the daemon's user namespace
 * (sl_unix_config) or in the one user namespace registered for its sandbox
 * (sl_unix_userns; see user_ns_ok). Everything else is refused: 0 is
 * EPERM to the caller. socketpair(2) and already-connected sockets never pass
 * here (nothing is looked up by name).
 *
 * The programs see the address as the agent passed it, before the kernel
 * resolves it: they resolve nothing. What makes the comparison sound is
 * where the own directory lives (see crates/kernel/src/unix.rs): a mount
 * of its own, with `nosymfollow`, so a symbolic link placed there is never
 * followed and a hard link to a socket elsewhere cannot be made (EXDEV).
 * "." and ".." are refused here because the kernel resolves them, and a
 * prefix test on the raw string would not.
 *
 * The address is read through bpf_cast_to_kern_ctx (struct
 * bpf_sock_addr_kern: uaddr, uaddrlen) and bpf_rdonly_cast to struct
 * sockaddr_un, as the kernel's own selftests do (connect_unix_prog.c); both
 * kfuncs and CO-RE offsets are resolved by libbpf against the running
 * kernel's BTF. These hooks exist from Linux 6.7 on.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "unix.h"

#define SL_ALLOW 1
#define SL_DENY 0

char LICENSE[] SEC("license") = "GPL";

/* Kernel types, only the fields used; CO-RE relocates their offsets. */
struct sockaddr;
struct bpf_sock_addr_kern {
	struct sockaddr *uaddr;
	__u32 uaddrlen;
} __attribute__((preserve_access_index));

struct sockaddr_un {
	unsigned short sun_family;
	char sun_path[SLUICE_UNIX_PATH_MAX];
} __attribute__((preserve_access_index));

struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct user_namespace {
	struct ns_common ns;
} __attribute__((preserve_access_index));

struct cred {
	struct user_namespace *user_ns;
} __attribute__((preserve_access_index));

struct task_struct {
	const struct cred *cred;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

/* Destinations the operator allows, for every sandbox: exact addresses. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_UNIX_ALLOW_ENTRIES);
	__type(key, struct sluice_unix_addr);
	__type(value, __u8);
} sl_unix_allow SEC(".maps");

/* A sandbox's own directory, keyed by the sandbox's cgroup id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_UNIX_DIRS_ENTRIES);
	__type(key, __u64);
	__type(value, struct sluice_unix_addr);
} sl_unix_dirs SEC(".maps");

/* Settings the daemon writes before attaching: index 0 is the inode number of
 * the user namespace (nsfs, as stat(2) of /proc/self/ns/user shows it) from
 * which listed addresses and own directories may be reached: the daemon's.
 * 0 (unset) allows none. See user_ns_ok. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} sl_unix_config SEC(".maps");

/* The user namespace (nsfs inode number) of a `sluice run` sandbox, keyed by
 * the sandbox's cgroup id: the one `sluice run` made before asking for the
 * sandbox, in which no process but its own trusted ones holds capabilities.
 * See user_ns_ok. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_UNIX_DIRS_ENTRIES);
	__type(key, __u64);
	__type(value, __u32);
} sl_unix_userns SEC(".maps");

/* Refusals, per CPU: index 0 connect, 1 sendmsg. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} sl_unix_refused SEC(".maps");

/* Scratch space for the address (too large for the 512-byte stack twice). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sluice_unix_addr);
} sl_unix_scratch SEC(".maps");

/* Reads the destination into `a` in the canonical form of struct
 * sluice_unix_addr. Returns 0, or -1 if the address cannot be read. */
static __always_inline int read_addr(struct bpf_sock_addr *ctx, struct sluice_unix_addr *a)
{
	struct bpf_sock_addr_kern *kctx = bpf_cast_to_kern_ctx(ctx);
	__u32 addrlen = kctx->uaddrlen;
	struct sockaddr_un *un = bpf_rdonly_cast(kctx->uaddr, bpf_core_type_id_kernel(struct sockaddr_un));
	__u32 len, i;
	int abstract, ended = 0;

	/* The kernel checked 2 < addrlen <= sizeof(struct sockaddr_un). */
	if (addrlen <= 2 || addrlen > 2 + SLUICE_UNIX_PATH_MAX)
		return -1;
	len = addrlen - 2;
	__builtin_memset(a, 0, sizeof(*a));
	__builtin_memcpy(a->bytes, un->sun_path, SLUICE_UNIX_PATH_MAX);
	abstract = a->bytes[0] == 0;
	/* Abstract: every byte up to len counts. Path: the kernel stops at
	 * the first NUL. Bytes past the end are zeroed (hash keys compare all). */
	for (i = 0; i < SLUICE_UNIX_PATH_MAX; i++) {
		if (i >= len || (!abstract && a->bytes[i] == 0))
			ended = 1;
		if (ended)
			a->bytes[i] = 0;
		else
			a->len = i + 1;
	}
	if (abstract)
		a->len = len;
	return 0;
}

/* 1 if `a` is a path below the directory `dir` (which ends in '/') with no
 * "." or ".." component anywhere. */
static __always_inline int below_dir(const struct sluice_unix_addr *a, const struct sluice_unix_addr *dir)
{
	__u32 i;

	if (dir->len == 0 || a->len <= dir->len || a->bytes[0] != '/')
		return 0;
	for (i = 0; i < SLUICE_UNIX_PATH_MAX; i++) {
		if (i < dir->len && a->bytes[i] != dir->bytes[i])
			return 0;
	}
	/* A component is "." or ".." if a '/' is followed by "." or "..",
	 * then by '/' or the end (bytes past the end are 0). */
	for (i = 0; i + 1 < SLUICE_UNIX_PATH_MAX; i++) {
		__u8 c2, c3;

		if (a->bytes[i] != '/' || a->bytes[i + 1] != '.')
			continue;
		c2 = i + 2 < SLUICE_UNIX_PATH_MAX ? a->bytes[i + 2] : 0;
		if (c2 == '/' || c2 == 0)
			return 0;
		c3 = i + 3 < SLUICE_UNIX_PATH_MAX ? a->bytes[i + 3] : 0;
		if (c2 == '.' && (c3 == '/' || c3 == 0))
			return 0;
	}
	return 1;
}

/* 1 if the calling task is in the daemon's user namespace, or in the one
 * registered for its sandbox (cgroup `cgroup_id`). An agent that makes a user
 * namespace of its own (unshare -Ur) holds CAP_SYS_ADMIN over a mount
 * namespace it owns and could bind-mount any host socket over a listed path
 * or over a path in its own directory: the raw path would match and the
 * kernel would reach the host socket. The registered namespace is the one
 * `sluice run` made, where the agent holds no capabilities; one the agent
 * makes is nested below it, has another inode, and is refused. From any other
 * user namespace no name is allowed (socketpair still works). */
static __always_inline int user_ns_ok(__u64 cgroup_id)
{
	__u32 zero = 0;
	__u32 *want = bpf_map_lookup_elem(&sl_unix_config, &zero);
	__u32 *registered = bpf_map_lookup_elem(&sl_unix_userns, &cgroup_id);
	struct task_struct *task = bpf_get_current_task_btf();
	__u32 inum;

	if (!task)
		return 0;
	inum = task->cred->user_ns->ns.inum;
	if (inum == 0)
		return 0;
	if (want && *want == inum)
		return 1;
	return registered && *registered == inum;
}

static __always_inline int decide(struct bpf_sock_addr *ctx, __u32 what)
{
	__u32 zero = 0;
	struct sluice_unix_addr *a = bpf_map_lookup_elem(&sl_unix_scratch, &zero);
	const struct sluice_unix_addr *dir;
	__u64 cgroup_id;
	__u64 *refused;

	if (!a)
		goto deny;
	if (read_addr(ctx, a))
		goto deny;
	cgroup_id = bpf_get_current_cgroup_id();
	if (!user_ns_ok(cgroup_id))
		goto deny;
	if (bpf_map_lookup_elem(&sl_unix_allow, a))
		return SL_ALLOW;
	dir = bpf_map_lookup_elem(&sl_unix_dirs, &cgroup_id);
	if (dir && below_dir(a, dir))
		return SL_ALLOW;
deny:
	refused = bpf_map_lookup_elem(&sl_unix_refused, &what);
	if (refused)
		*refused += 1;
	return SL_DENY;
}

SEC("cgroup/connect_unix")
int sl_connect_unix(struct bpf_sock_addr *ctx)
{
	return decide(ctx, 0);
}

SEC("cgroup/sendmsg_unix")
int sl_sendmsg_unix(struct bpf_sock_addr *ctx)
{
	return decide(ctx, 1);
}
