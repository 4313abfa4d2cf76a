//! The controller's TLS: TLS 1.3 with ALPN h2, a serving certificate from the mesh CA that is
//! renewed at half its life, and handshakes done off the accept loop with a deadline, so a
//! client that sends garbage or nothing costs one task and no one else's connection.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rcgen::SanType;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::{Ca, CaError};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed accept (out of file descriptors, say), wait rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// Resolves every handshake to the current serving certificate, issuing a new one when the
/// current one is half through its life.
pub struct ServingCert {
    ca: Arc<Ca>,
    names: Vec<SanType>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    current: Mutex<(Arc<CertifiedKey>, Instant)>,
}

impl ServingCert {
    pub fn new(ca: Arc<Ca>, names: Vec<SanType>, lifetime: Duration) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let first = issue(&ca, &names, lifetime, &provider)?;
        let current = Mutex::new((first, Instant::now() + lifetime / 2));
        Ok(ServingCert {
            ca,
            names,
            lifetime,
            provider,
            current,
        })
    }

    pub fn acceptor(self) -> Result<TlsAcceptor, TlsError> {
        let provider = self.provider.clone();
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn issue(
    ca: &Ca,
    names: &[SanType],
    lifetime: Duration,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let (cert, key) = ca.issue_serving(names, lifetime)?;
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key))?;
    Ok(Arc::new(CertifiedKey::new(vec![cert], key)))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if Instant::now() >= current.1 {
            match issue(&self.ca, &self.names, self.lifetime, &self.provider) {
                Ok(fresh) => *current = (fresh, Instant::now() + self.lifetime / 2),
                // The old certificate is still valid for half its life: retry next time.
                Err(e) => tracing::error!(error = %e, "cannot renew the serving certificate"),
            }
        }
        Some(current.0.clone())
    }
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// A listening socket of either family.
pub trait Listen: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next connection and a description of its peer.
    fn next(&self) -> impl Future<Output = io::Result<(Self::Io, String)>> + Send;
}

impl Listen for TcpListener {
    type Io = TcpStream;

    async fn next(&self) -> io::Result<(TcpStream, String)> {
        let (stream, peer) = self.accept().await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer.to_string()))
    }
}

impl Listen for UnixListener {
    type Io = UnixStream;

    async fn next(&self) -> io::Result<(UnixStream, String)> {
        let (stream, _) = self.accept().await?;
        let peer = stream
            .peer_cred()
            .map_or("unix".into(), |c| format!("unix pid {:?}", c.pid()));
        Ok((stream, peer))
    }
}

/// The established TLS connections of `listener`, for tonic's `serve_with_incoming`. The
/// accept loop ends once the stream is dropped.
pub fn incoming<L: Listen>(
    listener: L,
    acceptor: TlsAcceptor,
) -> ReceiverStream<Result<TlsStream<L::Io>, io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.next() => accepted,
            };
            let (io, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
