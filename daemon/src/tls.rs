//! The one TLS crypto provider of the daemon: every rustls connection it accepts or makes (agents,
//! upstreams, the gate, Redis) uses [`crypto_provider`]. A module of its own, below `proxy`,
//! `gate` and `fleet`, so that none of them depends on another for it.

use rustls::crypto::CryptoProvider;
use std::sync::{Arc, OnceLock};

/// The cryptography of every TLS connection the daemon accepts or makes (agents, upstreams, the
/// gate, Redis): rustls's aws-lc provider with its default suites and key exchange groups.
///
/// aws-lc rather than ring because of what a new agent connection costs: an agent that resumes
/// its session skips the certificate and the signature but still pays an ephemeral X25519 key
/// pair and agreement (TLS 1.3 resumption is `psk_dhe_ke` only), and a profile of
/// `bench proxy`'s new connections with ring had that exchange as the largest single cost of
/// the handshake; aws-lc's X25519 and AES-GCM are faster on x86_64 (figures in
/// `docs/testing.md`). The groups are the provider's defaults without rustls's
/// `prefer-post-quantum` feature: X25519 first, then P-256 and P-384, then the hybrid
/// X25519MLKEM768, so a client that sends an X25519 key share (every common one does) is not
/// made to pay for ML-KEM on a loopback connection, and one that sends only a hybrid share is
/// still served.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())).clone()
}

/// Makes [`crypto_provider`] the process's default, for libraries that build their own rustls
/// configuration with `ClientConfig::builder()` (the Redis client of `[fleet]`): rustls picks a
/// default from its crate features only when exactly one provider is compiled in, and a build
/// that unifies features with a crate using another (the e2e test crate) would otherwise make
/// that call panic. Idempotent; a default installed earlier is left as it is.
pub fn install_process_provider() {
    if CryptoProvider::get_default().is_none() {
        let _ = CryptoProvider::install_default((*crypto_provider()).clone());
    }
}
