//! `sluice-mock-llm --listen ADDR --ca-out FILE [--name HOST]… [--leaf HOST=DIR]…`: the mock LLM
//! API of [`sluice_e2e::mock_llm`] over HTTPS (HTTP/1.1 and HTTP/2 by ALPN), for `cargo xtask demo`.
//!
//! It makes a fresh test CA, writes its certificate to `--ca-out` (for the daemon's
//! `upstream_tls.extra_roots`), serves one leaf for every `--name` (default `api.openai.com`
//! and `api.anthropic.com`), writes a leaf of the same CA for every `--leaf HOST=DIR` to
//! `DIR/tls.crt` and `DIR/tls.key` (for another server the daemon must trust, such as the demo's
//! gate), prints `ready <addr>` on stdout, then one `mock: …` line per
//! request. It exits when its standard input closes (so it never outlives the process that
//! started it, even one killed with SIGKILL) or on SIGTERM / SIGINT.

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_e2e::mock_llm;
use sluice_e2e::upstream::TestCa;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "usage: sluice-mock-llm --listen ADDR:PORT --ca-out FILE [--name HOST]... [--leaf HOST=DIR]...";

struct Args {
    listen: SocketAddr,
    ca_out: PathBuf,
    names: Vec<String>,
    /// (host name, directory) of the leaves written out.
    leaves: Vec<(String, PathBuf)>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut listen, mut ca_out, mut names, mut leaves) = (None, None, Vec::new(), Vec::new());
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| format!("--listen {value:?}: {e}"))?),
            "--ca-out" => ca_out = Some(PathBuf::from(value)),
            "--name" => names.push(value),
            "--leaf" => {
                let (host, dir) =
                    value.split_once('=').ok_or_else(|| format!("--leaf {value:?}: HOST=DIR expected"))?;
                if host.is_empty() || dir.is_empty() {
                    return Err(format!("--leaf {value:?}: HOST=DIR expected"));
                }
                leaves.push((host.to_string(), PathBuf::from(dir)));
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if names.is_empty() {
        names = vec!["api.openai.com".into(), "api.anthropic.com".into()];
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        ca_out: ca_out.ok_or("--ca-out is required")?,
        names,
        leaves,
    })
}

/// `dir/tls.crt` and `dir/tls.key` (mode 0600): a leaf of `ca` for `host`.
fn write_leaf(ca: &TestCa, host: &str, dir: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir)?;
    let (cert, key) = ca.leaf_pem(&[host]);
    std::fs::write(dir.join("tls.crt"), cert)?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.join("tls.key"))?;
    f.write_all(key.as_bytes())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sluice-mock-llm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let ca = TestCa::new();
    if let Err(e) = std::fs::write(&args.ca_out, &ca.pem) {
        eprintln!("sluice-mock-llm: cannot write the CA certificate to {}: {e}", args.ca_out.display());
        return ExitCode::FAILURE;
    }
    for (host, dir) in &args.leaves {
        if let Err(e) = write_leaf(&ca, host, dir) {
            eprintln!("sluice-mock-llm: cannot write the leaf for {host} to {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    }
    let names: Vec<&str> = args.names.iter().map(String::as_str).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config(&names)));
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sluice-mock-llm: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    println!("ready {addr}");

    let serve = async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    println!("mock: {peer} TLS handshake failed");
                    return;
                };
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let host = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| {
                            req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
                        })
                        .unwrap_or_default();
                    let (method, path, version) = (req.method().clone(), req.uri().path().to_string(), req.version());
                    let a = mock_llm::answer(&method, &path, req.into_body()).await;
                    println!("mock: {peer} {version:?} {method} {host}{path} -> {}", a.summary);
                    Ok::<_, Infallible>(a.response)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    };
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        eprintln!("sluice-mock-llm: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    tokio::select! {
        _ = serve => {}
        _ = stdin_closed => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // The stdin reader sits in a blocking thread the runtime would wait for: leave now.
    std::process::exit(0)
}
