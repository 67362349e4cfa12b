//! Connections that are not HTTP, and connection-level refusals.
//!
//! Non-HTTP bytes (or silence) on a redirected connection fall to the raw-TCP host policy: a
//! `[[raw_tcp]]` rule must allow the *name* the agent resolved (a synthetic destination) and
//! the port. A connection by bare IP has no name and matches nothing. Without a rule the
//! connection is refused, and the refusal is a decision on the passport's chain (reason
//! `raw_tcp_denied`), so "non-HTTP bytes on an allowed port" is in the log too. With a rule,
//! the action and cost are decided like any request, and an allowed connection is spliced to the
//! address the daemon resolves for the name, never to the address the agent dialed.

use super::answer::{record_refusal, ConnInfo};
use super::checks::Refusal;
use super::prefixed::Prefixed;
use super::{inc, upstream, Proxy};
use crate::decide::Decision;
use crate::decide::Reason;
use crate::service::EnforceInput;
use std::sync::Arc;
use tokio::net::TcpStream;

/// The action recorded for raw connections no rule covers.
pub const RAW_ACTION: &str = "tcp:connect";

/// Records a refusal of the whole connection (nothing can be answered in-band), then closes it.
pub(super) async fn refuse(proxy: &Proxy, info: &ConnInfo, refusal: Refusal) {
    inc(&proxy.stats.blocked);
    tracing::info!(client = %info.client, pid = info.pid, cgroup_id = info.cgroup_id, dialed = %info.dialed, reason = %refusal.reason, detail = %refusal.detail, "connection refused");
    if let Err(e) = record_refusal(proxy, info, info.conn_name(), RAW_ACTION, None, None, &refusal).await {
        tracing::error!(error = %e, "could not record a connection refusal");
    }
}

pub(super) async fn handle(proxy: Arc<Proxy>, info: ConnInfo, mut agent: Prefixed<TcpStream>) {
    inc(&proxy.stats.raw_connections);
    let port = info.dialed.port();
    let policy = proxy.policy.current();
    let Some(rule) = policy.raw_tcp(info.dialed_name.as_ref(), port) else {
        let what = match &info.dialed_name {
            Some(n) => format!("{n}:{port}"),
            None => info.dialed.to_string(),
        };
        let detail = format!("The connection to {what} is not HTTP or TLS, and no [[raw_tcp]] host policy allows it.");
        refuse(&proxy, &info, Refusal { reason: Reason::RawTcpDenied, detail }).await;
        return;
    };
    // A rule matched, so there is a name.
    let Some(name) = info.dialed_name.clone() else { return };
    let verdict = policy.host_check(&name, rule.cost_millicents);
    let input = EnforceInput {
        passport_id: info.passport_id.clone(),
        action: rule.action.to_string(),
        cost_cents: None,
        cost_millicents: Some(rule.cost_millicents),
        target: Some(name.to_string()),
        method: None,
        path: None,
        port: Some(port),
    };
    let outcome = match proxy.service.enforce(input, verdict).await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "decision failed; closing the raw connection");
            return;
        }
    };
    let allowed = match outcome.decision {
        Decision::Allow => true,
        Decision::Block => false,
        Decision::RequestHold => match outcome.hold_id() {
            Some(id) => {
                inc(&proxy.stats.held);
                proxy.service.wait_hold(id).await.decision() == Decision::Allow
            }
            None => false,
        },
    };
    if !allowed {
        inc(&proxy.stats.blocked);
        return;
    }
    let mut upstream = match upstream::dial(&proxy.resolver, &name, port).await {
        Ok((s, _)) => s,
        Err(e) => {
            inc(&proxy.stats.upstream_errors);
            crate::metrics::global().upstream_error(e.kind());
            let event = serde_json::json!({
                "passport_id": info.passport_id, "host": name.to_string(), "port": port,
                "decision_attestation_id": outcome.attestation_id, "error": e.to_string(),
            });
            let _ = proxy.service.record_host_event("upstream_error", event).await;
            return;
        }
    };
    inc(&proxy.stats.forwarded);
    let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await;
}
