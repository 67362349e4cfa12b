//! `sluice detach`: removes the eBPF programs and maps a stopped daemon leaves pinned.
//!
//! A daemon that stops or crashes leaves its programs attached to the agents' cgroup on purpose:
//! agents' connections are then refused, never sent out unchecked. This is the one way to take
//! them off (uninstalling, or giving the cgroup back to unconfined use). It refuses while a
//! daemon still uses the pins, says exactly what it removes and what that means, and is
//! idempotent: nothing pinned is success.
//!
//! Nothing locks the pin directory: a daemon started while this runs is not prevented from
//! pinning again. The package stops the unit first; an operator stops it first too.

use super::CmdResult;
use crate::config::Config;
use crate::kernel::{cgroup2_mount, Cgroup, Holder, PinKind, PinnedState};
use anyhow::{bail, Context};
use clap::Args;
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct DetachArgs {
    /// Print what would be removed and what that would mean; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Detach even though a daemon is running. It keeps running, but its agents' connections no
    /// longer reach it (they go out directly, unenforced) until it is restarted.
    #[arg(long)]
    force: bool,
}

/// Evidence that a daemon is using the pins: who holds them, which socket answers.
struct Running {
    holders: Vec<Holder>,
    sockets: Vec<PathBuf>,
}

impl Running {
    fn is_running(&self) -> bool {
        !self.holders.is_empty() || !self.sockets.is_empty()
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.holders.is_empty() {
            let who: Vec<String> = self.holders.iter().map(|h| format!("pid {} ({})", h.pid, h.comm)).collect();
            parts.push(format!("{} holds the pinned programs or maps", who.join(", ")));
        }
        for s in &self.sockets {
            parts.push(format!("the API socket {} answers", s.display()));
        }
        parts.join("; ")
    }
}

/// A socket that accepts a connection has a live daemon behind it. A stale socket file left by a
/// crash refuses (ECONNREFUSED); a missing one is ENOENT.
fn answers(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `extra_sockets`: `--socket` and `$SLUICE_SOCKET` when given; the config's `[api] socket` is
/// always tried.
pub fn run(args: DetachArgs, config_path: &Path, extra_sockets: &[PathBuf]) -> CmdResult {
    let config = Config::load(config_path).context("sluice detach reads [sandbox] pin_dir and cgroup from it")?;
    if !nix::unistd::geteuid().is_root() {
        bail!("sluice detach must run as root: the pins on bpffs and the cgroups are root's (try: sudo sluice detach)");
    }
    let pin_dir = &config.sandbox.pin_dir;
    println!("pin directory   {}  ([sandbox] pin_dir in {})", pin_dir.display(), config_path.display());
    let Some(state) =
        PinnedState::survey(pin_dir).with_context(|| format!("[sandbox] pin_dir in {}", config_path.display()))?
    else {
        println!(
            "nothing to remove: {} does not exist, so no sluice eBPF programs are pinned there",
            pin_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    };

    // The agents' cgroup as the daemon finds it (the directory, or the systemd slice of that name).
    let cg_name = &config.sandbox.cgroup;
    let agents = match cgroup2_mount().and_then(|m| Cgroup::find_agents(&m, cg_name)) {
        Ok(Some(cg)) => Some(cg),
        Ok(None) => {
            println!("agents' cgroup  [sandbox] cgroup = {cg_name:?}: does not exist");
            None
        }
        Err(e) => {
            println!("agents' cgroup  [sandbox] cgroup = {cg_name:?}: cannot be looked up ({e})");
            None
        }
    };
    let processes = agents.as_ref().map(|a| (a.path().to_owned(), a.process_count()));
    match &processes {
        Some((path, Ok(n))) => {
            println!("agents' cgroup  {}  ({} in it now)", path.display(), plural(*n, "process", "processes"))
        }
        Some((path, Err(e))) => println!("agents' cgroup  {}  (processes cannot be counted: {e})", path.display()),
        None => {}
    }

    let mut sockets = vec![config.api.socket.clone()];
    for s in extra_sockets {
        if !sockets.contains(s) {
            sockets.push(s.clone());
        }
    }
    let running = Running { holders: state.holders(), sockets: sockets.into_iter().filter(|s| answers(s)).collect() };
    if running.is_running() {
        if args.dry_run && !args.force {
            println!(
                "warning: a sluice daemon is running ({}); sluice detach would refuse without --force",
                running.describe()
            );
        } else if !args.force {
            bail!(
                "refusing to detach: a sluice daemon is running ({}). Stop it first (systemctl stop sluice), \
                 or pass --force to detach under it: its agents would then connect directly, unenforced, until it \
                 restarts",
                running.describe()
            );
        } else {
            println!("warning: a sluice daemon is running ({}); detaching anyway (--force)", running.describe());
        }
    }

    let links = state.links().count();
    let dir_count = state.dirs_to_remove().len();
    // What each path is, for the line printed when it is (or would be) removed.
    let mut what: HashMap<PathBuf, String> = HashMap::new();
    for pin in &state.pins {
        let text = match &pin.kind {
            PinKind::Link { link_id, prog_id, cgroup_id } => {
                let on = match &agents {
                    Some(a) if a.id() == *cgroup_id => "the agents' cgroup".to_string(),
                    _ if *cgroup_id == 0 => "a cgroup that no longer exists".to_string(),
                    _ => format!("cgroup id {cgroup_id}, not the configured agents' cgroup"),
                };
                format!("link {link_id}: detaches program {prog_id} from {on}")
            }
            PinKind::Map { map_id } => format!("map {map_id}"),
            PinKind::Program { prog_id } => format!("program {prog_id}"),
            PinKind::Other => "not a readable bpf object; unlinked".to_string(),
        };
        what.insert(pin.path.clone(), text);
    }
    for dir in state.dirs_to_remove() {
        what.insert(dir.to_owned(), "directory".to_string());
    }
    let line = |verb: &str, path: &Path| match what.get(path) {
        Some(w) => println!("{verb} {}  ({w})", path.display()),
        None => println!("{verb} {}", path.display()),
    };
    println!();
    if state.is_empty() {
        println!("no eBPF programs or maps are pinned, only empty directories");
    }
    let meaning = match &processes {
        Some((path, Ok(0))) => format!(
            "nothing redirects {} any more: a process started in it connects and resolves names directly, and \
             no passport is enforced on its traffic (no process is in it now)",
            path.display()
        ),
        Some((path, Ok(n))) => format!(
            "nothing redirects {} any more: the {} in it, and anything started there later, connect and \
             resolve names directly, and no passport is enforced on their traffic",
            path.display(),
            plural(*n, "process", "processes")
        ),
        _ => "nothing redirects the agents' cgroup any more: processes in it connect and resolve names directly, \
              and no passport is enforced on their traffic"
            .to_string(),
    };
    if args.dry_run {
        for pin in &state.pins {
            line("would remove", &pin.path);
        }
        for dir in state.dirs_to_remove() {
            line("would remove", dir);
        }
        println!();
        println!("--dry-run: nothing was changed. Detaching would mean: {meaning}.");
        return Ok(ExitCode::SUCCESS);
    }
    state
        .remove(|path| line("removed", path))
        .context("detaching stopped half-way; what is left stays pinned (run sluice detach again)")?;
    println!();
    let maps = state.pins.iter().filter(|p| matches!(p.kind, PinKind::Map { .. })).count();
    let others = state.pins.len() - links - maps;
    let mut removed = vec![plural(maps, "map", "maps")];
    if others > 0 {
        removed.push(plural(others, "other pin", "other pins"));
    }
    removed.push(plural(dir_count, "directory", "directories"));
    println!("done: {} detached; {} removed.", plural(links, "program", "programs"), removed.join(", "));
    println!("From now on {meaning}. Starting the daemon again attaches the programs again.");
    Ok(ExitCode::SUCCESS)
}
