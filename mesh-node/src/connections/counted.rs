//! A stream wrapper that counts the bytes through it into its connection's record: one atomic
//! add per read or write call, nothing else on the data path.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Tracked;

/// What reading from the wrapped stream means for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// The stream faces the source (the client pod): reads are request bytes.
    FacesSource,
    /// The stream faces the destination (the server pod): reads are response bytes.
    FacesDestination,
}

/// `S`, counted; the record closes when this is dropped.
pub struct Counted<S> {
    inner: S,
    tracked: Tracked,
    orientation: Orientation,
}

impl<S> Counted<S> {
    pub fn new(inner: S, tracked: Tracked, orientation: Orientation) -> Self {
        Counted {
            inner,
            tracked,
            orientation,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn count(&self, n: usize, read: bool) {
        let request = read == (self.orientation == Orientation::FacesSource);
        if request {
            self.tracked.add_request(n as u64);
        } else {
            self.tracked.add_response(n as u64);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.count(n, true);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.count(n, false);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.count(n, false);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
