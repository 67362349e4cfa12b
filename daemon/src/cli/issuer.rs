//! `sluice issuer init`: a new Ed25519 issuer key.

use super::CmdResult;
use crate::keyfile;
use crate::passport::IssuerId;
use anyhow::Context;
use clap::{Args, Subcommand};
use ed25519_dalek::SigningKey;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum IssuerCmd {
    /// Create a new issuer: DIR/issuer.key (PKCS#8 v1 PEM, mode 0600), DIR/issuer.pub (SPKI PEM) and
    /// DIR/issuer.json (id and name). Prints the issuer id. Never overwrites an existing key.
    Init(InitArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory for the key files (created with mode 0700 if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// A human-readable name for this issuer, kept in issuer.json.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: IssuerCmd) -> CmdResult {
    match cmd {
        IssuerCmd::Init(args) => init(args),
    }
}

fn init(args: InitArgs) -> CmdResult {
    if !args.dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&args.dir)
            .with_context(|| format!("{}: cannot create directory", args.dir.display()))?;
    }
    let key_path = args.dir.join("issuer.key");
    let pub_path = args.dir.join("issuer.pub");
    let meta_path = args.dir.join("issuer.json");
    for p in [&key_path, &pub_path, &meta_path] {
        if p.exists() {
            anyhow::bail!("{}: already exists; refusing to overwrite an issuer (choose another --dir)", p.display());
        }
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let id = IssuerId::from_key(&key.verifying_key());
    keyfile::write_signing_key(&key_path, &key)?;
    keyfile::write_public_key(&pub_path, &key.verifying_key())?;
    let meta = serde_json::json!({
        "issuer_id": id.as_str(),
        "name": args.name,
        "created_at": super::util::rfc3339(crate::passport::now()),
    });
    crate::files::create_new(&meta_path, format!("{}\n", serde_json::to_string_pretty(&meta)?).as_bytes(), 0o644)?;
    if args.json {
        super::util::print_json(&serde_json::json!({
            "issuer_id": id.as_str(), "key": key_path, "public_key": pub_path,
        }));
    } else {
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}
