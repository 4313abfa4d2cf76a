//! Running the built `meshctl` as a user would.

use std::process::Command;

#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// `meshctl ARGS` with no meshctl settings from the environment, output not to a terminal
/// (so tables are fitted to 80 columns).
pub fn meshctl(args: &[&str]) -> Out {
    meshctl_with(args, &[])
}

pub fn meshctl_with(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    command
        .args(args)
        .env_remove("MESHCTL_NODE")
        .env_remove("MESHCTL_SOCKET")
        .env_remove("COLUMNS")
        .env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("running meshctl");
    Out {
        code: out.status.code().expect("meshctl exited, not killed"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// The one line a failed command printed on stderr; with backtraces asked for, a panic would
/// show one.
pub fn one_line(out: &Out) -> &str {
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr, not: {:?}", out.stderr);
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("backtrace"),
        "{out:?}"
    );
    lines[0]
}
