//! Small files sluice writes once or replaces whole (keys, passports, exports, certificates), and
//! bounded reads of files a person names.
//!
//! [`create_new`] never overwrites and never exposes half a file: the bytes go to a temporary
//! sibling opened with `O_CREAT | O_EXCL | O_NOFOLLOW` and the final mode, are fsynced, and the
//! temporary is then hard-linked to the final name. `link(2)` fails if the name exists in any form
//! (file, directory, symlink, dangling or not), so the final name is created exclusively and
//! nothing at it is followed. The directory is fsynced last, so the file survives a crash once the
//! call returned. A crash before the link leaves only a hidden `.NAME.*.tmp` sibling behind.
//!
//! [`NewFile`] is [`create_new`] for a file written in parts as they arrive (an audit export):
//! the name appears only at [`NewFile::commit`], and a file dropped before that leaves nothing.
//!
//! [`replace`] does the same with `rename(2)`, for public files that are regenerated whole (the
//! CA certificate, the agents' trust bundle).
//!
//! [`open`] and [`read_text`] refuse what is not a regular file (without blocking on a FIFO) and
//! read at most a caller-chosen number of bytes; [`Links::Refuse`] also refuses a symlink at the
//! last component (the daemon's own state directory).

use std::fs::{File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Whether a symlink at the last component of a path is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Paths a person names on the command line or in the config.
    Follow,
    /// Files in the daemon's state directory: nobody may point them elsewhere.
    Refuse,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: no such file", path = .path.display())]
    NotFound { path: PathBuf },
    #[error("{path}: already exists; refusing to overwrite it (move it away or choose another path)", path = .path.display())]
    Exists { path: PathBuf },
    #[error("{path}: is a symbolic link, which sluice does not follow here; put the file itself at this path", path = .path.display())]
    Symlink { path: PathBuf },
    #[error("{path}: not a regular file (a directory, device or pipe); name the file itself", path = .path.display())]
    NotRegular { path: PathBuf },
    #[error("{path}: larger than {max} bytes; this is not the file sluice expects here", path = .path.display())]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path}: not UTF-8 text; this is not the file sluice expects here", path = .path.display())]
    NotText { path: PathBuf },
    #[error("{path}: {action}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io { path: path.to_path_buf(), action, source }
}

/// Creates `path` holding `bytes` with exactly `mode` (the umask does not apply), failing with
/// [`FileError::Exists`] if anything is at that name. See the module docs.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let tmp = write_temporary(path, bytes, mode)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(FileError::Exists { path: path.to_path_buf() }),
        Err(e) => Err(io(path, "link the new file into place")(e)),
    }
}

/// A file written in parts that appears at its name only once complete, exactly as
/// [`create_new`] makes it (a hidden temporary sibling, fsynced, hard-linked into place). Dropped
/// before [`NewFile::commit`] (an error midway), it leaves nothing behind.
pub struct NewFile {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl NewFile {
    /// Starts `path`, failing early with [`FileError::Exists`] if something is already there
    /// (checked again, exclusively, at [`NewFile::commit`]).
    pub fn create(path: &Path, mode: u32) -> Result<NewFile, FileError> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(FileError::Exists { path: path.to_path_buf() });
        }
        let (file, tmp) = open_temporary(path, mode)?;
        Ok(NewFile { file, tmp, path: path.to_path_buf(), committed: false })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), FileError> {
        self.file.write_all(bytes).map_err(io(&self.path, "write"))
    }

    /// Syncs the file and links it into place.
    pub fn commit(mut self) -> Result<(), FileError> {
        self.file.sync_all().map_err(io(&self.path, "write"))?;
        let linked = std::fs::hard_link(&self.tmp, &self.path);
        let _ = std::fs::remove_file(&self.tmp);
        self.committed = true;
        match linked {
            Ok(()) => sync_parent(&self.path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(FileError::Exists { path: self.path.clone() })
            }
            Err(e) => Err(io(&self.path, "link the new file into place")(e)),
        }
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` with exactly `mode`, replacing whatever file was there in one step.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let tmp = write_temporary(path, bytes, mode)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, "rename the new file into place")(e));
    }
    sync_parent(path)
}

/// A fresh hidden sibling of `path` holding `bytes`, fsynced; removed again on any error.
fn write_temporary(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, FileError> {
    let (mut file, tmp) = open_temporary(path, mode)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, "write")(e));
    }
    Ok(tmp)
}

/// A fresh hidden sibling of `path`, empty, with exactly `mode`.
fn open_temporary(path: &Path, mode: u32) -> Result<(File, PathBuf), FileError> {
    let name = path.file_name().ok_or_else(|| FileError::NotRegular { path: path.to_path_buf() })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{:016x}.tmp", std::process::id(), rand::random::<u64>()));
    let tmp = path.with_file_name(tmp_name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io(path, "create"))?;
    if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, "write")(e));
    }
    Ok((file, tmp))
}

fn sync_parent(path: &Path) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "fsync the directory"))
}

/// An open regular file and its metadata (from the open descriptor, so it is the file read).
#[derive(Debug)]
pub struct Opened {
    file: File,
    path: PathBuf,
    pub meta: Metadata,
}

/// Opens `path` for reading if it is a regular file.
pub fn open(path: &Path, links: Links) -> Result<Opened, FileError> {
    // O_NONBLOCK: opening a FIFO must not hang; it is refused below like any non-regular file.
    let mut flags = libc::O_NONBLOCK;
    if links == Links::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    let file = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FileError::NotFound { path: path.to_path_buf() })
        }
        Err(e) if links == Links::Refuse && e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(FileError::Symlink { path: path.to_path_buf() })
        }
        Err(e) => return Err(io(path, "open")(e)),
    };
    let meta = file.metadata().map_err(io(path, "stat"))?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular { path: path.to_path_buf() });
    }
    Ok(Opened { file, path: path.to_path_buf(), meta })
}

impl Opened {
    /// The open file, to read as a stream.
    pub fn into_file(self) -> File {
        self.file
    }

    /// The whole file as text, at most `max` bytes. The buffer is zeroed when dropped (it may
    /// hold a private key) and sized up front, so no copy is left behind by a reallocation.
    pub fn read_text(self, max: u64) -> Result<Zeroizing<String>, FileError> {
        let path = self.path;
        if self.meta.len() > max {
            return Err(FileError::TooLarge { path, max });
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(self.meta.len() as usize + 1));
        self.file.take(max + 1).read_to_end(&mut bytes).map_err(io(&path, "read"))?;
        if bytes.len() as u64 > max {
            return Err(FileError::TooLarge { path, max });
        }
        match std::str::from_utf8(&bytes) {
            Ok(s) => Ok(Zeroizing::new(s.to_owned())),
            Err(_) => Err(FileError::NotText { path }),
        }
    }
}

/// Reads a regular text file of at most `max` bytes.
pub fn read_text(path: &Path, max: u64, links: Links) -> Result<Zeroizing<String>, FileError> {
    open(path, links)?.read_text(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn create_new_writes_the_exact_mode_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        create_new(&path, b"one", 0o644).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
        assert!(matches!(create_new(&path, b"two", 0o600), Err(FileError::Exists { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        // No temporary is left behind, in success or failure.
        assert_eq!(names(dir.path()), ["f"]);
    }

    #[test]
    fn a_file_written_in_parts_appears_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.json");
        let mut f = NewFile::create(&path, 0o644).unwrap();
        f.write(b"{\"a\":").unwrap();
        f.write(b"1}").unwrap();
        assert!(!path.exists(), "visible before it is complete");
        f.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
        assert!(matches!(NewFile::create(&path, 0o644), Err(FileError::Exists { .. })));
        // Abandoned midway (an error while downloading): nothing is left.
        let other = dir.path().join("partial.json");
        let mut f = NewFile::create(&other, 0o644).unwrap();
        f.write(b"{\"records\":[").unwrap();
        drop(f);
        assert_eq!(names(dir.path()), ["export.json"]);
        // Something created at the name meanwhile is not overwritten.
        let raced = dir.path().join("raced.json");
        let mut f = NewFile::create(&raced, 0o644).unwrap();
        f.write(b"ours").unwrap();
        std::fs::write(&raced, b"theirs").unwrap();
        assert!(matches!(f.commit(), Err(FileError::Exists { .. })));
        assert_eq!(std::fs::read(&raced).unwrap(), b"theirs");
        assert_eq!(names(dir.path()), ["export.json", "raced.json"]);
    }

    #[test]
    fn create_new_does_not_follow_a_symlink_even_a_dangling_one() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(create_new(&link, b"secret", 0o600), Err(FileError::Exists { .. })));
        assert!(!target.exists(), "the write went through the symlink");
        // Nor into a directory of that name.
        std::fs::create_dir(dir.path().join("d")).unwrap();
        assert!(matches!(create_new(&dir.path().join("d"), b"x", 0o600), Err(FileError::Exists { .. })));
    }

    #[test]
    fn create_new_names_the_path_when_the_directory_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/f");
        let e = create_new(&path, b"x", 0o600).unwrap_err();
        assert!(matches!(e, FileError::Io { action: "create", .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn replace_swaps_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        replace(&path, b"one", 0o644).unwrap();
        replace(&path, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["f"]);
    }

    #[test]
    fn reads_are_bounded_and_refuse_what_is_not_a_regular_text_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "hello").unwrap();
        assert_eq!(read_text(&path, 5, Links::Refuse).unwrap().as_str(), "hello");
        assert!(matches!(read_text(&path, 4, Links::Follow), Err(FileError::TooLarge { max: 4, .. })));
        assert!(matches!(read_text(&dir.path().join("nope"), 9, Links::Follow), Err(FileError::NotFound { .. })));
        assert!(matches!(read_text(dir.path(), 9, Links::Follow), Err(FileError::NotRegular { .. })));
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_text(&path, 9, Links::Follow), Err(FileError::NotText { .. })));
        // A FIFO is refused at once rather than blocking the reader.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(read_text(&fifo, 9, Links::Follow), Err(FileError::NotRegular { .. })));
        // Links are followed or refused as asked.
        let link = dir.path().join("link");
        std::fs::write(&path, "hello").unwrap();
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(read_text(&link, 9, Links::Follow).unwrap().as_str(), "hello");
        assert!(matches!(read_text(&link, 9, Links::Refuse), Err(FileError::Symlink { .. })));
    }
}
