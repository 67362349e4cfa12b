//! Compiles the eBPF object (`ebpf/sluice.bpf.c`) into `OUT_DIR/sluice.bpf.o`;
//! `kernel::loader` embeds it with `include_bytes_aligned!`.
//!
//! The object needs BTF (`-g`): socket-storage maps and `.maps` definitions
//! cannot be loaded without it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

const INSTALL_HINT: &str = "apt-get install clang libbpf-dev";

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    println!("cargo:warning={msg}");
    exit(1);
}

/// The Debian/Ubuntu multiarch include directory (`asm/types.h` lives there):
/// asked from the compiler, else derived from the target triple.
fn multiarch_include(clang: &str) -> Option<PathBuf> {
    let from_compiler = Command::new(clang)
        .arg("-print-multiarch")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let triple = from_compiler.or_else(|| {
        let arch = env::var("CARGO_CFG_TARGET_ARCH").ok()?;
        let env_abi = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_else(|_| "gnu".into());
        let arch = match arch.as_str() {
            "x86" => "i386".to_owned(),
            "powerpc64" => "powerpc64le".to_owned(),
            "loongarch64" => "loongarch64".to_owned(),
            other => other.to_owned(),
        };
        Some(format!("{arch}-linux-{env_abi}"))
    })?;
    let dir = Path::new("/usr/include").join(triple);
    dir.is_dir().then_some(dir)
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let ebpf_dir = manifest.join("../../ebpf");
    let src = ebpf_dir.join("sluice.bpf.c");
    let header = ebpf_dir.join("sluice.h");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-env-changed=CLANG");

    let out_dir = match env::var("OUT_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => fail("OUT_DIR is not set (build.rs must run under cargo)"),
    };
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());

    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => fail(&format!("`{clang}` not found: it compiles the eBPF programs; install it with `{INSTALL_HINT}`")),
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail(&format!("/usr/include/bpf/bpf_helpers.h not found: install libbpf headers with `{INSTALL_HINT}`"));
    }

    let obj = out_dir.join("sluice.bpf.o");
    // -mcpu=v3: atomic fetch-add and exchange (the per-sandbox slot counters).
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"])
        .arg(format!("-I{}", ebpf_dir.display()))
        .arg("-I/usr/include/bpf");
    if let Some(dir) = multiarch_include(&clang) {
        cmd.arg(format!("-I{}", dir.display()));
    }
    cmd.arg("-c").arg(&src).arg("-o").arg(&obj);
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("compiling {} with {clang} failed ({s}); see the compiler output above", src.display())),
        Err(e) => fail(&format!("running {clang}: {e}; install it with `{INSTALL_HINT}`")),
    }
}
