//! Uninstalling the redirect: what is pinned under a pin directory, which processes still use it,
//! and removing it. Used by `sluice detach` (an operator, the package's removal) and by the
//! tests' cleanup ([`super::detach_and_unpin`]).
//!
//! Removing a pinned link detaches its program from the cgroup (the daemon keeps no link fds), so
//! from then on the agents' connections and DNS queries go out directly. That is why the survey
//! comes first: the caller shows exactly what will go and who still uses it.
//!
//! The pin directory comes from a configuration file and the code runs as root, so nothing is
//! trusted: the directory must be on bpffs and hold sluice's layout only (`links/`, `v<N>/`, pins
//! in them; `pin_dir = "/sys/fs/bpf"` would otherwise take every other program's pins with it),
//! symbolic links are removed, never followed, and the number of pins is bounded.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{sys, KernelError};

/// More pins than this under a pin directory is not sluice's layout (about 20 files).
const MAX_ENTRIES: usize = 4096;

/// What one pinned file is, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinKind {
    /// A bpf_link: removing its last pin detaches `prog_id` from the cgroup `cgroup_id` (0 when
    /// that cgroup is gone, or the link is not a cgroup link).
    Link {
        link_id: u32,
        prog_id: u32,
        cgroup_id: u64,
    },
    Map {
        map_id: u32,
    },
    Program {
        prog_id: u32,
    },
    /// Not a bpf object this code can open (a symlink, a stray file, a pin it may not read).
    Other,
}

/// One pinned file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub path: PathBuf,
    pub kind: PinKind,
}

/// A process other than this one holding a pinned map, a program a pinned link runs, or a
/// pinned link: a running daemon, normally.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    pub pid: u32,
    /// `/proc/PID/comm`, for the message.
    pub comm: String,
}

/// Everything under a pin directory, found by [`PinnedState::survey`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedState {
    pub pin_dir: PathBuf,
    /// Every pinned file, links first (removal order: programs are detached before their maps go).
    pub pins: Vec<Pin>,
    /// The layout's directories (`links`, `v<N>`); see [`PinnedState::dirs_to_remove`].
    pub dirs: Vec<PathBuf>,
}

fn pin_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> KernelError + 'a {
    move |source| KernelError::Pin { path: path.to_owned(), op, source }
}

fn invalid(path: &Path, op: &'static str, what: String) -> KernelError {
    KernelError::Pin { path: path.to_owned(), op, source: io::Error::new(io::ErrorKind::InvalidData, what) }
}

/// Checks that `pin_dir` is a real directory (not a symlink) on bpffs; returns its device.
fn check_pin_dir(pin_dir: &Path) -> Result<Option<u64>, KernelError> {
    let meta = match fs::symlink_metadata(pin_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(pin_err(pin_dir, "stat")(e)),
    };
    if meta.file_type().is_symlink() {
        return Err(invalid(
            pin_dir,
            "check",
            "is a symbolic link; refusing to follow it (name the real directory)".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(invalid(pin_dir, "check", "is not a directory".into()));
    }
    if sys::fs_type(pin_dir).map_err(pin_err(pin_dir, "statfs"))? != sys::BPF_FS_MAGIC {
        return Err(KernelError::NotBpffs { path: pin_dir.to_owned() });
    }
    Ok(Some(meta.dev()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(pin_err(dir, "read_dir"))? {
        out.push(entry.map_err(pin_err(dir, "read_dir"))?.path());
    }
    out.sort();
    Ok(out)
}

fn not_ours(path: &Path) -> KernelError {
    invalid(
        path,
        "survey",
        "is not part of sluice's pin layout (links/ and v<N>/, holding pins): nothing was removed; check \
         [sandbox] pin_dir, or remove what is not sluice's by hand"
            .into(),
    )
}

/// `key:\tvalue` lines of an fdinfo file.
fn fdinfo_u64(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().parse().ok())
}

/// Opens a pin and asks the kernel what it is.
fn classify(path: &Path) -> PinKind {
    let Ok(fd) = sys::obj_get(path) else {
        return PinKind::Other;
    };
    let Ok(info) = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())) else {
        return PinKind::Other;
    };
    let id = |key| fdinfo_u64(&info, key).and_then(|v| u32::try_from(v).ok());
    if let (Some(link_id), Some(prog_id)) = (id("link_id"), id("prog_id")) {
        let cgroup_id = sys::link_info(fd.as_fd())
            .ok()
            .filter(|i| i.link_type == sys::LINK_TYPE_CGROUP)
            .map(|i| i.cgroup_id)
            .unwrap_or(0);
        return PinKind::Link { link_id, prog_id, cgroup_id };
    }
    if let Some(map_id) = id("map_id") {
        return PinKind::Map { map_id };
    }
    if let Some(prog_id) = id("prog_id") {
        return PinKind::Program { prog_id };
    }
    PinKind::Other
}

impl PinnedState {
    /// What is pinned under `pin_dir`; `None` when it does not exist. Changes nothing. Fails if
    /// `pin_dir` is not a directory on bpffs, or holds more than sluice ever pins.
    pub fn survey(pin_dir: &Path) -> Result<Option<PinnedState>, KernelError> {
        let Some(dev) = check_pin_dir(pin_dir)? else {
            return Ok(None);
        };
        let mut state = PinnedState { pin_dir: pin_dir.to_owned(), pins: Vec::new(), dirs: Vec::new() };
        state.walk(dev)?;
        // Links first (each removal detaches a program), then maps and the rest.
        state.pins.sort_by_key(|p| (!matches!(p.kind, PinKind::Link { .. }), p.path.clone()));
        Ok(Some(state))
    }

    /// Reads sluice's layout and nothing else: `pin_dir/links/*` and `pin_dir/v<N>/*`, files or
    /// symlinks only. Anything else means `pin_dir` is not (only) sluice's (`/sys/fs/bpf` itself,
    /// say, where other software pins): refused, naming the entry, before anything is removed.
    fn walk(&mut self, dev: u64) -> Result<(), KernelError> {
        let mut entries = 0;
        for sub in sorted_entries(&self.pin_dir)? {
            let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let is_layout = name == "links"
                || (name.len() > 1 && name.starts_with('v') && name[1..].bytes().all(|b| b.is_ascii_digit()));
            let meta = fs::symlink_metadata(&sub).map_err(pin_err(&sub, "stat"))?;
            if !is_layout || !meta.is_dir() || meta.dev() != dev {
                return Err(not_ours(&sub));
            }
            for path in sorted_entries(&sub)? {
                entries += 1;
                if entries > MAX_ENTRIES {
                    return Err(invalid(
                        &self.pin_dir,
                        "survey",
                        format!("more than {MAX_ENTRIES} pins: not a sluice pin directory"),
                    ));
                }
                let meta = match fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(pin_err(&path, "stat")(e)),
                };
                let kind = if meta.is_dir() {
                    return Err(not_ours(&path));
                } else if meta.file_type().is_symlink() {
                    PinKind::Other
                } else {
                    classify(&path)
                };
                self.pins.push(Pin { path, kind });
            }
            self.dirs.push(sub);
        }
        Ok(())
    }

    /// The directories [`PinnedState::remove`] removes, after the pins: the layout's, then
    /// `pin_dir` itself unless it is a mount point (bpffs itself), which stays.
    pub fn dirs_to_remove(&self) -> Vec<&Path> {
        let is_mount = match (fs::metadata(&self.pin_dir), self.pin_dir.parent().map(fs::metadata)) {
            (Ok(d), Some(Ok(p))) => d.dev() != p.dev(),
            _ => false,
        };
        let mut dirs: Vec<&Path> = self.dirs.iter().map(PathBuf::as_path).collect();
        if !is_mount {
            dirs.push(&self.pin_dir);
        }
        dirs
    }

    /// `true` when nothing but (empty) directories is pinned.
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    /// The pinned links.
    pub fn links(&self) -> impl Iterator<Item = &Pin> {
        self.pins.iter().filter(|p| matches!(p.kind, PinKind::Link { .. }))
    }

    /// Processes other than this one that hold one of the pinned maps or links, or a program a
    /// pinned link runs (read from `/proc/*/fdinfo`; needs root to see other users' processes).
    /// A running daemon holds its programs and maps for its whole life, whatever its socket or
    /// configuration file.
    pub fn holders(&self) -> Vec<Holder> {
        let mut maps = BTreeSet::new();
        let mut progs = BTreeSet::new();
        let mut links = BTreeSet::new();
        for p in &self.pins {
            match p.kind {
                PinKind::Link { link_id, prog_id, .. } => {
                    links.insert(u64::from(link_id));
                    progs.insert(u64::from(prog_id));
                }
                PinKind::Map { map_id } => {
                    maps.insert(u64::from(map_id));
                }
                PinKind::Program { prog_id } => {
                    progs.insert(u64::from(prog_id));
                }
                PinKind::Other => {}
            }
        }
        if maps.is_empty() && progs.is_empty() && links.is_empty() {
            return Vec::new();
        }
        let me = std::process::id();
        let mut out = Vec::new();
        let Ok(procs) = fs::read_dir("/proc") else {
            return out;
        };
        for entry in procs.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let holds = |fd: &fs::DirEntry| -> bool {
                let Ok(target) = fs::read_link(fd.path()) else {
                    return false;
                };
                let (key, ids) = match target.to_str() {
                    Some("anon_inode:bpf-map") => ("map_id", &maps),
                    Some("anon_inode:bpf-prog") => ("prog_id", &progs),
                    Some("anon_inode:bpf_link") => ("link_id", &links),
                    _ => return false,
                };
                let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()));
                info.ok().and_then(|t| fdinfo_u64(&t, key)).is_some_and(|id| ids.contains(&id))
            };
            // A process that exits meanwhile, or that we may not inspect, is skipped.
            let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            if fds.flatten().any(|fd| holds(&fd)) {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned();
                out.push(Holder { pid, comm });
            }
        }
        out.sort();
        out
    }

    /// Removes every pin (links first: each removal detaches a program), then the directories and
    /// `pin_dir`, calling `removed` with each path as it goes. A pin already gone is skipped; a
    /// pin that appeared since the survey makes the final `rmdir` fail, naming the directory.
    pub fn remove(&self, mut removed: impl FnMut(&Path)) -> Result<(), KernelError> {
        // The directory is checked again: it could have been replaced since the survey.
        if check_pin_dir(&self.pin_dir)?.is_none() {
            return Ok(());
        }
        for pin in &self.pins {
            match fs::remove_file(&pin.path) {
                Ok(()) => removed(&pin.path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(&pin.path, "unpin")(e)),
            }
        }
        for dir in self.dirs_to_remove() {
            match fs::remove_dir(dir) {
                Ok(()) => removed(dir),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(dir, "rmdir")(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_fields_are_read_exactly() {
        let link = "pos:\t0\nflags:\t02000000\nmnt_id:\t15\nino:\t2049\nlink_type:\tcgroup\nlink_id:\t5\nprog_tag:\tabc\nprog_id:\t12\ncgroup_id:\t77\n";
        assert_eq!(fdinfo_u64(link, "link_id"), Some(5));
        assert_eq!(fdinfo_u64(link, "prog_id"), Some(12));
        assert_eq!(fdinfo_u64(link, "map_id"), None);
        // A key that is a prefix of another is not confused with it.
        assert_eq!(fdinfo_u64("prog_id_x:\t3\n", "prog_id"), None);
        assert_eq!(fdinfo_u64("map_id:\tnot-a-number\n", "map_id"), None);
    }

    #[test]
    fn a_pin_dir_off_bpffs_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("precious");
        fs::write(&victim, b"x").unwrap();
        let err = PinnedState::survey(dir.path()).unwrap_err();
        assert!(matches!(err, KernelError::NotBpffs { .. }), "{err}");
        assert!(super::super::detach_and_unpin(dir.path()).is_err());
        assert!(victim.exists());
    }

    #[test]
    fn a_symlinked_pin_dir_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("pins");
        std::os::unix::fs::symlink("/sys/fs/bpf", &link).unwrap();
        let err = PinnedState::survey(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn a_missing_pin_dir_is_nothing_to_remove() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(PinnedState::survey(&dir.path().join("absent")).unwrap(), None);
        super::super::detach_and_unpin(&dir.path().join("absent")).unwrap();
    }
}
