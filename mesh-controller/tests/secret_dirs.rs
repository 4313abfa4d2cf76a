//! The binary refuses to start on a CA or token directory others can write to, saying which
//! directory and how to fix it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the controller in local mode on `dir`'s subdirectories; its exit status and stderr,
/// or `None` if it was still running (serving) after `within`.
fn start(dir: &Path, within: Duration) -> Option<(bool, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-controller"))
        .arg("--source")
        .arg(format!("file:{}", dir.join("cluster").display()))
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .arg("--tokens-dir")
        .arg(dir.join("tokens"))
        .args(["--listen", "127.0.0.1:0", "--health-listen", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return Some((
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn private_dirs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["cluster", "ca", "tokens"] {
        fs::create_dir(dir.path().join(sub)).unwrap();
        fs::set_permissions(dir.path().join(sub), fs::Permissions::from_mode(0o700)).unwrap();
    }
    dir
}

#[test]
fn a_world_writable_token_or_ca_directory_stops_the_start() {
    for sub in ["tokens", "ca"] {
        let dir = private_dirs();
        let path = dir.path().join(sub);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
        let Some((ok, stderr)) = start(dir.path(), Duration::from_secs(10)) else {
            panic!("the controller started on a world-writable {sub} directory");
        };
        assert!(!ok, "{sub}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains("chmod go-w"),
            "{sub}: {stderr}"
        );
    }
}
