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
        signed_request_hash: None,
        gate_price: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::HostVerdict;
    use crate::domain::DomainName;
    use crate::proxy::decider::fake::{outcome, FakeDecide};
    use crate::proxy::testing::{agent_pair, harness, raw_rule, read_to_close, upstream, Harness, CGROUP};
    use crate::service::{HoldOutcome, HoldStatus, ServiceError};
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// One raw connection to `db.example.test:port` through [`handle`]: the agent's first bytes
    /// (`HELLO`, already read by the sniffer) and then ` WORLD`, after which it stops sending.
    /// Returns the harness and what the agent read until the proxy closed its connection.
    async fn raw_connection(decide: FakeDecide, policy: &str, port: u16) -> (Harness, Vec<u8>) {
        let h = harness(decide, policy, &[("db.example.test", LOCAL)]);
        let (mut agent, accepted) = agent_pair().await;
        let info = ConnInfo {
            passport_id: "pp-1".into(),
            client: agent.local_addr().expect("addr"),
            dialed: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)), port),
            pid: 4242,
            cgroup_id: CGROUP,
            dialed_name: Some(DomainName::parse("db.example.test").expect("name")),
            sni: None,
            tls: false,
            slot: None,
        };
        let task = tokio::spawn(handle(h.proxy.clone(), info, Prefixed::new(b"HELLO".to_vec(), accepted)));
        // The write may fail if the proxy has already closed the connection: that is an outcome.
        let _ = agent.write_all(b" WORLD").await;
        let _ = agent.shutdown().await;
        let read = read_to_close(&mut agent).await;
        task.await.expect("handle");
        (h, read)
    }

    fn stat(h: &Harness, f: impl Fn(&super::super::Stats) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(&h.proxy.stats).load(Ordering::Relaxed)
    }

    /// What the fake was asked to decide: one call, the request and the host verdict.
    fn decided(h: &Harness) -> (EnforceInput, HostVerdict) {
        let calls = h.decide.enforced.lock().unwrap();
        assert_eq!(calls.len(), 1, "{calls:?}");
        calls[0].clone()
    }

    #[tokio::test]
    async fn an_allowed_raw_connection_is_decided_then_spliced_to_the_name_the_daemon_resolves() {
        let up = upstream().await;
        let port = up.addr.port();
        let fake = FakeDecide::answering(Ok(outcome(Decision::Allow, Reason::Allowed, 7)));
        let (h, read) = raw_connection(fake, &raw_rule(port), port).await;
        assert_eq!(read, b"PONG", "the upstream's answer reaches the agent");
        assert_eq!(*up.seen.lock().unwrap(), vec![b"HELLO WORLD".to_vec()], "the sniffed bytes are replayed first");
        let (input, verdict) = decided(&h);
        assert_eq!(verdict, HostVerdict::Allow);
        assert_eq!(
            (input.action.as_str(), input.cost_millicents, input.target.as_deref(), input.method, input.port),
            ("tcp:postgres", Some(2_000), Some("db.example.test"), None, Some(port)),
            "the rule's action and cost, and the port a hold keeps"
        );
        assert_eq!((stat(&h, |s| &s.forwarded), stat(&h, |s| &s.blocked)), (1, 0));
    }

    #[tokio::test]
    async fn a_refused_raw_connection_is_closed_and_nothing_reaches_upstream() {
        let up = upstream().await;
        let port = up.addr.port();
        let fake = FakeDecide::answering(Ok(outcome(Decision::Block, Reason::PermissionDenied, 8)));
        let (h, read) = raw_connection(fake, &raw_rule(port), port).await;
        assert!(read.is_empty(), "{read:?}");
        assert!(up.seen.lock().unwrap().is_empty(), "no connection to the upstream was made");
        assert_eq!(decided(&h).0.action, "tcp:postgres");
        assert_eq!((stat(&h, |s| &s.forwarded), stat(&h, |s| &s.blocked)), (0, 1));
    }

    /// No `[[raw_tcp]]` rule for the port: refused as `raw_tcp_denied`, through the engine as a
    /// host-policy denial (so the refusal is on the passport's chain), without being dialed.
    #[tokio::test]
    async fn a_port_no_rule_allows_is_recorded_as_raw_tcp_denied_and_closed() {
        let up = upstream().await;
        let port = up.addr.port();
        let other = if port == 5432 { 5433 } else { 5432 };
        let fake = FakeDecide::answering(Ok(outcome(Decision::Block, Reason::RawTcpDenied, 9)));
        let (h, read) = raw_connection(fake, &raw_rule(other), port).await;
        assert!(read.is_empty(), "{read:?}");
        assert!(up.seen.lock().unwrap().is_empty());
        let (input, verdict) = decided(&h);
        assert_eq!((input.action.as_str(), input.target.as_deref()), (RAW_ACTION, Some("db.example.test")));
        match verdict {
            HostVerdict::Deny { reason, detail } => {
                assert_eq!(reason, Reason::RawTcpDenied);
                assert!(detail.contains(&format!("db.example.test:{port}")), "{detail}");
            }
            other => panic!("a proxy refusal is a host denial, got {other:?}"),
        }
        assert_eq!(stat(&h, |s| &s.blocked), 1);
    }

    #[tokio::test]
    async fn a_held_raw_connection_waits_and_goes_ahead_only_when_approved() {
        for (approved, resolution) in [
            (true, outcome(Decision::Allow, Reason::HoldApproved, 11)),
            (false, outcome(Decision::Block, Reason::HoldDenied, 12)),
        ] {
            let up = upstream().await;
            let port = up.addr.port();
            let fake = FakeDecide::answering(Ok(outcome(Decision::RequestHold, Reason::ApprovalRequired, 10)));
            let hold_status = if approved { HoldStatus::Approved } else { HoldStatus::Denied };
            *fake.hold.lock().unwrap() =
                Some(HoldOutcome::Resolved { outcome: resolution, hold_id: "hold-1".into(), hold_status });
            let (h, read) = raw_connection(fake, &raw_rule(port), port).await;
            assert_eq!(*h.decide.waited.lock().unwrap(), vec!["hold-1".to_string()]);
            assert_eq!(stat(&h, |s| &s.held), 1);
            if approved {
                assert_eq!(read, b"PONG");
                assert_eq!(*up.seen.lock().unwrap(), vec![b"HELLO WORLD".to_vec()]);
            } else {
                assert!(read.is_empty(), "{read:?}");
                assert!(up.seen.lock().unwrap().is_empty());
                assert_eq!(stat(&h, |s| &s.blocked), 1);
            }
        }
    }

    /// The store failed: nothing was decided, so nothing is dialed.
    #[tokio::test]
    async fn a_failed_decision_closes_the_connection_without_dialing() {
        let up = upstream().await;
        let port = up.addr.port();
        let fake = FakeDecide::answering(Err(ServiceError::NotAppended("decision")));
        let (h, read) = raw_connection(fake, &raw_rule(port), port).await;
        assert!(read.is_empty(), "{read:?}");
        assert!(up.seen.lock().unwrap().is_empty());
        assert_eq!(stat(&h, |s| &s.forwarded), 0);
    }

    /// Allowed, but the upstream is down: the agent's connection is closed and the failure is a
    /// host record naming the allow decision it follows.
    #[tokio::test]
    async fn an_unreachable_upstream_after_an_allow_is_recorded_against_the_decision() {
        let port = {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
            l.local_addr().expect("addr").port()
        };
        let fake = FakeDecide::answering(Ok(outcome(Decision::Allow, Reason::Allowed, 21)));
        let (h, read) = raw_connection(fake, &raw_rule(port), port).await;
        assert!(read.is_empty(), "{read:?}");
        let events = h.decide.events.lock().unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        let (kind, detail) = &events[0];
        assert_eq!(kind, "upstream_error");
        assert_eq!(
            (detail["decision_attestation_id"].as_u64(), detail["port"].as_u64()),
            (Some(21), Some(port.into()))
        );
        assert_eq!((stat(&h, |s| &s.upstream_errors), stat(&h, |s| &s.forwarded)), (1, 0));
    }
}
