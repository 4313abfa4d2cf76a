//! Child processes placed in a network namespace and a cgroup, with captured output.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys::{log, NETNS_DIR};

/// How long a dropped [`Proc`] gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Lines kept per process (both streams together); older lines are dropped.
const MAX_LINES: usize = 100_000;

/// Which output stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A running child process. Dropping it stops it: SIGTERM, up to 5 s, SIGKILL, reap.
///
/// Its stdin is /dev/null; its stdout and stderr are collected line by line (set
/// `MESH_HARNESS_ECHO=1` to also copy them to stderr, prefixed by the label).
pub struct Proc {
    pub(crate) shared: Arc<ProcShared>,
}

pub(crate) struct ProcShared {
    pub(crate) label: String,
    pid: u32,
    child: Mutex<Child>,
    out: Arc<OutBuf>,
    /// The pod it runs in, if any (so removing the pod stops it).
    pub(crate) pod: Option<String>,
}

#[derive(Default)]
struct OutBuf {
    state: Mutex<OutState>,
    cv: Condvar,
}

#[derive(Default)]
struct OutState {
    lines: VecDeque<(Stream, String)>,
    /// Lines dropped from the front (so absolute line numbers stay meaningful).
    dropped: usize,
    open_streams: u8,
}

impl OutBuf {
    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Opens the namespace and cgroup files in the parent and makes the child enter them between
/// fork and exec; the child also gets PR_SET_PDEATHSIG(SIGKILL).
pub(crate) fn place(cmd: &mut Command, netns: Option<&str>, cgroup: Option<&Path>) -> Result<()> {
    let ns: Option<File> = netns
        .map(|n| File::open(Path::new(NETNS_DIR).join(n)).with_context(|| format!("opening netns {n}")))
        .transpose()?;
    let procs: Option<File> = cgroup
        .map(|c| {
            let p = c.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&p)
                .with_context(|| format!("opening {}", p.display()))
        })
        .transpose()?;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only makes async-signal-safe syscalls and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The parent died before the death signal was armed.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(ns) = &ns {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(procs) = &procs {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

impl Proc {
    /// Spawns `cmd` as it is (no namespace, no cgroup), with the same guard and capture as the
    /// cluster's `spawn_*` methods. Spawn from a thread that outlives the process: the child gets
    /// SIGKILL when the spawning thread exits.
    pub fn spawn(label: &str, cmd: Command) -> Result<Proc> {
        spawn_placed(label, cmd, None, None, None).map(|shared| Proc { shared })
    }

    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    pub fn label(&self) -> &str {
        &self.shared.label
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`); fails if the process has already exited.
    pub fn kill(&self, signal: i32) -> Result<()> {
        let mut child = self.shared.lock_child();
        if let Some(status) = child.try_wait()? {
            bail!("{}: already exited ({status})", self.shared.label);
        }
        // SAFETY: the child is not reaped (we hold its lock), so the pid is still ours.
        if unsafe { libc::kill(self.shared.pid as libc::pid_t, signal) } != 0 {
            bail!(
                "{}: kill({signal}): {}",
                self.shared.label,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// The exit status, if it has exited (reaping it).
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        Ok(self.shared.lock_child().try_wait()?)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        match self.shared.wait_exit(timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "{}: still running after {timeout:?}; last output:\n{}",
                self.shared.label,
                self.shared.tail(20)
            ),
        }
    }

    /// Everything read from stdout so far, one `\n`-terminated line each.
    pub fn stdout(&self) -> String {
        self.shared.joined(Stream::Stdout)
    }

    /// Everything read from stderr so far, one `\n`-terminated line each.
    pub fn stderr(&self) -> String {
        self.shared.joined(Stream::Stderr)
    }

    /// The lines read so far from both streams, in arrival order.
    pub fn lines(&self) -> Vec<(Stream, String)> {
        self.shared.out.lock().lines.iter().cloned().collect()
    }

    /// Waits up to `timeout` for a line (stdout or stderr, any since the start) matching `pred`
    /// and returns it. On timeout or end of output, fails showing the last lines seen.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl FnMut(&str) -> bool) -> Result<String> {
        let mut lines = self.wait_for_lines(timeout, 1, pred)?;
        Ok(lines.remove(0))
    }

    /// Like [`Proc::wait_for_line`], for the first `n` matching lines.
    pub fn wait_for_lines(
        &self,
        timeout: Duration,
        n: usize,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let out = &self.shared.out;
        let mut found = Vec::new();
        let mut next = 0; // absolute number of the next line to look at
        let mut st = out.lock();
        loop {
            let start = next.max(st.dropped) - st.dropped;
            for (_, line) in st.lines.iter().skip(start) {
                if found.len() < n && pred(line) {
                    found.push(line.clone());
                }
            }
            next = st.dropped + st.lines.len();
            if found.len() >= n {
                return Ok(found);
            }
            let why = if st.open_streams == 0 {
                "its output ended (exited?)".to_string()
            } else {
                let now = Instant::now();
                if now < deadline {
                    st = out
                        .cv
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    continue;
                }
                format!("timed out after {timeout:?}")
            };
            drop(st);
            bail!(
                "{}: {why} waiting for {n} matching line(s), found {}; last lines:\n{}",
                self.shared.label,
                found.len(),
                self.shared.tail(20)
            );
        }
    }
}

impl ProcShared {
    fn lock_child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok(None)` if still running at the deadline.
    fn wait_exit(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut interval = Duration::from_millis(1);
        loop {
            if let Some(status) = self.lock_child().try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(interval.min(deadline - now));
            interval = (interval * 2).min(Duration::from_millis(20));
        }
    }

    /// Signals the process unless it has exited; returns whether it was still running.
    fn signal(&self, signal: i32) -> bool {
        let mut child = self.lock_child();
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: not reaped while we hold the lock.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
            true
        } else {
            false
        }
    }

    /// SIGTERM, wait up to `grace`, SIGKILL, reap. Never panics.
    pub(crate) fn stop(&self, grace: Duration) {
        if grace > Duration::ZERO && self.signal(libc::SIGTERM) {
            if let Ok(Some(_)) = self.wait_exit(grace) {
                return;
            }
        }
        if self.signal(libc::SIGKILL) {
            match self.wait_exit(Duration::from_secs(5)) {
                Ok(Some(_)) => {}
                Ok(None) => log(&format!(
                    "{} (pid {}) did not die from SIGKILL",
                    self.label, self.pid
                )),
                Err(e) => log(&format!("reaping {} (pid {}): {e:#}", self.label, self.pid)),
            }
        }
    }

    fn joined(&self, stream: Stream) -> String {
        let st = self.out.lock();
        let mut s = String::new();
        for (_, line) in st.lines.iter().filter(|(s, _)| *s == stream) {
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    /// Waits up to `timeout` for both output streams to reach end of file.
    fn wait_output_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.out.lock();
        while st.open_streams > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self
                .out
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn tail(&self, n: usize) -> String {
        let st = self.out.lock();
        let skip = st.lines.len().saturating_sub(n);
        let mut s = String::new();
        if st.lines.is_empty() {
            s.push_str("  (no output)\n");
        }
        for (stream, line) in st.lines.iter().skip(skip) {
            let tag = if *stream == Stream::Stdout { "out" } else { "err" };
            s.push_str(&format!("  [{tag}] {line}\n"));
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.shared.stop(STOP_GRACE);
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.shared.label)
            .field("pid", &self.shared.pid)
            .finish()
    }
}

/// Spawns with piped output, /dev/null stdin, in `netns`/`cgroup` when given.
pub(crate) fn spawn_placed(
    label: &str,
    mut cmd: Command,
    netns: Option<&str>,
    cgroup: Option<&Path>,
    pod: Option<String>,
) -> Result<Arc<ProcShared>> {
    place(&mut cmd, netns, cgroup)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{label}: spawning {cmd:?}"))?;
    let out = Arc::new(OutBuf::default());
    out.lock().open_streams = 2;
    let echo = std::env::var_os("MESH_HARNESS_ECHO").is_some_and(|v| v != "0");
    let stdout = child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>);
    let stderr = child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>);
    for (stream, reader) in [(Stream::Stdout, stdout), (Stream::Stderr, stderr)] {
        let out = out.clone();
        let label = label.to_string();
        let reader = reader.expect("stdout and stderr are piped");
        std::thread::Builder::new()
            .name(format!("out-{label}"))
            .spawn(move || read_lines(reader, stream, &out, echo.then_some(label.as_str())))
            .context("spawning an output reader thread")?;
    }
    Ok(Arc::new(ProcShared {
        label: label.to_string(),
        pid: child.id(),
        child: Mutex::new(child),
        out,
        pod,
    }))
}

fn read_lines(reader: Box<dyn Read + Send>, stream: Stream, out: &OutBuf, echo: Option<&str>) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                let line = String::from_utf8_lossy(&buf).into_owned();
                if let Some(label) = echo {
                    eprintln!("[{label}] {line}");
                }
                let mut st = out.lock();
                if st.lines.len() == MAX_LINES {
                    st.lines.pop_front();
                    st.dropped += 1;
                }
                st.lines.push_back((stream, line));
                drop(st);
                out.cv.notify_all();
            }
        }
    }
    out.lock().open_streams -= 1;
    out.cv.notify_all();
}

/// Waits for a short command to finish (killing it after `timeout`) and collects its output.
pub(crate) fn finish(shared: &ProcShared, timeout: Duration) -> Result<(ExitStatus, String, String)> {
    let status = match shared.wait_exit(timeout)? {
        Some(s) => s,
        None => {
            shared.stop(Duration::ZERO);
            bail!(
                "{}: still running after {timeout:?}, killed; output:\n{}",
                shared.label,
                shared.tail(20)
            );
        }
    };
    // A daemonized grandchild could hold the pipes open; do not wait for it long.
    shared.wait_output_closed(Duration::from_secs(2));
    Ok((
        status,
        shared.joined(Stream::Stdout),
        shared.joined(Stream::Stderr),
    ))
}
