//! Who may use the console: the token file, sessions, CSRF tokens, the login-failure limit, and
//! the `Host`/`Origin` checks that stop a DNS-rebinding page from talking to it.
//!
//! The token (`state_dir/console.token`, 0600, made at start if absent) is the only credential.
//! Posting it to `/login` opens a session: a random id in an `HttpOnly; SameSite=Strict` cookie,
//! with its own random CSRF token that every state-changing request must send back in the
//! `X-CSRF-Token` header. Sessions live in memory only: a restart logs everyone out.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The token file's name in `state_dir`.
pub const TOKEN_FILE: &str = "console.token";
/// The session cookie's name.
pub const COOKIE: &str = "sluice_console";
/// A token shorter than this is refused (the generated one has 43 characters).
const MIN_TOKEN_CHARS: usize = 32;
const MAX_TOKEN_FILE: u64 = 4096;
/// Sessions open at once; logging in beyond it ends the oldest.
pub const MAX_SESSIONS: usize = 32;
/// Failed logins allowed per [`FAILURE_WINDOW`], all clients together; then logins are refused
/// until the window ends.
pub const MAX_FAILURES: u32 = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error(
        "{path}: group or others may read or write it (mode {mode:o}); run `chmod 600 {path}` (the token opens the console)",
        path = .path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "{path}: the token is shorter than {MIN_TOKEN_CHARS} characters or holds whitespace inside; delete the file and restart the daemon to get a new one",
        path = .path.display()
    )]
    Weak { path: PathBuf },
    #[error("{path}: cannot read its mode: {source}", path = .path.display())]
    Stat { path: PathBuf, source: std::io::Error },
}

/// The console token, compared in constant time.
pub struct Token {
    digest: [u8; 32],
}

impl Token {
    /// Reads `state_dir/console.token`, creating it (0600, 256 random bits) if absent.
    pub fn load_or_create(state_dir: &Path) -> Result<Token, TokenError> {
        let path = state_dir.join(TOKEN_FILE);
        if std::fs::symlink_metadata(&path).is_err() {
            let fresh = Zeroizing::new(format!("{}\n", B64.encode(rand::random::<[u8; 32]>())));
            match crate::files::create_new(&path, fresh.as_bytes(), 0o600) {
                Ok(()) => tracing::info!(path = %path.display(), "console token created"),
                // Another process made it in between: read that one.
                Err(crate::files::FileError::Exists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let opened = crate::files::open(&path, crate::files::Links::Refuse)?;
        let mode = opened.meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Permissions { path, mode });
        }
        let text = opened.read_text(MAX_TOKEN_FILE)?;
        Token::from_text(&text).ok_or(TokenError::Weak { path })
    }

    /// The token in a file's text (surrounding whitespace ignored).
    fn from_text(text: &str) -> Option<Token> {
        let t = text.trim();
        if t.chars().count() < MIN_TOKEN_CHARS || t.chars().any(char::is_whitespace) {
            return None;
        }
        Some(Token { digest: Sha256::digest(t.as_bytes()).into() })
    }

    /// Whether `candidate` is the token. Both sides are hashed first, so the comparison takes
    /// the same time whatever the candidate's length or content.
    pub fn matches(&self, candidate: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(candidate.trim().as_bytes()).into();
        bool::from(d.ct_eq(&self.digest))
    }
}

/// An open session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The cookie's value.
    pub id: String,
    pub csrf: String,
    pub expires: Instant,
    /// Seconds since the epoch, for the page.
    pub expires_at_unix: i64,
}

/// The sessions in memory.
pub struct Sessions {
    ttl: Duration,
    open: Mutex<HashMap<String, Session>>,
}

fn random_id() -> String {
    B64.encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    pub fn new(ttl: Duration) -> Sessions {
        Sessions { ttl, open: Mutex::new(HashMap::new()) }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session (ending expired ones, and the oldest when [`MAX_SESSIONS`] are open).
    pub fn open(&self) -> Session {
        let now = Instant::now();
        let session = Session {
            id: random_id(),
            csrf: random_id(),
            expires: now + self.ttl,
            expires_at_unix: chrono::Utc::now().timestamp().saturating_add(self.ttl.as_secs() as i64),
        };
        let mut open = self.lock();
        open.retain(|_, s| s.expires > now);
        while open.len() >= MAX_SESSIONS {
            let Some(oldest) = open.values().min_by_key(|s| s.expires).map(|s| s.id.clone()) else { break };
            open.remove(&oldest);
        }
        open.insert(session.id.clone(), session.clone());
        session
    }

    /// The live session a request's `Cookie` header names, if any.
    pub fn find(&self, cookie_header: Option<&str>) -> Option<Session> {
        let id = cookie_value(cookie_header?, COOKIE)?;
        let now = Instant::now();
        let mut open = self.lock();
        match open.get(id) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                open.remove(id);
                None
            }
            None => None,
        }
    }

    /// Whether the session `id` is still open (an event stream ends when it is not).
    pub fn is_open(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|s| s.expires > Instant::now())
    }

    pub fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The `Set-Cookie` value opening `s`.
    pub fn cookie(&self, s: &Session) -> String {
        format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", s.id, self.ttl.as_secs())
    }

    /// The `Set-Cookie` value that removes the cookie.
    pub fn cookie_cleared() -> String {
        format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
    }
}

/// Whether `sent` is the session's CSRF token (constant time).
pub fn csrf_matches(session: &Session, sent: Option<&str>) -> bool {
    let Some(sent) = sent else { return false };
    let (a, b): ([u8; 32], [u8; 32]) =
        (Sha256::digest(sent.as_bytes()).into(), Sha256::digest(session.csrf.as_bytes()).into());
    bool::from(a.ct_eq(&b))
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').filter_map(|part| part.trim().split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// Failed logins, all clients together: at most [`MAX_FAILURES`] per [`FAILURE_WINDOW`].
pub struct LoginLimiter {
    state: Mutex<(Instant, u32)>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter { state: Mutex::new((Instant::now(), 0)) }
    }
}

impl LoginLimiter {
    /// `Err(seconds to wait)` while logins are refused.
    pub fn check(&self, now: Instant) -> Result<(), u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(s.0) >= FAILURE_WINDOW {
            *s = (now, 0);
        }
        if s.1 >= MAX_FAILURES {
            let left = FAILURE_WINDOW.saturating_sub(now.duration_since(s.0));
            return Err(left.as_secs().max(1));
        }
        Ok(())
    }

    pub fn failed(&self, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(s.0) >= FAILURE_WINDOW {
            *s = (now, 0);
        }
        s.1 = s.1.saturating_add(1);
    }
}

/// The `Host` values the console answers to, and the `Origin`s it accepts: its listen address
/// spelled as an address, and `localhost` with its port. Anything else (a rebound DNS name, a
/// page on another origin) is refused before the request is read further.
pub struct Origins {
    hosts: Vec<String>,
    origins: Vec<String>,
}

impl Origins {
    pub fn for_listen(listen: SocketAddr) -> Origins {
        let port = listen.port();
        let hosts = vec![listen.to_string(), format!("localhost:{port}")];
        let origins = hosts.iter().map(|h| format!("http://{h}")).collect();
        Origins { hosts, origins }
    }

    /// Whether a request's `Host` header names the console.
    pub fn host_ok(&self, host: Option<&str>) -> bool {
        host.is_some_and(|h| self.hosts.iter().any(|ok| ok.eq_ignore_ascii_case(h.trim())))
    }

    /// Whether a state-changing request's `Origin` is the console's own. A request without one
    /// is refused: browsers send it with every POST, and a script can add it.
    pub fn origin_ok(&self, origin: Option<&str>) -> bool {
        origin.is_some_and(|o| self.origins.iter().any(|ok| ok.eq_ignore_ascii_case(o.trim())))
    }

    /// The accepted `Host` values, for error messages.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_token_file_is_made_0600_and_read_back_and_a_loose_or_weak_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = Token::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(TOKEN_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(t.matches(text.trim()) && t.matches(&text), "the file's own token");
        assert!(!t.matches("") && !t.matches(&text.trim()[1..]) && !t.matches(&format!("{}x", text.trim())));
        // Read again, the same token.
        assert!(Token::load_or_create(dir.path()).unwrap().matches(&text));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Token::load_or_create(dir.path()).err().unwrap().to_string();
        assert!(e.contains("chmod 600") && e.contains(TOKEN_FILE), "{e}");

        std::fs::remove_file(&path).unwrap();
        crate::files::create_new(&path, b"short\n", 0o600).unwrap();
        let e = Token::load_or_create(dir.path()).err().unwrap().to_string();
        assert!(e.contains("shorter than"), "{e}");

        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
        assert!(Token::load_or_create(dir.path()).is_err(), "a symlink in the state directory is followed");
    }

    #[test]
    fn sessions_expire_are_bounded_and_found_only_by_their_cookie() {
        let s = Sessions::new(Duration::from_secs(60));
        let a = s.open();
        let header = format!("other=1; {COOKIE}={}; x=y", a.id);
        assert_eq!(s.find(Some(&header)).map(|f| f.id), Some(a.id.clone()));
        assert!(s.find(Some("sluice_console=forged")).is_none());
        assert!(s.find(Some(&format!("not_{COOKIE}={}", a.id))).is_none());
        assert!(s.find(None).is_none());
        assert!(csrf_matches(&a, Some(&a.csrf)));
        assert!(!csrf_matches(&a, Some(&a.id)) && !csrf_matches(&a, None) && !csrf_matches(&a, Some("")));
        for _ in 0..MAX_SESSIONS {
            s.open();
        }
        assert_eq!(s.lock().len(), MAX_SESSIONS);
        assert!(!s.is_open(&a.id), "the oldest session survived the bound");
        let b = s.open();
        s.close(&b.id);
        assert!(!s.is_open(&b.id));
        let short = Sessions::new(Duration::from_millis(1));
        let c = short.open();
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.find(Some(&format!("{COOKIE}={}", c.id))).is_none(), "an expired session was found");
        let cookie = s.cookie(&s.open());
        for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=60"] {
            assert!(cookie.contains(part), "{cookie}");
        }
    }

    #[test]
    fn login_failures_are_limited_then_allowed_again_after_the_window() {
        let l = LoginLimiter::default();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(l.check(t0).is_ok());
            l.failed(t0);
        }
        let wait = l.check(t0 + Duration::from_secs(10)).unwrap_err();
        assert!((1..=50).contains(&wait), "{wait}");
        assert!(l.check(t0 + FAILURE_WINDOW).is_ok());
    }

    #[test]
    fn only_the_listen_address_and_localhost_are_accepted_as_host_and_origin() {
        let o = Origins::for_listen("127.0.0.1:7070".parse().unwrap());
        for ok in ["127.0.0.1:7070", "localhost:7070", "LOCALHOST:7070"] {
            assert!(o.host_ok(Some(ok)), "{ok}");
            assert!(o.origin_ok(Some(&format!("http://{ok}"))), "{ok}");
        }
        for bad in ["evil.example:7070", "127.0.0.1:7071", "127.0.0.1", "localhost", "7f000001.rebind.example:7070", ""]
        {
            assert!(!o.host_ok(Some(bad)), "{bad}");
            assert!(!o.origin_ok(Some(&format!("http://{bad}"))), "{bad}");
        }
        assert!(!o.host_ok(None) && !o.origin_ok(None) && !o.origin_ok(Some("null")));
        assert!(!o.origin_ok(Some("https://127.0.0.1:7070")) && !o.origin_ok(Some("127.0.0.1:7070")));
        let v6 = Origins::for_listen("[::1]:7070".parse().unwrap());
        assert!(v6.host_ok(Some("[::1]:7070")) && !v6.host_ok(Some("127.0.0.1:7070")));
    }
}
