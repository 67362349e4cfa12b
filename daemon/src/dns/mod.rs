//! DNS for agents, and the daemon's own resolution.
//!
//! * [`resolver`]: the agents' resolver core. It answers A/AAAA only for names the asking
//!   sandbox may reach, with synthetic addresses from [`pool`], NXDOMAIN for everything else, and
//!   never forwards a query anywhere: an agent's DNS never leaves the host.
//! * [`server`]: a thin UDP + TCP front for it.
//! * [`lookup`]: how the daemon itself finds the real addresses it dials (static hosts, then
//!   the system resolver or configured servers).
//!
//! Who may ask (the sandbox behind a query) is wired in `crate::wiring::dns_identity`.

pub mod lookup;
pub mod pool;
pub mod resolver;
pub mod server;

pub use lookup::UpstreamResolver;
pub use pool::{PoolConfig, SyntheticPool};
pub use resolver::Resolver;
pub use server::{serve, Allow, Via};
