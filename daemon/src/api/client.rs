//! The CLI's client for the local API: one HTTP/1.1 request over the Unix socket per call.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Responses larger than this are refused (an export can be large; everything else is small).
const MAX_RESPONSE: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon at {path}: {source}; is `sluice daemon` running? (the socket is set with --socket)"
    )]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("permission denied on {path}: run as root or as a member of the sluice group")]
    Permission { path: PathBuf },
    #[error(
        "the kernel refused the connection to {path} (EPERM): this process runs inside an agent sandbox, which \
         reaches only its own Unix sockets and those in [sandbox] unix_allow; agents may not use the local API"
    )]
    Confined { path: PathBuf },
    #[error("talking to the daemon at {path}: {message}")]
    Protocol { path: PathBuf, message: String },
    #[error("{message}")]
    Api { status: StatusCode, code: String, message: String },
    /// The caller's sink refused a part of a download (a local write failed).
    #[error("{0}")]
    Sink(String),
}

/// A successful response: its status and JSON body.
pub struct Response {
    pub status: StatusCode,
    pub body: Value,
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client { socket: socket.to_path_buf() }
    }

    /// Sends one request. A non-2xx answer with an `{error, message}` body becomes
    /// [`ClientError::Api`]; other non-2xx answers (a decision's 403, say) are returned as they are
    /// when `accept_any_status` is set.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Response, ClientError> {
        let (status, bytes) = self.raw(method, path, body).await?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| self.protocol(format!("response is not JSON: {e}")))?
        };
        if !status.is_success() {
            if let Some(code) = body.get("error").and_then(Value::as_str) {
                let message = body.get("message").and_then(Value::as_str).unwrap_or(code).to_string();
                return Err(ClientError::Api { status, code: code.to_string(), message });
            }
        }
        Ok(Response { status, body })
    }

    /// Sends a GET and hands the body of a 2xx answer to `sink` part by part as it arrives (an
    /// export can be larger than memory). Another answer is read whole (it is a small error
    /// document) and becomes [`ClientError::Api`] or [`ClientError::Protocol`]. A body that
    /// stops early (the daemon cut it) is a [`ClientError::Protocol`].
    pub async fn download(
        &self,
        path: &str,
        mut sink: impl FnMut(Bytes) -> Result<(), String>,
    ) -> Result<(), ClientError> {
        const MAX_ERROR_BODY: usize = 1 << 20;
        let (resp, driver) = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = Limited::new(body, MAX_ERROR_BODY)
                .collect()
                .await
                .map_err(|e| self.protocol(e.to_string()))?
                .to_bytes();
            driver.abort();
            let doc: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let code = doc.get("error").and_then(Value::as_str).unwrap_or("error").to_string();
            let message = doc
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("the daemon answered {status}"));
            return Err(ClientError::Api { status, code, message });
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.protocol(format!("the answer stopped early: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if let Err(e) = sink(data) {
                    driver.abort();
                    return Err(ClientError::Sink(e));
                }
            }
        }
        driver.abort();
        Ok(())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(http::Response<hyper::body::Incoming>, tokio::task::JoinHandle<hyper::Result<()>>), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|source| {
            if source.raw_os_error() == Some(libc::EPERM) {
                ClientError::Confined { path: self.socket.clone() }
            } else if source.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::Permission { path: self.socket.clone() }
            } else {
                ClientError::Connect { path: self.socket.clone(), source }
            }
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut req = Request::builder().method(method).uri(path).header(http::header::HOST, "sluice");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(payload)).map_err(|e| self.protocol(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| self.protocol(e.to_string()))?;
        Ok((resp, driver))
    }

    /// Sends one request and returns the status and raw body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (resp, driver) = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| self.protocol(e.to_string()))?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    }

    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol { path: self.socket.clone(), message }
    }
}
