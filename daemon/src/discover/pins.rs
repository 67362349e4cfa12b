//! What the daemon pinned per gate host (`state_dir/gate-pins.json`): the gate key, the newest
//! catalog version accepted and its content hash, and the newest checkpoint of the gate's log.
//! Written whole and atomically (a temporary file renamed over the old one), mode 0600, after
//! every verified fetch that moved it. A damaged file stops the daemon from trusting any gate
//! (each fetch is refused, naming the file) rather than silently pinning again on first use.

use crate::files::{self, Links};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const FILE: &str = "gate-pins.json";
pub const FORMAT: &str = "sluice-gate-pins/v1";
/// Largest pin file read, and most hosts in it.
const MAX_BYTES: u64 = 4 << 20;
const MAX_HOSTS: usize = 4096;

/// One host's pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPin {
    /// The base URL it was fetched from (`https://host[:port]`), which the refresh uses.
    pub url: String,
    pub gate_id: String,
    /// `None`: the gate declared no catalog.
    pub catalog_version: Option<u64>,
    pub content_hash: Option<String>,
    /// The newest checkpoint of the gate's log seen (signed note).
    pub checkpoint: String,
    /// When this pin was last moved (RFC 3339).
    pub pinned_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinFile {
    format: String,
    gates: BTreeMap<String, HostPin>,
}

/// The pins, in memory and on disk.
pub struct Pins {
    path: PathBuf,
    /// `Err`: the file is damaged (the message names it).
    map: Mutex<Result<BTreeMap<String, HostPin>, String>>,
}

impl Pins {
    /// Reads `state_dir/gate-pins.json` (none yet: no pins).
    pub fn open(state_dir: &Path) -> Pins {
        let path = state_dir.join(FILE);
        let map = read(&path);
        if let Err(e) = &map {
            tracing::error!(error = %e, "gate pins unreadable: every gate's catalog is refused until the file is fixed or removed");
        }
        Pins { path, map: Mutex::new(map) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pin of `host`; `Err` when the file is damaged.
    pub fn get(&self, host: &str) -> Result<Option<HostPin>, String> {
        let map = self.map.lock().map_err(|_| "the gate pins' lock is poisoned".to_string())?;
        match &*map {
            Ok(m) => Ok(m.get(host).cloned()),
            Err(e) => Err(e.clone()),
        }
    }

    /// Stores `pin` for `host`, durably, before it is used.
    pub fn put(&self, host: &str, pin: HostPin) -> Result<(), String> {
        let mut map = self.map.lock().map_err(|_| "the gate pins' lock is poisoned".to_string())?;
        let current = match &*map {
            Ok(m) => m,
            Err(e) => return Err(e.clone()),
        };
        if current.get(host) == Some(&pin) {
            return Ok(());
        }
        let mut next = current.clone();
        next.insert(host.to_string(), pin);
        if next.len() > MAX_HOSTS {
            return Err(format!("{}: more than {MAX_HOSTS} gates pinned", self.path.display()));
        }
        let doc = PinFile { format: FORMAT.into(), gates: next.clone() };
        let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
        files::replace(&self.path, &bytes, 0o600).map_err(|e| format!("{}: cannot write: {e}", self.path.display()))?;
        *map = Ok(next);
        Ok(())
    }
}

fn read(path: &Path) -> Result<BTreeMap<String, HostPin>, String> {
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let text = files::read_text(path, MAX_BYTES, Links::Refuse).map_err(|e| format!("{}: {e}", path.display()))?;
    let doc: PinFile = serde_json::from_str(&text).map_err(|e| {
        format!("{}: not a gate pin file ({e}); remove it to pin every gate again on first use", path.display())
    })?;
    if doc.format != FORMAT || doc.gates.len() > MAX_HOSTS {
        return Err(format!("{}: not a {FORMAT} file of at most {MAX_HOSTS} gates", path.display()));
    }
    Ok(doc.gates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(v: u64) -> HostPin {
        HostPin {
            url: "https://g.test".into(),
            gate_id: "gate_x".into(),
            catalog_version: Some(v),
            content_hash: Some("sha256:00".into()),
            checkpoint: "cp".into(),
            pinned_at: "2026-12-02T00:00:00Z".into(),
        }
    }

    #[test]
    fn pins_survive_a_restart_and_a_damaged_file_refuses_all() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::open(dir.path());
        assert_eq!(pins.get("g.test").unwrap(), None);
        pins.put("g.test", pin(2)).unwrap();
        let again = Pins::open(dir.path());
        assert_eq!(again.get("g.test").unwrap(), Some(pin(2)));
        std::fs::write(dir.path().join(FILE), b"{\"format\":\"sluice-gate-pins/v1\",\"gates\":{},\"x\":1}").unwrap();
        let damaged = Pins::open(dir.path());
        let e = damaged.get("g.test").unwrap_err();
        assert!(e.contains(FILE) && e.contains("remove it"), "{e}");
        assert!(damaged.put("g.test", pin(3)).is_err());
    }
}
