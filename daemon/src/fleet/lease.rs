//! Budget leases: how a host spends a shared budget without asking Redis on every request.
//!
//! For each limit of a passport that a fleet shares (its cumulative spend cap in its UTC window,
//! and each rate limit in a fixed UTC window of its period), the budget hash in Redis holds what
//! each host may spend in the window: its *claim* (spent + unused lease). [`LEASE_SCRIPT`] grants
//! a host at most `lease_cents` (or `lease_requests`) and at most what the limit leaves after every
//! host's claim, atomically. So the sum of what all hosts may spend in a window never exceeds the
//! passport's limit, and each host checks its own spend against its own claim ([`Leases::admit`]),
//! in memory, on the request path.
//!
//! - Ahead of need: a lease is renewed once less than half of one lease is left, by the first
//!   request that sees it (in the background, at most once per [`TICK`]) or by the background
//!   task ([`Leases::run`]), so most decisions never wait; a request that does not fit waits at most
//!   [`WAIT_FOR_LEASE`] for a lease ([`Leases::prepare`]) and is otherwise blocked.
//! - Returned: a lease unused for `lease_secs`, one whose window ended, and every lease at
//!   shutdown give their unused part back ([`RETURN_SCRIPT`]: the claim becomes what was spent).
//! - Recorded: every lease taken, renewed and returned is an attested record in the host's log,
//!   written (through the service's [`Recorder`]) *before* the host spends from it; the record's
//!   state entry is what the host re-publishes after a restart.
//! - Redis down: the host keeps spending what its claims hold, then blocks with
//!   `fleet_unavailable` (which Redis, since when); it never spends beyond its claims.
//! - Redis emptied (restart, FLUSHALL): the `epoch` key is gone. The first host to notice that
//!   holds claims sets a new epoch with a recovery period of `lease_secs` during which nothing is
//!   granted; every host re-publishes its claims of the current windows (never less than it
//!   spent) as soon as it notices, so budgets are re-established, not reset to zero.

use super::conn::rfc3339;
use super::{FleetError, Keys, RedisConn};
use crate::config::FleetConfig;
use crate::decide::detail::money;
use crate::decide::rate::RatePeriod;
use crate::decide::usage::{window_end, window_start};
use crate::decide::CompiledPassport;
use crate::passport::SpendWindow;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest a request waits for a lease before it is blocked.
pub const WAIT_FOR_LEASE: Duration = Duration::from_millis(250);
/// How often the background task looks at the leases (renewals, returns, Redis's epoch).
pub const TICK: Duration = Duration::from_millis(250);
/// After Redis granted less than asked (the fleet's budget is spent), how long before a request
/// asks again.
pub const SHORT_RETRY: Duration = Duration::from_secs(1);
/// Budget keys live this long past their window's end (then Redis drops them).
pub const KEY_GRACE_SECS: i64 = 3600;

/// Grants a lease. KEYS: budget hash, epoch. ARGV: host, limit, want, held (the host's claim as
/// its own records know it), expire-at (unix seconds).
/// Returns {grant, claim after, every host's claim together after, recovering (0/1)}, or
/// {-1, 0, 0, 0} when the epoch is missing (Redis lost its data: re-publish first).
pub const LEASE_SCRIPT: &str = r#"
local epoch = redis.call('GET', KEYS[2])
if not epoch then return {-1, 0, 0, 0} end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local host = ARGV[1]
local limit = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local held = tonumber(ARGV[4])
local cur = tonumber(redis.call('HGET', KEYS[1], host) or '0')
if held > cur then
  redis.call('HSET', KEYS[1], host, held)
  cur = held
end
local total = 0
local vals = redis.call('HVALS', KEYS[1])
for i = 1, #vals do total = total + tonumber(vals[i]) end
local recovering = 0
if now_ms < tonumber(epoch) then recovering = 1 end
local grant = 0
if recovering == 0 and want > 0 and limit > total then
  grant = math.min(want, limit - total)
  cur = redis.call('HINCRBY', KEYS[1], host, grant)
  total = total + grant
end
if cur > 0 then redis.call('EXPIREAT', KEYS[1], ARGV[5]) end
return {grant, cur, total, recovering}
"#;

/// Returns the unused part of a lease. KEYS: budget hash. ARGV: host, claim (what the host spent:
/// its new claim, never raised by a return). Returns {claim before, claim after}.
pub const RETURN_SCRIPT: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local new = tonumber(ARGV[2])
if new < cur then
  if new > 0 then redis.call('HSET', KEYS[1], ARGV[1], new) else redis.call('HDEL', KEYS[1], ARGV[1]) end
  return {cur, new}
end
return {cur, cur}
"#;

/// Says hello: KEYS: epoch, hosts. ARGV: host, whether it holds claims (0/1), recovery ms.
/// Creates the epoch when missing: with a recovery period when this host holds claims (Redis
/// lost the fleet's data), without one otherwise (a new fleet). Returns {epoch, created (0/1)}.
pub const HELLO_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[1], t[1])
local epoch = redis.call('GET', KEYS[1])
if epoch then return {tonumber(epoch), 0} end
local value = 0
if ARGV[2] == '1' then value = now_ms + tonumber(ARGV[3]) end
redis.call('SET', KEYS[1], value)
return {value, 1}
"#;

/// One limit a fleet shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// The passport's cumulative spend cap, in its window (cents).
    Cap(SpendWindow),
    /// A rate limit, counted in fixed UTC windows of its period (requests).
    Rate(RatePeriod),
}

impl Limit {
    /// `cap-daily`, `rate-minute`...: its name in keys and records.
    pub fn name(self) -> String {
        match self {
            Limit::Cap(w) => format!("cap-{}", w.as_str()),
            Limit::Rate(p) => format!("rate-{}", p.as_str()),
        }
    }

    /// `cents` or `requests`.
    pub fn unit(self) -> &'static str {
        match self {
            Limit::Cap(_) => "cents",
            Limit::Rate(_) => "requests",
        }
    }
}

/// One window of one limit of one passport, as of a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub limit: Limit,
    /// The passport's limit (cents or requests).
    pub amount: u64,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Window {
    /// Its label in keys and records: the start's date for a cap, unix seconds for a rate.
    pub fn label(&self) -> String {
        match self.limit {
            Limit::Cap(_) => self.start.format("%Y-%m-%d").to_string(),
            Limit::Rate(_) => self.start.timestamp().to_string(),
        }
    }
}

/// The limits of `cp` a fleet shares, in the windows that contain `now`. Empty: the passport has
/// neither a cumulative cap nor a rate limit, and its decisions never involve the fleet.
pub fn windows(cp: &CompiledPassport, now: DateTime<Utc>) -> Vec<Window> {
    let c = &cp.passport.claims.constraints;
    let mut out = Vec::new();
    if let Some(cap) = c.max_cumulative {
        let w = c.window();
        let start = window_start(w, now);
        out.push(Window { limit: Limit::Cap(w), amount: cap.0, start, end: window_end(w, start) });
    }
    for (period, limit) in [
        (RatePeriod::Minute, c.rate_per_minute),
        (RatePeriod::Hour, c.rate_per_hour),
        (RatePeriod::Day, c.rate_per_day),
    ] {
        if let Some(amount) = limit {
            let secs = period.seconds();
            let t = now.timestamp();
            let s = t - t.rem_euclid(secs);
            let start = DateTime::from_timestamp(s, 0).unwrap_or(now);
            let end = DateTime::from_timestamp(s.saturating_add(secs), 0).unwrap_or(now);
            out.push(Window { limit: Limit::Rate(period), amount, start, end });
        }
    }
    out
}

/// Cents a spend in millicents takes from a claim (rounded up: a fraction of a cent spent is a
/// cent claimed).
fn cents_up(millicents: u64) -> u64 {
    millicents.div_ceil(1000)
}

/// What happened to a lease, for its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    Taken,
    Renewed,
    Returned,
}

impl LeaseOp {
    /// The record kind.
    pub fn kind(self) -> &'static str {
        match self {
            LeaseOp::Taken => "fleet_lease_taken",
            LeaseOp::Renewed => "fleet_lease_renewed",
            LeaseOp::Returned => "fleet_lease_returned",
        }
    }
}

/// One lease event, recorded before the host acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEvent {
    pub op: LeaseOp,
    pub passport_id: String,
    pub host_id: String,
    /// The limit, its amount and the window (its label names the window in records and keys).
    pub window: Window,
    /// Granted (taken, renewed) or given back (returned).
    pub amount: u64,
    /// What the host may spend in the window after this (its claim).
    pub claim: u64,
    /// Every host's claims together after this (`None` for a return: not asked).
    pub fleet_total: Option<u64>,
    /// Why a lease was returned: `idle`, `window_end`, `shutdown`.
    pub why: Option<&'static str>,
}

/// Writes lease records (the service's, so that the fleet module never touches the ledger).
pub type Recorder = Arc<dyn Fn(LeaseEvent) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A host's claim in one window, as the host's own records know it (restored at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub passport_id: String,
    pub window: Window,
    pub claim: u64,
    /// Spent in the window, in the limit's unit (cents for a cap, requests for a rate).
    pub used: u64,
}

#[derive(Debug, Clone)]
struct Holding {
    window: Window,
    claim: u64,
    /// Spent: cents (rounded up) for a cap, requests for a rate.
    used: u64,
    /// The last time the host asked for this holding (a request, a renewal).
    last_need: Instant,
    /// The last ask got less than a full lease: the fleet's budget is (nearly) spent; renew
    /// again only when a request needs it.
    short: bool,
    /// The last ask found Redis recovering from a data loss (nothing granted until it ends).
    recovering: bool,
    /// When the host last asked Redis for this holding (a short answer is not asked again for
    /// [`SHORT_RETRY`], so a spent budget does not send every refused request to Redis).
    asked: Option<Instant>,
    /// When a request last started a renewal of this holding (at most one per [`TICK`], so a
    /// Redis that is down is not asked by every request).
    renew_started: Option<Instant>,
}

impl Holding {
    fn new(window: Window, claim: u64, used: u64) -> Holding {
        Holding {
            window,
            claim,
            used,
            last_need: Instant::now(),
            short: false,
            recovering: false,
            asked: None,
            renew_started: None,
        }
    }

    fn headroom(&self) -> u64 {
        self.claim.saturating_sub(self.used)
    }

    fn is(&self, w: &Window) -> bool {
        self.is_at(w.limit, w.start)
    }

    fn is_at(&self, limit: Limit, start: DateTime<Utc>) -> bool {
        self.window.limit == limit && self.window.start == start
    }
}

/// A holding: passport id, limit, and the window's start (with the limit it fixes the window,
/// whose label is only needed for Redis keys and records).
type HoldingKey = (Arc<str>, Limit, DateTime<Utc>);

/// Whether any limit of `cp` is shared by the fleet (else its decisions never involve it).
fn shares_limits(cp: &CompiledPassport) -> bool {
    let c = &cp.passport.claims.constraints;
    c.max_cumulative.is_some() || c.rate_per_minute.is_some() || c.rate_per_hour.is_some() || c.rate_per_day.is_some()
}

/// One passport's holdings, and the windows its decisions currently fall in.
#[derive(Default)]
struct Entry {
    /// The passport's shared windows that contained the last decision's time: computed again
    /// only when a decision falls outside one of them (once per window, not per decision).
    current: Vec<Window>,
    /// Every window the host holds a claim in (the current ones, and ended ones until their
    /// unused part is returned).
    holdings: Vec<Holding>,
}

impl Entry {
    /// The passport's shared windows at `now` (the cached ones while they still contain it).
    fn refresh(&mut self, cp: &CompiledPassport, now: DateTime<Utc>) {
        if self.current.is_empty() || self.current.iter().any(|w| now < w.start || now >= w.end) {
            self.current = windows(cp, now);
        }
    }
}

/// The host's holdings by passport id. Keyed by `Arc<str>` so that the request path looks a
/// passport up by the `&str` it has, allocating nothing.
#[derive(Default)]
struct Table {
    passports: HashMap<Arc<str>, Entry>,
}

impl Table {
    fn get(&self, (id, limit, start): &HoldingKey) -> Option<&Holding> {
        self.passports.get(&**id)?.holdings.iter().find(|h| h.is_at(*limit, *start))
    }

    fn get_mut(&mut self, (id, limit, start): &HoldingKey) -> Option<&mut Holding> {
        self.passports.get_mut(&**id)?.holdings.iter_mut().find(|h| h.is_at(*limit, *start))
    }

    /// The passport's entry, made on its first use (the only allocation, once per passport).
    fn entry(&mut self, id: &str) -> &mut Entry {
        self.keyed_entry(id).1
    }

    /// As [`Table::entry`], with the table's key for `id` (a clone of the `Arc`, no allocation).
    fn keyed_entry(&mut self, id: &str) -> (Arc<str>, &mut Entry) {
        let key = match self.passports.get_key_value(id) {
            Some((key, _)) => key.clone(),
            None => Arc::from(id),
        };
        (key.clone(), self.passports.entry(key).or_default())
    }

    /// The holding of `w`, made (empty) when the host holds nothing in it yet.
    fn holding(&mut self, id: &str, w: &Window) -> &mut Holding {
        let entry = self.entry(id);
        match entry.holdings.iter().position(|h| h.is(w)) {
            Some(i) => &mut entry.holdings[i],
            None => {
                entry.holdings.push(Holding::new(w.clone(), 0, 0));
                let last = entry.holdings.len() - 1;
                &mut entry.holdings[last]
            }
        }
    }

    fn remove(&mut self, (id, limit, start): &HoldingKey) {
        if let Some(entry) = self.passports.get_mut(&**id) {
            entry.holdings.retain(|h| !h.is_at(*limit, *start));
            if entry.holdings.is_empty() {
                self.passports.remove(&**id);
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (HoldingKey, &Holding)> + '_ {
        self.passports
            .iter()
            .flat_map(|(id, e)| e.holdings.iter().map(move |h| ((id.clone(), h.window.limit, h.window.start), h)))
    }
}

/// Why [`Leases::admit`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `fleet_unavailable`, `spend_limit_exceeded` or `rate_limit_exceeded`.
    pub reason: &'static str,
    pub detail: String,
}

/// The host's leases. One per daemon with `[fleet]`.
pub struct Leases {
    conn: Arc<RedisConn>,
    keys: Keys,
    host: String,
    lease_cents: u64,
    lease_requests: u64,
    lease_secs: u64,
    table: Mutex<Table>,
    /// One lease request in flight per passport.
    asking: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    recorder: OnceLock<Recorder>,
    lease_script: redis::Script,
    return_script: redis::Script,
    hello_script: redis::Script,
}

impl Leases {
    pub fn new(conn: Arc<RedisConn>, config: &FleetConfig) -> Arc<Leases> {
        Arc::new(Leases {
            conn,
            keys: Keys::from_config(config),
            host: config.host_id.clone(),
            lease_cents: config.lease_cents,
            lease_requests: config.lease_requests,
            lease_secs: config.lease_secs,
            table: Mutex::new(Table::default()),
            asking: Mutex::new(HashMap::new()),
            recorder: OnceLock::new(),
            lease_script: redis::Script::new(LEASE_SCRIPT),
            return_script: redis::Script::new(RETURN_SCRIPT),
            hello_script: redis::Script::new(HELLO_SCRIPT),
        })
    }

    pub fn host_id(&self) -> &str {
        &self.host
    }

    pub fn conn(&self) -> &Arc<RedisConn> {
        &self.conn
    }

    /// Where lease records go; set once, before the first lease.
    pub fn set_recorder(&self, recorder: Recorder) {
        let _ = self.recorder.set(recorder);
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the host's records hold (at start, before any lease): spending resumes from them,
    /// and they are re-published to Redis before the host takes a new lease.
    pub fn restore(&self, restored: Vec<Restored>) {
        let mut table = self.table();
        for r in restored {
            let h = table.holding(&r.passport_id, &r.window);
            *h = Holding::new(r.window, r.claim, r.used);
        }
    }

    /// The host's current claims (for `sluice fleet status` and tests): (passport, window, claim,
    /// used).
    pub fn holdings(&self) -> Vec<(String, Window, u64, u64)> {
        let mut v: Vec<_> =
            self.table().iter().map(|((p, _, _), h)| (p.to_string(), h.window.clone(), h.claim, h.used)).collect();
        v.sort_by(|a, b| (&a.0, a.1.limit.name(), a.1.start).cmp(&(&b.0, b.1.limit.name(), b.1.start)));
        v
    }

    fn lease_size(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Cap(_) => self.lease_cents,
            Limit::Rate(_) => self.lease_requests,
        }
    }

    /// Whether a request of `cost_millicents` needs a lease in window `w` beyond what the host
    /// holds (`h`: its holding there).
    fn lacks(h: Option<&Holding>, w: &Window, cost_millicents: u64) -> bool {
        let need = match w.limit {
            Limit::Cap(_) => cents_up(cost_millicents).max(1),
            Limit::Rate(_) => 1,
        };
        match h {
            None => true,
            Some(h) if h.short && h.asked.is_some_and(|t| t.elapsed() < SHORT_RETRY) => false,
            Some(h) => h.headroom() < need,
        }
    }

    /// The windows of `windows` that lack room for a request of `cost_millicents`.
    fn lacking(&self, passport_id: &str, windows: &[Window], cost_millicents: u64) -> Vec<Window> {
        let table = self.table();
        let holdings = table.passports.get(passport_id).map_or(&[][..], |e| &e.holdings[..]);
        windows.iter().filter(|w| Self::lacks(holdings.iter().find(|h| h.is(w)), w, cost_millicents)).cloned().collect()
    }

    /// Before a decision: makes sure the host's leases cover a request of `cost_millicents`,
    /// asking Redis for a lease when they do not, for at most [`WAIT_FOR_LEASE`]. Never fails:
    /// [`Leases::admit`] decides with whatever the host then holds.
    ///
    /// The common case (the leases cover it) takes the table's lock once, allocates nothing and
    /// never touches Redis. A holding found below half a lease starts its renewal here, in the
    /// background, so that a fast-spending passport renews before it runs out rather than at the
    /// next [`TICK`].
    pub async fn prepare(self: &Arc<Self>, cp: &CompiledPassport, cost_millicents: u64, now: DateTime<Utc>) {
        if !shares_limits(cp) {
            return;
        }
        let id = cp.passport.claims.id.as_str();
        let mut lacking = Vec::new();
        let mut renew: Vec<HoldingKey> = Vec::new();
        {
            let mut table = self.table();
            let (key, entry) = table.keyed_entry(id);
            entry.refresh(cp, now);
            let at = Instant::now();
            let Entry { current, holdings } = entry;
            for w in current.iter() {
                let Some(h) = holdings.iter_mut().find(|h| h.is(w)) else {
                    lacking.push(w.clone());
                    continue;
                };
                h.last_need = at;
                if Self::lacks(Some(h), w, cost_millicents) {
                    lacking.push(w.clone());
                } else if !h.short
                    && h.headroom() * 2 < self.lease_size(w.limit)
                    && h.renew_started.is_none_or(|t| at.duration_since(t) >= TICK)
                {
                    h.renew_started = Some(at);
                    renew.push((key.clone(), w.limit, w.start));
                }
            }
        }
        if !renew.is_empty() {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                for key in renew {
                    if let Err(e) = me.renew(&key).await {
                        tracing::debug!(passport_id = %key.0, error = %e, "renewing a fleet lease failed");
                        break;
                    }
                }
            });
        }
        if lacking.is_empty() {
            return;
        }
        let id = id.to_string();
        // The ask runs to its end even when the request stops waiting: a grant Redis made is then
        // recorded and kept for the next request, never lost half-way.
        let me = Arc::clone(self);
        let ask = tokio::spawn(async move {
            if let Err(e) = me.ask(&id, &lacking, cost_millicents).await {
                tracing::debug!(passport_id = %id, error = %e, "asking for a fleet lease failed");
            }
        });
        let _ = tokio::time::timeout(WAIT_FOR_LEASE, ask).await;
    }

    /// Asks Redis for a lease in each of `windows` (one ask per passport at a time; a request that
    /// waited for another's ask finds the room it made).
    async fn ask(&self, passport_id: &str, windows: &[Window], cost_millicents: u64) -> Result<(), FleetError> {
        let _one = self.passport_lock(passport_id).await;
        let still = self.lacking(passport_id, windows, cost_millicents);
        for w in still {
            let want = match w.limit {
                Limit::Cap(_) => self.lease_cents.max(cents_up(cost_millicents)),
                Limit::Rate(_) => self.lease_requests,
            };
            self.take(passport_id, &w, want).await?;
        }
        Ok(())
    }

    /// Held while a passport's claims change (asks, renewals, returns), so that they never
    /// interleave.
    async fn passport_lock(&self, passport_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut asking = self.asking.lock().unwrap_or_else(|p| p.into_inner());
            asking.entry(passport_id.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Renews a lease running low (background): under the passport's lock, if it still is.
    async fn renew(&self, key: &HoldingKey) -> Result<(), FleetError> {
        let _one = self.passport_lock(&key.0).await;
        let w = match self.table().get(key) {
            Some(h) if !h.short && h.headroom() * 2 < self.lease_size(h.window.limit) => h.window.clone(),
            _ => return Ok(()),
        };
        self.take(&key.0, &w, self.lease_size(w.limit)).await.map(|_| ())
    }

    /// Takes (or renews) a lease of `want` in window `w`, records it, and only then adds it to
    /// what the host may spend.
    async fn take(&self, passport_id: &str, w: &Window, want: u64) -> Result<u64, FleetError> {
        let key: HoldingKey = (Arc::from(passport_id), w.limit, w.start);
        let (held, renewal) = match self.table().get(&key) {
            Some(h) => (h.claim.max(h.used), true),
            None => (0, false),
        };
        let (grant, _redis_claim, total, recovering) = match self.call_lease(passport_id, w, want, held).await? {
            Some(answer) => answer,
            None => {
                // The epoch is gone: Redis lost the fleet's data. Re-publish, then ask again.
                self.reestablish().await?;
                self.call_lease(passport_id, w, want, held).await?.ok_or_else(|| FleetError::Protocol {
                    redis: self.conn.url().to_string(),
                    problem: "the epoch vanished again right after it was set".into(),
                })?
            }
        };
        let claim = held.saturating_add(grant);
        if grant > 0 {
            let event = LeaseEvent {
                op: if renewal { LeaseOp::Renewed } else { LeaseOp::Taken },
                passport_id: passport_id.to_string(),
                host_id: self.host.clone(),
                window: w.clone(),
                amount: grant,
                claim,
                fleet_total: Some(total),
                why: None,
            };
            self.record(event).await?;
        }
        let mut table = self.table();
        let h = table.holding(passport_id, w);
        // Redis may know a larger claim than the host (a grant whose record was lost in a crash):
        // the host keeps to what its records hold plus this grant, which is never more.
        h.claim = claim;
        h.short = grant < want;
        h.recovering = recovering;
        h.asked = Some(Instant::now());
        Ok(grant)
    }

    /// The lease script; `None` when Redis has no epoch.
    async fn call_lease(
        &self,
        passport_id: &str,
        w: &Window,
        want: u64,
        held: u64,
    ) -> Result<Option<(u64, u64, u64, bool)>, FleetError> {
        let expire_at = w.end.timestamp().saturating_add(KEY_GRACE_SECS);
        let mut call = self.lease_script.prepare_invoke();
        call.key(self.keys.budget(passport_id, &w.limit.name(), &w.label()))
            .key(self.keys.epoch())
            .arg(&self.host)
            .arg(w.amount)
            .arg(want)
            .arg(held)
            .arg(expire_at);
        let answer: Vec<i64> = self.conn.invoke(&call).await?;
        match answer.as_slice() {
            [-1, ..] => Ok(None),
            // Never more than asked, whatever Redis says: it is trusted with accounting only.
            [g, c, t, r] if *g >= 0 && *c >= 0 && *t >= 0 => {
                Ok(Some(((*g as u64).min(want), *c as u64, *t as u64, *r != 0)))
            }
            other => Err(FleetError::Protocol {
                redis: self.conn.url().to_string(),
                problem: format!("the lease script answered {other:?}"),
            }),
        }
    }

    async fn record(&self, event: LeaseEvent) -> Result<(), FleetError> {
        let Some(recorder) = self.recorder.get() else {
            return Err(FleetError::Protocol { redis: self.conn.url().to_string(), problem: "no recorder".into() });
        };
        recorder(event).await.map_err(|problem| FleetError::Protocol {
            redis: self.conn.url().to_string(),
            problem: format!("recording a lease failed: {problem}"),
        })
    }

    /// Says hello (creating the epoch if Redis lost it) and re-publishes every claim the host
    /// holds in the current windows.
    pub async fn reestablish(&self) -> Result<(), FleetError> {
        let claims: Vec<(String, Window, u64)> = self
            .table()
            .iter()
            .filter(|(_, h)| h.claim.max(h.used) > 0)
            .map(|((p, _, _), h)| (p.to_string(), h.window.clone(), h.claim.max(h.used)))
            .collect();
        let mut hello = self.hello_script.prepare_invoke();
        hello
            .key(self.keys.epoch())
            .key(self.keys.hosts())
            .arg(&self.host)
            .arg(if claims.is_empty() { 0 } else { 1 })
            .arg(self.lease_secs.saturating_mul(1000));
        let (epoch, created): (i64, i64) = self.conn.invoke(&hello).await?;
        if created == 1 && !claims.is_empty() {
            tracing::warn!(
                redis = %self.conn.url(),
                recovery_until = epoch,
                "fleet Redis lost its data; re-publishing this host's claims, no leases granted during recovery"
            );
        }
        for (passport, w, claim) in claims {
            if self.call_lease(&passport, &w, 0, claim).await?.is_none() {
                return Err(FleetError::Protocol {
                    redis: self.conn.url().to_string(),
                    problem: "the epoch vanished while claims were re-published".into(),
                });
            }
        }
        Ok(())
    }

    /// On the request path, in memory: whether a request that leaves this host's spend in the
    /// passport's window at `spend_after_millicents` fits in the host's claims, counting it in
    /// the rate windows when it does. One lock, no allocation unless it refuses.
    pub fn admit(&self, cp: &CompiledPassport, spend_after_millicents: u64, now: DateTime<Utc>) -> Result<(), Refusal> {
        if !shares_limits(cp) {
            return Ok(());
        }
        let id = cp.passport.claims.id.as_str();
        let refused = {
            let mut table = self.table();
            let entry = table.entry(id);
            entry.refresh(cp, now);
            let Entry { current, holdings } = entry;
            let mut refused = None;
            for w in current.iter() {
                let h = holdings.iter().find(|h| h.is(w));
                let (claim, used) = h.map_or((0, 0), |h| (h.claim, h.used));
                let fits = match w.limit {
                    Limit::Cap(_) => spend_after_millicents <= claim.saturating_mul(1000),
                    Limit::Rate(_) => used < claim,
                };
                if !fits {
                    let (short, recovering) = h.map_or((false, false), |h| (h.short, h.recovering));
                    refused = Some((w.clone(), claim, used, short, recovering));
                    break;
                }
            }
            if refused.is_none() {
                for w in current.iter() {
                    if let Some(h) = holdings.iter_mut().find(|h| h.is(w)) {
                        match w.limit {
                            Limit::Cap(_) => h.used = h.used.max(cents_up(spend_after_millicents)),
                            Limit::Rate(_) => h.used = h.used.saturating_add(1),
                        }
                    }
                }
            }
            refused
        };
        // The refusal's text is built outside the lock (it also asks the connection's health).
        match refused {
            None => Ok(()),
            Some((w, claim, used, short, recovering)) => Err(self.refusal(id, &w, claim, used, short, recovering)),
        }
    }

    fn refusal(&self, passport_id: &str, w: &Window, claim: u64, used: u64, short: bool, recovering: bool) -> Refusal {
        let what = |n: u64| match w.limit {
            Limit::Cap(_) => money(n.saturating_mul(1000)),
            Limit::Rate(_) => format!("{n} requests"),
        };
        let holds = format!(
            "This host's lease for passport {passport_id} ({} window {}) holds {}, {} of it used.",
            w.limit.name(),
            w.label(),
            what(claim),
            what(used)
        );
        if let super::Health::Down { since, error } = self.conn.health() {
            return Refusal {
                reason: "fleet_unavailable",
                detail: format!(
                    "Fleet Redis {} unavailable since {} ({error}). {holds} Requests are blocked until Redis answers again.",
                    self.conn.url(),
                    rfc3339(since)
                ),
            };
        }
        if recovering {
            return Refusal {
                reason: "fleet_unavailable",
                detail: format!(
                    "Fleet Redis {} lost its data and the hosts are re-publishing their claims; no lease is granted for up to {} s. {holds}",
                    self.conn.url(),
                    self.lease_secs
                ),
            };
        }
        if !short {
            return Refusal {
                reason: "fleet_unavailable",
                detail: format!(
                    "No fleet lease within {} ms from {}. {holds} Try again.",
                    WAIT_FOR_LEASE.as_millis(),
                    self.conn.url()
                ),
            };
        }
        let reason = match w.limit {
            Limit::Cap(_) => "spend_limit_exceeded",
            Limit::Rate(_) => "rate_limit_exceeded",
        };
        Refusal {
            reason,
            detail: format!(
                "The fleet's hosts together hold the passport's whole {} limit of {} in this window. {holds}",
                w.limit.name(),
                what(w.amount)
            ),
        }
    }

    /// Gives back the unused part of one holding (`why`: idle, window_end, shutdown) and records
    /// it. The host stops counting the unused part first: it never spends what it returns.
    async fn give_back(&self, key: &HoldingKey, why: &'static str) -> Result<(), FleetError> {
        let _one = self.passport_lock(&key.0).await;
        let (w, claim, used) = {
            let mut table = self.table();
            let Some(h) = table.get_mut(key) else { return Ok(()) };
            if h.claim <= h.used {
                if why == "window_end" {
                    table.remove(key);
                }
                return Ok(());
            }
            let before = (h.window.clone(), h.claim, h.used);
            h.claim = h.used;
            before
        };
        let mut call = self.return_script.prepare_invoke();
        call.key(self.keys.budget(&key.0, &w.limit.name(), &w.label())).arg(&self.host).arg(used);
        let result: Result<(i64, i64), FleetError> = self.conn.invoke(&call).await;
        if let Err(e) = result {
            // Not returned: Redis still counts it for this host, so nothing is spent twice; the
            // host simply spends no more of it.
            tracing::debug!(passport_id = %key.0, error = %e, "returning a lease failed; it stays claimed");
            return Err(e);
        }
        let event = LeaseEvent {
            op: LeaseOp::Returned,
            passport_id: key.0.to_string(),
            host_id: self.host.clone(),
            window: w.clone(),
            amount: claim - used,
            claim: used,
            fleet_total: None,
            why: Some(why),
        };
        let recorded = self.record(event).await;
        if why == "window_end" {
            self.table().remove(key);
        }
        recorded
    }

    /// One pass of the background work: says hello (re-publishing after a data loss), returns
    /// idle and ended leases, renews leases running low.
    pub async fn tick(&self, now: DateTime<Utc>) {
        let epoch: Result<Option<i64>, FleetError> = self.conn.query(redis::cmd("GET").arg(self.keys.epoch())).await;
        match epoch {
            Ok(None) => {
                if let Err(e) = self.reestablish().await {
                    tracing::debug!(error = %e, "re-establishing the fleet's claims failed; trying again");
                }
            }
            Ok(Some(_)) => {}
            Err(_) => return,
        }
        let idle_after = Duration::from_secs(self.lease_secs);
        let snapshot: Vec<(HoldingKey, Holding)> = self.table().iter().map(|(k, h)| (k, h.clone())).collect();
        for (key, h) in snapshot {
            let result = if h.window.end <= now {
                self.give_back(&key, "window_end").await
            } else if h.last_need.elapsed() >= idle_after {
                self.give_back(&key, "idle").await
            } else if !h.short && h.headroom() * 2 < self.lease_size(h.window.limit) {
                self.renew(&key).await
            } else {
                Ok(())
            };
            if result.is_err() {
                return;
            }
        }
    }

    /// The background task: [`Leases::tick`] every [`TICK`] until `stop`, then every unused
    /// part is returned (bounded: a Redis that is down keeps them claimed).
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.tick(Utc::now()).await,
                _ = stop.changed() => break,
            }
        }
        self.shutdown().await;
    }

    /// Returns every unused part (daemon stop), for at most two seconds.
    pub async fn shutdown(&self) {
        let keys: Vec<HoldingKey> = self.table().iter().map(|(k, _)| k).collect();
        let work = async {
            for key in keys {
                if self.give_back(&key, "shutdown").await.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), work).await.is_err() {
            tracing::warn!(
                "returning the fleet leases took longer than 2 s; the rest stay claimed until their window ends"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_the_engines_utc_windows_and_fixed_rate_windows() {
        let now: DateTime<Utc> = "2026-12-02T10:17:42Z".parse().unwrap();
        let w = Window {
            limit: Limit::Rate(RatePeriod::Minute),
            amount: 5,
            start: "2026-12-02T10:17:00Z".parse().unwrap(),
            end: "2026-12-02T10:18:00Z".parse().unwrap(),
        };
        assert_eq!(w.label(), w.start.timestamp().to_string());
        let cap = Window {
            limit: Limit::Cap(SpendWindow::Weekly),
            amount: 100,
            start: window_start(SpendWindow::Weekly, now),
            end: window_end(SpendWindow::Weekly, window_start(SpendWindow::Weekly, now)),
        };
        assert_eq!(cap.label(), "2026-11-30", "ISO week starts on Monday");
        assert_eq!(Limit::Cap(SpendWindow::Daily).name(), "cap-daily");
        assert_eq!(Limit::Rate(RatePeriod::Hour).name(), "rate-hour");
        assert_eq!(cents_up(0), 0);
        assert_eq!(cents_up(1), 1);
        assert_eq!(cents_up(1000), 1);
        assert_eq!(cents_up(1001), 2);
    }
}
