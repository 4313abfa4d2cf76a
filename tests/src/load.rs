//! Load that the test app generates inside pods for `cargo xtask bench`, where no packaged tool
//! fits: HTTP/1.1 requests at a fixed rate (open loop, with latency percentiles), and many idle
//! connections held open.
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The request both generators send: the bench's HTTP servers answer it with a 1 KiB body.
pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: mesh-testapp\r\n\r\n";

/// What [`fixed_rate`] measured.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct RateReport {
    pub requests: u64,
    pub errors: u64,
    /// The rate asked for and the rate achieved, requests per second.
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The first error, if any.
    pub error: Option<String>,
}

/// Sends `rate` requests per second over one keep-alive connection for `duration`, each at its
/// scheduled time whatever the answers before it did (so a stall cannot hide itself by delaying
/// the requests it would have hurt), and reports the latency percentiles.
pub fn fixed_rate(
    addr: SocketAddr,
    rate: f64,
    duration: Duration,
    timeout: Duration,
) -> io::Result<RateReport> {
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "rate must be positive",
        ));
    }
    fine_timer_slack();
    let period = Duration::from_secs_f64(1.0 / rate);
    let count = (rate * duration.as_secs_f64()).round().max(1.0) as u32;
    let mut conn = connect(addr, timeout)?;
    let mut buf = Vec::with_capacity(4096);
    let mut latencies = Vec::with_capacity(count as usize);
    let (mut errors, mut first_error) = (0u64, None);
    let start = Instant::now();
    let mut prev_done = start;
    for i in 0..count {
        let intended = start + period * i;
        let now = Instant::now();
        if now < intended {
            std::thread::sleep(intended - now);
        }
        let sent = Instant::now();
        // A request held back by the answer before it is charged from its scheduled time (that
        // wait is the server's); one that was only woken late is charged from when it went out
        // (that delay is the client's timer).
        let from = if prev_done > intended { intended } else { sent };
        let outcome = exchange(&mut conn, &mut buf);
        let done = Instant::now();
        prev_done = done;
        match outcome {
            Ok(()) => latencies.push(done - from),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
                conn = connect(addr, timeout)?;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let us = |q: f64| percentile(&latencies, q).map_or(0.0, |d| d.as_secs_f64() * 1e6);
    Ok(RateReport {
        requests: latencies.len() as u64,
        errors,
        target_rate: rate,
        achieved_rate: (latencies.len() as u64 + errors) as f64 / elapsed,
        p50_us: us(0.50),
        p90_us: us(0.90),
        p99_us: us(0.99),
        max_us: us(1.0),
        error: first_error,
    })
}

/// Opens `n` connections, completes one request on each (so every hop on the path holds its
/// share of the connection), and returns them open. A few threads open them, so that a path
/// slow to set connections up (a TLS handshake, a process per connection) is done in time.
pub fn hold(addr: SocketAddr, n: usize, timeout: Duration) -> io::Result<Vec<TcpStream>> {
    const OPENERS: usize = 8;
    let threads: Vec<_> = (0..OPENERS)
        .map(|i| {
            let share = n / OPENERS + usize::from(i < n % OPENERS);
            std::thread::spawn(move || -> io::Result<Vec<TcpStream>> {
                let mut buf = Vec::with_capacity(4096);
                (0..share)
                    .map(|_| {
                        let mut conn = connect(addr, timeout)?;
                        exchange(&mut conn, &mut buf)?;
                        Ok(conn)
                    })
                    .collect()
            })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    for t in threads {
        let conns = t
            .join()
            .map_err(|_| io::Error::other("a connection-opening thread panicked"))??;
        held.extend(conns);
    }
    Ok(held)
}

/// The nearest-rank `q`-quantile (0 < q ≤ 1) of sorted values.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

/// Sends [`REQUEST`] and reads one whole `200` response.
fn exchange(conn: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    conn.write_all(REQUEST)?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(total) = response_len(buf)? {
            if buf.len() >= total {
                return Ok(());
            }
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the whole response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The length of the response whose start is `buf` (head and body), once its head is complete.
pub fn response_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(bad(&format!("response status is not 200: {status:?}")));
    }
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .ok_or_else(|| bad("response has no Content-Length"))?
        .1
        .trim()
        .parse::<usize>()
        .map_err(|_| bad("response Content-Length is not a number"))?;
    Ok(Some(end + 4 + length))
}

/// The default 50 µs timer slack would delay every scheduled send by about that much.
fn fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK only sets this thread's slack; 1 ns is a valid value.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.9), Some(90));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[7u32], 0.5), Some(7));
        assert_eq!(percentile::<u32>(&[], 0.5), None);
    }

    #[test]
    fn response_length_from_the_head() {
        let head = b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-length: 1024\r\n\r\n";
        assert_eq!(response_len(head).unwrap(), Some(head.len() + 1024));
        assert_eq!(response_len(&head[..20]).unwrap(), None);
        let missing = b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n";
        assert!(response_len(missing)
            .unwrap_err()
            .to_string()
            .contains("Content-Length"));
        let not_ok = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert!(response_len(not_ok).unwrap_err().to_string().contains("503"));
    }
}
