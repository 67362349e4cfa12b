//! One request to the protected service (`upstream` in `gate.toml`): `http://`, or `https://`
//! with full certificate checks against the webpki roots and the system's trust store
//! (`/etc/ssl/certs/ca-certificates.crt`). One HTTP/1.1 connection per request; bodies stream
//! both ways.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type GateBody = BoxBody<Bytes, BoxError>;

const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Connecting (and the TLS handshake) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The response head must arrive within this.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Upstream {
    uri: http::Uri,
    host: String,
    port: u16,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Upstream {
    pub fn new(uri: &http::Uri) -> anyhow::Result<Upstream> {
        let host = uri.host().ok_or_else(|| anyhow::anyhow!("upstream {uri} names no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Ok(pem) = std::fs::read(SYSTEM_BUNDLE) {
                let certs: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
                roots.add_parsable_certificates(certs);
            }
            let provider = crate::tls::crypto_provider();
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())
                .map_err(|e| anyhow::anyhow!("upstream {uri}: {host:?} is not a server name: {e}"))?;
            Some((Arc::new(config), name))
        } else {
            None
        };
        Ok(Upstream { uri: uri.clone(), host, port, tls })
    }

    /// The `Host` the service sees: the upstream's authority.
    pub fn authority(&self) -> &str {
        self.uri.authority().map(|a| a.as_str()).unwrap_or(&self.host)
    }

    /// Sends `req` (origin-form target, headers already set) and returns the response head
    /// with its body streaming.
    pub async fn send(&self, req: http::Request<GateBody>) -> Result<http::Response<hyper::body::Incoming>, String> {
        let addr = (self.host.as_str(), self.port);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to {} timed out", self.uri))?
            .map_err(|e| format!("cannot connect to {}: {e}", self.uri))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.exchange(hyper_util::rt::TokioIo::new(tcp), req).await,
            Some((config, name)) => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| format!("TLS handshake with {} timed out", self.uri))?
                    .map_err(|e| format!("TLS handshake with {} failed: {e}", self.uri))?;
                self.exchange(hyper_util::rt::TokioIo::new(tls), req).await
            }
        }
    }

    async fn exchange<T>(
        &self,
        io: T,
        req: http::Request<GateBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, String>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP handshake with {} failed: {e}", self.uri))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "gate upstream connection ended");
            }
        });
        tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| format!("{} did not answer within {} s", self.uri, RESPONSE_TIMEOUT.as_secs()))?
            .map_err(|e| format!("{} failed: {e}", self.uri))
    }
}
