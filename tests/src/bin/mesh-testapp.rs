//! A tiny TCP test app for the netns harness: an echo server, a verifying client, a connect loop,
//! and the bench's fixed-rate HTTP client and idle-connection holder. Every report is one JSON
//! line on stdout.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mesh_harness::load;
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};

#[derive(Parser)]
#[command(name = "mesh-testapp", about = "TCP test app for the mesh netns harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo every connection's bytes back; half-close after the peer's FIN.
    EchoServer {
        /// Address to listen on (repeatable), e.g. `0.0.0.0:8080` or `[::]:8080`.
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Send N pseudo-random bytes, read the echo to EOF, verify it; exit 0 iff exact.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Pause between 16 KiB chunks, to keep one connection open and flowing for a while.
        #[arg(long, default_value_t = 0)]
        pace_ms: u64,
    },
    /// CONNECTIONS clients at once, each sending BYTES and checking the echo; one JSON report.
    FanOut {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// COUNT attempts of connect + small echo, one JSON line each.
    ConnectLoop {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 2_000)]
        timeout_ms: u64,
    },
    /// HTTP/1.1 GETs at a fixed RATE per second over one keep-alive connection (open loop);
    /// reports latency percentiles; exit 0 iff every request got a whole 200 answer.
    HttpRate {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// Open CONNECTIONS keep-alive connections, one HTTP/1.1 GET on each, then hold them idle
    /// until terminated.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::EchoServer { listen } => echo_server(&listen),
        Cmd::Client {
            connect,
            bytes,
            timeout_ms,
            pace_ms,
        } => client(
            connect,
            bytes,
            Duration::from_millis(timeout_ms),
            Duration::from_millis(pace_ms),
        ),
        Cmd::FanOut {
            connect,
            connections,
            bytes,
            timeout_ms,
        } => fan_out(connect, connections, bytes, Duration::from_millis(timeout_ms)),
        Cmd::ConnectLoop {
            connect,
            count,
            interval_ms,
            timeout_ms,
        } => connect_loop(
            connect,
            count,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::HttpRate {
            connect,
            rate,
            duration_ms,
            timeout_ms,
        } => http_rate(
            connect,
            rate,
            Duration::from_millis(duration_ms),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::Hold {
            connect,
            connections,
            timeout_ms,
        } => hold(connect, connections, Duration::from_millis(timeout_ms)),
    }
}

fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?; // so 0.0.0.0:P and [::]:P can both be listened on
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

fn echo_server(addrs: &[SocketAddr]) -> ExitCode {
    raise_fd_limit();
    let mut listeners = Vec::new();
    for addr in addrs {
        match listen(*addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                emit(json!({"event": "error", "listen": addr.to_string(), "error": e.to_string()}));
                return ExitCode::FAILURE;
            }
        }
    }
    let bound: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    emit(json!({"event": "listening", "addrs": bound}));
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            std::thread::spawn(move || loop {
                match l.accept() {
                    Ok((conn, peer)) => {
                        let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
                        emit(json!({"event": "accept", "peer": peer.to_string(), "local": local}));
                        std::thread::spawn(move || echo(conn));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        emit(json!({"event": "error", "error": e.to_string()}));
                        std::thread::sleep(Duration::from_millis(10)); // e.g. EMFILE: do not spin
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

/// Echoes until the peer's FIN, then half-closes our side.
fn echo(mut conn: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// A deterministic pseudo-random byte stream (xorshift64*), the same for sender and checker
/// whatever the chunk sizes.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new() -> Self {
        Pattern {
            state: 0x9E37_79B9_7F4A_7C15,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

fn client(addr: SocketAddr, bytes: u64, timeout: Duration, pace: Duration) -> ExitCode {
    let mut report = json!({"ok": false, "local": null, "peer": addr.to_string(), "sent": 0, "received": 0,
                            "error": null});
    let result = run_client(addr, bytes, timeout, pace, &mut report);
    if let Err(e) = &result {
        report["error"] = json!(e.to_string());
    }
    report["ok"] = json!(result.is_ok());
    emit(report);
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_client(
    addr: SocketAddr,
    bytes: u64,
    timeout: Duration,
    pace: Duration,
    report: &mut Value,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut conn = TcpStream::connect_timeout(&addr, timeout)?;
    report["local"] = json!(conn.local_addr()?.to_string());
    report["peer"] = json!(conn.peer_addr()?.to_string());
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let mut writer = conn.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<u64> {
        let mut pattern = Pattern::new();
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            writer.write_all(&buf[..n])?;
            sent += n as u64;
            if !pace.is_zero() && sent < bytes {
                std::thread::sleep(pace);
            }
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    let mut expect = Pattern::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut want = vec![0u8; 16 * 1024];
    let mut received = 0u64;
    let mut mismatch = None;
    let read_result = loop {
        if Instant::now() > deadline {
            break Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "deadline passed while reading the echo",
            ));
        }
        let n = match conn.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        };
        if mismatch.is_none() {
            expect.fill(&mut want[..n]);
            if let Some(i) = buf[..n].iter().zip(&want[..n]).position(|(a, b)| a != b) {
                mismatch = Some(received + i as u64);
            }
        }
        received += n as u64;
    };
    report["received"] = json!(received);
    let sent = sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))?;
    report["sent"] = json!(*sent.as_ref().unwrap_or(&0));
    sent?;
    read_result?;
    if let Some(at) = mismatch {
        return Err(io::Error::other(format!(
            "echoed bytes differ from the sent ones at offset {at}"
        )));
    }
    if received != bytes {
        return Err(io::Error::other(format!(
            "received {received} bytes, sent {bytes}"
        )));
    }
    Ok(())
}

fn fan_out(addr: SocketAddr, connections: usize, bytes: u64, timeout: Duration) -> ExitCode {
    raise_fd_limit();
    let start = Instant::now();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(connections));
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
                // All connections open together, so they are concurrent, not sequential.
                barrier.wait();
                let mut report = json!({});
                run_client(addr, bytes, timeout, Duration::ZERO, &mut report)
            })
        })
        .collect();
    let mut ok = 0;
    let mut errors = Vec::new();
    for t in threads {
        match t.map(|h| h.join()) {
            Ok(Ok(Ok(()))) => ok += 1,
            Ok(Ok(Err(e))) => errors.push(e.to_string()),
            Ok(Err(_)) => errors.push("client thread panicked".into()),
            Err(e) => errors.push(format!("spawning a client thread: {e}")),
        }
    }
    errors.truncate(5);
    emit(json!({"ok": ok, "failed": connections - ok, "errors": errors,
                "elapsed_ms": start.elapsed().as_millis() as u64}));
    if ok == connections {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Many connections need more than the usual 1024 descriptors.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn connect_loop(addr: SocketAddr, count: u64, interval: Duration, timeout: Duration) -> ExitCode {
    let start = Instant::now();
    for i in 0..count {
        let t = start.elapsed();
        let attempt = Instant::now();
        let result = echo_once(addr, i, timeout);
        emit(json!({
            "i": i,
            "ok": result.is_ok(),
            "error": result.as_ref().err().map(|e| e.to_string()),
            "t_ms": t.as_millis() as u64,
            "dur_ms": attempt.elapsed().as_millis() as u64,
        }));
        if i + 1 < count {
            std::thread::sleep(interval); // pacing, not synchronization
        }
    }
    ExitCode::SUCCESS
}

fn echo_once(addr: SocketAddr, i: u64, timeout: Duration) -> io::Result<()> {
    let mut conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let msg = format!("mesh-testapp ping {i}\n");
    conn.write_all(msg.as_bytes())?;
    conn.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    conn.read_to_end(&mut back)?;
    if back != msg.as_bytes() {
        return Err(io::Error::other(format!(
            "echo mismatch: got {} bytes",
            back.len()
        )));
    }
    Ok(())
}

fn http_rate(addr: SocketAddr, rate: f64, duration: Duration, timeout: Duration) -> ExitCode {
    match load::fixed_rate(addr, rate, duration, timeout) {
        Ok(report) => {
            let ok = report.errors == 0;
            emit(json!(report));
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            emit(json!({"error": e.to_string()}));
            ExitCode::FAILURE
        }
    }
}

fn hold(addr: SocketAddr, connections: usize, timeout: Duration) -> ExitCode {
    raise_fd_limit();
    match load::hold(addr, connections, timeout) {
        Ok(held) => {
            emit(json!({"event": "holding", "connections": held.len()}));
            loop {
                // Until terminated: the connections stay open and idle meanwhile.
                std::thread::park();
            }
        }
        Err(e) => {
            emit(json!({"event": "error", "error": e.to_string()}));
            ExitCode::FAILURE
        }
    }
}
