/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Types shared by unix.bpf.c and the daemon (crates/kernel/src/unix.rs
 * mirrors them; its tests compare the numbers).
 */
#ifndef SLUICE_UNIX_H
#define SLUICE_UNIX_H

#include <linux/types.h>

/* sizeof(((struct sockaddr_un *)0)->sun_path) */
#define SLUICE_UNIX_PATH_MAX 108

/* Operator-listed destinations (`[sandbox] unix_allow`). */
#define SLUICE_UNIX_ALLOW_ENTRIES 1024
/* Live sandboxes with an own directory. */
#define SLUICE_UNIX_DIRS_ENTRIES 16384

/*
 * A Unix socket address in canonical form: the key of sl_unix_allow and the
 * value of sl_unix_dirs.
 *
 * A path is its bytes up to (not including) the first NUL; an abstract name
 * is a NUL followed by exactly the name's bytes. `len` counts the bytes;
 * every byte past `len` is zero.
 */
struct sluice_unix_addr {
	__u32 len;
	__u8 bytes[SLUICE_UNIX_PATH_MAX];
};

_Static_assert(sizeof(struct sluice_unix_addr) == 112, "sluice_unix_addr size");

#endif /* SLUICE_UNIX_H */
