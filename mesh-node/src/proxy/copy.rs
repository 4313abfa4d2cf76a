//! Copies both directions of a proxied connection. Like tokio's `copy_bidirectional`, but each
//! direction's buffer starts small and grows only when reads fill it: a thousand idle or
//! request/response connections cost a page each way, a bulk transfer still moves 64 KiB per
//! system call. A connection on which nothing moves for the idle timeout is closed, so that
//! peers that vanished without a FIN (or never meant to send one) do not hold it for ever.
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The first buffer of each direction.
const INITIAL: usize = 4 * 1024;
/// The largest buffer: what one read moves in a bulk transfer.
pub const MAX: usize = 64 * 1024;

/// Copies `a` → `b` and `b` → `a` until both have ended (each end is shut down for writing
/// after its source's EOF), or until no byte has moved either way for `idle` (then a
/// `TimedOut` error). Returns the bytes copied (a → b, b → a).
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut ab, mut ba) = (Half::new(), Half::new());
    // The timer is moved only when it fires: resetting it on every read would cost a timer
    // operation per read on a busy connection.
    let mut moved_at = Instant::now();
    let mut timer = pin!(tokio::time::sleep(idle));
    poll_fn(|cx| {
        let before = ab.copied + ba.copied;
        let ab_done = ab.poll(cx, &mut *a, &mut *b)?;
        let ba_done = ba.poll(cx, &mut *b, &mut *a)?;
        if let (Poll::Ready(x), Poll::Ready(y)) = (ab_done, ba_done) {
            return Poll::Ready(Ok((x, y)));
        }
        if ab.copied + ba.copied != before {
            moved_at = Instant::now();
        }
        while timer.as_mut().poll(cx).is_ready() {
            let deadline = moved_at + idle;
            if deadline <= Instant::now() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {idle:?}"),
                )));
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}

/// One direction: read into the buffer, write it all out, repeat; at EOF, flush and shut
/// the writer down.
struct Half {
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    eof: bool,
    done: bool,
    need_flush: bool,
    copied: u64,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: Vec::new(),
            pos: 0,
            filled: 0,
            eof: false,
            done: false,
            need_flush: false,
            copied: 0,
        }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.copied));
        }
        loop {
            if self.pos == self.filled && !self.eof {
                if self.buf.is_empty() {
                    self.buf = vec![0; INITIAL];
                } else if self.filled == self.buf.len() && self.buf.len() < MAX {
                    // The last read filled the buffer: more is coming, read more at once.
                    self.buf.resize((self.buf.len() * 4).min(MAX), 0);
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        // Nothing to read for now: push out what was written so far.
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
                let n = rb.filled().len();
                (self.pos, self.filled) = (0, n);
                self.eof = n == 0;
            }
            while self.pos < self.filled {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.filled]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                self.buf = Vec::new();
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_byte_exact_and_half_closes() {
        let (mut app_a, mut proxy_a) = tokio::io::duplex(8 * 1024);
        let (mut proxy_b, mut app_b) = tokio::io::duplex(8 * 1024);
        let copier =
            tokio::spawn(
                async move { bidirectional(&mut proxy_a, &mut proxy_b, Duration::from_secs(60)).await },
            );
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            app_a.write_all(&sent).await.unwrap();
            app_a.shutdown().await.unwrap();
            let mut back = Vec::new();
            app_a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        app_b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        app_b.write_all(b"bye").await.unwrap();
        app_b.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"bye");
        assert_eq!(copier.await.unwrap().unwrap(), (300_000, 3));
    }

    #[tokio::test]
    async fn buffers_grow_only_for_bulk() {
        let mut h = Half::new();
        let (mut src, mut reader) = tokio::io::duplex(1 << 20);
        let mut sink = tokio::io::sink();
        src.write_all(&[1u8; 100]).await.unwrap();
        poll_fn(|cx| {
            let _ = h.poll(cx, &mut reader, &mut sink);
            Poll::Ready(())
        })
        .await;
        assert_eq!(h.buf.len(), INITIAL);
        src.write_all(&vec![2u8; 512 * 1024]).await.unwrap();
        poll_fn(|cx| {
            let _ = h.poll(cx, &mut reader, &mut sink);
            Poll::Ready(())
        })
        .await;
        assert_eq!(h.buf.len(), MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_a_talking_one_is_not() {
        let idle = Duration::from_secs(3600);
        let (mut app_a, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut app_b) = tokio::io::duplex(1024);
        let copier = tokio::spawn(async move { bidirectional(&mut proxy_a, &mut proxy_b, idle).await });
        // A byte every 40 minutes for four hours keeps it open.
        let mut buf = [0u8; 1];
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(40 * 60)).await;
            app_a.write_all(b"x").await.unwrap();
            app_b.read_exact(&mut buf).await.unwrap();
        }
        assert!(!copier.is_finished());
        let quiet_from = Instant::now();
        let err = copier.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let quiet = quiet_from.elapsed();
        assert!(
            quiet >= idle && quiet < idle + Duration::from_secs(1),
            "closed after {quiet:?}"
        );
    }
}
