//! The service's side of fleet leases (`crate::fleet`): lease records and their state entries,
//! and the claims restored from them at start.
//!
//! State key `fleet/<passport id>/<limit>/<window>` (JSON [`StoredClaim`]): what the host may
//! spend in that window, written in the same transaction as the lease record that changed it.
//! At start these are the claims the host re-publishes to Redis (after a FLUSHALL too), so a
//! budget is never re-established from zero.

use super::{drafts, now, Service, ServiceError};
use crate::decide::usage::window_start;
use crate::fleet::{LeaseEvent, LeaseOp, Leases, Limit, Restored, Window};
use crate::ledger::{Draft, Txn, TxnError};
use crate::passport::SpendWindow;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// State-table prefix of the host's fleet claims.
pub(super) const FLEET_PREFIX: &str = "fleet/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoredClaim {
    pub limit: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub limit_amount: u64,
    pub claim: u64,
}

fn state_key(e: &LeaseEvent) -> String {
    format!("{FLEET_PREFIX}{}/{}/{}", e.passport_id, e.window.limit.name(), e.window.label())
}

fn parse_limit(name: &str) -> Option<Limit> {
    use crate::decide::rate::RatePeriod;
    Some(match name {
        "cap-daily" => Limit::Cap(SpendWindow::Daily),
        "cap-weekly" => Limit::Cap(SpendWindow::Weekly),
        "cap-monthly" => Limit::Cap(SpendWindow::Monthly),
        "rate-minute" => Limit::Rate(RatePeriod::Minute),
        "rate-hour" => Limit::Rate(RatePeriod::Hour),
        "rate-day" => Limit::Rate(RatePeriod::Day),
        _ => return None,
    })
}

impl Service {
    /// Joins the fleet: lease records go to this service's log, and the claims its records hold
    /// for the current windows are restored into `leases` (re-published before any new lease).
    pub fn attach_fleet(&self, leases: Arc<Leases>) -> Result<(), ServiceError> {
        let me = self.me.clone();
        let redis = leases.conn().url().to_string();
        leases.set_recorder(Arc::new(move |event: LeaseEvent| {
            let me = me.clone();
            let redis = redis.clone();
            Box::pin(async move {
                let service = me.upgrade().ok_or_else(|| "the daemon is stopping".to_string())?;
                service.record_lease(event, redis).await.map_err(|e| e.to_string())
            })
        }));
        let at = now();
        let mut restored = Vec::new();
        for (key, bytes) in self.ledger.state_scan(FLEET_PREFIX)? {
            let Some(rest) = key.strip_prefix(FLEET_PREFIX) else { continue };
            let Some((passport_id, _)) = rest.split_once('/') else { continue };
            let stored: StoredClaim = match serde_json::from_slice(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    // An unreadable claim cannot be re-published; Redis keeps what it knows and the
                    // host spends nothing from it.
                    tracing::error!(key, error = %e, "fleet claim in the store is unreadable; ignored");
                    continue;
                }
            };
            let Some(limit) = parse_limit(&stored.limit) else { continue };
            if stored.window_end <= at {
                continue;
            }
            let window =
                Window { limit, amount: stored.limit_amount, start: stored.window_start, end: stored.window_end };
            // Spent so far: a cap's from the passport's counters (what this host spent in that
            // window); a rate window's is not kept, so all of its claim counts as used.
            let used = match limit {
                Limit::Cap(w) => self
                    .load_usage(passport_id)
                    .ok()
                    .map(|u| {
                        let c = u.spend_at(w, at);
                        if c.start == window_start(w, stored.window_start) {
                            c.spent_millicents.div_ceil(1000)
                        } else {
                            stored.claim
                        }
                    })
                    .unwrap_or(stored.claim),
                Limit::Rate(_) => stored.claim,
            };
            restored.push(Restored { passport_id: passport_id.to_string(), window, claim: stored.claim, used });
        }
        if !restored.is_empty() {
            tracing::info!(claims = restored.len(), "fleet claims restored from the store");
        }
        leases.restore(restored);
        self.fleet.set(leases).map_err(|_| ServiceError::LockPoisoned("fleet already attached"))
    }

    pub(super) fn fleet(&self) -> Option<&Arc<Leases>> {
        self.fleet.get()
    }

    /// One lease record, with the claim it leaves in the state table (removed once a window's
    /// lease is returned at its end).
    async fn record_lease(&self, event: LeaseEvent, redis: String) -> Result<(), ServiceError> {
        let key = state_key(&event);
        let stored = StoredClaim {
            limit: event.window.limit.name(),
            window_start: event.window.start,
            window_end: event.window.end,
            limit_amount: event.window.amount,
            claim: event.claim,
        };
        let drop_entry = event.op == LeaseOp::Returned && event.why == Some("window_end");
        let bytes = serde_json::to_vec(&stored).unwrap_or_default();
        let ((), appended) = self
            .transact(move |txn: &mut Txn<'_>| -> Result<((), Vec<Draft>), TxnError> {
                if drop_entry {
                    txn.delete(&key)?;
                } else {
                    txn.put(&key, &bytes)?;
                }
                let body = drafts::fleet_lease(&event, &redis, now());
                Ok(((), vec![Draft::new(event.passport_id.clone(), body)]))
            })
            .await?;
        super::appended_index(&appended, "fleet lease").map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FleetConfig;
    use crate::decide::{Decision, HostVerdict};
    use crate::fleet::RedisConn;
    use crate::passport::{Cents, Constraints};
    use crate::service::testkit::{self, fixture_with};
    use crate::service::{EnforceInput, HoldOrigin};

    /// Leases against a port nothing listens on: Redis is down for the whole test.
    fn dead_fleet() -> Arc<Leases> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = FleetConfig {
            redis: format!("redis://127.0.0.1:{port}"),
            password_file: None,
            ca_file: None,
            host_id: "unit".into(),
            lease_cents: 10,
            lease_requests: 10,
            lease_secs: 60,
            prefix: "t".into(),
        };
        Leases::new(Arc::new(RedisConn::new(&config).unwrap()), &config)
    }

    async fn one_cent(f: &testkit::Fixture) -> crate::service::DecisionOutcome {
        let input = EnforceInput {
            passport_id: f.passport.clone(),
            action: "llm:chat".into(),
            cost_cents: Some(1),
            cost_millicents: None,
            target: None,
            method: None,
            path: None,
            port: None,
            signed_request_hash: None,
            gate_price: None,
        };
        f.service.enforce_outcome(input, HoldOrigin::Api, HostVerdict::Allow).await.unwrap()
    }

    fn daily_cap(cents: u64) -> Constraints {
        Constraints {
            max_cumulative: Some(Cents(cents)),
            cumulative_window: Some(SpendWindow::Daily),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn without_a_lease_and_without_redis_a_capped_passport_is_blocked_and_spends_nothing() {
        let f = fixture_with(daily_cap(100)).await;
        let leases = dead_fleet();
        f.service.attach_fleet(leases.clone()).unwrap();
        let o = one_cent(&f).await;
        assert_eq!(o.decision, Decision::Block, "{}", o.to_json());
        assert_eq!(o.reason.as_str(), "fleet_unavailable");
        let detail = o.to_json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains(&leases.conn().url().to_string()) && detail.contains("unavailable since"), "{detail}");
        assert_eq!(testkit::spent(&f), (0, 0), "a fleet block spends nothing");
        let report = testkit::verified(&f).await;
        assert!(report.is_ok(), "{:?}", report.problems);
    }

    #[tokio::test]
    async fn a_restored_claim_is_spent_with_redis_down_and_never_more() {
        let f = fixture_with(daily_cap(100)).await;
        // The host's records say it holds 5 cents of today's window (as after a restart).
        let at = now();
        let start = window_start(SpendWindow::Daily, at);
        let stored = StoredClaim {
            limit: "cap-daily".into(),
            window_start: start,
            window_end: crate::decide::usage::window_end(SpendWindow::Daily, start),
            limit_amount: 100,
            claim: 5,
        };
        let key = format!("{FLEET_PREFIX}{}/cap-daily/{}", f.passport, start.format("%Y-%m-%d"));
        let bytes = serde_json::to_vec(&stored).unwrap();
        f.service
            .transact(move |txn: &mut Txn<'_>| -> Result<((), Vec<Draft>), TxnError> {
                txn.put(&key, &bytes)?;
                Ok(((), vec![]))
            })
            .await
            .unwrap();
        f.service.attach_fleet(dead_fleet()).unwrap();
        for i in 0..5 {
            let o = one_cent(&f).await;
            assert_eq!(o.decision, Decision::Allow, "request {i}: {}", o.to_json());
        }
        let o = one_cent(&f).await;
        assert_eq!(o.reason.as_str(), "fleet_unavailable", "{}", o.to_json());
        assert_eq!(testkit::spent(&f).0, 5_000, "exactly the claim was spent");
    }

    #[tokio::test]
    async fn a_decision_in_a_new_window_never_spends_the_last_windows_claim() {
        // The request path caches a passport's windows; a decision past their end must be checked
        // against the new window (where this host holds nothing), not the cached one.
        let f = fixture_with(daily_cap(100)).await;
        let leases = dead_fleet();
        f.service.attach_fleet(leases.clone()).unwrap();
        let cp = f.service.passport(&f.passport).unwrap();
        let at = now();
        let start = window_start(SpendWindow::Daily, at);
        let today = Window {
            limit: Limit::Cap(SpendWindow::Daily),
            amount: 100,
            start,
            end: crate::decide::usage::window_end(SpendWindow::Daily, start),
        };
        leases.restore(vec![Restored { passport_id: f.passport.clone(), window: today, claim: 5, used: 0 }]);
        assert_eq!(leases.admit(&cp, 2_000, at), Ok(()), "2 cents fit in today's 5");
        let tomorrow = at + chrono::Duration::days(1);
        let refused = leases.admit(&cp, 1_000, tomorrow).unwrap_err();
        assert_eq!(refused.reason, "fleet_unavailable", "{refused:?}");
        assert!(refused.detail.contains(&tomorrow.format("%Y-%m-%d").to_string()), "{}", refused.detail);
        // Back in today's window, today's claim is found again, used as the request left it.
        assert_eq!(leases.admit(&cp, 5_000, at), Ok(()));
        assert!(leases.admit(&cp, 5_001, at).is_err(), "beyond the claim");
        let held = leases.holdings();
        assert_eq!((held.len(), held[0].2, held[0].3), (1, 5, 5), "{held:?}");
    }

    #[tokio::test]
    async fn passports_without_a_cap_or_rate_limit_never_involve_the_fleet() {
        let f = fixture_with(Constraints::default()).await;
        f.service.attach_fleet(dead_fleet()).unwrap();
        assert_eq!(one_cent(&f).await.decision, Decision::Allow);
    }
}
