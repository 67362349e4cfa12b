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

/// Compiles the ABI 1 object of `tests/fixtures/abi1` (as `crates/kernel/build.rs` compiles the
/// current one).
fn abi1_object(dir: &std::path::Path) -> Vec<u8> {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/abi1");
    let obj = dir.join("sluice-abi1.bpf.o");
    let multiarch = std::process::Command::new("clang")
        .arg("-print-multiarch")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "x86_64-linux-gnu".into());
    let st = std::process::Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-Wall"])
        .arg(format!("-I{}", fixture.display()))
        .arg("-I/usr/include/bpf")
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(fixture.join("sluice.bpf.c"))
        .arg("-o")
        .arg(&obj)
        .status()
        .expect("clang (and libbpf-dev) are needed");
    assert!(st.success(), "compiling the ABI 1 object failed");
    std::fs::read(&obj).unwrap()
}

/// Pins the ABI 1 programs and maps under `pin_dir` on `agents`, as a daemon of that version did
/// (`links/<program>`, `v1/<map>`).
fn pin_abi1(object: &[u8], config: &KernelConfig, agents: &Cgroup, host_netns: u64) {
    use aya::programs::links::FdLink;
    use aya::programs::{CgroupAttachMode, CgroupSkbAttachType, Program};
    let maps = config.pin_dir.join("v1");
    let links = config.pin_dir.join("links");
    std::fs::create_dir_all(&maps).unwrap();
    std::fs::create_dir_all(&links).unwrap();
    let mut ebpf = aya::EbpfLoader::new()
        .override_global("sluice_proxy_port", &config.proxy_port, true)
        .override_global("sluice_dns_port", &config.dns_port, true)
        .override_global("sluice_host_netns", &host_netns, true)
        .map_pin_path("sluice_socks", maps.join("sluice_socks"))
        .map_pin_path("sluice_conns", maps.join("sluice_conns"))
        .map_pin_path("sluice_udp_srcs", maps.join("sluice_udp_srcs"))
        .load(object)
        .expect("load the ABI 1 object");
    let cgroup = std::fs::File::open(agents.path()).unwrap();
    let names = [
        "sl_sockops",
        "sl_recvmsg4",
        "sl_recvmsg6",
        "sl_getpeer4",
        "sl_getpeer6",
        "sl_bind4",
        "sl_bind6",
        "sl_sock_create",
        "sl_connect4",
        "sl_connect6",
        "sl_sendmsg4",
        "sl_sendmsg6",
        "sl_egress",
    ];
    let mode = CgroupAttachMode::Single;
    for name in names {
        let link: FdLink = match ebpf.program_mut(name).expect(name) {
            Program::CgroupSockAddr(p) => {
                p.load().unwrap();
                let id = p.attach(&cgroup, mode).unwrap();
                p.take_link(id).unwrap().try_into().unwrap()
            }
            Program::SockOps(p) => {
                p.load().unwrap();
                let id = p.attach(&cgroup, mode).unwrap();
                p.take_link(id).unwrap().try_into().unwrap()
            }
            Program::CgroupSock(p) => {
                p.load().unwrap();
                let id = p.attach(&cgroup, mode).unwrap();
                p.take_link(id).unwrap().try_into().unwrap()
            }
            Program::CgroupSkb(p) => {
                p.load().unwrap();
                let id = p.attach(&cgroup, CgroupSkbAttachType::Egress, mode).unwrap();
                p.take_link(id).unwrap().try_into().unwrap()
            }
            _ => panic!("{name}: unexpected program type"),
        };
        link.pin(links.join(name)).unwrap();
    }
    // The old daemon exits here: programs and maps stay pinned.
}

/// A host upgraded from ABI 1 (LRU table, no slots): the new daemon swaps every pinned link's
/// program in place, attaches `sock_release`, drops the old maps, and from then on counts slots.
/// A socket connected under the old programs and closed after the upgrade neither breaks the
/// counters nor leaks; nothing reaches the outside canary at any point.
#[test]
fn pins_of_abi_1_are_upgraded_in_place_without_failing_open() {
    let Some(mut fx) = KernelFixture::new("pins_of_abi_1_are_upgraded_in_place_without_failing_open") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let object = abi1_object(dir.path());
    let port = free_port();
    let canary = sluice_e2e::Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    // Start from exactly what an ABI 1 daemon leaves: no daemon, its pins only.
    let host_netns = fx.enforcer().host_netns_cookie();
    fx.kill_daemon();
    sluice::kernel::detach_and_unpin(&fx.config.pin_dir).unwrap();
    pin_abi1(&object, &fx.config, &fx.agents, host_netns);
    let old_links = sluice::kernel::loader::pinned_links(&fx.config.pin_dir).unwrap();
    let unix_programs = sluice::kernel::unix::PROGRAM_NAMES;
    assert_eq!(
        old_links.len(),
        PROGRAM_COUNT - 1 - unix_programs.len(),
        "ABI 1 had no sock_release and no Unix socket programs"
    );

    // An agent connected under the old programs, holding its socket across the upgrade (no
    // proxy listens meanwhile: refused, never sent out).
    let mut cmd = fx.agent_command(sluice_e2e::python());
    cmd.arg("-c")
        .arg(
            r#"
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
err = s.connect_ex(("127.0.0.55", int(sys.argv[1])))
print(json.dumps({"err": err}), flush=True)
sys.stdin.readline()
"#,
        )
        .arg(port.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut guard = sluice_e2e::ChildGuard(Some(cmd.spawn().unwrap()));
    let child = guard.0.as_mut().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["err"].as_i64(), Some(i64::from(libc::ECONNREFUSED)), "old programs redirect: {v}");

    let enforcer = fx.restart_daemon();
    let actions = enforcer.link_actions().to_vec();
    for (prog, action) in &actions {
        let new = *prog == "sl_sock_release" || unix_programs.contains(prog);
        let want = if new { LinkAction::Attached } else { LinkAction::Updated };
        assert_eq!(*action, want, "{prog}");
    }
    let new_links = sluice::kernel::loader::pinned_links(&fx.config.pin_dir).unwrap();
    for old in &old_links {
        let new = new_links.iter().find(|l| l.program == old.program).unwrap();
        assert_eq!(new.link_id, old.link_id, "{}: replaced, not updated in place", old.program);
        assert_ne!(new.prog_id, old.prog_id, "{}: still the ABI 1 program", old.program);
    }
    assert!(!fx.config.pin_dir.join("v1").exists(), "ABI 1 maps left pinned");
    assert!(fx.config.pin_dir.join("v2/sluice_quota").exists());

    // The old socket closes under the new programs: no slot to give back, counters untouched.
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"done\n").unwrap();
    assert!(guard.0.take().unwrap().wait().unwrap().success());
    assert_eq!(fx.conntable.kernel_stat("release_slot"), Some(0));

    // New connections are redirected, recorded and counted by the new programs.
    let v = fx.run_python(
        r#"
import json, socket, sys
s = socket.create_connection(("127.0.0.55", int(sys.argv[1])), timeout=20)
out = {"local": s.getsockname()}
s.recv(1)
print(json.dumps(out))
"#,
        &[port.to_string()],
    );
    let ev = fx.next_probe_event().expect("probe event after the upgrade");
    assert_eq!(ev.client, sluice_e2e::py_addr(&v["local"]));
    assert_eq!(ev.orig.expect("entry").cgroup_id, fx.sandbox.id());
    assert_eq!(fx.conntable.kernel_stat("slot_taken"), Some(1));
    assert_eq!(fx.conntable.sandbox_slots(fx.sandbox.id()).map(|q| q.used), Some(0));
    assert_eq!(canary.hits(), 0, "traffic left during the upgrade");
}
