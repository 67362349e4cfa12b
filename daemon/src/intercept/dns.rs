//! Who is asking the agents' resolver, and which names they may resolve.
//!
//! * **DNS over TCP** comes through the kernel redirect like any TCP connection, so the
//!   connection table names the sandbox's cgroup, hence its passport: answers follow exactly that
//!   passport's `core:scope:domain_allowlist`.
//! * **DNS over UDP** has no connection-table entry (the kernel records TCP connections only;
//!   see `ebpf/README.md`). Until an egress-side record of UDP sources exists, a UDP query is
//!   answered for a name if the passport of *any* live sandbox allows it. What this leaks is
//!   small and stated: a sandbox can learn that a name another sandbox's passport allows
//!   resolves (to a synthetic address that leads only back to the proxy). It cannot reach that
//!   name: every request is decided on the connection's own passport. A query from a host with
//!   no live sandbox gets no answer at all.
//!
//! Host-wide `deny_domains` apply to every sandbox. Refused names are attested (`dns_denied`
//! host records), at most once per name and transport per minute, so a flood of queries cannot
//! turn into a flood of durable writes.

use crate::decide::CompiledPassport;
use crate::dns::{Allow, Via};
use crate::domain::DomainName;
use crate::kernel::Conntable;
use crate::policy::{HostVerdict, PolicyHandle};
use crate::service::Service;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One `dns_denied` record per (name, transport) per this interval.
const AUDIT_INTERVAL: Duration = Duration::from_secs(60);
const AUDIT_ENTRIES: usize = 4096;

pub struct Identity {
    service: Arc<Service>,
    policy: Arc<PolicyHandle>,
    conntable: Arc<Conntable>,
    recent: Mutex<HashMap<(DomainName, bool), Instant>>,
}

/// Does this passport's allowlist cover `name`? (No allowlist: every name.)
pub fn passport_allows(cp: &CompiledPassport, name: &DomainName) -> bool {
    match &cp.passport.claims.constraints.domain_allowlist {
        None => true,
        Some(list) => list.iter().any(|p| p.matches(name)),
    }
}

impl Identity {
    pub fn new(service: Arc<Service>, policy: Arc<PolicyHandle>, conntable: Arc<Conntable>) -> Identity {
        Identity { service, policy, conntable, recent: Mutex::new(HashMap::new()) }
    }

    /// The allow-function for a query from `peer`; `None` drops the query unanswered.
    pub fn allow_for(self: &Arc<Self>, peer: SocketAddr, via: Via) -> Option<Allow> {
        let passports: Vec<Arc<CompiledPassport>> = match via {
            Via::Tcp => {
                let orig = self.conntable.lookup(peer)?;
                vec![self.service.passport_for_cgroup(orig.cgroup_id)?]
            }
            Via::Udp => self.live_passports(),
        };
        if passports.is_empty() {
            return None;
        }
        let this = self.clone();
        Some(Arc::new(move |name: &DomainName| {
            let host_ok = this.policy.current().host_check(name, 0) == HostVerdict::Allow;
            let ok = host_ok && passports.iter().any(|cp| passport_allows(cp, name));
            if !ok {
                this.audit_denied(name, via, &passports);
            }
            ok
        }))
    }

    fn live_passports(&self) -> Vec<Arc<CompiledPassport>> {
        let Ok(list) = self.service.sandboxes() else { return Vec::new() };
        let mut ids: Vec<&str> = list
            .get("sandboxes")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.get("passport_id").and_then(Value::as_str)).collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter().filter_map(|id| self.service.passport(id)).collect()
    }

    fn audit_denied(&self, name: &DomainName, via: Via, passports: &[Arc<CompiledPassport>]) {
        let now = Instant::now();
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let key = (name.clone(), via == Via::Tcp);
            if recent.get(&key).is_some_and(|t| now.duration_since(*t) < AUDIT_INTERVAL) {
                return;
            }
            if recent.len() >= AUDIT_ENTRIES {
                recent.retain(|_, t| now.duration_since(*t) < AUDIT_INTERVAL);
                if recent.len() >= AUDIT_ENTRIES {
                    return; // flooded: the records already written say enough
                }
            }
            recent.insert(key, now);
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let service = self.service.clone();
        let ids: Vec<String> = passports.iter().map(|cp| cp.id().to_string()).collect();
        let detail = json!({
            "name": name.to_string(),
            "via": if via == Via::Tcp { "tcp" } else { "udp" },
            "passport_ids": ids,
            "answer": "NXDOMAIN",
        });
        tracing::info!(%name, ?via, "agent DNS query for a name no passport allows: NXDOMAIN");
        handle.spawn(async move {
            if let Err(e) = service.record_host_event("dns_denied", detail).await {
                tracing::warn!(error = %e, "could not record a DNS denial");
            }
        });
    }
}
