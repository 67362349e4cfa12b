//! `cargo xtask demo`: sluice's main job, step by step, with the real binary in a temporary
//! directory that is removed at the end.

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

fn sluice(bin: &Path, args: &[&str]) -> anyhow::Result<Output> {
    println!("$ sluice {}", args.join(" "));
    let out = Command::new(bin).args(args).output().with_context(|| format!("cannot run {}", bin.display()))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(out)
}

fn must(out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!("the command above failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn run() -> anyhow::Result<()> {
    super::run(super::cargo().args(["build", "--quiet", "-p", "sluice", "--bin", "sluice"]))?;
    let bin = super::target_dir().join("debug/sluice");
    let dir = TempDir(std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let d = |name: &str| dir.0.join(name).to_string_lossy().into_owned();

    step(1, "Create an issuer (an Ed25519 signing key; its id is derived from the public key)");
    must(sluice(&bin, &["issuer", "init", "--dir", &d("issuer"), "--name", "Demo issuer"])?)?;

    step(2, "Issue a passport: permissions, a spend limit per action, a daily budget, a domain allowlist");
    must(sluice(
        &bin,
        &[
            "passport",
            "issue",
            "--issuer-key",
            &d("issuer/issuer.key"),
            "--agent-id",
            "shopper-1",
            "--agent-name",
            "Shopping agent",
            "--permission",
            "orders:read",
            "--permission",
            "llm:*",
            "--constraint",
            "core:cost:max_per_action=500",
            "--constraint",
            "core:cost:max_cumulative=2000",
            "--constraint",
            "core:cost:approval_threshold=300",
            "--constraint",
            "core:scope:domain_allowlist=api.openai.com,*.shop.example",
            "--expires-in",
            "7d",
            "--out",
            &d("shopper.jwt"),
        ],
    )?)?;

    step(3, "Inspect it (claims as written, not yet trusted)");
    must(sluice(&bin, &["passport", "inspect", &d("shopper.jwt")])?)?;

    step(4, "Verify it, pinning the issuer");
    must(sluice(&bin, &["passport", "verify", &d("shopper.jwt"), "--issuer-pub", &d("issuer/issuer.pub")])?)?;

    step(5, "Tamper with it: raise the per-action limit from $5.00 to $5000.00, keep the signature");
    let token = std::fs::read_to_string(d("shopper.jwt"))?;
    let forged = tamper(token.trim())?;
    std::fs::write(d("tampered.jwt"), forged)?;
    let out = sluice(&bin, &["passport", "verify", &d("tampered.jwt")])?;
    if out.status.success() {
        bail!("the tampered passport verified: this is a bug");
    }
    println!("-> rejected, as it must be (exit status {})", out.status.code().unwrap_or(-1));

    println!("\nDemo complete. (The daemon, kernel redirect and proxy steps join this demo as they land.)");
    Ok(())
}

/// Rewrites `"core:cost:max_per_action":500` in the payload to 500000 and re-encodes it.
fn tamper(token: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, s] = parts[..] else { bail!("not a compact JWS") };
    let payload = URL_SAFE_NO_PAD.decode(p).context("payload")?;
    let text =
        String::from_utf8(payload)?.replace("\"core:cost:max_per_action\":500", "\"core:cost:max_per_action\":500000");
    Ok(format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode(text.as_bytes())))
}
