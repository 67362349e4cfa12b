//! `sluice run` against a real daemon with the kernel redirect attached: the command runs in a
//! sandbox bound to its passport, its traffic is redirected (never reaching the address it
//! dialed), it cannot use the local API, its exit status is passed through, and the sandbox is
//! gone when it ends — for root and for a non-root member of the API group.

use sluice_e2e::daemon::Daemon;
use sluice_e2e::{python, root_or_skip, Canary, HANG_GUARD};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn wait_no_sandboxes(d: &Daemon) {
    let deadline = Instant::now() + HANG_GUARD;
    while !d.sandbox_cgroups().is_empty() {
        assert!(Instant::now() < deadline, "sandbox cgroups left: {:?}\n{}", d.sandbox_cgroups(), d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_passes_the_exit_status_through_and_removes_the_sandbox() {
    if !root_or_skip("run_passes_the_exit_status_through_and_removes_the_sandbox") {
        return;
    }
    let d = Daemon::start("");
    let (passport, _) = d.issue("exit7", &["--permission", "*"]);
    let out =
        d.cli(&["run", "--passport", passport.to_str().unwrap(), "--", "sh", "-c", "cat /proc/self/cgroup; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}\n{}", stderr(&out), d.log());
    let cg = String::from_utf8_lossy(&out.stdout);
    assert!(cg.contains(&format!("/{}/run-", d.cgroup)), "the command ran outside its sandbox: {cg}");
    wait_no_sandboxes(&d);
}

#[test]
fn a_sandboxed_command_is_redirected_and_cannot_use_the_api() {
    if !root_or_skip("a_sandboxed_command_is_redirected_and_cannot_use_the_api") {
        return;
    }
    let d = Daemon::start("");
    let (passport, _) = d.issue("agent", &["--permission", "*"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let canary_addr: SocketAddr = format!("127.0.0.77:{}", sluice_e2e::free_port()).parse().unwrap();
    let canary = Canary::tcp(&rt, canary_addr);
    let script = format!(
        "import socket\ns=socket.create_connection(('{}',{}),timeout=5)\nprint(s.getpeername())\ntry:\n  print(s.recv(10))\nexcept Exception as e:\n  print(e)\n",
        canary_addr.ip(),
        canary_addr.port()
    );
    let py = python().to_str().unwrap().to_string();
    let out = d.cli(&["run", "--passport", passport.to_str().unwrap(), "--", &py, "-c", &script]);
    assert_eq!(canary.hits(), 0, "the agent reached the address it dialed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(
        d.log().contains(&format!("dialed={canary_addr}")),
        "the daemon did not see the connection (agent: {:?} {} {}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out),
        d.log()
    );

    // The agent asks the daemon to approve its own holds: refused, even as root.
    let bin = sluice_e2e::daemon::sluice_bin();
    let out = d.cli(&[
        "run",
        "--passport",
        passport.to_str().unwrap(),
        "--",
        bin.to_str().unwrap(),
        "--socket",
        d.socket.to_str().unwrap(),
        "holds",
    ]);
    assert_eq!(out.status.code(), Some(1));
    // The API socket is on the kernel's list of reachable Unix sockets (agent units bind
    // themselves through it), so the daemon itself refuses the sandboxed caller.
    assert!(stderr(&out).contains("runs inside the agent sandbox"), "{}\n{}", stderr(&out), d.log());
    wait_no_sandboxes(&d);
}

#[test]
fn grandchildren_left_behind_are_killed_with_the_sandbox() {
    if !root_or_skip("grandchildren_left_behind_are_killed_with_the_sandbox") {
        return;
    }
    let d = Daemon::start("");
    let (passport, _) = d.issue("forker", &["--permission", "*"]);
    // The agent has its own PID namespace, so the pid it sees means nothing here: the grandchild
    // is found by a unique argument instead, once the agent has seen it run.
    let marker = d.dir.path().join("grandchild.started");
    let arg = format!("300.{}", std::process::id());
    let script = format!(
        "setsid sleep {arg} & p=$!; while ! grep -q {arg} /proc/$p/cmdline 2>/dev/null; do sleep 0.05; done; echo $p > {}; exit 0",
        marker.display()
    );
    let out = d.cli(&["run", "--passport", passport.to_str().unwrap(), "--", "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(marker.exists(), "the grandchild never ran");
    wait_no_sandboxes(&d);
    // Dead means gone, or a zombie waiting for its parent to reap it.
    let alive = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let dir = e.path();
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            cmdline == format!("sleep\0{arg}\0").as_bytes()
                && stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    };
    assert!(!alive(), "a daemonised grandchild outlived its sandbox");
}

#[test]
fn a_non_root_member_of_the_api_group_can_run_agents() {
    if !root_or_skip("a_non_root_member_of_the_api_group_can_run_agents") {
        return;
    }
    // "nobody" (uid/gid 65534) gets the API through its group, and a path to the socket.
    let d = Daemon::start_with_group("nogroup", "");
    use std::os::unix::fs::PermissionsExt;
    for dir in [d.dir.path().to_path_buf(), d.dir.path().join("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (passport, _) = d.issue("nobody-agent", &["--permission", "*"]);
    std::fs::set_permissions(&passport, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = d
        .cli_command(&[
            "run",
            "--passport",
            passport.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "cat /proc/self/cgroup; id -u; exit 3",
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}\n{}", stderr(&out), d.log());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("/{}/run-", d.cgroup)) && text.contains("65534"), "{text}");
    wait_no_sandboxes(&d);
}

#[test]
fn l3_agents_run_only_with_their_key() {
    if !root_or_skip("l3_agents_run_only_with_their_key") {
        return;
    }
    let mut d = Daemon::start("");
    let (passport, _) = d.issue("l3", &["--permission", "*", "--tier", "L3"]);
    let issuer_pub = d.dir.path().join("l3-issuer/issuer.pub");
    let text =
        std::fs::read_to_string(&d.config).unwrap() + &format!("[trust]\nissuers = [\"{}\"]\n", issuer_pub.display());
    std::fs::write(&d.config, text).unwrap();
    d.kill();
    d.spawn();
    let out = d.cli(&["run", "--passport", passport.to_str().unwrap(), "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stderr(&out), d.log());
    let key = format!("{}.key", passport.display());
    std::fs::rename(&key, format!("{key}.moved")).unwrap();
    let out = d.cli(&["run", "--passport", passport.to_str().unwrap(), "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("agent key"), "{}", stderr(&out));
    wait_no_sandboxes(&d);
}

/// `sluice run` as a non-root user: the agent (python3) cannot connect to a Unix socket outside
/// its sandbox nor to an abstract one (EPERM), can connect to a listed one, and can use Unix
/// sockets it creates in its own directory (`TMPDIR`, with `multiprocessing.connection` too),
/// which is owned by the user and gone when the command ends.
#[test]
fn an_agent_reaches_only_its_own_and_listed_unix_sockets() {
    if !root_or_skip("an_agent_reaches_only_its_own_and_listed_unix_sockets") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let outside = tempfile::Builder::new().prefix("sluice-unix-run").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out_path = outside.path().join("host-service.sock");
    let listed_path = outside.path().join("listed.sock");
    let _out = std::os::unix::net::UnixListener::bind(&out_path).unwrap();
    let _listed = std::os::unix::net::UnixListener::bind(&listed_path).unwrap();
    for p in [&out_path, &listed_path] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let abstract_name = sluice_e2e::unique("sluice-unix-run-abstract");
    let _abs = std::os::unix::net::UnixListener::bind_addr(
        &<std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            abstract_name.as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();

    let d = Daemon::start_with_group("nogroup", &format!("unix_allow = [\"{}\"]\n", listed_path.display()));
    for dir in [d.dir.path().to_path_buf(), d.dir.path().join("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (passport, _) = d.issue("unix-agent", &["--permission", "*"]);
    std::fs::set_permissions(&passport, std::fs::Permissions::from_mode(0o644)).unwrap();
    let script = r#"
import json, os, socket, sys, tempfile
from multiprocessing.connection import Listener, Client
def conn(a):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(a)
        return 0
    except OSError as e:
        return e.errno
res = {"tmpdir": os.environ.get("TMPDIR"), "xdg": os.environ.get("XDG_RUNTIME_DIR"), "uid": os.getuid()}
res["outside"] = conn(sys.argv[1])
res["listed"] = conn(sys.argv[2])
res["abstract"] = conn("\0" + sys.argv[3])
d = tempfile.mkdtemp()
l = socket.socket(socket.AF_UNIX)
l.bind(os.path.join(d, "own.sock"))
l.listen()
res["own"] = conn(os.path.join(d, "own.sock"))
res["own_path"] = d
with Listener(family="AF_UNIX") as server:
    Client(server.address).close()
    res["multiprocessing"] = server.address
a, b = socket.socketpair()
a.send(b"ok")
res["socketpair"] = b.recv(2).decode()
print(json.dumps(res))
"#;
    // The system's python3: the user "nobody" may run it (a pyenv one under /root it may not).
    let py = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a system python3 that the user nobody may run");
    let out = d
        .cli_command(&[
            "run",
            "--passport",
            passport.to_str().unwrap(),
            "--",
            py,
            "-c",
            script,
            out_path.to_str().unwrap(),
            listed_path.to_str().unwrap(),
            &abstract_name,
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", stderr(&out), d.log());
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    const EPERM: i64 = 1;
    assert_eq!(v["outside"].as_i64(), Some(EPERM), "{v}");
    assert_eq!(v["abstract"].as_i64(), Some(EPERM), "{v}");
    assert_eq!(v["listed"], 0, "{v}");
    assert_eq!(v["own"], 0, "{v}");
    assert_eq!(v["socketpair"], "ok", "{v}");
    assert_eq!(v["uid"], 65534, "{v}");
    let own = v["tmpdir"].as_str().unwrap().to_string();
    assert!(own.starts_with(&format!("{}/run-", d.unix_dir().display())), "{v}");
    assert_eq!(v["xdg"].as_str(), Some(own.as_str()), "{v}");
    assert!(v["own_path"].as_str().unwrap().starts_with(&own), "{v}");
    assert!(v["multiprocessing"].as_str().unwrap().starts_with(&own), "{v}");
    // The refusals are counted (the path and the abstract name), and the health says enforced.
    let metrics = api_get(&d, "/metrics");
    assert!(metrics.contains("sluice_unix_connects_refused_total 2\n"), "{metrics}");
    assert!(metrics.contains("sluice_unix_sends_refused_total 0\n"), "{metrics}");
    let health = api_get(&d, "/v1/health");
    assert!(
        health.contains(r#""unix_sockets":{"own_directories""#) && health.contains(r#""status":"enforced""#),
        "{health}"
    );
    wait_no_sandboxes(&d);
    let deadline = Instant::now() + HANG_GUARD;
    while std::fs::read_dir(d.unix_dir()).unwrap().next().is_some() {
        assert!(Instant::now() < deadline, "own directory left behind: {own}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The system's python3: the user "nobody" may run it (a pyenv one under /root it may not).
fn system_python() -> &'static str {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a system python3 that the user nobody may run")
}

/// Binds and connects to a socket in TMPDIR (`own`), connects to argv[1] (`outside`), and, with
/// argv[2] = "mount", first bind-mounts argv[1] over TMPDIR/x.sock and connects there (`via_own`).
const NESTED_TRY: &str = r#"
import ctypes, json, os, socket, sys
def conn(a):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(a)
        return 0
    except OSError as e:
        return e.errno
own = os.environ["TMPDIR"]
res = {"uid": os.getuid()}
l = socket.socket(socket.AF_UNIX)
p = os.path.join(own, "s%d.sock" % os.getpid())
l.bind(p)
l.listen()
res["own"] = conn(p)
res["outside"] = conn(sys.argv[1])
if sys.argv[2] == "mount":
    x = os.path.join(own, "x.sock")
    open(x, "w").close()
    libc = ctypes.CDLL(None, use_errno=True)
    res["mount"] = 0 if libc.mount(sys.argv[1].encode(), x.encode(), None, 4096, None) == 0 else ctypes.get_errno()
    res["via_own"] = conn(x)
print(json.dumps(res))
"#;

/// A non-root agent runs in the user namespace `sluice run` made (registered for its sandbox):
/// it reaches its own directory and no capability lets it mount there. A user namespace it
/// makes itself (`unshare -Urm`) lets it bind-mount an outside socket over a path in its own
/// directory, but from there every name is refused.
#[test]
fn a_non_root_agent_in_a_nested_user_namespace_cannot_bind_mount_a_way_out() {
    if !root_or_skip("a_non_root_agent_in_a_nested_user_namespace_cannot_bind_mount_a_way_out") {
        return;
    }
    let NobodySetup { _outside, out_path, _out, d, passport } = NobodySetup::new("sluice-unix-nested", "nested-agent");
    let py = system_python();
    let script = format!("{py} -c \"$0\" \"$1\" mount || exit 1; exec unshare -Urm {py} -c \"$0\" \"$1\" mount");
    let out = d
        .cli_command(&[
            "run",
            "--passport",
            passport.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
            NESTED_TRY,
            out_path.to_str().unwrap(),
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", stderr(&out), d.log());
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let (agent, nested) = (&lines[0], &lines[1]);
    const EPERM: i64 = 1;
    // connect(2) to a path that is not a listening socket.
    const ECONNREFUSED: i64 = 111;
    assert_eq!(agent["uid"], 65534, "{agent}");
    assert_eq!(agent["own"], 0, "{agent}");
    assert_eq!(agent["outside"].as_i64(), Some(EPERM), "{agent}");
    assert_eq!(agent["mount"].as_i64(), Some(EPERM), "the agent has no capability in sluice run's namespace: {agent}");
    assert_eq!(agent["via_own"].as_i64(), Some(ECONNREFUSED), "a plain file, no socket: {agent}");
    assert_eq!(nested["mount"], 0, "the nested namespace lets it mount (else this tests nothing): {nested}");
    for case in ["own", "outside", "via_own"] {
        assert_eq!(nested[case].as_i64(), Some(EPERM), "nested namespace, {case}: {nested}");
    }
    wait_no_sandboxes(&d);
}

/// Root's agent (no user namespace: the daemon's) reaches its own directory too.
#[test]
fn a_root_agent_reaches_its_own_directory() {
    if !root_or_skip("a_root_agent_reaches_its_own_directory") {
        return;
    }
    let outside = tempfile::Builder::new().prefix("sluice-unix-root").tempdir_in("/tmp").unwrap();
    let out_path = outside.path().join("host-service.sock");
    let _out = std::os::unix::net::UnixListener::bind(&out_path).unwrap();
    let d = Daemon::start("");
    let (passport, _) = d.issue("root-unix-agent", &["--permission", "*"]);
    let out = d
        .cli_command(&[
            "run",
            "--passport",
            passport.to_str().unwrap(),
            "--",
            system_python(),
            "-c",
            NESTED_TRY,
            out_path.to_str().unwrap(),
            "no-mount",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", stderr(&out), d.log());
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["uid"], 0, "{v}");
    assert_eq!(v["own"], 0, "{v}");
    assert_eq!(v["outside"].as_i64(), Some(1), "{v}");
    wait_no_sandboxes(&d);
}

/// A caller that is root in a user namespace of its own (`unshare -r`, as in a rootless
/// container) would start agents that keep every capability there and can mount: the daemon does
/// not register that namespace (it maps uid 0, not only the caller's uid to itself), says why,
/// and the agent reaches no Unix socket by name even after bind-mounting one into its directory.
#[test]
fn a_caller_that_is_root_in_a_user_namespace_of_its_own_gets_no_names() {
    if !root_or_skip("a_caller_that_is_root_in_a_user_namespace_of_its_own_gets_no_names") {
        return;
    }
    let NobodySetup { _outside, out_path, _out, d, passport } = NobodySetup::new("sluice-unix-rootns", "rootns-agent");
    let mut cmd = std::process::Command::new("unshare");
    cmd.arg("-r")
        .arg(sluice_e2e::daemon::sluice_bin())
        .args(["--socket", d.socket.to_str().unwrap(), "--config", d.config.to_str().unwrap()])
        .args(["run", "--passport", passport.to_str().unwrap(), "--", system_python(), "-c", NESTED_TRY])
        .args([out_path.to_str().unwrap(), "mount"])
        .uid(65534)
        .gid(65534);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = stderr(&out);
    assert!(out.status.success(), "{stdout}\n{err}\n{}", d.log());
    assert!(err.contains("did not register") && err.contains("not only the caller's uid 65534"), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    const EPERM: i64 = 1;
    assert_eq!(v["uid"], 0, "root inside its namespace: {v}");
    assert_eq!(v["mount"], 0, "it can mount there (else this tests nothing): {v}");
    for case in ["own", "outside", "via_own"] {
        assert_eq!(v[case].as_i64(), Some(EPERM), "{case}: {v}");
    }
    wait_no_sandboxes(&d);
}

/// `--no-pid-namespace` makes no user namespace (and registers none): the agent is in the
/// daemon's, and reaches its own directory from there.
#[test]
fn without_namespaces_a_non_root_agent_reaches_its_own_directory() {
    if !root_or_skip("without_namespaces_a_non_root_agent_reaches_its_own_directory") {
        return;
    }
    let NobodySetup { _outside, out_path, _out, d, passport } = NobodySetup::new("sluice-unix-nons", "nons-agent");
    let out = d
        .cli_command(&[
            "run",
            "--passport",
            passport.to_str().unwrap(),
            "--no-pid-namespace",
            "--",
            system_python(),
            "-c",
            NESTED_TRY,
            out_path.to_str().unwrap(),
            "no-mount",
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", stderr(&out), d.log());
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["uid"], 65534, "{v}");
    assert_eq!(v["own"], 0, "{v}");
    assert_eq!(v["outside"].as_i64(), Some(1), "{v}");
    wait_no_sandboxes(&d);
}

/// The raw answer to `GET path` on the daemon's API socket.
fn api_get(d: &Daemon, path: &str) -> String {
    d.api_get(path).unwrap_or_else(|e| panic!("GET {path} on the API socket: {e}"))
}

/// A daemon whose API, config and passport the user nobody can reach, and a Unix socket outside
/// any sandbox (`out_path`, world-connectable) that an agent must not reach.
struct NobodySetup {
    _outside: tempfile::TempDir,
    out_path: std::path::PathBuf,
    _out: std::os::unix::net::UnixListener,
    d: Daemon,
    passport: std::path::PathBuf,
}

impl NobodySetup {
    fn new(prefix: &str, agent: &str) -> NobodySetup {
        use std::os::unix::fs::PermissionsExt;
        let outside = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let out_path = outside.path().join("host-service.sock");
        let out = std::os::unix::net::UnixListener::bind(&out_path).unwrap();
        std::fs::set_permissions(&out_path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let d = Daemon::start_with_group("nogroup", "");
        for dir in [d.dir.path().to_path_buf(), d.dir.path().join("run")] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let (passport, _) = d.issue(agent, &["--permission", "*"]);
        std::fs::set_permissions(&passport, std::fs::Permissions::from_mode(0o644)).unwrap();
        NobodySetup { _outside: outside, out_path, _out: out, d, passport }
    }
}
