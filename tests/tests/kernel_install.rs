//! Installation: the egress backstop as loaded, a bad pin dir, a changed
//! agents cgroup.

use std::path::PathBuf;

use sluice::kernel::loader::{LinkAction, PROGRAM_COUNT};
use sluice::kernel::{cgroup2_mount, Cgroup, Enforcer, KernelConfig, KernelError};
use sluice_e2e::{free_port, root_or_skip, unique, KernelFixture};

#[test]
fn egress_backstop_passes_loopback_and_drops_the_rest() {
    let Some(fx) = KernelFixture::new("egress_backstop_passes_loopback_and_drops_the_rest") else {
        return;
    };
    fx.enforcer().check_egress_backstop().expect("egress program verdicts");
}

#[test]
fn pin_dir_outside_bpffs_is_refused_before_anything_is_created() {
    if !root_or_skip("pin_dir_outside_bpffs_is_refused_before_anything_is_created") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let name = unique("sluice-test-nopin");
    let config = KernelConfig {
        cgroup: name.clone(),
        pin_dir: tmp.path().join("pins"),
        proxy_port: free_port(),
        dns_port: free_port(),
        max_tcp_sockets: sluice::kernel::DEFAULT_MAX_TCP_SOCKETS,
    };
    let err = Enforcer::install(&config).expect_err("a tmpfs pin dir must be refused");
    assert!(matches!(err, KernelError::NotBpffs { .. }), "{err}");
    assert!(err.to_string().contains("pins"), "error names the path: {err}");
    assert!(!cgroup2_mount().unwrap().join(&name).exists());
    assert!(!tmp.path().join("pins").exists());
}

/// Removes a cgroup on drop (the fixture owns only its own).
struct CgroupGuard(PathBuf);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Ok(cg) = Cgroup::open(&self.0) {
            let _ = cg.remove();
        }
    }
}

#[test]
fn links_pinned_for_another_cgroup_are_replaced() {
    let Some(fx) = KernelFixture::new("links_pinned_for_another_cgroup_are_replaced") else {
        return;
    };
    let other = unique("sluice-test-other");
    let _guard = CgroupGuard(cgroup2_mount().unwrap().join(&other));
    let config = KernelConfig { cgroup: other, ..fx.config.clone() };
    let before = fx.enforcer().pinned_links().unwrap();
    let second = Enforcer::install(&config).expect("install on another cgroup");
    for (prog, action) in second.link_actions() {
        assert_eq!(*action, LinkAction::Replaced, "{prog}");
    }
    let after = second.pinned_links().unwrap();
    assert_eq!(after.len(), PROGRAM_COUNT);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b.link_id, a.link_id, "{}", a.program);
        assert_eq!(a.cgroup_id, second.agents_cgroup().id());
    }
    // Nothing but our programs' links is left in the pin dir.
    let names: Vec<_> =
        std::fs::read_dir(fx.pin_dir().join("links")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), PROGRAM_COUNT, "{names:?}");
}

#[test]
fn cgroup_of_pid_and_join_before_exec_agree() {
    let Some(fx) = KernelFixture::new("cgroup_of_pid_and_join_before_exec_agree") else {
        return;
    };
    let mut cmd = fx.agent_command("sleep");
    cmd.arg("30");
    let mut guard = sluice_e2e::ChildGuard(Some(cmd.spawn().unwrap()));
    let pid = guard.0.as_ref().unwrap().id();
    let cg = Cgroup::of_pid(pid).unwrap();
    assert_eq!(cg, fx.sandbox);
    assert!(fx.agents.contains(&cg));
    assert_eq!(fx.sandbox.pids().unwrap(), vec![pid]);
    // A second sandbox; move the process there with add_pid.
    let other = fx.agents.create_child("second").unwrap();
    other.add_pid(pid).unwrap();
    assert_eq!(Cgroup::of_pid(pid).unwrap().id(), other.id());
    assert!(fx.sandbox.pids().unwrap().is_empty());
    // remove() kills what is inside, then removes the directory.
    other.remove().unwrap();
    assert!(!other.path().exists());
    let status = guard.0.take().unwrap().wait().unwrap();
    assert!(!status.success(), "sleep was killed");
    assert!(fx.agents.create_child("sandbox").is_err(), "existing child must not be reused");
}
