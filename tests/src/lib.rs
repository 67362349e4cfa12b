//! Helpers shared by the end-to-end suites.
//!
//! Kernel suites (`tests/kernel_*.rs`) run against the real kernel as root.
//! Each test gets its own agents cgroup, pin directory and ports from
//! [`KernelFixture::new`], and everything is removed by `Drop` even when the
//! test panics: processes in the sandbox are killed (`cgroup.kill`), links
//! and maps are unpinned, cgroups removed.
//!
//! Skipping: without root a test prints a loud `SKIPPED: needs root` and
//! returns, unless `CI` is set, in which case it fails. As root, a failure
//! to load or attach is always a test failure.

pub mod browser;
pub mod daemon;
pub mod flood;
pub mod gate;
pub mod mock_llm;
pub mod ports;
pub mod probe;
pub mod redis;
pub mod threads;
pub mod upstream;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::probe::{DnsQuery, Probe, ProbeEvent, ResolverStub};
use sluice::kernel::{cgroup2_mount, detach_and_unpin, Cgroup, Conntable, Enforcer, KernelConfig};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Upper bound for anything a test waits on, so a broken kernel hook makes a
/// test fail instead of hanging. Not a performance assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// `true` if the test may run. Without root: loud skip, or panic under CI.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root, and CI is set: kernel suites must not be skipped in CI");
    }
    // Written to the real stderr, not eprintln!: libtest captures the macro
    // for passing tests, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "\n**************** SKIPPED: needs root ({test}) ****************\n");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `prefix-<pid>-<n>`, unique within this machine for the test's lifetime.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A port free for TCP and UDP on 127.0.0.1 and ::1, never handed out twice by this process,
/// from below the kernel's ephemeral range ([`ports`] says why).
pub fn free_port() -> u16 {
    ports::free_port().unwrap_or_else(|e| panic!("free_port: {e}"))
}

/// The real python3 binary (not a pyenv shim), so agents exec it directly.
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is needed by the kernel suites");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    })
}

/// Removes what a fixture created, in reverse order, even if setup failed
/// half-way. Runs on drop.
struct Cleanup {
    sandbox: Option<Cgroup>,
    pin_dir: PathBuf,
    agents_path: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(s) = self.sandbox.take() {
            if let Err(e) = s.remove() {
                eprintln!("cleanup: removing sandbox cgroup: {e}");
            }
        }
        if let Err(e) = detach_and_unpin(&self.pin_dir) {
            eprintln!("cleanup: unpinning {}: {e}", self.pin_dir.display());
        }
        if self.agents_path.exists() {
            match Cgroup::open(&self.agents_path) {
                Ok(cg) => {
                    if let Err(e) = cg.remove() {
                        eprintln!("cleanup: removing agents cgroup: {e}");
                    }
                }
                Err(e) => eprintln!("cleanup: opening agents cgroup: {e}"),
            }
        }
    }
}

/// An installed kernel redirect on a fresh agents cgroup, with one sandbox,
/// the probe on the proxy port and the resolver stub on the DNS port.
pub struct KernelFixture {
    // Field order is drop order: listeners and runtime before cleanup.
    probe: Option<Probe>,
    resolver: Option<ResolverStub>,
    enforcer: Option<Enforcer>,
    pub conntable: Arc<Conntable>,
    pub probe_events: UnboundedReceiver<ProbeEvent>,
    pub dns_events: UnboundedReceiver<DnsQuery>,
    pub config: KernelConfig,
    pub agents: Cgroup,
    pub sandbox: Cgroup,
    pub rt: tokio::runtime::Runtime,
    _cleanup: Cleanup,
    /// Kernel fixtures of one test binary run one at a time. In parallel, the 1,000-connect test
    /// used to see accepted connections without a table entry more often: a busier machine
    /// drains the probe's accept queue more slowly, and connections answered with SYN cookies
    /// when it overflowed reached `accept` only after the agent closed them (see that test; the
    /// listeners now have a 4,096-deep queue). Kept serialised: the suites measure one thing at
    /// a time. Dropped last.
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// See [`KernelFixture::_serial`].
static KERNEL_SERIAL: Mutex<()> = Mutex::new(());

impl KernelFixture {
    /// `None` when the test must be skipped (see [`root_or_skip`]).
    pub fn new(test: &str) -> Option<Self> {
        Self::with_max_tcp_sockets(test, sluice::kernel::DEFAULT_MAX_TCP_SOCKETS)
    }

    /// Like [`Self::new`], with `quota` TCP sockets per sandbox (`[sandbox] max_tcp_sockets`).
    pub fn with_max_tcp_sockets(test: &str, quota: u32) -> Option<Self> {
        if !root_or_skip(test) {
            return None;
        }
        // Poisoned by a failed test: the lock still serialises, take it.
        let serial = KERNEL_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let name = unique("sluice-test");
        let mount = cgroup2_mount().expect("cgroup2 mount");
        let config = KernelConfig {
            cgroup: name.clone(),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            proxy_port: free_port(),
            dns_port: free_port(),
            max_tcp_sockets: quota,
        };
        let mut cleanup = Cleanup { sandbox: None, pin_dir: config.pin_dir.clone(), agents_path: mount.join(&name) };
        let enforcer = Enforcer::install(&config)
            .unwrap_or_else(|e| panic!("{test}: installing the kernel redirect failed as root: {e}"));
        let agents = enforcer.agents_cgroup().clone();
        assert_eq!(agents.path(), cleanup.agents_path);
        let sandbox = agents.create_child("sandbox").expect("sandbox cgroup");
        cleanup.sandbox = Some(sandbox.clone());

        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
        let conntable = enforcer.conntable();
        let (ptx, probe_events) = unbounded_channel();
        let (dtx, dns_events) = unbounded_channel();
        let (probe, resolver) = rt.block_on(async {
            let p = Probe::start(config.proxy_port, Arc::clone(&conntable), ptx).await.expect("probe listener");
            let r = ResolverStub::start(config.dns_port, Arc::clone(&conntable), dtx).await.expect("resolver stub");
            (p, r)
        });
        Some(Self {
            probe: Some(probe),
            resolver: Some(resolver),
            enforcer: Some(enforcer),
            conntable,
            probe_events,
            dns_events,
            config,
            agents,
            sandbox,
            rt,
            _cleanup: cleanup,
            _serial: serial,
        })
    }

    pub fn enforcer(&self) -> &Enforcer {
        self.enforcer.as_ref().expect("enforcer is running")
    }

    /// Connections the probe closed for lack of a table entry.
    pub fn probe_unknown(&self) -> u64 {
        self.probe.as_ref().map_or(0, Probe::unknown)
    }

    /// Simulates a killed daemon: listeners closed, `Enforcer` dropped,
    /// pins left in place.
    pub fn kill_daemon(&mut self) {
        let probe = self.probe.take();
        let resolver = self.resolver.take();
        self.rt.block_on(async {
            if let Some(p) = probe {
                p.shutdown().await;
            }
            if let Some(r) = resolver {
                r.shutdown().await;
            }
        });
        drop(self.enforcer.take());
    }

    /// Starts a new daemon on the same config (takes over the pins) and a
    /// new probe.
    pub fn restart_daemon(&mut self) -> &Enforcer {
        self.kill_daemon();
        let enforcer = Enforcer::install(&self.config).expect("reinstall");
        self.conntable = enforcer.conntable();
        let (ptx, rx) = unbounded_channel();
        let (dtx, drx) = unbounded_channel();
        let port = self.config.proxy_port;
        let dport = self.config.dns_port;
        let ct = Arc::clone(&self.conntable);
        let (p, r) = self.rt.block_on(async move {
            let p = Probe::start(port, Arc::clone(&ct), ptx).await.expect("probe");
            let r = ResolverStub::start(dport, ct, dtx).await.expect("resolver");
            (p, r)
        });
        self.probe = Some(p);
        self.resolver = Some(r);
        self.probe_events = rx;
        self.dns_events = drx;
        self.enforcer.insert(enforcer)
    }

    /// A command that joins the sandbox cgroup between fork and exec.
    pub fn agent_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let join = self.sandbox.join_before_exec().expect("open cgroup.procs");
        // SAFETY: the hook only calls write(2) on an already-open fd.
        unsafe { cmd.pre_exec(join) };
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs a python script as an agent; returns the JSON object it prints
    /// on its last stdout line. Panics (with stderr) if it exits non-zero.
    pub fn run_python(&self, script: &str, args: &[String]) -> serde_json::Value {
        let mut cmd = self.agent_command(python());
        cmd.arg("-c").arg(script).args(args);
        last_json(run(cmd))
    }

    /// Waits for the next probe event (bounded by [`HANG_GUARD`]).
    pub fn next_probe_event(&mut self) -> Option<ProbeEvent> {
        let rx = &mut self.probe_events;
        self.rt.block_on(async { tokio::time::timeout(HANG_GUARD, rx.recv()).await.ok().flatten() })
    }

    /// Probe events already delivered, without waiting.
    pub fn drain_probe_events(&mut self) -> Vec<ProbeEvent> {
        let mut out = Vec::new();
        while let Ok(e) = self.probe_events.try_recv() {
            out.push(e);
        }
        out
    }

    /// Waits for the next DNS query seen by the resolver stub.
    pub fn next_dns_query(&mut self) -> Option<DnsQuery> {
        let rx = &mut self.dns_events;
        self.rt.block_on(async { tokio::time::timeout(HANG_GUARD, rx.recv()).await.ok().flatten() })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.config.pin_dir
    }
}

/// Runs `cmd` to completion with piped output (bounded by [`HANG_GUARD`]).
pub fn run(mut cmd: Command) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn agent");
    let guard = ChildGuard(Some(child));
    wait_output(guard)
}

/// Kills the child if the test panics before it exits.
pub struct ChildGuard(pub Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (bounded by [`HANG_GUARD`]) for the guarded child and collects its output.
pub fn wait_output(mut guard: ChildGuard) -> Output {
    let child = guard.0.as_mut().expect("child");
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => panic!("agent did not finish"),
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for agent: {e}"),
        }
    }
    let child = guard.0.take().expect("child");
    child.wait_with_output().expect("agent output")
}

/// The JSON object on the last stdout line; panics with stderr otherwise.
pub fn last_json(out: Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agent failed ({}):\nstdout: {stdout}\nstderr: {stderr}", out.status);
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("agent printed nothing; stderr: {stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("agent output {line:?}: {e}"))
}

/// An "outside world" listener: counts every TCP connection or UDP datagram
/// it receives. Redirected agent traffic must never reach it.
pub struct Canary {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    marker_hits: Arc<AtomicUsize>,
    udp: bool,
    task: tokio::task::JoinHandle<()>,
}

/// Datagram the test itself sends to a UDP canary to know that everything
/// sent before it has been delivered.
const MARKER: &[u8] = b"sluice-canary-marker";

impl Canary {
    pub fn tcp(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        let listener =
            rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap_or_else(|e| panic!("canary bind {addr}: {e}"));
        let task = rt.spawn(async move {
            while let Ok((_s, _)) = listener.accept().await {
                h.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self { addr, hits, marker_hits: Arc::new(AtomicUsize::new(0)), udp: false, task }
    }

    pub fn udp(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let marker_hits = Arc::new(AtomicUsize::new(0));
        let (h, m) = (Arc::clone(&hits), Arc::clone(&marker_hits));
        let sock = rt.block_on(tokio::net::UdpSocket::bind(addr)).unwrap_or_else(|e| panic!("canary bind {addr}: {e}"));
        let task = rt.spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, _)) = sock.recv_from(&mut buf).await {
                if buf.get(..n) == Some(MARKER) {
                    m.fetch_add(1, Ordering::SeqCst);
                } else {
                    h.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Self { addr, hits, marker_hits, udp: true, task }
    }

    /// Agent traffic received so far. For UDP, first flushes: sends a marker
    /// from outside the sandbox and waits until it arrives, so nothing the
    /// agent sent earlier is still in flight.
    pub fn hits(&self) -> usize {
        if self.udp {
            let before = self.marker_hits.load(Ordering::SeqCst);
            let s =
                UdpSocket::bind(if self.addr.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }).expect("marker socket");
            let deadline = Instant::now() + HANG_GUARD;
            while self.marker_hits.load(Ordering::SeqCst) == before {
                s.send_to(MARKER, self.addr).expect("send marker");
                assert!(Instant::now() < deadline, "canary marker never arrived");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `ip:port` of a JSON `[host, port, ...]` address as Python prints it.
pub fn py_addr(v: &serde_json::Value) -> SocketAddr {
    let host = v[0].as_str().expect("host");
    let port = v[1].as_u64().expect("port");
    let ip: std::net::IpAddr = host.parse().expect("ip");
    SocketAddr::new(ip, u16::try_from(port).expect("port range"))
}
