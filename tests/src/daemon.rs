//! A real `sluice daemon` with the kernel redirect on: its own agents cgroup, pin dir, ports,
//! state and socket. Dropping it kills the daemon and removes the pins and cgroups, as an
//! operator's uninstall would; tests never leave kernel state behind.

use crate::{free_port, unique, HANG_GUARD};
use sluice::kernel::{cgroup2_mount, detach_and_unpin, Cgroup};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `sluice` binary: `$SLUICE_BIN` (set by `cargo xtask test`), else the workspace's
/// debug build.
pub fn sluice_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/sluice");
    assert!(bin.exists(), "{} is missing: run `cargo build -p sluice` first (cargo xtask test does)", bin.display());
    bin
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub cgroup: String,
    pub pin_dir: PathBuf,
    pub proxy_port: u16,
    pub dns_port: u16,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon; `extra` is appended to its config (sections after `[sandbox]`).
    pub fn start(extra: &str) -> Daemon {
        Daemon::start_with_group("root", extra)
    }

    /// As [`Daemon::start`], with `group` as the API group.
    pub fn start_with_group(group: &str, extra: &str) -> Daemon {
        Daemon::start_custom(group, "", extra, &[])
    }

    /// As [`Daemon::start_with_group`], with `dns_extra` appended to the `[dns]` section and
    /// `policies` (file name, text) written to the policies directory before the daemon starts.
    pub fn start_custom(group: &str, dns_extra: &str, extra: &str, policies: &[(&str, &str)]) -> Daemon {
        Daemon::start_full(group, "", dns_extra, extra, policies)
    }

    /// As [`Daemon::start_custom`], with `proxy_extra` appended to the `[proxy]` section.
    pub fn start_full(
        group: &str,
        proxy_extra: &str,
        dns_extra: &str,
        extra: &str,
        policies: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("policies")).expect("policies dir");
        for (name, text) in policies {
            std::fs::write(dir.path().join("policies").join(name), text).expect("write policy");
        }
        let cgroup = unique("sluice-e2e");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("sluice-e2e")));
        let (proxy_port, dns_port) = (free_port(), free_port());
        let socket = dir.path().join("run/sluice.sock");
        let config = dir.path().join("sluice.toml");
        let text = format!(
            "state_dir = \"{state}\"\npolicies_dir = \"{pol}\"\n[api]\nsocket = \"{sock}\"\ngroup = \"{group}\"\n\
             [proxy]\nport = {proxy_port}\n{proxy_extra}\n[dns]\nport = {dns_port}\n{dns_extra}\n\
             [sandbox]\ncgroup = \"{cgroup}\"\npin_dir = \"{pins}\"\nunix_dir = \"{own}\"\n{extra}",
            state = dir.path().join("state").display(),
            pol = dir.path().join("policies").display(),
            sock = socket.display(),
            pins = pin_dir.display(),
            own = dir.path().join("own").display(),
        );
        std::fs::write(&config, text).expect("write config");
        let mut d = Daemon { dir, config, socket, cgroup, pin_dir, proxy_port, dns_port, child: None };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("daemon.log")).expect("log file");
        let child = Command::new(sluice_bin())
            .args(["--config", self.config.to_str().unwrap(), "daemon"])
            // `SLUICE_TEST_DAEMON_LOG` overrides the filter (e.g. `warn` to measure the cost of logging).
            .env("RUST_LOG", std::env::var("SLUICE_TEST_DAEMON_LOG").unwrap_or_else(|_| "info".into()))
            // The daemon bounds its own malloc; a caller's GLIBC_TUNABLES would override that and
            // measure another daemon than the shipped one.
            .env_remove("GLIBC_TUNABLES")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
        let deadline = Instant::now() + HANG_GUARD;
        while !self.cli(&["holds"]).status.success() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("daemon exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id while it runs (the proxy benchmark reads its RSS).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `true` while the daemon process has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGTERM, as `systemctl stop` sends it; returns without waiting (see [`Daemon::alive`]).
    pub fn term(&self) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// Sends SIGHUP (policy reload).
    pub fn hup(&self) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGHUP) };
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL: pins stay, as when a daemon crashes.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The raw answer (status line, headers, body) to `GET path` on the daemon's API socket.
    /// HTTP/1.0, so the body is never chunked: a caller may search it line by line.
    pub fn api_get(&self, path: &str) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(HANG_GUARD))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: sluice\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp)
    }

    /// `sluice --socket … --config … ARGS` outside any sandbox.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("run sluice")
    }

    /// Every record of the daemon's log, parsed, after `sluice audit export` and `sluice audit
    /// verify` with the host key (both must succeed; the export file is removed after).
    pub fn verified_records(&self) -> Vec<serde_json::Value> {
        let export = self.dir.path().join(format!("export-{}.json", unique("x")));
        let out = self.cli(&["audit", "export", "--out", export.to_str().unwrap()]);
        assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
        let host_pub = self.dir.path().join("state/host.pub");
        let out = self.cli(&["audit", "verify", export.to_str().unwrap(), "--host-pub", host_pub.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "audit verify failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let bundle: serde_json::Value = serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
        let _ = std::fs::remove_file(&export);
        bundle["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(r["record"].as_str().unwrap()).unwrap())
            .collect()
    }

    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(sluice_bin());
        c.args(["--socket", self.socket.to_str().unwrap(), "--config", self.config.to_str().unwrap()]).args(args);
        for var in
            ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"]
        {
            c.env_remove(var);
        }
        c
    }

    /// `[sandbox] unix_dir`: where the sandboxes' own directories are made.
    pub fn unix_dir(&self) -> PathBuf {
        self.dir.path().join("own")
    }

    /// The agents' cgroup of this daemon.
    pub fn agents_cgroup(&self) -> PathBuf {
        cgroup2_mount().expect("cgroup2 mount").join(&self.cgroup)
    }

    /// Sandbox cgroups (`run-*`) currently under the agents' cgroup.
    pub fn sandbox_cgroups(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.agents_cgroup())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("run-")))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// An issuer and a passport (`sluice passport issue` with `extra` flags) in this daemon's dir.
    pub fn issue(&self, name: &str, extra: &[&str]) -> (PathBuf, String) {
        let iss = self.dir.path().join(format!("{name}-issuer"));
        let out = self.cli(&["issuer", "init", "--dir", iss.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let passport = self.dir.path().join(format!("{name}.jwt"));
        let key = iss.join("issuer.key");
        let mut args = vec![
            "passport",
            "issue",
            "--issuer-key",
            key.to_str().unwrap(),
            "--agent-id",
            name,
            "--out",
            passport.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (passport, String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if let Err(e) = detach_and_unpin(&self.pin_dir) {
            eprintln!("cleanup: unpinning {}: {e}", self.pin_dir.display());
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
        // The daemon mounted a tmpfs for the sandboxes' own directories.
        if let Err(e) = sluice::kernel::SandboxDirs::unmount(&self.unix_dir()) {
            eprintln!("cleanup: unmounting {}: {e}", self.unix_dir().display());
        }
        if let Ok(cg) = Cgroup::open(self.agents_cgroup()) {
            if let Err(e) = cg.remove() {
                eprintln!("cleanup: removing {}: {e}", self.agents_cgroup().display());
            }
        }
    }
}
