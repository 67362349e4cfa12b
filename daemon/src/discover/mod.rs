//! The agent side of gates' catalogs (docs/catalogs.md, "How an agent's daemon verifies a gate"):
//! `sluice discover`, the verified catalog of each `[gates] hosts` host, and its refresh.
//!
//! **Owns** fetching a gate's documents through the daemon's own upstream path (full certificate
//! checks, the daemon's resolver and `static_hosts`; never through an agent's sandbox),
//! verifying them ([`verify`]), and the durable pins ([`pins`]). **Must not** decide requests:
//! the proxy asks [`GateCatalogs::offer`] for the verified catalog of a host and prices with it.
//!
//! **Invariants**: an offer is kept in memory only after it verified against the host's pin and
//! the new pin was written; a fetch that fails verification changes nothing (the last verified
//! offer stays in force) and is logged at error with the gate named.

pub mod pins;
pub mod verify;

#[cfg(test)]
mod tests;

use crate::catalog::GateId;
use crate::domain::DomainName;
use crate::proxy::upstream::{ProxyBody, Upstream};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use pins::Pins;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
pub use verify::{DiscoverError, ErrorKind, Offer};

/// How often every gate host's catalog is fetched again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// How long one document may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request to a gate waits for the gate's catalog when the daemon holds none.
pub const ENSURE_WAIT: Duration = Duration::from_secs(15);

/// The verified catalogs of gate hosts, and how to fetch them.
pub struct GateCatalogs {
    hosts: Vec<DomainName>,
    configured: HashMap<String, GateId>,
    pins: Pins,
    upstream: Option<Upstream>,
    offers: RwLock<HashMap<String, Arc<Offer>>>,
    /// The last refusal per host, for the reason of a blocked request.
    failures: RwLock<HashMap<String, String>>,
    /// One discovery at a time, so two cannot both move a pin.
    busy: tokio::sync::Mutex<()>,
}

impl GateCatalogs {
    /// `upstream`: the daemon's own client (`None` in tests that give documents directly).
    pub fn new(
        hosts: Vec<DomainName>,
        configured: Vec<(DomainName, GateId)>,
        state_dir: &std::path::Path,
        upstream: Option<Upstream>,
    ) -> GateCatalogs {
        GateCatalogs {
            hosts,
            configured: configured.into_iter().map(|(h, id)| (h.as_str().to_string(), id)).collect(),
            pins: Pins::open(state_dir),
            upstream,
            offers: RwLock::default(),
            failures: RwLock::default(),
            busy: tokio::sync::Mutex::new(()),
        }
    }

    pub fn is_gate(&self, host: &DomainName) -> bool {
        self.hosts.contains(host)
    }

    /// The verified offer of `host`, if one was fetched.
    pub fn offer(&self, host: &str) -> Option<Arc<Offer>> {
        self.offers.read().ok().and_then(|m| m.get(host).cloned())
    }

    /// Why there is no verified offer for `host` (the last refusal), if known.
    pub fn failure(&self, host: &str) -> Option<String> {
        self.failures.read().ok().and_then(|m| m.get(host).cloned())
    }

    /// Every verified offer, by host.
    pub fn offers(&self) -> Vec<Arc<Offer>> {
        let mut v: Vec<Arc<Offer>> = self.offers.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
        v.sort_by(|a, b| a.host.cmp(&b.host));
        v
    }

    /// Fetches and verifies `url` (`https://HOST[:PORT]`) with `src`, then pins and keeps it.
    pub async fn discover_with(&self, url: &str, src: &dyn verify::Source) -> Result<Arc<Offer>, DiscoverError> {
        let (host, base) = parse_url(url).map_err(|message| DiscoverError {
            host: url.to_string(),
            kind: ErrorKind::Invalid,
            message,
        })?;
        let _one = self.busy.lock().await;
        let result = self.discover_locked(&host, &base, src).await;
        match &result {
            Ok(offer) => {
                if let Ok(mut f) = self.failures.write() {
                    f.remove(&host);
                }
                tracing::info!(gate = %host, gate_id = %offer.gate_id.as_str(), catalog_version = ?offer.current().map(|c| c.snapshot.version), first_use = offer.first_use, "gate catalog verified");
            }
            Err(e) => {
                if let Ok(mut f) = self.failures.write() {
                    f.insert(host.clone(), e.to_string());
                }
                tracing::error!(gate = %host, kind = e.kind.as_str(), error = %e, "gate catalog refused");
            }
        }
        result
    }

    async fn discover_locked(
        &self,
        host: &str,
        base: &str,
        src: &dyn verify::Source,
    ) -> Result<Arc<Offer>, DiscoverError> {
        let fail = |kind, message: String| DiscoverError { host: host.to_string(), kind, message };
        let prior = self.pins.get(host).map_err(|e| fail(ErrorKind::Invalid, e))?;
        let configured = self.configured.get(host);
        let offer = verify::discover(src, host, base, prior.as_ref(), configured, chrono::Utc::now()).await?;
        self.pins
            .put(host, offer.pin())
            .map_err(|e| fail(ErrorKind::Invalid, format!("the verified offer cannot be pinned: {e}")))?;
        let offer = Arc::new(offer);
        if let Ok(mut m) = self.offers.write() {
            m.insert(host.to_string(), offer.clone());
        }
        Ok(offer)
    }

    /// Fetches `url` through the daemon's own upstream path.
    pub async fn discover(&self, url: &str) -> Result<Arc<Offer>, DiscoverError> {
        let Some(upstream) = &self.upstream else {
            return Err(DiscoverError {
                host: url.to_string(),
                kind: ErrorKind::Unreachable,
                message: "this daemon has no upstream path (passport-only mode)".into(),
            });
        };
        let base = parse_url(url).map(|(_, b)| b).unwrap_or_default();
        let src = Remote { upstream, base };
        self.discover_with(url, &src).await
    }

    /// Fetches every gate host's catalog again (the URL pinned for it, else `https://HOST`).
    pub async fn refresh_all(&self) {
        for host in &self.hosts {
            let url = match self.pins.get(host.as_str()) {
                Ok(Some(p)) => p.url,
                _ => format!("https://{}", host.as_str()),
            };
            let _ = self.discover(&url).await;
        }
    }

    /// Refreshes every gate host at once, then every [`REFRESH_EVERY`] (the proxy plane runs
    /// it as one of its tasks). Nothing to do without gate hosts.
    pub async fn refresh_loop(self: Arc<Self>) {
        if self.hosts.is_empty() {
            return;
        }
        let mut every = tokio::time::interval(REFRESH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.refresh_all().await;
        }
    }

    /// The offer of `host`, fetching it now when there is none (a request to a gate found none):
    /// waits for a discovery under way, then fetches from the pinned URL (else `https://HOST`).
    /// `None` when it cannot be had within [`ENSURE_WAIT`]; the reason is [`Self::failure`].
    pub async fn ensure(&self, host: &DomainName) -> Option<Arc<Offer>> {
        if let Some(o) = self.offer(host.as_str()) {
            return Some(o);
        }
        let fetch = async {
            let url = match self.pins.get(host.as_str()) {
                Ok(Some(p)) => p.url,
                _ => format!("https://{}", host.as_str()),
            };
            {
                // A discovery under way (the refresh) may bring it.
                let _wait = self.busy.lock().await;
            }
            match self.offer(host.as_str()) {
                Some(o) => Some(o),
                None => self.discover(&url).await.ok(),
            }
        };
        tokio::time::timeout(ENSURE_WAIT, fetch).await.ok().flatten()
    }
}

/// `https://HOST[:PORT]` (a trailing `/` allowed, nothing else) → (host, base URL).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url:?}: a gate is discovered over https:// only"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{url:?}: give the gate's origin only (https://HOST[:PORT])"));
    }
    let authority = uri.authority().ok_or_else(|| format!("{url:?} names no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{url:?}: no user information in a gate URL"));
    }
    let host = DomainName::parse(authority.host()).map_err(|e| format!("{url:?}: {e}"))?;
    let base = match authority.port_u16() {
        Some(p) if p != 443 => format!("https://{}:{p}", host.as_str()),
        _ => format!("https://{}", host.as_str()),
    };
    Ok((host.as_str().to_string(), base))
}

/// A gate's documents over the daemon's upstream client.
struct Remote<'a> {
    upstream: &'a Upstream,
    base: String,
}

impl verify::Source for Remote<'_> {
    fn get<'a>(&'a self, path: &'a str, max: usize) -> verify::BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let body: ProxyBody = Empty::<Bytes>::new().map_err(|never| match never {}).boxed();
            let req = http::Request::get(format!("{}{path}", self.base))
                .header(http::header::ACCEPT, "application/json")
                .body(body)
                .map_err(|e| e.to_string())?;
            let fetch = async {
                let resp = self.upstream.send(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let mut body = resp.into_body();
                let mut bytes = Vec::new();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| format!("the answer cannot be read: {e}"))?;
                    if let Ok(data) = frame.into_data() {
                        if bytes.len().saturating_add(data.len()) > max {
                            return Err(format!("the answer is larger than {max} bytes"));
                        }
                        bytes.extend_from_slice(&data);
                    }
                }
                if !status.is_success() {
                    let detail = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
                    return Err(format!("answered {status}: {detail}"));
                }
                Ok(bytes)
            };
            tokio::time::timeout(FETCH_TIMEOUT, fetch)
                .await
                .map_err(|_| format!("no answer within {} s", FETCH_TIMEOUT.as_secs()))?
        })
    }
}
