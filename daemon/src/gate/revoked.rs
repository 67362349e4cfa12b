//! The gate's revocation list: `state_dir/revoked`, one passport id per line (`#` comments),
//! read again whenever its size or modification time changes, so a revocation takes effect on
//! the next request without a restart. Checked on every request.
//!
//! Fail closed: a file that exists but cannot be read, is too large or names something that is
//! not a passport id makes every passport count as revoked until it is fixed (the error says
//! which line).

use crate::passport::{PassportId, Revocations};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// A revocation list larger than this is refused (about 200,000 ids).
const MAX_BYTES: u64 = 8 << 20;

pub struct RevokedFile {
    path: PathBuf,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    stamp: Option<(SystemTime, u64)>,
    ids: HashSet<String>,
    error: Option<String>,
}

impl RevokedFile {
    pub fn new(state_dir: &Path) -> RevokedFile {
        RevokedFile { path: state_dir.join("revoked"), cache: Mutex::new(Cache::default()) }
    }

    /// Is `id` revoked? `Err` when the list cannot be read (then every passport is refused).
    pub fn check(&self, id: &PassportId) -> Result<bool, String> {
        let mut cache = self.cache.lock().map_err(|_| "revocation list lock poisoned".to_string())?;
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        if stamp != cache.stamp {
            *cache = Cache { stamp, ..Cache::default() };
            if stamp.is_some() {
                match read(&self.path) {
                    Ok(ids) => cache.ids = ids,
                    Err(e) => cache.error = Some(e),
                }
            }
        }
        match &cache.error {
            Some(e) => Err(e.clone()),
            None => Ok(cache.ids.contains(id.as_str())),
        }
    }
}

fn read(path: &Path) -> Result<HashSet<String>, String> {
    let text = crate::files::read_text(path, MAX_BYTES, crate::files::Links::Follow)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut ids = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let id = PassportId::parse(line)
            .map_err(|p| format!("{} line {}: {line:?} is not a passport id: {p}", path.display(), i + 1))?;
        ids.insert(id.as_str().to_string());
    }
    Ok(ids)
}

/// The list as the verifier's [`Revocations`]: an unreadable list revokes everything.
pub struct AsRevocations<'a>(pub &'a RevokedFile);

impl Revocations for AsRevocations<'_> {
    fn is_revoked(&self, id: &PassportId) -> bool {
        self.0.check(id).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_again_when_the_file_changes_and_garbage_revokes_all() {
        let dir = tempfile::tempdir().unwrap();
        let r = RevokedFile::new(dir.path());
        let a = PassportId::random();
        let b = PassportId::random();
        assert_eq!(r.check(&a), Ok(false));
        std::fs::write(dir.path().join("revoked"), format!("# revoked\n{a}\n")).unwrap();
        assert_eq!(r.check(&a), Ok(true));
        assert_eq!(r.check(&b), Ok(false));
        std::fs::write(dir.path().join("revoked"), format!("{a}\n{b}  # key leaked\n")).unwrap();
        assert_eq!(r.check(&b), Ok(true));
        std::fs::write(dir.path().join("revoked"), "pp_nope\n").unwrap();
        let e = r.check(&b).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        assert!(AsRevocations(&r).is_revoked(&b));
    }
}
