//! Who is asking the agents' resolver, and which names they may resolve.
//!
//! Every query is answered for exactly one passport: the one bound to the sandbox that sent it.
//! * **DNS over TCP** comes through the kernel redirect like any TCP connection: the connection
//!   table names the client's cgroup.
//! * **DNS over UDP**: the egress program records each UDP packet's source (address, port) to
//!   the resolver port with the sending socket's record, before the packet is delivered
//!   (`Conntable::udp_source`), so the resolver looks the sender's cgroup up by the datagram's
//!   source address.
//!
//! A query whose sender is not a sandbox with a passport, or whose passport is under an emergency
//! stop, gets no answer at all.
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
use serde_json::json;
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
        let orig = match via {
            Via::Tcp => self.conntable.lookup_resolver(peer)?,
            Via::Udp => self.conntable.udp_source(peer)?,
        };
        let passport = self.service.passport_for_cgroup(orig.cgroup_id)?;
        // An emergency stop: no answer at all (the kernel refuses new DNS sends of the sandbox;
        // this covers a UDP socket connected before the stop, whose sends skip that hook).
        if self.service.is_stopped(passport.passport.claims.id.as_str()) {
            return None;
        }
        let this = self.clone();
        Some(Arc::new(move |name: &DomainName| {
            let host_ok = this.policy.current().host_check(name, 0) == HostVerdict::Allow;
            let ok = host_ok && passport_allows(&passport, name);
            if !ok {
                this.audit_denied(name, via, &passport);
            }
            ok
        }))
    }

    fn audit_denied(&self, name: &DomainName, via: Via, passport: &CompiledPassport) {
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
        let detail = json!({
            "name": name.to_string(),
            "via": if via == Via::Tcp { "tcp" } else { "udp" },
            "passport_id": passport.id().to_string(),
            "answer": "NXDOMAIN",
        });
        tracing::info!(%name, ?via, passport_id = %passport.id(), "agent DNS query for a name its passport does not allow: NXDOMAIN");
        handle.spawn(async move {
            if let Err(e) = service.record_host_event("dns_denied", detail).await {
                tracing::warn!(error = %e, "could not record a DNS denial");
            }
        });
    }
}
