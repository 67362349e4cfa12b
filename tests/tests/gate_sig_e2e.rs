//! Linked attestations end to end: a real `sluice daemon` with the eBPF redirect and
//! `[gates] hosts`, an agent under `sluice run --passport P --key P.key` (curl, no proxy
//! settings), and a loopback HTTPS "gate" that records every request it receives, headers and
//! body. The gate verifies what it got with `sluice-httpsig` and the agent's public key, as a real
//! gate does; the request hash it computes must be the one in the daemon's decision record.
//!
//! Also: the same agent without `--key` reaches the gate unsigned; a body over
//! `[gates] max_body_bytes` is refused (`gate_body_too_large`) and never reaches the gate; the
//! agent's own forged signature headers are replaced, not forwarded; a host that is not a gate
//! gets nothing added.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use sluice_e2e::daemon::Daemon;
use sluice_e2e::root_or_skip;
use sluice_e2e::upstream::TestCa;
use sluice_httpsig as httpsig;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

const GATE: &str = "gate.example.test";
const PLAIN: &str = "plain.example.test";
const MAX_BODY: usize = 256;

/// One request the gate received.
#[derive(Debug, Clone)]
struct Got {
    method: String,
    /// `Host`, or `:authority` over HTTP/2.
    authority: String,
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// What a gate does: rebuild `@target-uri`, digest the body, verify with the agent's key.
    fn verify(&self, key: &ed25519_dalek::VerifyingKey) -> Result<httpsig::Verified, httpsig::Error> {
        let uri = httpsig::target_uri("https", &self.authority, &self.path)?;
        let received = httpsig::Received {
            content_digest: self.header("content-digest").unwrap_or(""),
            signature_input: self.header("signature-input").unwrap_or(""),
            signature: self.header("signature").unwrap_or(""),
        };
        let body = httpsig::ContentDigest::of(&self.body);
        httpsig::verify(key, httpsig::Target { method: &self.method, target_uri: &uri }, received, &body)
    }
}

/// What this "gate" answers at `/.well-known/sluice`: a gate that declares no catalog (so the
/// daemon, after `sluice discover`, sends its requests unpriced), with an empty log's checkpoint
/// signed by its key.
fn well_known() -> Bytes {
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let host = sluice::ledger::HostKey::from_signing_key(key.clone());
    let cp = sluice::ledger::checkpoint::sign(
        sluice::ledger::Checkpoint {
            origin: host.origin().to_string(),
            size: 0,
            root: sluice::ledger::merkle::empty_root(),
        },
        &host,
    );
    let raw = key.verifying_key().to_bytes();
    let doc = serde_json::json!({
        "gate_id": format!("gate_{}", base64_url(&raw)),
        "name": "test-gate",
        "public_key": base64_url(&raw),
        "trust_level": "L1",
        "catalog_version": null,
        "catalog_content_hash": null,
        "catalog_url": "/v1/catalog",
        "log_origin": host.origin(),
        "checkpoint": cp.note,
    });
    Bytes::from(doc.to_string())
}

/// A loopback HTTPS server (on a port of its own, returned) that records every request (whole
/// body) and answers `ok`; `/.well-known/sluice` (not recorded) answers [`well_known`].
fn start_gate(rt: &tokio::runtime::Runtime, ca: &TestCa) -> (Arc<Mutex<Vec<Got>>>, u16) {
    let wk = well_known();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config(&[GATE, PLAIN])));
    let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0))).expect("bind gate");
    let port = listener.local_addr().expect("gate addr").port();
    let seen: Arc<Mutex<Vec<Got>>> = Arc::default();
    let st = seen.clone();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, st, wk) = (acceptor.clone(), st.clone(), wk.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (st, wk) = (st.clone(), wk.clone());
                    async move {
                        if req.uri().path() == "/.well-known/sluice" {
                            return Ok::<_, Infallible>(Response::new(Full::new(wk)));
                        }
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(String::from)
                            })
                            .unwrap_or_default();
                        let method = req.method().to_string();
                        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        st.lock().unwrap().push(Got { method, authority, path, headers: parts.headers, body });
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (seen, port)
}

struct World {
    d: Daemon,
    rt: tokio::runtime::Runtime,
    seen: Arc<Mutex<Vec<Got>>>,
    port: u16,
    _ca_dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let ca = TestCa::new();
        let ca_dir = tempfile::tempdir().unwrap();
        let ca_path = ca.write(ca_dir.path());
        let (seen, port) = start_gate(&rt, &ca);
        let dns_extra = format!("static_hosts = {{ \"{GATE}\" = \"127.0.0.1\", \"{PLAIN}\" = \"127.0.0.1\" }}");
        let extra = format!(
            "[upstream_tls]\nextra_roots = [\"{}\"]\n[gates]\nhosts = [\"{GATE}\"]\nmax_body_bytes = {MAX_BODY}\n",
            ca_path.display()
        );
        let d = Daemon::start_full("root", "", &dns_extra, &extra, &[]);
        // Requests to a gate host wait for a verified catalog: this gate declares none.
        let out = d.cli(&["discover", &format!("https://{GATE}:{port}")]);
        assert!(
            out.status.success(),
            "discover: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        World { d, rt, seen, port, _ca_dir: ca_dir }
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    /// `sluice run --passport P [--key K] -- curl …`; curl's stdout and the status line.
    fn curl(&self, passport: &Path, key: Option<&Path>, extra: &[&str]) -> Output {
        let mut args = vec!["run", "--passport", passport.to_str().unwrap()];
        if let Some(k) = key {
            args.extend(["--key", k.to_str().unwrap()]);
        }
        args.extend(["--", "curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}"]);
        args.extend_from_slice(extra);
        self.d.cli(&args)
    }

    fn take(&self) -> Vec<Got> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn status(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().last().unwrap_or("").to_string()
}

#[test]
fn requests_to_a_gate_are_signed_with_the_agent_key_and_linked_by_hash() {
    if !root_or_skip("requests_to_a_gate_are_signed_with_the_agent_key_and_linked_by_hash") {
        return;
    }
    let w = World::new();
    let _rt = &w.rt;
    let (passport, passport_id) = w.d.issue(
        "agent",
        &["--permission", "web:*", "--constraint", &format!("core:scope:domain_allowlist=[\"{GATE}\", \"{PLAIN}\"]")],
    );
    let key_path = PathBuf::from(format!("{}.key", passport.display()));
    let agent_key = sluice::keyfile::load_signing_key(&key_path).unwrap().verifying_key();
    let token = std::fs::read_to_string(&passport).unwrap().trim().to_string();
    let body = r#"{"order":"A-1","qty":2}"#;

    // 1. Signed, with the agent's own forged signature headers replaced.
    let out = w.curl(
        &passport,
        Some(&key_path),
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-H",
            "Signature: sluice=:AAAA:",
            "-H",
            "Sluice-Passport: forged",
            "--data-binary",
            body,
            &w.url(GATE, "/v1/orders?id=7&x=a%20b"),
        ],
    );
    assert_eq!(
        status(&out),
        "200",
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        w.d.log()
    );
    let got = w.take();
    assert_eq!(got.len(), 1, "{got:?}");
    let g = &got[0];
    assert_eq!(g.body, body.as_bytes());
    assert_eq!(g.header("sluice-passport"), Some(token.as_str()));
    assert_eq!(g.header("sluice-agent-key"), Some(base64_url(agent_key.as_bytes()).as_str()));
    assert_eq!(g.headers.get_all("signature").iter().count(), 1);
    let v = g.verify(&agent_key).unwrap_or_else(|e| panic!("the gate cannot verify: {e}\n{g:?}"));
    let claims = sluice::passport::inspect(&token).unwrap().0;
    assert_eq!(v.keyid, claims["cnf"]["jkt"].as_str().unwrap());
    let now = sluice::passport::now() as u64;
    assert!(v.created <= now && now - v.created < 120, "created {} now {now}", v.created);
    // Another key does not verify it.
    let other = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    assert_eq!(g.verify(&other).unwrap_err(), httpsig::Error::SignatureInvalid);
    // Replayed with another body, the digest no longer matches.
    let mut tampered = g.clone();
    tampered.body = Bytes::from_static(br#"{"order":"A-1","qty":200}"#);
    assert_eq!(tampered.verify(&agent_key).unwrap_err(), httpsig::Error::DigestMismatch);

    // 2. An empty body (GET) is signed too.
    let out = w.curl(&passport, Some(&key_path), &[&w.url(GATE, "/v1/catalog")]);
    assert_eq!(status(&out), "200");
    let got = w.take();
    let empty = got[0].verify(&agent_key).unwrap();
    assert_eq!(got[0].header("content-digest"), Some("sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"));

    // 3. Without --key: forwarded as the agent sent it.
    let out = w.curl(&passport, None, &["-X", "POST", "--data-binary", body, &w.url(GATE, "/v1/orders")]);
    assert_eq!(status(&out), "200");
    let got = w.take();
    assert!(got[0].header("signature").is_none() && got[0].header("sluice-passport").is_none(), "{got:?}");

    // 4. A host that is not a gate gets nothing added, even with --key.
    let out = w.curl(&passport, Some(&key_path), &[&w.url(PLAIN, "/x")]);
    assert_eq!(status(&out), "200");
    let got = w.take();
    assert!(got[0].header("signature").is_none() && got[0].header("content-digest").is_none(), "{got:?}");

    // 5. A body over [gates] max_body_bytes: refused, never sent.
    let big = "x".repeat(MAX_BODY + 1);
    let out = w.curl(&passport, Some(&key_path), &["-X", "POST", "--data-binary", &big, &w.url(GATE, "/v1/orders")]);
    assert_eq!(status(&out), "403", "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("gate_body_too_large"));
    assert!(w.take().is_empty(), "a refused body reached the gate");

    // The daemon's records: the same request hashes, on the passport's chain.
    let records = w.d.verified_records();
    let signed: Vec<&Value> = records.iter().filter(|r| r.get("signed_request_hash").is_some()).collect();
    assert_eq!(signed.len(), 2, "{signed:#?}");
    assert_eq!(signed[0]["signed_request_hash"], v.request_hash.as_str());
    assert_eq!(signed[1]["signed_request_hash"], empty.request_hash.as_str());
    for r in &signed {
        assert_eq!((r["kind"].as_str(), r["decision"].as_str()), (Some("decision"), Some("allow")));
        assert_eq!(r["passport_id"], passport_id.as_str());
        assert_eq!(r["host"], GATE);
    }
    let refused: Vec<&Value> = records.iter().filter(|r| r["reason"] == "gate_body_too_large").collect();
    assert_eq!(refused.len(), 1, "{records:#?}");
    assert!(refused[0].get("signed_request_hash").is_none());
    // The key never reached the store or the log.
    let secret = sluice::keyfile::load_signing_key(&key_path).unwrap().to_bytes();
    let b64 = base64_url(&secret);
    let log = w.d.log();
    assert!(!log.contains(&b64), "the agent key is in the daemon's log");
    assert!(!records.iter().any(|r| r.to_string().contains(&b64)), "the agent key is in a record");
}

fn base64_url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[test]
fn a_key_that_is_not_the_passport_s_is_refused_before_the_agent_runs() {
    if !root_or_skip("a_key_that_is_not_the_passport_s_is_refused_before_the_agent_runs") {
        return;
    }
    let w = World::new();
    let (passport, _) = w.d.issue("agent", &["--permission", "web:*"]);
    let (other, _) = w.d.issue("other", &["--permission", "web:*"]);
    let other_key = PathBuf::from(format!("{}.key", other.display()));
    let out = w.curl(&passport, Some(&other_key), &[&w.url(GATE, "/")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent_key") || err.contains("possession"), "{err}");
    assert!(w.take().is_empty());
    assert!(w.d.sandbox_cgroups().is_empty(), "a sandbox was left behind");
}
