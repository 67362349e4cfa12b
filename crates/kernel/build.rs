//! Compiles the eBPF objects (`ebpf/sluice.bpf.c`, `ebpf/unix.bpf.c`) into `OUT_DIR`;
//! `kernel::loader` and `kernel::unix` embed them with `include_bytes_aligned!`.
//!
//! `unix.bpf.o` is loaded with libbpf (aya 0.14 cannot parse its sections nor resolve its
//! kfuncs), linked statically from libbpf-dev's `libbpf.a` (with libelf and zlib, its own
//! dependencies), so the daemon does not depend on the host's libbpf version at run time.
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

/// The multiarch library directory (`libbpf.a` lives there on Debian).
fn multiarch_lib(clang: &str) -> Option<PathBuf> {
    let include = multiarch_include(clang)?;
    let dir = Path::new("/usr/lib").join(include.file_name()?);
    dir.is_dir().then_some(dir)
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let ebpf_dir = manifest.join("../../ebpf");
    let src = ebpf_dir.join("sluice.bpf.c");
    let unix_src = ebpf_dir.join("unix.bpf.c");
    for file in [&src, &unix_src, &ebpf_dir.join("sluice.h"), &ebpf_dir.join("unix.h")] {
        println!("cargo:rerun-if-changed={}", file.display());
    }
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

    for (name, src) in [("sluice.bpf.o", &src), ("unix.bpf.o", &unix_src)] {
        compile(&clang, &ebpf_dir, src, &out_dir.join(name));
    }
    let lib_dirs: Vec<PathBuf> = multiarch_lib(&clang)
        .into_iter()
        .chain(["/usr/lib", "/usr/lib64", "/usr/local/lib"].map(PathBuf::from))
        .collect();
    let Some(lib_dir) = lib_dirs.iter().find(|d| d.join("libbpf.a").exists()) else {
        fail(&format!("libbpf.a not found in {lib_dirs:?}: install it with `{INSTALL_HINT}`"));
    };
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=static=bpf");
    println!("cargo:rustc-link-lib=dylib=elf");
    println!("cargo:rustc-link-lib=dylib=z");
}

fn compile(clang: &str, ebpf_dir: &Path, src: &Path, obj: &Path) {
    let mut cmd = Command::new(clang);
    // -mcpu=v3: atomic fetch-add and exchange (the per-sandbox slot counters).
    cmd.args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"])
        .arg(format!("-I{}", ebpf_dir.display()))
        .arg("-I/usr/include/bpf");
    if let Some(dir) = multiarch_include(clang) {
        cmd.arg(format!("-I{}", dir.display()));
    }
    cmd.arg("-c").arg(src).arg("-o").arg(obj);
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("compiling {} with {clang} failed ({s}); see the compiler output above", src.display())),
        Err(e) => fail(&format!("running {clang}: {e}; install it with `{INSTALL_HINT}`")),
    }
}
