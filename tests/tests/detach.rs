//! `sluice detach` against a real daemon's pinned eBPF state: it refuses while the daemon runs,
//! lists exactly what it removes, really detaches the links in the kernel, is idempotent, and
//! never touches a "pin dir" that is not on bpffs. Every test cleans up through the `Daemon`
//! fixture (kill, unpin, remove cgroups), on failure too.

use sluice::kernel::loader::{pinned_links, PROGRAM_COUNT};
use sluice::kernel::Cgroup;
use sluice_e2e::daemon::{sluice_bin, Daemon};
use sluice_e2e::root_or_skip;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `true` while the kernel still has a bpf_link with this id (`BPF_LINK_GET_FD_BY_ID`).
fn link_exists(id: u32) -> bool {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    #[repr(C, align(8))]
    struct Attr([u8; 16]);
    let mut attr = Attr([0; 16]);
    attr.0[..4].copy_from_slice(&id.to_ne_bytes());
    // SAFETY: attr is a valid buffer of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_GET_FD_BY_ID, attr.0.as_mut_ptr(), attr.0.len() as u32) };
    if fd >= 0 {
        // SAFETY: the kernel just gave us this fd.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    let err = std::io::Error::last_os_error();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "BPF_LINK_GET_FD_BY_ID({id}): {err}");
    false
}

/// Every file under the pin dir (links and maps).
fn pin_files(pin_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(pin_dir).unwrap().flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            out.push(f.path().display().to_string());
        }
    }
    out.sort();
    out
}

/// A `sleep` inside the agents' cgroup, killed on drop (the fixture's cleanup kills it too).
struct Sleeper(Child);

impl Sleeper {
    fn start(agents: &Path) -> Sleeper {
        let cg = Cgroup::open(agents).unwrap();
        let join = cg.join_before_exec().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("120").stdout(Stdio::null());
        // SAFETY: the hook only calls write(2) on an fd opened beforehand.
        unsafe { cmd.pre_exec(join) };
        Sleeper(cmd.spawn().unwrap())
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn detach_refuses_a_running_daemon_then_removes_exactly_its_pins() {
    if !root_or_skip("detach_refuses_a_running_daemon_then_removes_exactly_its_pins") {
        return;
    }
    let mut d = Daemon::start("");
    let links = pinned_links(&d.pin_dir).unwrap();
    assert_eq!(links.len(), PROGRAM_COUNT);
    let files = pin_files(&d.pin_dir);
    let _sleeper = Sleeper::start(&d.agents_cgroup());
    let pid = d.pid().unwrap();

    // Running: refused, with the evidence, and nothing removed.
    let out = d.cli(&["detach"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to detach"), "{}", text(&out));
    assert!(err.contains(&format!("pid {pid} ")), "the daemon's pid is named: {}", text(&out));
    assert!(err.contains(&format!("the API socket {} answers", d.socket.display())), "{}", text(&out));
    assert_eq!(pin_files(&d.pin_dir), files);

    // Crashed (SIGKILL): the pins stay, and nothing holds them any more.
    d.kill();
    assert_eq!(pin_files(&d.pin_dir), files);

    let out = d.cli(&["detach", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    let dry = String::from_utf8_lossy(&out.stdout);
    for f in &files {
        assert!(dry.contains(&format!("would remove {f}  (")), "{f} missing from the dry run:\n{dry}");
    }
    assert!(dry.contains("1 process in it"), "{dry}");
    assert!(dry.contains("nothing was changed"), "{dry}");
    assert_eq!(pin_files(&d.pin_dir), files, "--dry-run removed something");
    assert!(links.iter().all(|l| link_exists(l.link_id)));

    let out = d.cli(&["detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let done = String::from_utf8_lossy(&out.stdout);
    for f in &files {
        assert!(done.contains(&format!("removed {f}  (")), "{f} missing:\n{done}");
    }
    for l in &links {
        assert!(
            done.contains(&format!("link {}: detaches program {} from the agents' cgroup", l.link_id, l.prog_id)),
            "{done}"
        );
        assert!(!link_exists(l.link_id), "link {} ({}) is still in the kernel", l.link_id, l.program);
    }
    assert!(done.contains(&format!("done: {PROGRAM_COUNT} programs detached")), "{done}");
    assert!(done.contains("no passport is enforced"), "the consequence is said: {done}");
    assert!(!d.pin_dir.exists());

    // Idempotent.
    let out = d.cli(&["detach"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to remove"), "{}", text(&out));
}

#[test]
fn force_detaches_under_a_running_daemon() {
    if !root_or_skip("force_detaches_under_a_running_daemon") {
        return;
    }
    let d = Daemon::start("");
    let links = pinned_links(&d.pin_dir).unwrap();
    let out = d.cli(&["detach", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("detaching anyway (--force)"), "{}", text(&out));
    assert!(!d.pin_dir.exists());
    assert!(links.iter().all(|l| !link_exists(l.link_id)));
    // The daemon itself keeps running (its API still answers).
    assert!(d.cli(&["holds"]).status.success(), "{}", d.log());
}

#[test]
fn a_pin_dir_off_bpffs_is_refused_untouched() {
    if !root_or_skip("a_pin_dir_off_bpffs_is_refused_untouched") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("pins/links/precious");
    std::fs::create_dir_all(victim.parent().unwrap()).unwrap();
    std::fs::write(&victim, "keep me").unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[api]\nsocket = \"{}\"\n[sandbox]\ncgroup = \"sluice-test-none\"\npin_dir = \"{}\"\n",
            dir.path().join("state").display(),
            dir.path().join("api.sock").display(),
            dir.path().join("pins").display()
        ),
    )
    .unwrap();
    let out = Command::new(sluice_bin()).args(["--config", config.to_str().unwrap(), "detach"]).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not on a bpf filesystem"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
}

/// Removes a test directory tree on bpffs on drop (plain directories only in this test).
struct BpffsDir(std::path::PathBuf);

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_pin_dir_holding_more_than_sluices_layout_is_refused_untouched() {
    if !root_or_skip("a_pin_dir_holding_more_than_sluices_layout_is_refused_untouched") {
        return;
    }
    // What `pin_dir = "/sys/fs/bpf"` would look like: sluice's directories beside someone else's.
    let root = BpffsDir(Path::new("/sys/fs/bpf").join(sluice_e2e::unique("sluice-test-layout")));
    for d in ["links", "v1", "tc/globals"] {
        std::fs::create_dir_all(root.0.join(d)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[api]\nsocket = \"{}\"\n[sandbox]\ncgroup = \"sluice-test-none\"\npin_dir = \"{}\"\n",
            dir.path().join("state").display(),
            dir.path().join("api.sock").display(),
            root.0.display()
        ),
    )
    .unwrap();
    for args in [&["detach"][..], &["detach", "--dry-run"], &["detach", "--force"]] {
        let out = Command::new(sluice_bin()).args(["--config", config.to_str().unwrap()]).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("tc") && err.contains("not part of sluice's pin layout"), "{args:?}: {}", text(&out));
        for d in ["links", "v1", "tc/globals"] {
            assert!(root.0.join(d).is_dir(), "{args:?} removed {d}");
        }
    }
}
