//! What the machine says about itself, printed beside a benchmark's figures. Shared by the
//! benches of two crates (`daemon/benches`, and `tests/benches/proxy.rs` through `#[path]`), so
//! every bench reports the host the same way.
//!
//! A figure means little without the machine's state: the load average says whether the cores
//! were shared, and the idle policy says what a hand-off between threads costs. On a virtual
//! machine whose idle CPUs halt at once, every wake-up of an idle CPU is an exit to the
//! hypervisor and back (measured here: 35–45 µs of scheduling delay each), and one request at a
//! time pays several of them; with guest halt polling the same wake-up costs a few µs. One
//! connection's latency, sluice's and its peers', moves by a factor of two to four between the
//! two settings, so a c1 figure is only comparable with one taken under the same policy.

#![allow(dead_code)] // each bench uses the part it prints

/// `/proc/loadavg`'s first three fields (1, 5 and 15 minutes).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

/// How this machine's idle CPUs wait, in one line: the cpuidle driver and governor, and under
/// the `haltpoll` driver (a KVM guest) how long an idle virtual CPU polls before it halts
/// (`guest_halt_poll_ns`, `0`: it halts at once).
pub fn idle_policy() -> String {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).ok();
    let Some(driver) = read("/sys/devices/system/cpu/cpuidle/current_driver") else {
        return "cpuidle: not reported".into();
    };
    let governor = read("/sys/devices/system/cpu/cpuidle/current_governor").unwrap_or_else(|| "?".into());
    let mut line = format!("cpuidle driver {driver}, governor {governor}");
    if let Some(ns) = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        let shrink = read("/sys/module/haltpoll/parameters/guest_halt_poll_allow_shrink").unwrap_or_else(|| "?".into());
        line.push_str(&format!(", guest_halt_poll_ns={ns} (allow_shrink={shrink})"));
        if ns == "0" {
            line.push_str(": idle virtual CPUs halt at once, so every wake-up of one exits to the hypervisor");
        }
    }
    line
}
