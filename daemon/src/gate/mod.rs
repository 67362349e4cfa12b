//! The gate: sluice on a service's side (docs/gate.md).
//!
//! A gate stands in front of one service and checks every agent that arrives: its passport
//! (`sluice-passport`), its signed request (RFC 9421 through [`sig`]), the passport's own
//! constraints and counters and the gate's `[limits]` (`sluice-decide`), then records the decision
//! in its own Merkle log (`sluice-ledger`, signed by the gate key) before anything reaches the
//! service. It shares no code with the daemon's interception plane (`proxy`, the kernel).
//!
//! Modules, one job each, depending one way (`server` → `upstream`, `decide` → `records`, `sig`,
//! `config`, `revoked`):
//! - `config`: `gate.toml`, strict; routes, the anonymous subset, limits.
//! - `catalog`: publishing catalog versions, the history, the version in force, the price lock.
//! - `sig`: the one door to HTTP message signature verification.
//! - `revoked`: the revocation list in `state_dir`.
//! - `discovery`: the public documents: `/.well-known/sluice` and the catalogs.
//! - `decide`: the decision in two steps (outside the store, then inside its transaction).
//! - `records`: the gate's record and its chains.
//! - `server`: the HTTP(S) listener, the reverse proxy and `/check`.
//! - `upstream`: one request to the protected service.

pub mod admin;
pub mod catalog;
pub mod config;
pub mod decide;
pub mod discovery;
pub mod records;
pub mod revoked;
pub mod server;
pub mod sig;
pub mod upstream;

use crate::decide::{CompiledPassport, RuleCompileError};
use crate::ledger::{HostKey, Ledger, LedgerOptions};
use crate::passport::{b64, Passport};
use config::GateConfig;
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Compiled passports kept (by token digest); the cache starts over beyond this.
const MAX_COMPILED: usize = 4096;

/// The gate id: `gate_` + base64url of the raw gate public key.
pub fn gate_id(key: &VerifyingKey) -> String {
    format!("gate_{}", b64::encode(key.as_bytes()))
}

/// A configured gate: its configuration, key and revocation list.
pub struct Gate {
    pub config: GateConfig,
    pub gate_id: String,
    pub revoked: revoked::RevokedFile,
    /// The published catalog versions (loaded when the store is opened).
    pub catalogs: catalog::Catalogs,
    key: SigningKey,
    compiled: Mutex<HashMap<[u8; 32], Arc<CompiledPassport>>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("name", &self.config.name).field("gate_id", &self.gate_id).finish_non_exhaustive()
    }
}

impl Gate {
    /// Loads the gate key named by the configuration.
    pub fn new(config: GateConfig) -> anyhow::Result<Gate> {
        let key = crate::keyfile::load_signing_key(&config.key)
            .map_err(|e| anyhow::anyhow!("{}: key: {e}", config.source.display()))?;
        Ok(Gate::with_key(config, key))
    }

    pub fn with_key(config: GateConfig, key: SigningKey) -> Gate {
        Gate {
            gate_id: gate_id(&key.verifying_key()),
            revoked: revoked::RevokedFile::new(&config.state_dir),
            config,
            catalogs: catalog::Catalogs::default(),
            key,
            compiled: Mutex::new(HashMap::new()),
        }
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The gate's store: `state_dir/gate.redb` (log, counters, nonces), signed by the gate key.
    pub fn store_path(&self) -> PathBuf {
        self.config.state_dir.join("gate.redb")
    }

    /// Opens the gate's store. Only one process may hold it.
    pub fn open_ledger(&self) -> anyhow::Result<Ledger> {
        if !self.config.state_dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.config.state_dir)
                .map_err(|e| anyhow::anyhow!("{}: cannot create state_dir: {e}", self.config.state_dir.display()))?;
        }
        let host = HostKey::from_signing_key(self.key.clone());
        let ledger = Ledger::open(&self.store_path(), host, LedgerOptions::default()).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot open the gate's store: {e} (only one process may use it: is `sluice gate run` running on this config?)",
                self.store_path().display()
            )
        })?;
        self.catalogs.load(&ledger, &self.key)?;
        Ok(ledger)
    }

    /// The passport with its CEL rules compiled, from a cache keyed by the token's digest.
    pub fn compiled(&self, p: Passport) -> Result<Arc<CompiledPassport>, RuleCompileError> {
        let digest: [u8; 32] = Sha256::digest(p.token.as_bytes()).into();
        if let Some(c) = self.compiled.lock().ok().and_then(|m| m.get(&digest).cloned()) {
            return Ok(c);
        }
        let c = Arc::new(CompiledPassport::compile(p)?);
        if let Ok(mut m) = self.compiled.lock() {
            if m.len() >= MAX_COMPILED {
                m.clear();
            }
            m.insert(digest, c.clone());
        }
        Ok(c)
    }
}
