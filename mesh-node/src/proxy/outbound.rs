//! Outbound: a connection captured from an enrolled pod is sent on to its original destination.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::SockRef;
use tokio::net::TcpStream;
use tracing::{debug, info_span, Instrument};

use super::orig_dst::original_dst;
use crate::config::Config;

pub async fn handle(cfg: Arc<Config>, client: TcpStream, peer: SocketAddr) {
    let span = info_span!("outbound", src = %peer);
    async move {
        let dst = match original_dst(&client) {
            Ok(dst) => dst,
            Err(e) => {
                // Not a captured connection (someone dialled the port directly): refuse it.
                debug!(error = %e, "no original destination; closing");
                reset(&client);
                return;
            }
        };
        if is_own_listener(&cfg, dst) {
            debug!(%dst, "original destination is this proxy; refusing to loop");
            reset(&client);
            return;
        }
        debug!(%dst, "captured");
        match proxy(&cfg, client, dst).await {
            Ok((sent, received)) => debug!(%dst, sent, received, "closed"),
            Err(e) => debug!(%dst, error = %e, "failed"),
        }
    }
    .instrument(span)
    .await
}

async fn proxy(cfg: &Config, mut client: TcpStream, dst: SocketAddr) -> io::Result<(u64, u64)> {
    let connect = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(dst)).await;
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // The client already holds an established connection to us; a reset is the
            // closest we can come to the refusal it would have seen without the mesh.
            reset(&client);
            return Err(e);
        }
        Err(_) => {
            reset(&client);
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
    };
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
}

fn is_own_listener(cfg: &Config, dst: SocketAddr) -> bool {
    dst.port() == cfg.datapath.outbound_port
        && (Some(dst.ip()) == cfg.datapath.proxy_ipv4.map(Into::into)
            || Some(dst.ip()) == cfg.datapath.proxy_ipv6.map(Into::into))
}

/// Linger 0 turns the coming close into an RST.
fn reset(conn: &TcpStream) {
    let _ = SockRef::from(conn).set_linger(Some(std::time::Duration::ZERO));
}
