//! Bounded TLS handshakes that report a classified [`TlsError`].
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::{peer_identity, TlsError};

/// Client handshake over `io` to the server at `server_ip` (used only as the rustls server name:
/// no SNI is sent, and the verifier checks the SPIFFE ID, not the address).
pub async fn connect<IO>(
    io: IO,
    config: Arc<ClientConfig>,
    server_ip: IpAddr,
    timeout: Duration,
) -> Result<client::TlsStream<IO>, TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let connector = TlsConnector::from(config);
    match tokio::time::timeout(
        timeout,
        connector.connect(ServerName::IpAddress(server_ip.into()), io),
    )
    .await
    {
        Err(_) => Err(TlsError::Timeout),
        Ok(Err(e)) => Err(TlsError::from_io(e)),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Server handshake over `io`; returns the stream and the client's SPIFFE ID.
pub async fn accept<IO>(
    io: IO,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<(server::TlsStream<IO>, String), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = TlsAcceptor::from(config);
    let stream = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Err(_) => return Err(TlsError::Timeout),
        Ok(Err(e)) => return Err(TlsError::from_io(e)),
        Ok(Ok(s)) => s,
    };
    let identity = peer_identity(stream.get_ref().1)?;
    Ok((stream, identity))
}
