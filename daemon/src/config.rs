//! `sluice.toml`: the daemon's configuration (every key: docs/configuration.md).
//!
//! Strict: an unknown key anywhere is an error naming the key, line and file, because a misspelt
//! setting that is silently ignored leaves an operator believing in a limit that does not exist.
//! Everything has a safe default, so a file that sets only `state_dir` works.

use crate::passport::IssuerId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/sluice/sluice.toml";
/// A configuration file larger than this is not a configuration file.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {problem}")]
    Invalid { path: PathBuf, field: String, problem: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Host key, CA, store.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Host policies (`*.toml`).
    #[serde(default = "default_policies_dir")]
    pub policies_dir: PathBuf,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub upstream_tls: UpstreamTlsConfig,
    #[serde(default)]
    pub trust: TrustConfig,
    #[serde(default)]
    pub holds: HoldsConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub gates: GatesConfig,
    /// `[fleet]`: budgets shared with other hosts through Redis (docs/fleet.md). Absent: this
    /// host counts alone, as it always did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetConfig>,
    /// The file this was read from (empty when built from defaults).
    #[serde(skip)]
    pub source: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/sluice")
}
fn default_policies_dir() -> PathBuf {
    PathBuf::from("/etc/sluice/policies")
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The local API's Unix socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Members of this group (and root) may use the API. Missing group: root only.
    #[serde(default = "default_group")]
    pub group: String,
}

/// Where the local API listens when the configuration names no `[api] socket`.
pub const DEFAULT_SOCKET: &str = "/run/sluice/sluice.sock";

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_group() -> String {
    "sluice".into()
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { socket: default_socket(), group: default_group() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The proxy listens on 127.0.0.1 and ::1 at this port.
    #[serde(default = "default_proxy_port")]
    pub port: u16,
    /// Connections the proxy handles at once, all sandboxes together; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections the proxy handles at once for one sandbox; more from that sandbox are closed
    /// at accept (counted per sandbox), so one agent cannot take the whole budget.
    #[serde(default = "default_max_connections_per_sandbox")]
    pub max_connections_per_sandbox: usize,
    /// Seconds an agent connection may go without a request in progress: an HTTP/1.1 request
    /// head must arrive whole within it (an idle keep-alive connection too), and an HTTP/2
    /// connection with no open request is closed after it.
    #[serde(default = "default_header_timeout_secs")]
    pub header_timeout_secs: u64,
}

fn default_proxy_port() -> u16 {
    15001
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_sandbox() -> usize {
    1024
}
/// Upper bound of `[proxy] max_connections` (each connection holds descriptors and buffers).
pub const MAX_PROXY_CONNECTIONS: usize = 1_000_000;
fn default_header_timeout_secs() -> u64 {
    30
}
/// The bounds of `[proxy] header_timeout_secs`.
pub const HEADER_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=3600;

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            port: default_proxy_port(),
            max_connections: default_max_connections(),
            max_connections_per_sandbox: default_max_connections_per_sandbox(),
            header_timeout_secs: default_header_timeout_secs(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// The resolver listens on UDP and TCP, 127.0.0.1 and ::1, at this port.
    #[serde(default = "default_dns_port")]
    pub port: u16,
    /// How the daemon resolves real upstream addresses: `"system"` or `"ip:port"` servers.
    #[serde(default = "default_upstream")]
    pub upstream: Vec<String>,
    /// Fixed name → address entries, consulted first (tests, air-gapped hosts).
    #[serde(default)]
    pub static_hosts: BTreeMap<String, IpAddr>,
}

fn default_dns_port() -> u16 {
    15053
}
fn default_upstream() -> Vec<String> {
    vec!["system".into()]
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig { port: default_dns_port(), upstream: default_upstream(), static_hosts: BTreeMap::new() }
    }
}

/// Where the resolver sends the daemon's own queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsUpstream {
    System,
    Server(SocketAddr),
}

impl DnsConfig {
    pub fn upstreams(&self) -> Vec<DnsUpstream> {
        self.upstream
            .iter()
            .filter_map(
                |u| if u == "system" { Some(DnsUpstream::System) } else { u.parse().ok().map(DnsUpstream::Server) },
            )
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// The agents' cgroup, relative to the cgroup2 mount.
    #[serde(default = "default_cgroup")]
    pub cgroup: String,
    /// Load the eBPF programs and redirect agents' traffic (needs root). `false` runs the daemon
    /// in passport-only mode: the local API decides, nothing is intercepted.
    #[serde(default = "default_redirect")]
    pub redirect: bool,
    /// Where the eBPF links and maps are pinned (on bpffs). They outlive the daemon on purpose:
    /// a dead daemon must mean refused connections, never open egress.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// TCP sockets one sandbox may hold connected or connecting at once, enforced by the kernel
    /// programs: its share of the kernel connection table. One more connect fails with EPERM.
    #[serde(default = "default_max_tcp_sockets")]
    pub max_tcp_sockets: u32,
    /// Whether sandboxes may be created where the kernel cannot confine agents' Unix sockets
    /// (before Linux 6.7): `enforced` refuses them, `unenforced` creates them and says loudly that
    /// agents reach every Unix socket their user may.
    #[serde(default)]
    pub unix_sockets: UnixSockets,
    /// Unix socket addresses every agent may connect or send to besides its own directory:
    /// absolute paths, or `@name` for an abstract name; compared exactly.
    #[serde(default)]
    pub unix_allow: Vec<String>,
    /// Where sandboxes' own directories are made (`<unix_dir>/<sandbox id>`): a mount of its own
    /// with `nosymfollow`, mounted by the daemon if nothing is.
    #[serde(default = "default_unix_dir")]
    pub unix_dir: PathBuf,
}

/// `[sandbox] unix_sockets`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnixSockets {
    #[default]
    Enforced,
    Unenforced,
}

impl SandboxConfig {
    /// `unix_allow`, parsed (validated at load, so this does not fail on a loaded config).
    pub fn unix_allow_addrs(&self) -> Result<Vec<crate::kernel::UnixAddr>, String> {
        self.unix_allow
            .iter()
            .map(|e| crate::kernel::UnixAddr::parse(e).map_err(|why| format!("{e:?} {why}")))
            .collect()
    }

    pub fn unix_mode(&self) -> crate::kernel::UnixMode {
        match self.unix_sockets {
            UnixSockets::Enforced => crate::kernel::UnixMode::Enforced,
            UnixSockets::Unenforced => crate::kernel::UnixMode::Unenforced,
        }
    }
}

fn default_max_tcp_sockets() -> u32 {
    crate::kernel::DEFAULT_MAX_TCP_SOCKETS
}
/// Upper bound of `[sandbox] max_tcp_sockets`: a quarter of the kernel connection table.
pub const MAX_TCP_SOCKETS: u32 = crate::kernel::abi::CONNTABLE_ENTRIES / 4;

fn default_cgroup() -> String {
    "sluice-agents".into()
}
fn default_redirect() -> bool {
    true
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/sluice")
}
fn default_unix_dir() -> PathBuf {
    PathBuf::from("/run/sluice-sandboxes")
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            cgroup: default_cgroup(),
            redirect: default_redirect(),
            pin_dir: default_pin_dir(),
            max_tcp_sockets: default_max_tcp_sockets(),
            unix_sockets: UnixSockets::default(),
            unix_allow: Vec::new(),
            unix_dir: default_unix_dir(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM files trusted for upstream connections, in addition to the system and webpki roots.
    #[serde(default)]
    pub extra_roots: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Pinned issuers (L2): issuer ids (`iss_…`) or paths to issuer public keys (PEM).
    /// Empty: L1, any issuer whose signature verifies.
    #[serde(default)]
    pub issuers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HoldsConfig {
    /// How long a held request waits for a human before it is answered 403 `hold_timeout`.
    #[serde(default = "default_hold_timeout")]
    pub timeout_secs: u64,
}

fn default_hold_timeout() -> u64 {
    120
}

impl Default for HoldsConfig {
    fn default() -> Self {
        HoldsConfig { timeout_secs: default_hold_timeout() }
    }
}

/// `[console]`: the operator's web console, served by the daemon (docs/console.md). Off unless
/// `listen` is set; only a loopback address is accepted (the console speaks plain HTTP: reach it
/// from elsewhere through an SSH tunnel, never by listening on a network address).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// `127.0.0.1:7070`, `[::1]:7070`: where the console listens. Absent: no console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// How long a console session lasts after login, in seconds.
    #[serde(default = "default_console_session_secs")]
    pub session_secs: u64,
}

fn default_console_session_secs() -> u64 {
    8 * 3600
}
/// The bounds of `[console] session_secs`: a minute to a week.
pub const CONSOLE_SESSION_RANGE: std::ops::RangeInclusive<u64> = 60..=7 * 86_400;

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig { listen: None, session_secs: default_console_session_secs() }
    }
}

/// `[gates]`: services that verify sluice's signed requests (linked attestations).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatesConfig {
    /// Host names of gates: a request from a sandbox whose agent key the daemon holds
    /// (`sluice run --key`) to one of them is signed (RFC 9421) and carries the passport.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The largest request body the daemon signs (it must read the whole body to digest it before
    /// sending the headers); a larger body to a gate is refused (`gate_body_too_large`).
    #[serde(default = "default_gate_max_body_bytes")]
    pub max_body_bytes: u64,
}

fn default_gate_max_body_bytes() -> u64 {
    1 << 20
}
/// Upper bound of `[gates] max_body_bytes` (each signed request's body is held in memory).
pub const MAX_GATE_BODY_BYTES: u64 = 64 << 20;
/// Upper bound of the number of `[gates] hosts`.
pub const MAX_GATE_HOSTS: usize = 1024;

impl Default for GatesConfig {
    fn default() -> Self {
        GatesConfig { hosts: Vec::new(), max_body_bytes: default_gate_max_body_bytes() }
    }
}

impl GatesConfig {
    /// The gate hosts, normalised (validated at load, so this does not fail on a loaded config).
    pub fn host_names(&self) -> Result<Vec<crate::domain::DomainName>, String> {
        self.hosts.iter().map(|h| crate::domain::DomainName::parse(h).map_err(|e| format!("{h:?}: {e}"))).collect()
    }
}

/// `[fleet]`: one budget across many hosts (docs/fleet.md). Each host spends a passport's spend
/// caps and rate limits from leases it takes from a shared Redis; Redis is trusted with budget
/// accounting only, never with a decision's integrity.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// `redis://host:port` or `rediss://host:port` (TLS), optionally `redis://user@host:port`.
    /// A password in the URL is refused: it comes from `password_file`.
    pub redis: String,
    /// The Redis password (AUTH), alone in a file of mode 0600 (or stricter). Absent: no AUTH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM certificates that verify a `rediss://` server, instead of the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// This host's name in the fleet: `[a-z0-9-]{1,64}`, unique per host.
    pub host_id: String,
    /// How much of a spend cap one lease takes, in cents.
    #[serde(default = "default_lease_cents")]
    pub lease_cents: u64,
    /// How many requests of a rate limit one lease takes.
    #[serde(default = "default_lease_requests")]
    pub lease_requests: u64,
    /// A lease's lifetime in seconds: renewed ahead of its end, its unused part returned after.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// The namespace of every key sluice writes in Redis.
    #[serde(default = "default_fleet_prefix")]
    pub prefix: String,
}

fn default_lease_cents() -> u64 {
    100
}
fn default_lease_requests() -> u64 {
    20
}
fn default_lease_secs() -> u64 {
    60
}
fn default_fleet_prefix() -> String {
    "sluice".into()
}
/// The bounds of `[fleet] lease_cents` (a cent to a million dollars).
pub const FLEET_LEASE_CENTS_RANGE: std::ops::RangeInclusive<u64> = 1..=100_000_000;
/// The bounds of `[fleet] lease_requests`.
pub const FLEET_LEASE_REQUESTS_RANGE: std::ops::RangeInclusive<u64> = 1..=1_000_000;
/// The bounds of `[fleet] lease_secs`.
pub const FLEET_LEASE_SECS_RANGE: std::ops::RangeInclusive<u64> = 5..=86_400;

/// Where `[fleet] redis` points, parsed: no password, no path, query or fragment (a
/// `#insecure` fragment would turn off certificate checks in the client library).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub tls: bool,
    /// A DNS name or IP address (an IPv6 address without brackets).
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
}

impl RedisUrl {
    /// The longest URL accepted.
    pub const MAX_LEN: usize = 512;

    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        if url.len() > Self::MAX_LEN {
            return Err(format!("is longer than {} bytes", Self::MAX_LEN));
        }
        let (tls, rest) = if let Some(rest) = url.strip_prefix("rediss://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("redis://") {
            (false, rest)
        } else {
            return Err(format!("{url:?} must start with redis:// or rediss:// (TLS)"));
        };
        // A password is refused before the URL is quoted in any message.
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':')) {
            return Err("carries a password; put the password alone in a file of mode 0600 and name it in \
                        fleet.password_file"
                .into());
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{url:?}: only scheme://[user@]host[:port] is accepted (no database path, query or fragment)"
            ));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let username = match userinfo {
            None => None,
            Some("") => return Err(format!("{url:?} has an empty user name before @")),
            Some(u) if u.len() > 128 || !u.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) => {
                return Err("user name must be 1 to 128 of A-Z a-z 0-9 - _ .".into())
            }
            Some(u) => Some(u.to_string()),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
            addr.parse::<std::net::Ipv6Addr>().map_err(|_| format!("{url:?}: {addr:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| format!("{url:?}: expected :port after ]"))?),
            };
            (addr.to_string(), port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && (host.parse::<IpAddr>().is_ok()
                || host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
        if !host_ok {
            return Err(format!("{url:?}: {host:?} is not a host name or IP address"));
        }
        let port = match port {
            None => 6379,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("{url:?}: port {p:?} is not from 1 to 65535")),
            },
        };
        Ok(RedisUrl { tls, host, port, username })
    }
}

impl std::fmt::Display for RedisUrl {
    /// The URL without secrets (there are none in it), for messages and records.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let user = self.username.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        if self.host.contains(':') {
            write!(f, "{scheme}://{user}[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{user}{}:{}", self.host, self.port)
        }
    }
}

impl FleetConfig {
    /// `redis`, parsed (validated at load, so this does not fail on a loaded config).
    pub fn redis_url(&self) -> Result<RedisUrl, String> {
        RedisUrl::parse(&self.redis)
    }

    /// Whether `id` is a valid `host_id` (also a prefix's shape check's building block).
    pub fn valid_host_id(id: &str) -> bool {
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    fn problem(&self) -> Option<(&'static str, String)> {
        if let Err(e) = self.redis_url() {
            return Some(("fleet.redis", e));
        }
        if !Self::valid_host_id(&self.host_id) {
            return Some(("fleet.host_id", format!("{:?} must be 1 to 64 of a-z 0-9 -", self.host_id)));
        }
        for (field, path) in [("fleet.password_file", &self.password_file), ("fleet.ca_file", &self.ca_file)] {
            if let Some(p) = path {
                if !p.is_absolute() {
                    return Some((field, format!("{} must be an absolute path", p.display())));
                }
            }
        }
        if self.ca_file.is_some() && !self.redis_url().map(|u| u.tls).unwrap_or(false) {
            return Some(("fleet.ca_file", "is only used with a rediss:// (TLS) URL; use rediss:// or drop it".into()));
        }
        if !FLEET_LEASE_CENTS_RANGE.contains(&self.lease_cents) {
            return Some(("fleet.lease_cents", format!("must be from 1 to {}", FLEET_LEASE_CENTS_RANGE.end())));
        }
        if !FLEET_LEASE_REQUESTS_RANGE.contains(&self.lease_requests) {
            return Some(("fleet.lease_requests", format!("must be from 1 to {}", FLEET_LEASE_REQUESTS_RANGE.end())));
        }
        if !FLEET_LEASE_SECS_RANGE.contains(&self.lease_secs) {
            return Some((
                "fleet.lease_secs",
                format!("must be from {} to {} seconds", FLEET_LEASE_SECS_RANGE.start(), FLEET_LEASE_SECS_RANGE.end()),
            ));
        }
        let prefix_ok = (1..=64).contains(&self.prefix.len())
            && self.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !prefix_ok {
            return Some(("fleet.prefix", format!("{:?} must be 1 to 64 of A-Z a-z 0-9 - _ .", self.prefix)));
        }
        None
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: default_state_dir(),
            policies_dir: default_policies_dir(),
            api: ApiConfig::default(),
            proxy: ProxyConfig::default(),
            dns: DnsConfig::default(),
            sandbox: SandboxConfig::default(),
            upstream_tls: UpstreamTlsConfig::default(),
            trust: TrustConfig::default(),
            holds: HoldsConfig::default(),
            console: ConsoleConfig::default(),
            gates: GatesConfig::default(),
            fleet: None,
            source: PathBuf::new(),
        }
    }
}

/// The text of a configuration file (`sluice.toml`, a gate's `gate.toml`), at most
/// [`MAX_CONFIG_BYTES`].
pub fn read_config_text(path: &Path) -> Result<String, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { path: path.into() });
    }
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })
}

/// toml's error message on one line (it spans several: a caret under the spot).
pub fn toml_message(e: &toml::de::Error) -> String {
    e.to_string().lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join(" | ")
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&read_config_text(path)?, path)
    }

    /// Parses and validates configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: toml_message(&e) })?;
        config.source = path.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    fn invalid(&self, field: &'static str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: self.source.clone(), field: field.to_string(), problem: problem.into() }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.state_dir.is_absolute() {
            return Err(self.invalid("state_dir", "must be an absolute path"));
        }
        if !self.policies_dir.is_absolute() {
            return Err(self.invalid("policies_dir", "must be an absolute path"));
        }
        if !self.api.socket.is_absolute() {
            return Err(self.invalid("api.socket", "must be an absolute path"));
        }
        if self.proxy.port == 0 {
            return Err(self.invalid("proxy.port", "must be a port from 1 to 65535"));
        }
        if self.dns.port == 0 {
            return Err(self.invalid("dns.port", "must be a port from 1 to 65535"));
        }
        if self.dns.port == self.proxy.port {
            return Err(self.invalid("dns.port", "must differ from proxy.port"));
        }
        if !(1..=MAX_PROXY_CONNECTIONS).contains(&self.proxy.max_connections) {
            return Err(self.invalid("proxy.max_connections", format!("must be from 1 to {MAX_PROXY_CONNECTIONS}")));
        }
        if !(1..=self.proxy.max_connections).contains(&self.proxy.max_connections_per_sandbox) {
            return Err(self.invalid(
                "proxy.max_connections_per_sandbox",
                format!("must be from 1 to proxy.max_connections ({})", self.proxy.max_connections),
            ));
        }
        if !HEADER_TIMEOUT_RANGE.contains(&self.proxy.header_timeout_secs) {
            return Err(self.invalid("proxy.header_timeout_secs", "must be from 1 to 3600 (seconds)"));
        }
        if self.dns.upstream.is_empty() {
            return Err(self.invalid("dns.upstream", "needs at least one entry: \"system\" or \"ip:port\""));
        }
        for u in &self.dns.upstream {
            if u != "system" && u.parse::<SocketAddr>().is_err() {
                return Err(self.invalid("dns.upstream", format!("{u:?} is neither \"system\" nor ip:port")));
            }
        }
        for name in self.dns.static_hosts.keys() {
            crate::domain::DomainName::parse(name)
                .map_err(|e| self.invalid("dns.static_hosts", format!("{name:?}: {e}")))?;
        }
        let cg = &self.sandbox.cgroup;
        let cg_ok = !cg.is_empty()
            && !cg.starts_with('/')
            && cg.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if !cg_ok {
            return Err(self.invalid("sandbox.cgroup", format!("{cg:?} must be a relative path without . or ..")));
        }
        if !self.sandbox.pin_dir.is_absolute() {
            return Err(self.invalid("sandbox.pin_dir", "must be an absolute path on bpffs (e.g. /sys/fs/bpf/sluice)"));
        }
        if !(1..=MAX_TCP_SOCKETS).contains(&self.sandbox.max_tcp_sockets) {
            return Err(self.invalid(
                "sandbox.max_tcp_sockets",
                format!("must be from 1 to {MAX_TCP_SOCKETS} (a quarter of the kernel connection table)"),
            ));
        }
        // One entry of the kernel's list is the API socket's.
        let most = crate::kernel::unix::ALLOW_ENTRIES.saturating_sub(1);
        if self.sandbox.unix_allow.len() > most {
            return Err(self.invalid(
                "sandbox.unix_allow",
                format!(
                    "lists {} addresses; at most {most} (the kernel's list holds {}, one is the API socket)",
                    self.sandbox.unix_allow.len(),
                    crate::kernel::unix::ALLOW_ENTRIES
                ),
            ));
        }
        self.sandbox.unix_allow_addrs().map_err(|e| self.invalid("sandbox.unix_allow", e))?;
        let unix_dir = &self.sandbox.unix_dir;
        let unix_dir_ok = unix_dir.is_absolute()
            && unix_dir.as_os_str().len() <= crate::kernel::unix::UNIX_DIR_MAX
            && unix_dir
                .components()
                .all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)))
            && !unix_dir.to_string_lossy().contains("//");
        if !unix_dir_ok {
            return Err(self.invalid(
                "sandbox.unix_dir",
                format!(
                    "{} must be an absolute path without `.`, `..` or `//`, at most {} bytes (socket paths below it must fit in 108)",
                    unix_dir.display(),
                    crate::kernel::unix::UNIX_DIR_MAX
                ),
            ));
        }
        if !(1..=86_400).contains(&self.holds.timeout_secs) {
            return Err(self.invalid("holds.timeout_secs", "must be from 1 to 86400 seconds"));
        }
        if let Some(listen) = self.console.listen {
            if !listen.ip().is_loopback() {
                return Err(self.invalid(
                    "console.listen",
                    format!(
                        "{listen} is not a loopback address; the console serves plain HTTP and must listen on \
                         127.0.0.1 or [::1] (reach it from elsewhere with an SSH tunnel: ssh -L 7070:127.0.0.1:7070 HOST)"
                    ),
                ));
            }
            if listen.port() == 0 {
                return Err(self.invalid("console.listen", "needs a port from 1 to 65535"));
            }
            if listen.port() == self.proxy.port || listen.port() == self.dns.port {
                return Err(self.invalid("console.listen", "port must differ from proxy.port and dns.port"));
            }
        }
        if !CONSOLE_SESSION_RANGE.contains(&self.console.session_secs) {
            return Err(self.invalid("console.session_secs", "must be from 60 to 604800 seconds"));
        }
        if self.gates.hosts.len() > MAX_GATE_HOSTS {
            return Err(self
                .invalid("gates.hosts", format!("lists {} hosts; at most {MAX_GATE_HOSTS}", self.gates.hosts.len())));
        }
        let gates = self.gates.host_names().map_err(|e| self.invalid("gates.hosts", e))?;
        for (i, name) in gates.iter().enumerate() {
            if gates.iter().take(i).any(|earlier| earlier == name) {
                return Err(self.invalid("gates.hosts", format!("{name} is listed twice")));
            }
        }
        if !(1..=MAX_GATE_BODY_BYTES).contains(&self.gates.max_body_bytes) {
            return Err(self.invalid("gates.max_body_bytes", format!("must be from 1 to {MAX_GATE_BODY_BYTES} bytes")));
        }
        if let Some((field, problem)) = self.fleet.as_ref().and_then(FleetConfig::problem) {
            return Err(self.invalid(field, problem));
        }
        self.pinned_issuers()?;
        Ok(())
    }

    /// The pinned issuers of `[trust] issuers`, loading PEM files as needed.
    pub fn pinned_issuers(&self) -> Result<Vec<IssuerId>, ConfigError> {
        self.trust
            .issuers
            .iter()
            .map(|entry| {
                if entry.starts_with(IssuerId::PREFIX) {
                    IssuerId::parse(entry)
                        .map(|(id, _)| id)
                        .map_err(|e| self.invalid("trust.issuers", format!("{entry:?}: {e}")))
                } else {
                    crate::keyfile::load_public_key(Path::new(entry))
                        .map(|k| IssuerId::from_key(&k))
                        .map_err(|e| self.invalid("trust.issuers", e.to_string()))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/sluice/sluice.toml"))
    }

    #[test]
    fn only_state_dir_is_enough() {
        let c = parse("state_dir = \"/tmp/x\"").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.proxy.port, 15001);
        assert_eq!(c.proxy.header_timeout_secs, 30);
        assert_eq!(c.dns.port, 15053);
        assert_eq!(c.sandbox.cgroup, "sluice-agents");
        assert_eq!(c.holds.timeout_secs, 120);
        assert_eq!(c.dns.upstreams(), vec![DnsUpstream::System]);
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(
            r#"
state_dir = "/var/lib/sluice"
policies_dir = "/etc/sluice/policies"
[api]
socket = "/run/sluice/sluice.sock"
[proxy]
port = 15001
[dns]
port = 15053
upstream = ["system", "127.0.0.53:53"]
static_hosts = { "api.example.test" = "127.0.0.10" }
[sandbox]
cgroup = "sluice-agents"
[upstream_tls]
extra_roots = []
[trust]
issuers = []
[holds]
timeout_secs = 120
[console]
listen = "127.0.0.1:7070"
"#,
        )
        .unwrap();
        assert_eq!(c.console.listen, Some("127.0.0.1:7070".parse().unwrap()));
        assert_eq!(
            parse("[console]\nlisten = \"[::1]:7070\"").unwrap().console.listen,
            Some("[::1]:7070".parse().unwrap())
        );
        assert_eq!(parse("").unwrap().console.listen, None, "the console is off unless listen is set");
        assert_eq!(c.dns.static_hosts["api.example.test"], "127.0.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(c.dns.upstreams().len(), 2);
    }

    #[test]
    fn gates_are_host_names_listed_once_with_a_bounded_body() {
        let p = Path::new("/etc/sluice/sluice.toml");
        let c =
            Config::parse("[gates]\nhosts = [\"API.example.com.\", \"b.example\"]\nmax_body_bytes = 10\n", p).unwrap();
        assert_eq!(
            c.gates.host_names().unwrap().iter().map(|d| d.as_str()).collect::<Vec<_>>(),
            ["api.example.com", "b.example"]
        );
        assert_eq!(c.gates.max_body_bytes, 10);
        assert_eq!(Config::parse("", p).unwrap().gates, GatesConfig::default());
        for (text, field) in [
            ("[gates]\nhosts = [\"*.example.com\"]", "gates.hosts"),
            ("[gates]\nhosts = [\"127.0.0.1\"]", "gates.hosts"),
            ("[gates]\nhosts = [\"\"]", "gates.hosts"),
            ("[gates]\nhosts = [\"a.example\", \"A.example.\"]", "gates.hosts"),
            ("[gates]\nmax_body_bytes = 0", "gates.max_body_bytes"),
            ("[gates]\nmax_body_bytes = 67108865", "gates.max_body_bytes"),
        ] {
            match Config::parse(text, p) {
                Err(ConfigError::Invalid { field: f, problem, .. }) => assert_eq!(f, field, "{text}: {problem}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let err = Config::parse("[gates]\nhost = []", p).unwrap_err().to_string();
        assert!(err.contains("unknown field `host`"), "{err}");
    }

    /// The shipped example (`config/sluice.toml.example`).
    const EXAMPLE: &str = include_str!("../../config/sluice.toml.example");

    #[test]
    fn the_shipped_example_parses_and_equals_the_defaults() {
        let path = Path::new("/etc/sluice/sluice.toml");
        let c = Config::parse(EXAMPLE, path).unwrap();
        let defaults = Config { source: path.to_path_buf(), ..Config::default() };
        assert_eq!(c, defaults);
        // And an empty file means the same.
        assert_eq!(Config::parse("", path).unwrap(), defaults);
    }

    /// Every key the daemon knows is set (so documented) in the example: walking the serialized
    /// defaults catches a key added to `Config` but forgotten in the example.
    #[test]
    fn the_shipped_example_sets_every_key() {
        fn walk(defaults: &toml::Table, example: &toml::Table, prefix: &str, missing: &mut Vec<String>) {
            for (key, value) in defaults {
                let name = format!("{prefix}{key}");
                match (value, example.get(key)) {
                    (toml::Value::Table(d), Some(toml::Value::Table(e))) if !d.is_empty() => {
                        walk(d, e, &format!("{name}."), missing)
                    }
                    (_, Some(_)) => {}
                    (_, None) => missing.push(name),
                }
            }
        }
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let example: toml::Table = toml::from_str(EXAMPLE).unwrap();
        let mut missing = Vec::new();
        walk(&defaults, &example, "", &mut missing);
        assert!(missing.is_empty(), "keys missing from config/sluice.toml.example: {missing:?}");
        // Sanity of the walk itself: a key it must see.
        assert!(defaults["sandbox"].as_table().unwrap().contains_key("pin_dir"));
    }

    #[test]
    fn unknown_keys_name_the_key_line_and_file() {
        let e = parse("state_dir = \"/x\"\n[proxy]\nprot = 1\n").unwrap_err().to_string();
        assert!(e.contains("/etc/sluice/sluice.toml"), "{e}");
        assert!(e.contains("prot"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains('\n'));
        let e = parse("stat_dir = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("stat_dir"), "{e}");
    }

    const FLEET: &str = "[fleet]\nredis = \"redis://127.0.0.1:6390\"\nhost_id = \"web-1\"\n";

    #[test]
    fn fleet_is_off_unless_configured_and_strict_when_it_is() {
        assert_eq!(parse("").unwrap().fleet, None);
        let f = parse(FLEET).unwrap().fleet.unwrap();
        assert_eq!((f.lease_cents, f.lease_requests, f.lease_secs, f.prefix.as_str()), (100, 20, 60, "sluice"));
        assert_eq!(
            f.redis_url().unwrap(),
            RedisUrl { tls: false, host: "127.0.0.1".into(), port: 6390, username: None }
        );
        let full = parse(
            "[fleet]\nredis = \"rediss://agent@redis.internal:6380\"\nhost_id = \"a-1\"\n\
             password_file = \"/etc/sluice/redis.pass\"\nca_file = \"/etc/sluice/redis-ca.pem\"\n\
             lease_cents = 500\nlease_requests = 7\nlease_secs = 30\nprefix = \"prod.sluice\"\n",
        )
        .unwrap()
        .fleet
        .unwrap();
        let url = full.redis_url().unwrap();
        assert_eq!(
            url,
            RedisUrl { tls: true, host: "redis.internal".into(), port: 6380, username: Some("agent".into()) }
        );
        assert_eq!(url.to_string(), "rediss://agent@redis.internal:6380");
        assert_eq!(RedisUrl::parse("redis://[::1]:7000/").unwrap().to_string(), "redis://[::1]:7000");
        assert_eq!(RedisUrl::parse("redis://r.example").unwrap().port, 6379);
        for (text, field, words) in [
            ("[fleet]\nhost_id = \"a\"", "redis", "missing field"),
            ("[fleet]\nredis = \"redis://h:1\"", "host_id", "missing field"),
            ("[fleet]\nredis = \"redis://h:1\"\nhost_id = \"a\"\nlease_cent = 1", "lease_cent", "unknown field"),
            ("[fleet]\nredis = \"redis://:hunter2@h:1\"\nhost_id = \"a\"", "fleet.redis", "password_file"),
            ("[fleet]\nredis = \"redis://u:hunter2@h:1\"\nhost_id = \"a\"", "fleet.redis", "password_file"),
            ("[fleet]\nredis = \"redis://u:hunter2@h:1/0?x#y\"\nhost_id = \"a\"", "fleet.redis", "password_file"),
            ("[fleet]\nredis = \"rediss://h:1/#insecure\"\nhost_id = \"a\"", "fleet.redis", "fragment"),
            ("[fleet]\nredis = \"redis://h:1/0\"\nhost_id = \"a\"", "fleet.redis", "database path"),
            ("[fleet]\nredis = \"http://h:1\"\nhost_id = \"a\"", "fleet.redis", "redis://"),
            ("[fleet]\nredis = \"redis://h:0\"\nhost_id = \"a\"", "fleet.redis", "port"),
            ("[fleet]\nredis = \"redis://h:x\"\nhost_id = \"a\"", "fleet.redis", "port"),
            ("[fleet]\nredis = \"redis://\"\nhost_id = \"a\"", "fleet.redis", "host"),
            ("[fleet]\nredis = \"redis://[zz]:1\"\nhost_id = \"a\"", "fleet.redis", "IPv6"),
            ("[fleet]\nredis = \"redis://h:1\"\nhost_id = \"Web_1\"", "fleet.host_id", "a-z"),
            ("[fleet]\nredis = \"redis://h:1\"\nhost_id = \"\"", "fleet.host_id", "a-z"),
            (
                "[fleet]\nredis = \"redis://h:1\"\nhost_id = \"a\"\npassword_file = \"p\"",
                "fleet.password_file",
                "absolute",
            ),
            ("[fleet]\nredis = \"redis://h:1\"\nhost_id = \"a\"\nca_file = \"/ca.pem\"", "fleet.ca_file", "rediss://"),
            ("[fleet]\nredis = \"redis://h:1\"\nhost_id = \"a\"\nlease_cents = 0", "fleet.lease_cents", "from 1"),
            ("[fleet]\nredis = \"redis://h:1\"\nhost_id = \"a\"\nlease_requests = 0", "fleet.lease_requests", "from 1"),
            ("[fleet]\nredis = \"redis://h:1\"\nhost_id = \"a\"\nlease_secs = 1", "fleet.lease_secs", "from 5"),
            ("[fleet]\nredis = \"redis://h:1\"\nhost_id = \"a\"\nprefix = \"a b\"", "fleet.prefix", "A-Z"),
            ("[fleet]\nredis = \"redis://h:1\"\nhost_id = \"a\"\nprefix = \"\"", "fleet.prefix", "A-Z"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(words), "{text}: {e}");
            assert!(!e.contains("hunter2"), "a password never reaches a message: {e}");
        }
        let long = format!("[fleet]\nredis = \"redis://{}:1\"\nhost_id = \"a\"", "h".repeat(600));
        assert!(parse(&long).unwrap_err().to_string().contains("longer than"));
    }

    #[test]
    fn invalid_values_name_the_field() {
        for (text, field) in [
            ("state_dir = \"relative\"", "state_dir"),
            ("[proxy]\nport = 0", "proxy.port"),
            ("[proxy]\nport = 70000", "port"),
            ("[dns]\nport = 15001", "dns.port"),
            ("[dns]\nupstream = [\"8.8.8.8\"]", "dns.upstream"),
            ("[dns]\nupstream = []", "dns.upstream"),
            ("[dns]\nstatic_hosts = { \"bad host\" = \"127.0.0.1\" }", "dns.static_hosts"),
            ("[dns]\nstatic_hosts = { \"ok.test\" = \"not-an-ip\" }", "static_hosts"),
            ("[sandbox]\ncgroup = \"../escape\"", "sandbox.cgroup"),
            ("[sandbox]\ncgroup = \"/abs\"", "sandbox.cgroup"),
            ("[sandbox]\nunix_allow = [\"relative.sock\"]", "sandbox.unix_allow"),
            ("[sandbox]\nunix_allow = [\"/run/../docker.sock\"]", "sandbox.unix_allow"),
            ("[sandbox]\nunix_allow = [\"/run/dir/\"]", "sandbox.unix_allow"),
            ("[sandbox]\nunix_allow = [\"@\"]", "sandbox.unix_allow"),
            ("[sandbox]\nunix_dir = \"run/x\"", "sandbox.unix_dir"),
            ("[sandbox]\nunix_dir = \"/run/../x\"", "sandbox.unix_dir"),
            ("[sandbox]\nunix_dir = \"/run/a-very-long-directory-name-for-own-directories/x\"", "sandbox.unix_dir"),
            ("[sandbox]\nunix_sockets = \"off\"", "expected `enforced` or `unenforced`"),
            ("[holds]\ntimeout_secs = 0", "holds.timeout_secs"),
            ("[proxy]\nmax_connections = 0", "proxy.max_connections"),
            ("[proxy]\nmax_connections = 1000001", "proxy.max_connections"),
            ("[proxy]\nmax_connections_per_sandbox = 0", "proxy.max_connections_per_sandbox"),
            ("[proxy]\nmax_connections = 10\nmax_connections_per_sandbox = 11", "proxy.max_connections_per_sandbox"),
            ("[proxy]\nheader_timeout_secs = 0", "proxy.header_timeout_secs"),
            ("[proxy]\nheader_timeout_secs = 3601", "proxy.header_timeout_secs"),
            ("[sandbox]\nmax_tcp_sockets = 0", "sandbox.max_tcp_sockets"),
            ("[sandbox]\nmax_tcp_sockets = 16385", "sandbox.max_tcp_sockets"),
            ("[sandbox]\nmax_tcp_sockets = -1", "max_tcp_sockets"),
            ("[trust]\nissuers = [\"iss_nope\"]", "trust.issuers"),
            ("[console]\nlisten = \"0.0.0.0:7070\"", "console.listen"),
            ("[console]\nlisten = \"192.168.1.10:7070\"", "not a loopback address"),
            ("[console]\nlisten = \"[::]:7070\"", "console.listen"),
            ("[console]\nlisten = \"127.0.0.1:0\"", "console.listen"),
            ("[console]\nlisten = \"127.0.0.1:15001\"", "console.listen"),
            ("[console]\nlisten = \"localhost:7070\"", "listen"),
            ("[console]\nsession_secs = 10", "console.session_secs"),
            ("[console]\nallow_remote = true", "allow_remote"),
            ("[trust]\nissuers = [\"/nonexistent/issuer.pub\"]", "trust.issuers"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
