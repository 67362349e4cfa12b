//! Headless Chromium (Debian's `chromium`) driven over the Chrome DevTools Protocol: one page,
//! JavaScript evaluated in it, screenshots. Enough for the console's browser test, with no
//! driver binary and no npm: the protocol is JSON over a WebSocket (`tungstenite`).
//!
//! Chromium runs with its own temporary profile, `--remote-debugging-port=0` (it writes the port
//! it chose to `DevToolsActivePort` in the profile) and no proxy; it is killed on drop.

use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// The browser binary: `$SLUICE_CHROMIUM`, else `/usr/bin/chromium` (Debian's package).
pub fn chromium_path() -> PathBuf {
    std::env::var_os("SLUICE_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium with a `width`×`height` window and attaches to its first page.
    pub fn launch(width: u32, height: u32) -> Browser {
        let bin = chromium_path();
        assert!(bin.exists(), "{} is missing: apt-get install chromium (cargo xtask deps does)", bin.display());
        let profile = tempfile::tempdir().expect("profile dir");
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--no-proxy-server",
            "--hide-scrollbars",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", profile.path().display()),
            "about:blank",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group, so dropping the browser kills its renderers and helpers too.
        .process_group(0);
        for var in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"] {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|t| t.lines().next()?.parse().ok()) {
                break p;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("chromium exited with {status} before opening its DevTools port");
            }
            assert!(Instant::now() < deadline, "chromium did not open its DevTools port in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        };
        // The first page target's WebSocket.
        let list = loop {
            let list = http_get(port, "/json/list");
            let has_page = list.as_array().is_some_and(|a| a.iter().any(|t| t["type"] == "page"));
            if has_page {
                break list;
            }
            assert!(Instant::now() < deadline, "chromium has no page target: {list}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let url = list
            .as_array()
            .and_then(|a| a.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("webSocketDebuggerUrl")
            .to_string();
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to DevTools");
        stream.set_read_timeout(Some(Duration::from_secs(60))).expect("read timeout");
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("DevTools WebSocket handshake");
        let mut b = Browser { child, _profile: profile, ws, next_id: 0 };
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        b
    }

    /// Sends one command and returns its `result`; events in between are skipped. A protocol
    /// error panics with the method and the message.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).unwrap_or_else(|e| panic!("{method}: {e}"));
        loop {
            let m = self.ws.read().unwrap_or_else(|e| panic!("{method}: {e}"));
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            if v["id"] != id {
                continue;
            }
            if let Some(e) = v.get("error") {
                panic!("{method}: {e}");
            }
            return v["result"].clone();
        }
    }

    /// Loads `url` and waits until the document is complete.
    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", Duration::from_secs(30));
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value. An exception
    /// panics with its text.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true, "userGesture": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` every 100 ms until it is truthy; panics with the page's text after `within`.
    pub fn wait_for(&mut self, expr: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let check = format!("(() => {{ try {{ return !!({expr}); }} catch (e) {{ return false; }} }})()");
        loop {
            if self.eval(&check) == Value::Bool(true) {
                return;
            }
            if Instant::now() >= deadline {
                let text = self.eval("document.body ? document.body.innerText : document.documentElement.outerHTML");
                panic!("waited {within:?} for `{expr}`; the page shows:\n{}", text.as_str().unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the page as shown (the whole page when `full`), written to `path`.
    pub fn screenshot(&mut self, path: &Path, full: bool) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": full}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.ws.close(None);
        // SAFETY: kill(2) on the process group this browser leads (spawned with process_group(0)).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on the DevTools HTTP endpoint, as JSON.
fn http_get(port: u16, path: &str) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to DevTools");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}
