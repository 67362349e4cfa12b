//! The connection to the fleet's Redis: one multiplexed connection, every command bounded by
//! [`COMMAND_TIMEOUT`], reconnection with exponential backoff, and a health state that says
//! since when Redis has been up or down (and why), for messages and `fleet_unavailable` answers.
//!
//! No caller ever waits longer than [`CONNECT_TIMEOUT`] + [`COMMAND_TIMEOUT`]: while the backoff
//! runs, a command fails at once with [`FleetError::Unavailable`].

use super::{FleetError, BACKOFF_MAX, BACKOFF_MIN, COMMAND_TIMEOUT, CONNECT_TIMEOUT, MAX_CA_FILE, MAX_PASSWORD_FILE};
use crate::config::{FleetConfig, RedisUrl};
use crate::files::{self, Links};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, IntoConnectionInfo};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use zeroize::Zeroizing;

/// What the host knows of Redis right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The last command (or connection attempt) succeeded; connected since then.
    Up { since: SystemTime },
    /// Unreachable or failing since `since` (the first failure of this outage); `error` is the
    /// latest reason.
    Down { since: SystemTime, error: String },
}

impl Health {
    pub fn is_up(&self) -> bool {
        matches!(self, Health::Up { .. })
    }

    /// When the current state began.
    pub fn since(&self) -> SystemTime {
        match self {
            Health::Up { since } | Health::Down { since, .. } => *since,
        }
    }
}

/// RFC 3339 UTC, seconds: how times appear in messages.
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

struct Slot {
    conn: Option<MultiplexedConnection>,
    /// No connection attempt before this.
    next_attempt: Instant,
    backoff: Duration,
}

/// The handle every fleet task shares (cheap to share behind an `Arc`).
pub struct RedisConn {
    url: RedisUrl,
    client: redis::Client,
    options: AsyncConnectionConfig,
    slot: tokio::sync::Mutex<Slot>,
    health: std::sync::Mutex<Health>,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn").field("url", &self.url.to_string()).field("health", &self.health()).finish()
    }
}

/// The password in `password_file`: the file's text without its trailing newline, refused if
/// group or others may read or write it, if it is empty or spans lines.
pub fn read_password(path: &Path) -> Result<Zeroizing<String>, FleetError> {
    let err = |problem: String| FleetError::File { field: "fleet.password_file", path: path.to_path_buf(), problem };
    let opened = files::open(path, Links::Follow).map_err(|e| err(e.to_string()))?;
    let mode = opened.meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "mode {mode:04o} lets other users read or change the Redis password; run `chmod 600 {}`",
            path.display()
        )));
    }
    let text = opened.read_text(MAX_PASSWORD_FILE).map_err(|e| err(e.to_string()))?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(err("is empty; it must hold the Redis password on one line".into()));
    }
    if password.contains(['\n', '\r']) {
        return Err(err("holds more than one line; it must hold the Redis password alone".into()));
    }
    Ok(Zeroizing::new(password.to_string()))
}

impl RedisConn {
    /// A handle for `[fleet]`: reads the password and CA files now (a problem with them stops the
    /// daemon at start, naming the file), connects lazily on the first command.
    pub fn new(config: &FleetConfig) -> Result<RedisConn, FleetError> {
        let url =
            config.redis_url().map_err(|problem| FleetError::Protocol { redis: config.redis.clone(), problem })?;
        let password = config.password_file.as_deref().map(read_password).transpose()?;
        let ca = match &config.ca_file {
            None => None,
            Some(path) => {
                let text = files::read_text(path, MAX_CA_FILE, Links::Follow).map_err(|e| FleetError::File {
                    field: "fleet.ca_file",
                    path: path.clone(),
                    problem: e.to_string(),
                })?;
                if !text.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(FleetError::File {
                        field: "fleet.ca_file",
                        path: path.clone(),
                        problem: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
                    });
                }
                Some(text.as_bytes().to_vec())
            }
        };
        RedisConn::build(url, password.as_deref().map(|p| p.as_str()), ca)
    }

    fn build(url: RedisUrl, password: Option<&str>, ca_pem: Option<Vec<u8>>) -> Result<RedisConn, FleetError> {
        let protocol_err =
            |e: redis::RedisError| FleetError::Protocol { redis: url.to_string(), problem: e.to_string() };
        // The URL without user name (RedisUrl's Display carries no secret); credentials are set
        // on the parsed connection info so none of them pass through URL escaping.
        let bare = RedisUrl { username: None, ..url.clone() }.to_string();
        let mut info = bare.as_str().into_connection_info().map_err(protocol_err)?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &url.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = password {
            settings = settings.set_password(password);
        }
        info = info.set_redis_settings(settings);
        // redis builds its rustls configuration with the process's default provider.
        crate::tls::install_process_provider();
        let client = match ca_pem {
            Some(pem) if url.tls => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates { client_tls: None, root_cert: Some(pem) },
            )
            .map_err(|e| FleetError::Protocol { redis: url.to_string(), problem: format!("fleet.ca_file: {e}") })?,
            _ => redis::Client::open(info).map_err(protocol_err)?,
        };
        let options = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let now = SystemTime::now();
        Ok(RedisConn {
            url,
            client,
            options,
            slot: tokio::sync::Mutex::new(Slot { conn: None, next_attempt: Instant::now(), backoff: BACKOFF_MIN }),
            health: std::sync::Mutex::new(Health::Down { since: now, error: "not connected yet".into() }),
        })
    }

    /// A handle for a plain `redis://` server without AUTH (tests, benches).
    pub fn plain(url: &str) -> Result<RedisConn, FleetError> {
        let parsed = RedisUrl::parse(url).map_err(|problem| FleetError::Protocol { redis: url.into(), problem })?;
        RedisConn::build(parsed, None, None)
    }

    /// Where Redis is (no secret in it).
    pub fn url(&self) -> &RedisUrl {
        &self.url
    }

    pub fn health(&self) -> Health {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn mark_up(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if !h.is_up() {
            tracing::info!(redis = %self.url, "fleet Redis reachable");
            *h = Health::Up { since: SystemTime::now() };
        }
    }

    fn mark_down(&self, error: String) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let since = match &*h {
            Health::Down { since, .. } => *since,
            Health::Up { .. } => {
                tracing::warn!(redis = %self.url, %error, "fleet Redis unavailable; spending what the leases hold");
                SystemTime::now()
            }
        };
        *h = Health::Down { since, error };
    }

    /// The error for "Redis is down", with since when and why.
    pub fn unavailable(&self) -> FleetError {
        let (since, error) = match self.health() {
            Health::Down { since, error } => (since, error),
            Health::Up { since } => (since, "no answer".to_string()),
        };
        FleetError::Unavailable { redis: self.url.to_string(), since: rfc3339(since), error }
    }

    /// The current connection, connecting if there is none and the backoff allows.
    async fn connection(&self) -> Result<MultiplexedConnection, FleetError> {
        let mut slot = self.slot.lock().await;
        if let Some(conn) = &slot.conn {
            return Ok(conn.clone());
        }
        if Instant::now() < slot.next_attempt {
            return Err(self.unavailable());
        }
        let attempt = tokio::time::timeout(
            CONNECT_TIMEOUT + COMMAND_TIMEOUT,
            self.client.get_multiplexed_async_connection_with_config(&self.options),
        )
        .await;
        match attempt {
            Ok(Ok(conn)) => {
                slot.conn = Some(conn.clone());
                slot.backoff = BACKOFF_MIN;
                self.mark_up();
                Ok(conn)
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => describe(&e),
                    _ => format!("connecting took longer than {} ms", (CONNECT_TIMEOUT + COMMAND_TIMEOUT).as_millis()),
                };
                slot.next_attempt = Instant::now() + slot.backoff;
                slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
                self.mark_down(error);
                Err(self.unavailable())
            }
        }
    }

    /// After a failed command: a broken connection is dropped (the next command reconnects after
    /// the backoff); a server's error answer leaves the connection up.
    async fn failed(&self, e: Option<redis::RedisError>) -> FleetError {
        let broken = match &e {
            None => true,
            Some(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error()
            }
        };
        if !broken {
            let problem = e.as_ref().map(describe).unwrap_or_default();
            return FleetError::Protocol { redis: self.url.to_string(), problem };
        }
        let error = match &e {
            Some(e) => describe(e),
            None => format!("no answer within {} ms", COMMAND_TIMEOUT.as_millis()),
        };
        let mut slot = self.slot.lock().await;
        if slot.conn.take().is_some() {
            slot.next_attempt = Instant::now() + slot.backoff;
            slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
        }
        drop(slot);
        self.mark_down(error);
        self.unavailable()
    }

    /// Runs one command, bounded by [`COMMAND_TIMEOUT`].
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, FleetError> {
        let mut conn = self.connection().await?;
        match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                self.mark_up();
                Ok(v)
            }
            Ok(Err(e)) => Err(self.failed(Some(e)).await),
            Err(_) => Err(self.failed(None).await),
        }
    }

    /// Runs a Lua script (EVALSHA, loading the script first when Redis does not know it, as
    /// after a restart), bounded by twice [`COMMAND_TIMEOUT`] (a load and a call).
    pub async fn invoke<T: FromRedisValue>(&self, call: &redis::ScriptInvocation<'_>) -> Result<T, FleetError> {
        let mut conn = self.connection().await?;
        match tokio::time::timeout(COMMAND_TIMEOUT * 2, call.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                self.mark_up();
                Ok(v)
            }
            Ok(Err(e)) => Err(self.failed(Some(e)).await),
            Err(_) => Err(self.failed(None).await),
        }
    }

    /// PING: whether Redis answers now.
    pub async fn ping(&self) -> Result<(), FleetError> {
        let answer: String = self.query(&redis::cmd("PING")).await?;
        if answer == "PONG" {
            Ok(())
        } else {
            Err(FleetError::Protocol { redis: self.url.to_string(), problem: format!("PING answered {answer:?}") })
        }
    }
}

/// A client error on one line, bounded (a hostile server's text never floods a log).
fn describe(e: &redis::RedisError) -> String {
    let text: String = e.to_string().chars().filter(|c| !c.is_control()).take(300).collect();
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_password_file_must_be_private_one_line_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redis.pass");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password(&path).unwrap().as_str(), "s3cret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_password(&path).unwrap_err().to_string();
        assert!(e.contains("fleet.password_file") && e.contains("chmod 600") && !e.contains("s3cret"), "{e}");
        for (text, words) in [("\n", "empty"), ("", "empty"), ("a\nb\n", "more than one line")] {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = read_password(&path).unwrap_err().to_string();
            assert!(e.contains(words), "{text:?}: {e}");
        }
        let e = read_password(&dir.path().join("absent")).unwrap_err().to_string();
        assert!(e.contains("absent"), "{e}");
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let config = FleetConfig {
            redis: "rediss://127.0.0.1:1".into(),
            password_file: None,
            ca_file: Some(ca),
            host_id: "a".into(),
            lease_cents: 1,
            lease_requests: 1,
            lease_secs: 60,
            prefix: "sluice".into(),
        };
        let e = RedisConn::new(&config).unwrap_err().to_string();
        assert!(e.contains("fleet.ca_file") && e.contains("BEGIN CERTIFICATE"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_redis_fails_fast_then_backs_off_and_says_since_when() {
        // A port nothing listens on: connecting is refused at once.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conn = RedisConn::plain(&format!("redis://127.0.0.1:{port}")).unwrap();
        assert!(!conn.health().is_up());
        let started = std::time::Instant::now();
        let e = conn.ping().await.unwrap_err();
        assert!(matches!(e, FleetError::Unavailable { .. }), "{e}");
        // Within the backoff: refused without a connection attempt.
        let e2 = conn.ping().await.unwrap_err().to_string();
        assert!(started.elapsed() < CONNECT_TIMEOUT + COMMAND_TIMEOUT, "{:?}", started.elapsed());
        assert!(e2.contains(&format!("redis://127.0.0.1:{port}")) && e2.contains("since"), "{e2}");
        assert!(matches!(conn.health(), Health::Down { .. }));
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout_not_a_stall() {
        // Accepts TCP and never answers: the connection handshake must give up in bounded time.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let conn = RedisConn::plain(&format!("redis://127.0.0.1:{port}")).unwrap();
        let started = std::time::Instant::now();
        assert!(conn.ping().await.is_err());
        assert!(started.elapsed() < CONNECT_TIMEOUT + COMMAND_TIMEOUT + Duration::from_millis(300));
        held.abort();
    }
}
