//! cgroup v2: finding the mount, the agents cgroup and the sandboxes below
//! it, moving processes in.
//!
//! The eBPF programs are attached to the agents cgroup and apply to every
//! descendant. A socket's cgroup is fixed when the socket is created, so a
//! process must join its sandbox *before* it creates any socket: use
//! [`Cgroup::join_before_exec`] on the `Command` that starts the agent.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{sys, KernelError};

/// Longest cgroup name component we create (the kernel allows 255).
const MAX_NAME: usize = 128;
/// How long [`Cgroup::remove`] waits for killed processes to exit.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The first cgroup2 mount point listed in `/proc/self/mountinfo`.
///
/// The location differs between machines (`/sys/fs/cgroup` on unified
/// systems, `/sys/fs/cgroup/unified` on hybrid ones), so it is never
/// hard-coded.
pub fn cgroup2_mount() -> Result<PathBuf, KernelError> {
    let path = Path::new("/proc/self/mountinfo");
    let text =
        fs::read_to_string(path).map_err(|source| KernelError::Cgroup { path: path.to_owned(), op: "read", source })?;
    parse_cgroup2_mount(&text).ok_or_else(|| KernelError::NoCgroup2 { mountinfo: path.to_owned() })
}

/// Parses mountinfo lines: `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`.
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount_point = pre.split(' ').nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| b == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks one cgroup name component: no separators, no dot files (cgroup
/// control files live there), no `cgroup.` prefix, bounded length.
fn check_name(name: &str) -> Result<(), KernelError> {
    let bad = |reason| Err(KernelError::CgroupName { name: name.to_owned(), reason });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME {
        return bad("longer than 128 bytes");
    }
    if name.starts_with('.') {
        return bad("starts with a dot");
    }
    if name.starts_with("cgroup.") {
        return bad("the `cgroup.` prefix is reserved for control files");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b':')) {
        return bad("only ASCII letters, digits and - _ . @ : are allowed");
    }
    Ok(())
}

/// Validates a path relative to the cgroup2 mount (the `[sandbox] cgroup`
/// setting): relative, no `..`, every component a valid name.
fn check_relative(rel: &str) -> Result<PathBuf, KernelError> {
    if rel.is_empty() {
        return Err(KernelError::CgroupName { name: rel.to_owned(), reason: "empty" });
    }
    let mut out = PathBuf::new();
    // Split by hand: Path::components() silently drops `.` and `//`.
    for part in rel.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(KernelError::CgroupName {
                name: rel.to_owned(),
                reason: "must be relative to the cgroup2 mount, without `.`, `..`, `//` or a leading `/`",
            });
        }
        check_name(part)?;
        out.push(part);
    }
    Ok(out)
}

/// Where systemd puts a slice: `a-b.slice` lives in `a.slice/a-b.slice`.
fn systemd_slice_path(name: &str) -> PathBuf {
    let unit = name.strip_suffix(".slice").unwrap_or(name);
    let mut path = PathBuf::new();
    // Every proper prefix ending before a '-': `a`, then `a-b`, ...
    for (i, _) in unit.match_indices('-') {
        path.push(format!("{}.slice", unit.get(..i).unwrap_or_default()));
    }
    path.push(format!("{unit}.slice"));
    path
}

/// A cgroup v2 directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
    id: u64,
}

impl Cgroup {
    /// Opens an existing cgroup directory (must be on cgroup2).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, KernelError> {
        let path = path.into();
        let err = |op, source| KernelError::Cgroup { path: path.clone(), op, source };
        let fs_type = sys::fs_type(&path).map_err(|e| err("statfs", e))?;
        if fs_type != sys::CGROUP2_SUPER_MAGIC {
            return Err(err("open", io::Error::new(io::ErrorKind::InvalidInput, "not a cgroup2 directory")));
        }
        let meta = fs::metadata(&path).map_err(|e| err("stat", e))?;
        if !meta.is_dir() {
            return Err(err("open", io::Error::new(io::ErrorKind::InvalidInput, "not a directory")));
        }
        // On cgroup2 the directory's inode number is the cgroup id the
        // kernel reports (bpf_get_current_cgroup_id, link info).
        Ok(Self { id: meta.ino(), path })
    }

    /// The agents cgroup named by the `[sandbox] cgroup` setting, relative to
    /// the cgroup2 `mount`: an existing directory of that name, else the
    /// systemd slice of that name if systemd created it
    /// (`sluice-agents` → `sluice.slice/sluice-agents.slice`), else a new
    /// directory.
    pub fn agents(mount: &Path, rel: &str) -> Result<Self, KernelError> {
        if let Some(found) = Self::find_agents(mount, rel)? {
            return Ok(found);
        }
        let direct = mount.join(check_relative(rel)?);
        fs::create_dir_all(&direct).map_err(|source| KernelError::Cgroup {
            path: direct.clone(),
            op: "mkdir",
            source,
        })?;
        Self::open(direct)
    }

    /// The existing cgroup [`Cgroup::agents`] would use, without creating anything: `None` when
    /// neither the directory nor the systemd slice of that name exists.
    pub fn find_agents(mount: &Path, rel: &str) -> Result<Option<Self>, KernelError> {
        let rel_path = check_relative(rel)?;
        let direct = mount.join(&rel_path);
        if direct.is_dir() {
            return Self::open(direct).map(Some);
        }
        if !rel.contains('/') {
            for candidate in [mount.join(systemd_slice_path(rel)), mount.join(format!("{rel}.slice"))] {
                if candidate.is_dir() {
                    return Self::open(candidate).map(Some);
                }
            }
        }
        Ok(None)
    }

    /// The cgroup `pid` belongs to (its `0::` line in `/proc/PID/cgroup`).
    pub fn of_pid(pid: u32) -> Result<Self, KernelError> {
        let mount = cgroup2_mount()?;
        let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = fs::read_to_string(&file).map_err(|source| KernelError::Cgroup {
            path: file.clone(),
            op: "read",
            source,
        })?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::")).ok_or_else(|| KernelError::Cgroup {
            path: file.clone(),
            op: "parse",
            source: io::Error::new(io::ErrorKind::InvalidData, "no cgroup v2 (0::) line"),
        })?;
        let rel = rel.trim_end_matches(" (deleted)").trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            return Err(KernelError::Cgroup {
                path: file,
                op: "parse",
                source: io::Error::new(io::ErrorKind::InvalidData, "`..` in cgroup path"),
            });
        }
        Self::open(mount.join(rel))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id (the directory's inode number), as recorded by the
    /// programs in [`super::OrigDst::cgroup_id`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether `other` is this cgroup or one of its descendants.
    pub fn contains(&self, other: &Cgroup) -> bool {
        other.path.starts_with(&self.path)
    }

    /// Creates a child cgroup (a sandbox). Fails if it already exists, so
    /// that two sandboxes never share a cgroup by accident.
    pub fn create_child(&self, name: &str) -> Result<Cgroup, KernelError> {
        check_name(name)?;
        let path = self.path.join(name);
        fs::create_dir(&path).map_err(|source| KernelError::Cgroup { path: path.clone(), op: "mkdir", source })?;
        Self::open(path)
    }

    /// Opens an existing child cgroup.
    pub fn child(&self, name: &str) -> Result<Cgroup, KernelError> {
        check_name(name)?;
        Self::open(self.path.join(name))
    }

    fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), KernelError> {
        let path = self.procs_path();
        let mut f = OpenOptions::new().write(true).open(&path).map_err(|source| KernelError::Cgroup {
            path: path.clone(),
            op: "open",
            source,
        })?;
        f.write_all(format!("{pid}\n").as_bytes()).map_err(|source| KernelError::Cgroup {
            path,
            op: "write pid",
            source,
        })
    }

    /// Pids currently in this cgroup (not its descendants).
    pub fn pids(&self) -> Result<Vec<u32>, KernelError> {
        let path = self.procs_path();
        let f = File::open(&path).map_err(|source| KernelError::Cgroup { path: path.clone(), op: "open", source })?;
        let mut out = Vec::new();
        for line in BufReader::new(f).lines() {
            let line = line.map_err(|source| KernelError::Cgroup { path: path.clone(), op: "read", source })?;
            if let Ok(pid) = line.trim().parse() {
                out.push(pid);
            }
        }
        Ok(out)
    }

    /// How many processes are in this cgroup and its descendants (bounded walk: at most 100,000
    /// cgroups are read; cgroupfs has no symbolic links).
    pub fn process_count(&self) -> Result<usize, KernelError> {
        const MAX_CGROUPS: usize = 100_000;
        let mut stack = vec![self.path.clone()];
        let (mut seen, mut count) = (0usize, 0usize);
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_CGROUPS {
                return Err(KernelError::Cgroup {
                    path: self.path.clone(),
                    op: "count processes",
                    source: io::Error::other(format!("more than {MAX_CGROUPS} cgroups below it")),
                });
            }
            let procs = dir.join("cgroup.procs");
            match fs::read_to_string(&procs) {
                Ok(text) => count += text.lines().filter(|l| !l.trim().is_empty()).count(),
                // Removed while we walk: nothing in it any more.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(KernelError::Cgroup { path: procs, op: "read", source }),
            }
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(KernelError::Cgroup { path: dir, op: "read_dir", source }),
            };
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(entry.path());
                }
            }
        }
        Ok(count)
    }

    /// A hook for `Command::pre_exec` that moves the child into this cgroup
    /// after `fork` and before `exec`, so the program never holds a socket
    /// created outside the sandbox. `cgroup.procs` is opened here, in the
    /// parent; the child only calls `write(2)` (async-signal-safe).
    ///
    /// ```no_run
    /// # use std::os::unix::process::CommandExt;
    /// # fn f(cg: &sluice_kernel::Cgroup) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut cmd = std::process::Command::new("curl");
    /// let join = cg.join_before_exec()?;
    /// // SAFETY: the hook only calls write(2) on an fd opened beforehand.
    /// unsafe { cmd.pre_exec(join) };
    /// # Ok(()) }
    /// ```
    pub fn join_before_exec(&self) -> Result<impl FnMut() -> io::Result<()> + Send + Sync + 'static, KernelError> {
        let path = self.procs_path();
        let file = OpenOptions::new().write(true).open(&path).map_err(|source| KernelError::Cgroup {
            path,
            op: "open",
            source,
        })?;
        // O_CLOEXEC (std's default): the exec'd program does not inherit it.
        let fd: OwnedFd = file.into();
        Ok(move || {
            // "0" moves the writing process itself.
            let buf = b"0\n";
            // SAFETY: fd is open for the lifetime of the closure; buf is valid.
            let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
    }

    /// Kills every process in this cgroup and its descendants
    /// (`cgroup.kill`, kernel >= 5.14) and waits (bounded) until they are gone.
    pub fn kill_all(&self) -> Result<(), KernelError> {
        let kill = self.path.join("cgroup.kill");
        fs::write(&kill, b"1").map_err(|source| KernelError::Cgroup { path: kill, op: "write", source })?;
        let events = self.path.join("cgroup.events");
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let populated = fs::read_to_string(&events).map(|t| t.lines().any(|l| l == "populated 1")).unwrap_or(false);
            if !populated {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(KernelError::Cgroup {
                    path: events,
                    op: "wait for killed processes",
                    source: io::Error::new(io::ErrorKind::TimedOut, "still populated"),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes this cgroup and its descendants, killing the processes in
    /// them first: a sandbox is gone only when its processes are.
    pub fn remove(&self) -> Result<(), KernelError> {
        if !self.path.exists() {
            return Ok(());
        }
        self.kill_all()?;
        self.remove_dirs(&self.path)
    }

    fn remove_dirs(&self, dir: &Path) -> Result<(), KernelError> {
        let entries =
            fs::read_dir(dir).map_err(|source| KernelError::Cgroup { path: dir.to_owned(), op: "read_dir", source })?;
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                self.remove_dirs(&entry.path())?;
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KernelError::Cgroup { path: dir.to_owned(), op: "rmdir", source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_mountinfo() {
        let hybrid = "\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 23 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(parse_cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let escaped = "35 24 0:30 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_cgroup2_mount(escaped), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(parse_cgroup2_mount("1 2 3:4 / /x rw - cgroup c rw\n"), None);
        assert_eq!(parse_cgroup2_mount("garbage\n\n - \n"), None);
    }

    #[test]
    fn rejects_escaping_and_control_file_names() {
        for bad in ["", "..", ".hidden", "a/b", "cgroup.procs", "x y", "a\0b", &"a".repeat(200)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["/abs", "../up", "a/../b", "a/./b", "", "a//b", "a/"] {
            assert!(check_relative(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(check_relative("sluice-agents").unwrap(), PathBuf::from("sluice-agents"));
        assert_eq!(
            check_relative("system.slice/sluice-agents.slice").unwrap(),
            PathBuf::from("system.slice/sluice-agents.slice")
        );
        check_name("sandbox-1_a.b@c:d").unwrap();
    }

    #[test]
    fn systemd_slice_nesting() {
        assert_eq!(systemd_slice_path("sluice-agents"), PathBuf::from("sluice.slice/sluice-agents.slice"));
        assert_eq!(systemd_slice_path("sluice-agents.slice"), PathBuf::from("sluice.slice/sluice-agents.slice"));
        assert_eq!(systemd_slice_path("agents"), PathBuf::from("agents.slice"));
        assert_eq!(systemd_slice_path("a-b-c"), PathBuf::from("a.slice/a-b.slice/a-b-c.slice"));
    }
}
