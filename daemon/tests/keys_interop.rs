//! Key files other tools can read, and keys other tools made that sluice reads.
//!
//! Every private key sluice writes (issuer and agent keys from the real `sluice` binary, the host
//! key and the local CA key through the library) is read by `openssl pkey` and by Python's
//! `cryptography`, and both derive the same public key as sluice; every public key it writes is
//! read by both too. The reverse: Ed25519 keys made by `openssl genpkey` and by `cryptography`
//! sign passports with `sluice passport issue` that `sluice passport verify` accepts.
//!
//! Needs `openssl` and python3 with the `cryptography` module (`cargo xtask deps` installs the
//! Debian packages `openssl` and `python3-cryptography`). Without them the tests fail: they never
//! skip. No root needed.

mod common;

use common::{p, sluice};
use ed25519_dalek::pkcs8::{PrivateKeyInfo, SecretDocument};
use ed25519_dalek::VerifyingKey;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Debian's interpreter, the one the Debian package `python3-cryptography` serves (a `python3`
/// earlier on PATH, pyenv's say, may lack it); `cargo xtask deps` checks the same one.
const PYTHON: &str = "/usr/bin/python3";

const INSTALL_HINT: &str = "install the Debian packages openssl and python3-cryptography (`cargo xtask deps`)";

/// Runs a tool, failing the test (with the install hint) if it is missing or exits non-zero.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}; {INSTALL_HINT}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?}: {}\n{err}\n(if a tool or module is missing: {INSTALL_HINT})", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn openssl(args: &[&str]) -> String {
    run(Command::new("openssl").args(args))
}

const PY: &str = r#"
import os, sys
try:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
except ImportError as e:
    sys.exit(f"python3 has no cryptography module ({e})")

def describe(pub):
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "ed25519 " + pub.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw).hex()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        spki = pub.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)
        return "ec:" + pub.curve.name + " " + spki.hex()
    return "other " + type(pub).__name__

cmd, *args = sys.argv[1:]
if cmd == "private":
    with open(args[0], "rb") as f:
        key = s.load_pem_private_key(f.read(), password=None)
    print(describe(key.public_key()))
elif cmd == "public":
    with open(args[0], "rb") as f:
        print(describe(s.load_pem_public_key(f.read())))
elif cmd == "generate":
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    loose = args[2] == "loose"
    # What a careful script does (0600), or a careless one (the umask's 0644).
    fd = os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if loose else 0o600)
    os.write(fd, pem)
    os.close(fd)
    with open(args[1], "wb") as f:
        f.write(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
"#;

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    script: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let script = root.join("keys.py");
        std::fs::write(&script, PY).unwrap();
        Env { _dir: dir, root, script }
    }

    fn python(&self, args: &[&str]) -> String {
        run(Command::new(PYTHON).arg(&self.script).args(args)).trim().to_string()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The version field of a PKCS#8 structure: `SEQUENCE { INTEGER version, ... }` (0 is v1).
fn pkcs8_version(der: &[u8]) -> u8 {
    assert_eq!(der.first(), Some(&0x30), "not a DER SEQUENCE");
    let header = match der[1] {
        n if n < 0x80 => 2,
        n => 2 + usize::from(n & 0x7f),
    };
    assert_eq!(&der[header..header + 2], [0x02, 0x01], "no one-byte INTEGER version");
    der[header + 2]
}

/// The PEM label is `PRIVATE KEY`, the structure PKCS#8 v1 and it carries no public key.
fn assert_pkcs8_v1(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let (label, doc) = SecretDocument::from_pem(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()));
    assert_eq!(label, "PRIVATE KEY", "{}", path.display());
    assert_eq!(pkcs8_version(doc.as_bytes()), 0, "{}: not PKCS#8 v1", path.display());
    let info = PrivateKeyInfo::try_from(doc.as_bytes()).unwrap();
    assert!(info.public_key.is_none(), "{}: carries a public key", path.display());
    assert_eq!(std::fs::metadata(path).unwrap().mode() & 0o777, 0o600, "{}", path.display());
}

/// openssl and cryptography both read the Ed25519 private key at `key` and derive `expected`.
fn assert_ed25519_private_readable(env: &Env, key: &Path, expected: &VerifyingKey) {
    assert_pkcs8_v1(key);
    openssl(&["pkey", "-in", p(key), "-noout"]);
    let spki = openssl(&["pkey", "-in", p(key), "-pubout"]);
    assert_eq!(sluice::keyfile::parse_public_key(key, &spki).unwrap(), *expected, "openssl on {}", key.display());
    let py = env.python(&["private", p(key)]);
    assert_eq!(py, format!("ed25519 {}", hex(expected.as_bytes())), "cryptography on {}", key.display());
}

/// openssl and cryptography both read the SPKI public key at `path`, and it is `expected`.
fn assert_ed25519_public_readable(env: &Env, path: &Path, expected: &VerifyingKey) {
    openssl(&["pkey", "-pubin", "-in", p(path), "-noout"]);
    let spki = openssl(&["pkey", "-pubin", "-in", p(path)]);
    assert_eq!(sluice::keyfile::parse_public_key(path, &spki).unwrap(), *expected, "openssl on {}", path.display());
    let py = env.python(&["public", p(path)]);
    assert_eq!(py, format!("ed25519 {}", hex(expected.as_bytes())), "cryptography on {}", path.display());
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_tools_these_tests_need_are_installed() {
    // Spelled out so a missing tool reads as what it is rather than as a failed comparison.
    assert!(openssl(&["version"]).starts_with("OpenSSL"), "{INSTALL_HINT}");
    let version = run(Command::new(PYTHON).args(["-c", "import cryptography; print(cryptography.__version__)"]));
    assert!(!version.trim().is_empty(), "{INSTALL_HINT}");
}

#[test]
fn issuer_and_agent_keys_written_by_the_cli_are_read_by_openssl_and_cryptography() {
    let env = Env::new();
    let dir = env.root.join("iss");
    ok(&sluice(&["issuer", "init", "--dir", p(&dir)]));
    let (key, public) = (dir.join("issuer.key"), dir.join("issuer.pub"));
    let issuer = sluice::keyfile::load_signing_key(&key).unwrap().verifying_key();
    assert_eq!(sluice::keyfile::load_public_key(&public).unwrap(), issuer);
    assert_ed25519_private_readable(&env, &key, &issuer);
    assert_ed25519_public_readable(&env, &public, &issuer);

    let passport = env.root.join("agent.jwt");
    ok(&sluice(&[
        "passport",
        "issue",
        "--issuer-key",
        p(&key),
        "--agent-id",
        "a1",
        "--tier",
        "L3",
        "--out",
        p(&passport),
    ]));
    let agent_key = env.root.join("agent.jwt.key");
    let agent = sluice::keyfile::load_signing_key(&agent_key).unwrap().verifying_key();
    assert_ed25519_private_readable(&env, &agent_key, &agent);
    let claims = verify(&passport, &public);
    assert_eq!(claims["cnf"]["jkt"], sluice::passport::jwk::okp_thumbprint(&agent), "{claims}");
}

#[test]
fn the_host_key_is_read_by_openssl_and_cryptography() {
    let env = Env::new();
    let state = env.root.join("state");
    let host = sluice::ledger::hostkey::load_or_create(&state).unwrap().verifying_key();
    assert_ed25519_private_readable(&env, &state.join("host.key"), &host);
    assert_ed25519_public_readable(&env, &state.join("host.pub"), &host);
}

#[test]
fn the_local_ca_key_is_read_by_openssl_and_cryptography() {
    let env = Env::new();
    let state = env.root.join("state");
    std::fs::create_dir(&state).unwrap();
    sluice::proxy::ca::Ca::load_or_create(&state).unwrap();
    let key = state.join("ca.key");
    assert_pkcs8_v1_label_and_mode(&key);
    openssl(&["pkey", "-in", p(&key), "-noout"]);
    // The certificate's public key is the key's, as both tools see it.
    let from_key = openssl(&["pkey", "-in", p(&key), "-pubout"]);
    let from_cert = openssl(&["x509", "-in", p(&state.join("ca.pem")), "-noout", "-pubkey"]);
    assert_eq!(from_key, from_cert);
    let py = env.python(&["private", p(&key)]);
    assert!(py.starts_with("ec:secp256r1 "), "{py}");
    let spki_der = SecretDocument::from_pem(&from_key).map(|(_, d)| hex(d.as_bytes())).unwrap();
    assert_eq!(py, format!("ec:secp256r1 {spki_der}"));
}

/// The CA key is ECDSA: PKCS#8 v1 (its public point sits inside the ECPrivateKey, as OpenSSL
/// writes it too), mode 0600.
fn assert_pkcs8_v1_label_and_mode(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let (label, doc) = SecretDocument::from_pem(&text).unwrap();
    assert_eq!(label, "PRIVATE KEY");
    assert_eq!(pkcs8_version(doc.as_bytes()), 0, "{}: not PKCS#8 v1", path.display());
    assert_eq!(std::fs::metadata(path).unwrap().mode() & 0o777, 0o600);
}

/// `sluice passport verify PASSPORT --issuer-pub PUBLIC` accepts it; its claims.
fn verify(passport: &Path, public: &Path) -> serde_json::Value {
    let out = sluice(&["passport", "verify", p(passport), "--issuer-pub", p(public), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["valid"], true, "{v}");
    v["claims"].clone()
}

/// Issues a passport with `key` and verifies it against `public`, both through the binary: the
/// passport names the issuer whose public key the other tool wrote.
fn issue_and_verify(env: &Env, key: &Path, public: &Path, name: &str) {
    let passport = env.root.join(format!("{name}.jwt"));
    ok(&sluice(&["passport", "issue", "--issuer-key", p(key), "--agent-id", name, "--out", p(&passport)]));
    let claims = verify(&passport, public);
    assert_eq!(claims["sub"], name, "{claims}");
    let issuer = sluice::passport::IssuerId::from_key(&sluice::keyfile::load_public_key(public).unwrap());
    assert_eq!(claims["iss"], issuer.as_str(), "{claims}");
}

#[test]
fn keys_made_by_openssl_are_used_by_sluice() {
    let env = Env::new();
    let (key, public) = (env.root.join("openssl.key"), env.root.join("openssl.pub"));
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", p(&key)]);
    openssl(&["pkey", "-in", p(&key), "-pubout", "-out", p(&public)]);
    assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600, "openssl writes private keys 0600");
    issue_and_verify(&env, &key, &public, "from-openssl");

    // The same key serves as a host key, and the daemon derives the same host.pub.
    let state = env.root.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(&key, state.join("host.key")).unwrap();
    std::fs::set_permissions(state.join("host.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let host = sluice::ledger::hostkey::load_or_create(&state).unwrap();
    assert_eq!(host.verifying_key(), sluice::keyfile::load_public_key(&public).unwrap());
}

#[test]
fn keys_made_by_python_cryptography_are_used_by_sluice() {
    let env = Env::new();
    let (key, public) = (env.root.join("py.key"), env.root.join("py.pub"));
    env.python(&["generate", p(&key), p(&public), "private"]);
    issue_and_verify(&env, &key, &public, "from-python");

    // A key left readable by others is refused, with the fix in the message.
    let (loose, loose_pub) = (env.root.join("loose.key"), env.root.join("loose.pub"));
    env.python(&["generate", p(&loose), p(&loose_pub), "loose"]);
    let out = sluice(&[
        "passport",
        "issue",
        "--issuer-key",
        p(&loose),
        "--agent-id",
        "x",
        "--out",
        p(&env.root.join("x.jwt")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("chmod 600 {}", loose.display())), "{err}");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o600)).unwrap();
    issue_and_verify(&env, &loose, &loose_pub, "after-chmod");
}

#[test]
fn a_ca_key_made_by_openssl_is_used_by_sluice() {
    let env = Env::new();
    let state = env.root.join("state");
    std::fs::create_dir(&state).unwrap();
    let key = state.join("ca.key");
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", p(&key)]);
    sluice::proxy::ca::Ca::load_or_create(&state).unwrap();
    let from_key = openssl(&["pkey", "-in", p(&key), "-pubout"]);
    let from_cert = openssl(&["x509", "-in", p(&state.join("ca.pem")), "-noout", "-pubkey"]);
    assert_eq!(from_key, from_cert, "the CA certificate is not for the openssl-made key");
}
