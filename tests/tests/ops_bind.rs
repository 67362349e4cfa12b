//! Bound sandboxes, as systemd agent units use them (`sluice sandbox bind`), against a real
//! daemon with the kernel redirect attached: a cgroup below the agents' cgroup (what systemd
//! makes for `sluice-agent@NAME.service`) is bound to a passport from outside or by a root
//! process inside it (the unit's `ExecStartPre=+`), and nobody else can use that door.

use sluice::kernel::Cgroup;
use sluice_e2e::daemon::{sluice_bin, Daemon};
use sluice_e2e::{root_or_skip, HANG_GUARD};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A cgroup standing in for a systemd unit's, removed (processes killed) on drop.
struct UnitCgroup(Cgroup);

impl UnitCgroup {
    fn new(d: &Daemon, name: &str) -> UnitCgroup {
        let path = d.agents_cgroup().join(name);
        std::fs::create_dir(&path).unwrap();
        UnitCgroup(Cgroup::open(path).unwrap())
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    /// `sluice --socket … ARGS`, started inside this cgroup, optionally through `wrapper`
    /// (e.g. setpriv to drop root).
    fn run(&self, d: &Daemon, wrapper: &[&str], args: &[&str]) -> Output {
        let bin = sluice_bin();
        let mut all: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        all.push(bin.display().to_string());
        all.extend(["--socket".to_string(), d.socket.display().to_string()]);
        all.extend(args.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(&all[0]);
        cmd.args(&all[1..]);
        let join = self.0.join_before_exec().unwrap();
        // SAFETY: the hook only calls write(2) on an fd opened beforehand.
        unsafe { cmd.pre_exec(join) };
        cmd.output().unwrap()
    }
}

impl Drop for UnitCgroup {
    fn drop(&mut self) {
        let _ = self.0.remove();
    }
}

fn sandboxes(d: &Daemon) -> Vec<serde_json::Value> {
    let out = d.cli(&["sandbox", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["sandboxes"].as_array().cloned().unwrap_or_default()
}

fn bound_to(d: &Daemon, cgroup: &Path) -> Option<String> {
    sandboxes(d)
        .into_iter()
        .find(|s| s["cgroup"].as_str() == cgroup.to_str())
        .and_then(|s| s["passport_id"].as_str().map(str::to_string))
}

#[test]
fn an_operator_binds_and_unbinds_a_unit_cgroup_and_bindings_survive_a_restart() {
    if !root_or_skip("an_operator_binds_and_unbinds_a_unit_cgroup_and_bindings_survive_a_restart") {
        return;
    }
    let mut d = Daemon::start("");
    let (passport, id) = d.issue("unit", &["--permission", "*"]);
    let (other, _) = d.issue("richer", &["--permission", "*"]);
    let unit = UnitCgroup::new(&d, "sluice-agent@e2e.service");
    let p = |x: &Path| x.to_str().unwrap().to_string();

    let out = d.cli(&["sandbox", "bind", "--passport", &p(&passport), "--cgroup", &p(unit.path())]);
    assert!(out.status.success(), "{}\n{}", text(&out), d.log());
    assert_eq!(bound_to(&d, unit.path()), Some(id.clone()));
    // Again with the same passport: a no-op. With another: refused, the binding stands.
    let out = d.cli(&["sandbox", "bind", "--passport", &p(&passport), "--cgroup", &p(unit.path()), "--json"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"already_bound\": true"),
        "{}",
        text(&out)
    );
    let out = d.cli(&["sandbox", "bind", "--passport", &p(&other), "--cgroup", &p(unit.path())]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never re-bound"), "{}", text(&out));
    assert_eq!(bound_to(&d, unit.path()), Some(id.clone()));

    // A restart keeps the binding (it is state, not memory).
    d.kill();
    d.spawn();
    assert_eq!(bound_to(&d, unit.path()), Some(id.clone()), "{}", d.log());

    let out = d.cli(&["sandbox", "unbind", "--cgroup", &p(unit.path())]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(bound_to(&d, unit.path()), None);
}

#[test]
fn only_cgroups_strictly_below_the_agents_cgroup_can_be_bound() {
    if !root_or_skip("only_cgroups_strictly_below_the_agents_cgroup_can_be_bound") {
        return;
    }
    let d = Daemon::start("");
    let (passport, _) = d.issue("unit", &["--permission", "*"]);
    let agents = d.agents_cgroup();
    // A sibling of the agents' cgroup whose name merely starts the same.
    let sibling = PathBuf::from(format!("{}-evil", agents.display()));
    std::fs::create_dir(&sibling).unwrap();
    let sibling_guard = UnitCgroup(Cgroup::open(&sibling).unwrap());
    let inside = UnitCgroup::new(&d, "x.service");
    for bad in [
        agents.clone(),
        sibling.clone(),
        agents.join("../").join(sibling.file_name().unwrap()),
        agents.join("missing.service"),
        PathBuf::from("/tmp"),
        inside.path().join("."),
    ] {
        let out =
            d.cli(&["sandbox", "bind", "--passport", passport.to_str().unwrap(), "--cgroup", bad.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{} was bound: {}", bad.display(), text(&out));
    }
    assert!(sandboxes(&d).is_empty(), "{:?}", sandboxes(&d));
    drop(sibling_guard);
}

#[test]
fn a_unit_binds_its_own_cgroup_as_root_and_nothing_else() {
    if !root_or_skip("a_unit_binds_its_own_cgroup_as_root_and_nothing_else") {
        return;
    }
    let d = Daemon::start("");
    let (passport, id) = d.issue("unit", &["--permission", "*"]);
    let pp = passport.to_str().unwrap();

    // ExecStartPre=+: root, inside the unit's cgroup, no --cgroup.
    let unit = UnitCgroup::new(&d, "sluice-agent@self.service");
    let out = unit.run(&d, &[], &["sandbox", "bind", "--passport", pp]);
    assert!(out.status.success(), "{}\n{}", text(&out), d.log());
    assert_eq!(bound_to(&d, unit.path()), Some(id.clone()));
    // The same root caller, inside, may do nothing else: not name another cgroup, not read holds.
    let other = UnitCgroup::new(&d, "sluice-agent@other.service");
    let out = unit.run(&d, &[], &["sandbox", "bind", "--passport", pp, "--cgroup", other.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(bound_to(&d, other.path()), None);
    let out = unit.run(&d, &[], &["holds"]);
    assert_eq!(out.status.code(), Some(1), "a sandboxed root read the holds: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandbox"), "{}", text(&out));
    // ExecStopPost=+ ends it.
    let out = unit.run(&d, &[], &["sandbox", "unbind"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(bound_to(&d, unit.path()), None);

    // A non-root process inside (the agent itself), even in the API's group, gets nothing.
    let fresh = UnitCgroup::new(&d, "sluice-agent@agent.service");
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--groups=0"];
    let readable = tempfile::tempdir().unwrap();
    std::fs::set_permissions(readable.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let copy = readable.path().join("agent.jwt");
    std::fs::copy(&passport, &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = fresh.run(&d, &nobody, &["sandbox", "bind", "--passport", copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandbox"), "{}", text(&out));
    assert_eq!(bound_to(&d, fresh.path()), None);
}

#[test]
fn root_inside_a_run_sandbox_cannot_rebind_or_unbind_it() {
    if !root_or_skip("root_inside_a_run_sandbox_cannot_rebind_or_unbind_it") {
        return;
    }
    let d = Daemon::start("");
    let (passport, _) = d.issue("run", &["--permission", "*"]);
    let (richer, _) = d.issue("richer", &["--permission", "*"]);
    let bin = sluice_bin();
    let sock = d.socket.to_str().unwrap().to_string();
    let script = format!(
        "{b} --socket {s} sandbox bind --passport {r}; echo bind=$?; {b} --socket {s} sandbox unbind; echo unbind=$?",
        b = bin.display(),
        s = sock,
        r = richer.display()
    );
    let out = d.cli(&["run", "--passport", passport.to_str().unwrap(), "--no-bind-ca", "--", "sh", "-c", &script]);
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(o.contains("bind=1") && o.contains("unbind=1"), "{}\n{}", text(&out), d.log());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never re-bound"), "{}", text(&out));
}

#[test]
fn a_binding_ends_when_its_cgroup_is_removed() {
    if !root_or_skip("a_binding_ends_when_its_cgroup_is_removed") {
        return;
    }
    let d = Daemon::start("");
    let (passport, _) = d.issue("unit", &["--permission", "*"]);
    let unit = UnitCgroup::new(&d, "sluice-agent@gone.service");
    let out = d.cli(&[
        "sandbox",
        "bind",
        "--passport",
        passport.to_str().unwrap(),
        "--cgroup",
        unit.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let path = unit.path().to_path_buf();
    drop(unit); // systemd removes a stopped unit's cgroup
    let deadline = Instant::now() + HANG_GUARD;
    while bound_to(&d, &path).is_some() {
        assert!(Instant::now() < deadline, "binding outlived its cgroup:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // The log line follows the state change: wait for it too.
    while !d.log().contains("binding ended") {
        assert!(Instant::now() < deadline, "the end of the binding was not logged:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}
