//! Builds the kernel programs (`mesh-ebpf`) for `bpfel-unknown-none` and puts the object at
//! `$OUT_DIR/mesh-ebpf`, where `src/ebpf` embeds it.
//!
//! One inner cargo run, in its own target dir (`<workspace>/target/bpf`), serves every profile
//! (build, test, clippy) of the outer build: `core` for the BPF target is compiled once, and
//! the inner cargo never waits on the outer one's lock of `target/<profile>`.
//! The compiler is Debian's `rustc-web` (it has the BPF target and `rust-src`), reached as the
//! rustup toolchain `debian-bpf`; `-Z build-std` on it needs `RUSTC_BOOTSTRAP=1`, which is set
//! for the inner cargo only (in the outer shell it would rebuild all of user space).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

const TOOLCHAIN: &str = "debian-bpf";
const TARGET: &str = "bpfel-unknown-none";
const MISSING: &str =
    "eBPF toolchain missing: run `sudo xtask/scripts/setup.sh` (or `cargo xtask test`, which runs it)";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("mesh-node lives in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));

    for path in [
        "mesh-ebpf/src",
        "mesh-ebpf/Cargo.toml",
        "mesh-common/src",
        "mesh-common/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }

    if let Err(why) = check_toolchain() {
        fail(&format!("{MISSING} ({why})"));
    }

    let target_dir = workspace.join("target").join("bpf");
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        TOOLCHAIN,
        "cargo",
        "build",
        "-p",
        "mesh-ebpf",
        "--bins",
        "--release",
    ])
    .args(["--target", TARGET, "-Z", "build-std=core"])
    .arg("--manifest-path")
    .arg(workspace.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&workspace);
    // Nothing of the outer build may leak into the inner one (compiler, wrappers, flags,
    // target dir, jobserver, profile settings); cargo's own network/registry settings stay.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if leaks_into_inner_build(key) {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env("CARGO_TERM_COLOR", "never")
        .stdin(Stdio::null());

    let output = match cmd.output() {
        Ok(output) => output,
        Err(err) => fail(&format!("{MISSING} (cannot run rustup: {err})")),
    };
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        fail(&format!(
            "building mesh-ebpf for {TARGET} failed ({}); the inner cargo's output is above",
            output.status
        ));
    }

    let object = target_dir.join(TARGET).join("release").join("mesh-ebpf");
    let dest = out_dir.join("mesh-ebpf");
    if let Err(err) = fs::copy(&object, &dest) {
        fail(&format!(
            "copying {} to {}: {err}",
            object.display(),
            dest.display()
        ));
    }
}

fn leaks_into_inner_build(key: &str) -> bool {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
    ];
    if KEEP.iter().any(|k| key.starts_with(k)) {
        return false;
    }
    key.starts_with("CARGO")
        || key.starts_with("RUSTC")
        || key.starts_with("RUSTDOC")
        || key.starts_with("RUSTFLAGS")
        || key.starts_with("DEP_")
        || matches!(
            key,
            "RUSTUP_TOOLCHAIN"
                | "OUT_DIR"
                | "TARGET"
                | "HOST"
                | "PROFILE"
                | "OPT_LEVEL"
                | "DEBUG"
                | "NUM_JOBS"
                | "MAKEFLAGS"
                | "MFLAGS"
        )
}

/// Cheap checks that turn a missing toolchain into one clear line instead of a wall of
/// compiler errors.
fn check_toolchain() -> Result<(), String> {
    let sysroot = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run rustup: {e}"))?;
    if !sysroot.status.success() {
        return Err(format!("no rustup toolchain `{TOOLCHAIN}`"));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Err(format!("no rust-src under {}", sysroot.display()));
    }
    if !on_path("bpf-linker") {
        return Err("bpf-linker not on PATH".into());
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| is_executable(&dir.join(program))))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(1);
}
