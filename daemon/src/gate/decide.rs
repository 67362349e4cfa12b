//! A gate's decision on one request (docs/gate.md, "How a request is decided").
//!
//! Two steps, so that nothing slow runs on the ledger's writer thread and nothing that must be
//! atomic runs outside it:
//! 1. [`precheck`] (pure, outside the store): route → permission and price; no passport →
//!    anonymous subset or `401`; the passport (signature, time, issuers, revocation, tier); the
//!    request's HTTP message signature, its key, its `Content-Digest` and its `created` window.
//! 2. [`evaluate`] (inside the decision's ledger transaction, against the stored state): the
//!    nonce (a replay is refused), the passport's own constraints and counters (`sluice-decide`,
//!    as the daemon evaluates them), then the gate's `[limits]` with their own counters. It
//!    returns the state writes (counters only for an allowed request, the nonce for every
//!    request that reached it) so the record and the state become durable together.
//!
//! `sluice gate check` runs the same two steps against a read-only view and writes nothing.

use super::catalog;
use super::config::GateConfig;
use super::records::{Charge, Spend};
use super::sig;
use super::Gate;
use crate::decide::{
    self, guardrail, ActionRequest, CompiledPassport, Decision, EvalOptions, Evaluation, Guardrail, HostVerdict,
    Reason, Usage,
};
use crate::domain::DomainName;
use crate::passport::{
    b64, jwk, Cents, Claims, Constraints, Passport, PassportError, SpendWindow, TrustTier, Verifier,
};
use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use std::sync::Arc;

/// A signature's `created` may be this far from the gate's clock (L2 and L3).
pub const CREATED_WINDOW_SECS: i64 = 60;
/// A nonce is remembered this long: past it, `created` is outside the window anyway.
const NONCE_TTL_SECS: i64 = 2 * CREATED_WINDOW_SECS + 1;
/// Most nonces remembered per passport (one window's worth of signed requests).
pub const MAX_NONCES_PER_PASSPORT: usize = 4096;
/// Longest nonce accepted.
pub const MAX_NONCE_BYTES: usize = 128;
/// Longest passport header accepted (the verifier has its own bound too).
const MAX_PASSPORT_HEADER: usize = 16 * 1024;

/// Names of the gate's own guardrails in `guardrails_evaluated`, around the engine's.
pub mod step {
    pub const ROUTE: &str = "gate_route";
    pub const PASSPORT: &str = "gate_passport";
    pub const SIGNATURE: &str = "gate_signature";
    pub const REPLAY: &str = "gate_replay";
    pub const LIMITS: &str = "gate_limits";
    pub const CATALOG: &str = "gate_catalog";
}

/// State keys in the gate's store.
pub mod key {
    /// The passport's own counters (`sluice-decide`'s `Usage`), as the daemon keeps them.
    pub fn usage(pp: &str) -> String {
        format!("usage/{pp}")
    }
    /// The counters of the gate's `[limits]` for this passport.
    pub fn gate_usage(pp: &str) -> String {
        format!("gate_usage/{pp}")
    }
    /// The nonces this passport used within the window.
    pub fn nonces(pp: &str) -> String {
        format!("nonces/{pp}")
    }
}

/// What the gate read from one request, before any check.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub method: http::Method,
    /// `scheme://authority/path?query`, as the client addressed the service.
    pub target_uri: String,
    /// Path and query.
    pub path: String,
    pub host: Option<String>,
    pub passport: Option<String>,
    pub agent_key: Option<String>,
    pub signature_input: Option<String>,
    pub signature: Option<String>,
    pub content_digest: Option<String>,
    /// The digest of the whole body, when the gate hashed it (signed requests).
    pub body_digest: Option<sig::ContentDigest>,
    /// `/check` without the body: the signed `Content-Digest` is checked against the signature
    /// only, and the service must check the body against it.
    pub digest_deferred: bool,
}

impl Arrival {
    pub fn is_signed(&self) -> bool {
        self.signature_input.is_some() || self.signature.is_some()
    }
}

/// How the answer is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Allowed (with or without a passport): forward, or 200 at `/check`.
    Allow,
    /// `401` with `WWW-Authenticate` and the hint.
    PassportRequired,
    /// `403` with the decision JSON.
    Refuse,
}

/// A decision, as answered and recorded.
#[derive(Debug, Clone)]
pub struct Decided {
    pub answer: Answer,
    pub decision: Decision,
    pub reason: Reason,
    pub detail: String,
    pub guardrails: Vec<Guardrail>,
    pub claims: Option<Claims>,
    pub permission: String,
    /// The catalog's price of this call (a gate with a catalog, once the price is known).
    pub charge: Option<Charge>,
    pub cost_millicents: u64,
    pub request_hash: Option<String>,
    pub signed: bool,
    pub tier: Option<TrustTier>,
    pub spend: Option<Spend>,
    /// State to write with the record.
    pub writes: Vec<(String, Vec<u8>)>,
}

impl Decided {
    /// A decision that knows nothing of a passport, a signature, a price or counters (the
    /// callers set those that apply with struct update syntax).
    pub fn bare(
        answer: Answer,
        decision: Decision,
        reason: Reason,
        detail: String,
        guardrails: Vec<Guardrail>,
        permission: String,
    ) -> Decided {
        Decided {
            answer,
            decision,
            reason,
            detail,
            guardrails,
            claims: None,
            permission,
            charge: None,
            cost_millicents: 0,
            request_hash: None,
            signed: false,
            tier: None,
            spend: None,
            writes: Vec::new(),
        }
    }

    pub fn all_passed(&self) -> bool {
        self.decision == Decision::Allow && self.guardrails.iter().all(|g| g.passed)
    }
}

/// A request whose passport and signature verified, ready for the transaction.
#[derive(Debug, Clone)]
pub struct Ready {
    pub passport: Arc<CompiledPassport>,
    pub permission: String,
    pub tier: TrustTier,
    pub signature: Option<sig::Verified>,
    pub request: ActionRequest,
    pub guardrails: Vec<Guardrail>,
}

/// The outcome of [`precheck`].
#[derive(Debug)]
pub enum Step {
    Decided(Box<Decided>),
    Evaluate(Box<Ready>),
}

fn pass(name: &'static str, detail: impl Into<String>) -> Guardrail {
    Guardrail { name: name.into(), passed: true, detail: detail.into().into() }
}

fn fail(name: &'static str, detail: impl Into<String>) -> Guardrail {
    Guardrail { name: name.into(), passed: false, detail: detail.into().into() }
}

struct Early<'a> {
    permission: &'a str,
    guardrails: Vec<Guardrail>,
    claims: Option<Claims>,
    request_hash: Option<String>,
    signed: bool,
    tier: Option<TrustTier>,
}

impl Early<'_> {
    fn refuse(mut self, answer: Answer, reason: Reason, name: &'static str, detail: String) -> Step {
        self.guardrails.push(fail(name, detail.clone()));
        Step::Decided(Box::new(Decided {
            claims: self.claims,
            request_hash: self.request_hash,
            signed: self.signed,
            tier: self.tier,
            ..Decided::bare(answer, Decision::Block, reason, detail, self.guardrails, self.permission.to_string())
        }))
    }
}

/// Step 1: everything that needs no stored state. `now` is seconds since the epoch.
pub fn precheck(gate: &Gate, a: &Arrival, now: i64) -> Step {
    let cfg = &gate.config;
    let permission = cfg.route_of(&a.method, &a.path);
    let mut early = Early {
        permission: &permission,
        guardrails: vec![pass(step::ROUTE, format!("{} {} needs permission {permission:?}", a.method, a.path))],
        claims: None,
        request_hash: None,
        signed: a.is_signed(),
        tier: None,
    };

    // No passport: the anonymous subset, or 401 with a hint.
    let Some(token) = a.passport.as_deref() else {
        if !a.is_signed() && cfg.is_anonymous(&a.method, &a.path) {
            early.guardrails.push(pass(step::PASSPORT, "no passport needed: the route is in the anonymous subset"));
            return Step::Decided(Box::new(Decided::bare(
                Answer::Allow,
                Decision::Allow,
                Reason::AnonymousAllowed,
                format!("{} {} is served without a passport", a.method, a.path),
                early.guardrails,
                "anonymous".into(),
            )));
        }
        let detail = format!(
            "{} {} needs a passport with permission {permission:?} (trust level {}). Send it in the Sluice-Passport header and sign the request (docs/gate.md).",
            a.method,
            a.path,
            cfg.trust_level.as_str()
        );
        return early.refuse(Answer::PassportRequired, Reason::PassportRequired, step::PASSPORT, detail);
    };

    // The passport.
    if token.len() > MAX_PASSPORT_HEADER {
        let detail = format!("the Sluice-Passport header is {} bytes, more than {MAX_PASSPORT_HEADER}", token.len());
        return early.refuse(Answer::Refuse, Reason::PassportInvalid, step::PASSPORT, detail);
    }
    let passport = match verify_passport(gate, token, now) {
        Ok(p) => p,
        Err((reason, detail)) => return early.refuse(Answer::Refuse, reason, step::PASSPORT, detail),
    };
    let claims = passport.passport.claims.clone();
    let tier = claims.trust_tier.max(cfg.trust_level);
    early.claims = Some(claims.clone());
    early.tier = Some(tier);
    early.guardrails.push(pass(
        step::PASSPORT,
        format!(
            "passport {} of agent {:?} from issuer {} (tier {})",
            claims.id,
            claims.agent_id,
            claims.issuer,
            tier.as_str()
        ),
    ));

    // The signature.
    let signature = if a.is_signed() {
        match verify_signature(a, &claims, tier, now) {
            Ok(v) => {
                early.request_hash = Some(v.request_hash.clone());
                early
                    .guardrails
                    .push(pass(step::SIGNATURE, format!("signed by the passport's key, created {}", v.created)));
                Some(v)
            }
            Err((reason, detail, hash)) => {
                early.request_hash = hash;
                return early.refuse(Answer::Refuse, reason, step::SIGNATURE, detail);
            }
        }
    } else if tier >= TrustTier::L2 {
        let detail = format!(
            "trust level {} needs a signed request: send Signature-Input, Signature and Content-Digest (RFC 9421, RFC 9530) made with the passport's key",
            tier.as_str()
        );
        return early.refuse(Answer::Refuse, Reason::SignatureRequired, step::SIGNATURE, detail);
    } else {
        early.guardrails.push(pass(step::SIGNATURE, "not signed (accepted at trust level L1)"));
        None
    };

    let host = a.host.as_deref().and_then(|h| DomainName::parse(h).ok());
    let request = ActionRequest {
        action: permission.clone(),
        // The catalog's price is set inside the transaction, where the passport's lock is read.
        cost_millicents: 0,
        host,
        method: Some(a.method.as_str().to_string()),
        path: Some(a.path.clone()),
    };
    let guardrails = early.guardrails;
    Step::Evaluate(Box::new(Ready { passport, permission: permission.clone(), tier, signature, request, guardrails }))
}

/// The passport, verified as the gate's trust level says: L1 any issuer (a passport that asks
/// for L2 or L3 itself needs a pinned issuer), L2 pinned issuers, L3 verified issuers.
/// Revocation (`state_dir/revoked`) is checked every time.
fn verify_passport(gate: &Gate, token: &str, now: i64) -> Result<Arc<CompiledPassport>, (Reason, String)> {
    let cfg = &gate.config;
    let revocations = super::revoked::AsRevocations(&gate.revoked);
    let pinned: &[_] = if cfg.trust_level >= TrustTier::L2 { &cfg.issuers } else { &[] };
    let mut result = Verifier::new(pinned, &revocations).verify(token, now);
    if matches!(result, Err(PassportError::TierNeedsPinnedIssuers { .. })) && !cfg.issuers.is_empty() {
        result = Verifier::new(&cfg.issuers, &revocations).verify(token, now);
    }
    let passport = result.map_err(|e| passport_refusal(&e, cfg))?;
    if let Err(e) = gate.revoked.check(&passport.claims.id) {
        return Err((
            Reason::PassportRevoked,
            format!("the gate's revocation list cannot be read ({e}); every passport is refused until it is fixed"),
        ));
    }
    if passport.claims.trust_tier.max(cfg.trust_level) == TrustTier::L3
        && !cfg.verified_issuers.contains(&passport.claims.issuer)
    {
        return Err((
            Reason::IssuerNotTrusted,
            format!("trust level L3 needs an issuer in verified_issuers; {} is not one", passport.claims.issuer),
        ));
    }
    gate.compiled(passport)
        .map_err(|e| (Reason::PassportInvalid, format!("the passport's CEL rules do not compile: {e}")))
}

fn passport_refusal(e: &PassportError, cfg: &GateConfig) -> (Reason, String) {
    let reason = match e {
        PassportError::UntrustedIssuer { .. } | PassportError::TierNeedsPinnedIssuers { .. } => {
            Reason::IssuerNotTrusted
        }
        other => Reason::of_passport_error(other),
    };
    let detail = match e {
        PassportError::UntrustedIssuer { issuer } => {
            format!("issuer {issuer} is not pinned by gate {:?} (trust level {})", cfg.name, cfg.trust_level.as_str())
        }
        PassportError::TierNeedsPinnedIssuers { tier } => {
            format!(
                "the passport asks for trust tier {tier}, which needs a pinned issuer, and gate {:?} pins none",
                cfg.name
            )
        }
        other => format!("the Sluice-Passport header is not a valid passport: {other}"),
    };
    (reason, detail)
}

type SigRefusal = (Reason, String, Option<String>);

/// The request's signature: the agent's key must be the passport's (`cnf.jkt`), the signature
/// must verify over this request, its `Content-Digest` must match the body, and at L2 and L3
/// `created` must be within ±60 s.
fn verify_signature(a: &Arrival, claims: &Claims, tier: TrustTier, now: i64) -> Result<sig::Verified, SigRefusal> {
    let bad = |d: String| (Reason::SignatureInvalid, d, None);
    let (Some(input), Some(signature)) = (a.signature_input.as_deref(), a.signature.as_deref()) else {
        return Err(bad("a signed request needs both Signature-Input and Signature".into()));
    };
    let key = agent_key(a.agent_key.as_deref(), claims).map_err(bad)?;
    let Some(content_digest) = a.content_digest.as_deref() else {
        return Err(bad("a signed request needs a Content-Digest header (RFC 9530), also for an empty body".into()));
    };
    let body = match (a.body_digest.as_ref(), a.digest_deferred) {
        (Some(b), _) => Some(b),
        (None, true) => None,
        (None, false) => return Err(bad("the body was not hashed".into())),
    };
    let req = sig::SignedRequest {
        method: a.method.as_str(),
        target_uri: &a.target_uri,
        content_digest,
        signature_input: input,
        signature,
    };
    let v = sig::verify(&req, &key, body).map_err(|e| match e {
        sig::SigError::DigestMismatch => bad(format!("{e}: the body was changed after it was signed")),
        sig::SigError::Invalid(e) => bad(format!("the request signature does not verify: {e}")),
    })?;
    let hash = Some(v.request_hash.clone());
    if v.keyid != claims.cnf_jkt {
        return Err((
            Reason::SignatureInvalid,
            format!("keyid {:?} is not the passport's key thumbprint (cnf.jkt {:?})", v.keyid, claims.cnf_jkt),
            hash,
        ));
    }
    if v.nonce.is_empty() || v.nonce.len() > MAX_NONCE_BYTES {
        return Err((Reason::SignatureInvalid, format!("the nonce must be 1 to {MAX_NONCE_BYTES} bytes"), hash));
    }
    if tier >= TrustTier::L2 && (v.created - now).abs() > CREATED_WINDOW_SECS {
        return Err((
            Reason::SignatureExpired,
            format!(
                "the signature was created at {} and the gate's clock says {now}: more than {CREATED_WINDOW_SECS} s apart; sign each request when it is sent (and check the clocks)",
                v.created
            ),
            hash,
        ));
    }
    Ok(v)
}

/// The agent's public key from `Sluice-Agent-Key` (base64url of the raw Ed25519 key); its RFC
/// 7638 thumbprint must be the passport's `cnf.jkt`.
fn agent_key(header: Option<&str>, claims: &Claims) -> Result<VerifyingKey, String> {
    let header = header.ok_or("a signed request needs the Sluice-Agent-Key header (the agent's public key)")?;
    let raw: [u8; 32] = b64::decode(header)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("Sluice-Agent-Key is not 32 bytes of strict base64url")?;
    let key = VerifyingKey::from_bytes(&raw).map_err(|_| "Sluice-Agent-Key is not an Ed25519 public key")?;
    if key.is_weak() {
        return Err("Sluice-Agent-Key is a small-order (weak) key".into());
    }
    if jwk::okp_thumbprint(&key) != claims.cnf_jkt {
        return Err(format!("Sluice-Agent-Key is not the key the passport names (cnf.jkt {:?})", claims.cnf_jkt));
    }
    Ok(key)
}

/// The gate's `[limits]` as a passport's constraints, so the same engine counts them.
fn limits_passport(cfg: &GateConfig, p: &CompiledPassport) -> Result<CompiledPassport, String> {
    let l = &cfg.limits;
    let mut claims = p.passport.claims.clone();
    claims.constraints = Constraints {
        max_per_action: l.per_call_cost_cents.map(Cents),
        max_cumulative: l.daily_cost_cents.map(Cents),
        cumulative_window: Some(SpendWindow::Daily),
        rate_per_minute: l.requests_per_minute.map(u64::from),
        rate_per_day: l.requests_per_day.map(u64::from),
        ..Constraints::default()
    };
    CompiledPassport::compile(Passport { token: String::new(), claims }).map_err(|e| e.to_string())
}

/// Reads stored state: a transaction's view, or a snapshot for a dry run.
pub type Read<'a> = dyn FnMut(&str) -> Result<Option<Vec<u8>>, String> + 'a;

/// Step 2, inside the decision's transaction (or against a snapshot, for a dry run).
pub fn evaluate(gate: &Gate, r: &Ready, read: &mut Read<'_>, now: DateTime<Utc>) -> Decided {
    let cfg = &gate.config;
    let claims = &r.passport.passport.claims;
    let pp = claims.id.as_str();
    let mut guardrails = r.guardrails.clone();
    let mut writes = Vec::new();
    let mut out = Decided {
        claims: Some(claims.clone()),
        request_hash: r.signature.as_ref().map(|s| s.request_hash.clone()),
        signed: r.signature.is_some(),
        tier: Some(r.tier),
        ..Decided::bare(
            Answer::Refuse,
            Decision::Block,
            Reason::StateError,
            String::new(),
            Vec::new(),
            r.permission.clone(),
        )
    };
    let refuse = |mut out: Decided,
                  mut guardrails: Vec<Guardrail>,
                  writes,
                  reason: Reason,
                  name: &'static str,
                  detail: String| {
        guardrails.push(fail(name, detail.clone()));
        out.reason = reason;
        out.detail = detail;
        out.guardrails = guardrails;
        out.writes = writes;
        out
    };

    // The nonce: once per passport within the window (L2, L3).
    if let (Some(s), true) = (&r.signature, r.tier >= TrustTier::L2) {
        let stored = match read(&key::nonces(pp)) {
            Ok(v) => v,
            Err(e) => return refuse(out, guardrails, writes, Reason::StateError, step::REPLAY, e),
        };
        let mut nonces = match Nonces::from_bytes(stored.as_deref()) {
            Ok(n) => n,
            Err(e) => return refuse(out, guardrails, writes, Reason::StateError, step::REPLAY, e),
        };
        nonces.prune(now.timestamp());
        if nonces.contains(&s.nonce) {
            let detail = format!(
                "nonce {:?} was already used by passport {pp} within the last {NONCE_TTL_SECS} s: a request is accepted once; sign a new request with a fresh nonce",
                s.nonce
            );
            return refuse(out, guardrails, writes, Reason::Replay, step::REPLAY, detail);
        }
        if nonces.len() >= MAX_NONCES_PER_PASSPORT {
            let detail = format!(
                "passport {pp} sent more than {MAX_NONCES_PER_PASSPORT} signed requests within {NONCE_TTL_SECS} s; wait and retry"
            );
            return refuse(out, guardrails, writes, Reason::RateLimitExceeded, step::REPLAY, detail);
        }
        nonces.insert(s.nonce.clone(), now.timestamp() + NONCE_TTL_SECS);
        writes.push((key::nonces(pp), nonces.to_bytes()));
        guardrails.push(pass(step::REPLAY, "nonce not seen within the window"));
    }

    // The catalog's price, with the passport's price lock.
    let mut request = r.request.clone();
    let mut lock_write = None;
    if cfg.catalog.is_some() {
        match price(gate, pp, &r.permission, read, now) {
            Ok((charge, lock, detail)) => {
                request.cost_millicents = charge.price_millicents;
                out.charge = Some(charge);
                out.cost_millicents = charge.price_millicents;
                lock_write = lock;
                guardrails.push(pass(step::CATALOG, detail));
            }
            Err((reason, detail)) => return refuse(out, guardrails, writes, reason, step::CATALOG, detail),
        }
    }
    let request = &request;

    // The passport's own constraints and counters.
    let host = HostVerdict::Allow;
    let eval = match load_usage(read, &key::usage(pp)) {
        Ok(u) => decide::evaluate(&r.passport, &u, request, &host, now, EvalOptions::default()),
        Err(e) => Evaluation::usage_corrupt(&r.passport, &e, now),
    };
    guardrails.extend(eval.guardrails.iter().filter(|g| g.name != guardrail::HOST_POLICY).cloned());
    out.spend = Some(Spend {
        window: eval.spend_window.as_str(),
        window_start: eval.spend_window_start,
        delta_millicents: 0,
        after_millicents: eval.spend_after_millicents,
    });
    if eval.decision != Decision::Allow {
        let (reason, detail) = if eval.decision == Decision::RequestHold {
            (Reason::ApprovalRequired, format!("{} A gate has no approvals: this request is refused.", eval.detail))
        } else {
            (eval.reason.clone(), eval.detail.clone())
        };
        out.reason = reason;
        out.detail = detail;
        out.guardrails = guardrails;
        out.writes = writes;
        return out;
    }

    // The gate's own limits, with their own counters.
    let limits = match limits_passport(cfg, &r.passport) {
        Ok(l) => l,
        Err(e) => return refuse(out, guardrails, writes, Reason::StateError, step::LIMITS, e),
    };
    let gate_eval = match load_usage(read, &key::gate_usage(pp)) {
        Ok(u) => decide::evaluate(&limits, &u, request, &host, now, EvalOptions::default()),
        Err(e) => Evaluation::usage_corrupt(&limits, &e, now),
    };
    const LIMIT_STEPS: &[&str] = &[
        guardrail::RATE_PER_MINUTE,
        guardrail::RATE_PER_DAY,
        guardrail::MAX_PER_ACTION,
        guardrail::MAX_CUMULATIVE,
        guardrail::USAGE,
    ];
    for g in gate_eval.guardrails.iter().filter(|g| LIMIT_STEPS.contains(&&*g.name)) {
        guardrails.push(Guardrail {
            name: format!("{}.{}", step::LIMITS, g.name).into(),
            passed: g.passed,
            detail: g
                .detail
                .replace(&format!("Passport {pp}"), "The gate")
                .replace(&format!("passport {pp}"), "the gate")
                .into(),
        });
    }
    if gate_eval.decision != Decision::Allow {
        let detail = format!("Gate {:?} limit: {}", cfg.name, guardrails.last().map(|g| &*g.detail).unwrap_or(""));
        out.reason = gate_eval.reason.clone();
        out.detail = detail;
        out.guardrails = guardrails;
        out.writes = writes;
        return out;
    }

    // Allowed: both counters move with the record.
    if let (Some(u), Some(g)) = (eval.usage_to_persist(), gate_eval.usage_to_persist()) {
        writes.push((key::usage(pp), u.to_bytes()));
        writes.push((key::gate_usage(pp), g.to_bytes()));
    }
    if let Some(lock) = lock_write {
        writes.push(lock);
    }
    out.spend = Some(Spend {
        window: eval.spend_window.as_str(),
        window_start: eval.spend_window_start,
        delta_millicents: eval.spend_delta_millicents,
        after_millicents: eval.spend_after_millicents,
    });
    out.answer = Answer::Allow;
    out.decision = Decision::Allow;
    out.reason = Reason::Allowed;
    out.detail = format!("passport {pp} may {:?} at gate {:?}", r.permission, cfg.name);
    out.guardrails = guardrails;
    out.writes = writes;
    out
}

/// A call's charge, the price lock to write with it (its first served call), and the detail.
type Priced = (Charge, Option<(String, Vec<u8>)>, String);

/// The price of `permission` for passport `pp`: the version in force, against the version the
/// passport's first served call locked (read from the store). Returns the charge, the lock to
/// write if this is that first call, and the guardrail's detail; or the refusal.
fn price(
    gate: &Gate,
    pp: &str,
    permission: &str,
    read: &mut Read<'_>,
    now: DateTime<Utc>,
) -> Result<Priced, (Reason, String)> {
    let name = &gate.config.name;
    let Some(current) = gate.catalogs.in_force(now) else {
        return Err((
            Reason::PermissionNotOffered,
            format!("gate {name:?} has no catalog version in force yet, so it offers nothing; its operator must run `sluice catalog publish`"),
        ));
    };
    let locked = match read(&catalog::key::lock(pp)) {
        Ok(None) => None,
        Ok(Some(b)) => match std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(v) => Some(v),
            None => return Err((Reason::StateError, format!("the price lock of passport {pp} cannot be read"))),
        },
        Err(e) => return Err((Reason::StateError, format!("the price lock of passport {pp} cannot be read: {e}"))),
    };
    let Some((p, version)) = catalog::price_for(&gate.catalogs, &current, locked, permission) else {
        return Err((
            Reason::PermissionNotOffered,
            format!(
                "catalog version {} of gate {name:?} does not offer permission {permission:?} (see /v1/catalog)",
                current.version()
            ),
        ));
    };
    let total = p.total_millicents();
    if total > crate::money::MAX_MILLICENTS {
        return Err((Reason::InvalidRequest, format!("the price of {permission:?} is out of range")));
    }
    let charge = Charge { catalog_version: version, price_millicents: total };
    let lock = match locked {
        None => Some((catalog::key::lock(pp), current.version().to_string().into_bytes())),
        Some(_) => None,
    };
    let held = match locked {
        Some(l) if l == version && l != current.version() => {
            format!(" (the price of version {l}, locked by the passport's first call)")
        }
        Some(l) => format!(" (price locked at version {l}; version {} is not dearer)", current.version()),
        None => format!(" (first call: locks version {})", current.version()),
    };
    let detail =
        format!("{permission:?} costs {} cents by catalog version {version}{held}", crate::money::cents_text(total));
    Ok((charge, lock, detail))
}

fn load_usage(read: &mut Read<'_>, key: &str) -> Result<Usage, decide::UsageError> {
    match read(key) {
        Ok(Some(bytes)) => Usage::from_bytes(&bytes),
        Ok(None) => Ok(Usage::default()),
        Err(e) => Err(decide::UsageError::Inconsistent(format!("cannot be read: {e}"))),
    }
}

/// A passport's recent nonces with their expiry (unix seconds): strict JSON `[[nonce, exp], ...]`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Nonces(Vec<(String, i64)>);

impl Nonces {
    pub fn from_bytes(b: Option<&[u8]>) -> Result<Nonces, String> {
        match b {
            None => Ok(Nonces::default()),
            Some(b) => {
                serde_json::from_slice(b).map(Nonces).map_err(|e| format!("the stored nonces cannot be read: {e}"))
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).unwrap_or_default()
    }

    pub fn prune(&mut self, now: i64) {
        self.0.retain(|(_, exp)| *exp > now);
    }

    pub fn contains(&self, n: &str) -> bool {
        self.0.iter().any(|(x, _)| x == n)
    }

    pub fn insert(&mut self, n: String, exp: i64) {
        self.0.push((n, exp));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
