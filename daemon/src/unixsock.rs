//! Binding the Unix sockets sluice serves on (the daemon's local API, a gate's admin socket).
//!
//! One rule for both: a stale socket file left by a process that died is replaced; anything
//! else at the path (a regular file, a symlink) is refused rather than removed; a socket that
//! something still answers on is refused as in use, so a second daemon or gate cannot take over
//! the first one's socket. The mode is set right after binding.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use tokio::net::UnixListener;

/// Binds `path` with `mode`. `not_socket` ends the message when something else is at the path
/// (what to do), `in_use` when a live socket answers there (who holds it).
pub fn bind(path: &Path, mode: u32, not_socket: &str, in_use: &str) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; {not_socket}", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is in use: {in_use}", path.display())));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}
