//! The HBONE server's set-up bounds over real TLS on 127.0.0.1: a handshake slot is held while
//! the peer sets the connection up (TLS, then the HTTP/2 preface) and freed once it has, and
//! one deadline covers both steps.
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use mesh_node::limits::Admission;
use mesh_node::proxy::hbone::{self, Deny, Handler, HboneError, Request, ServerSettings};
use mesh_node::tls::{self, RootCertStore, Svid};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "root");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        tls::roots_from_der(std::slice::from_ref(&self.der)).unwrap()
    }

    fn svid(&self, id: &str) -> Svid {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Svid::new(vec![cert.der().clone()], key).unwrap()
    }
}

/// Never reached: these tests end before a stream.
struct NoStreams;

impl Handler for NoStreams {
    type Upstream = TcpStream;

    fn authorize(&self, _req: &Request) -> Result<(), Deny> {
        Ok(())
    }

    fn connect(&self, _req: &Request) -> impl Future<Output = io::Result<TcpStream>> + Send {
        std::future::ready(Err(io::Error::other("no upstream in this test")))
    }
}

struct Setup {
    ca: Ca,
    listener: TcpListener,
    handshakes: Admission,
}

async fn setup() -> Setup {
    Setup {
        ca: Ca::new(),
        listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        handshakes: Admission::handshakes("test", 1, None),
    }
}

impl Setup {
    /// Serves one connection holding a handshake slot, with `settings`.
    fn serve_one(self: &Arc<Self>, settings: ServerSettings) -> JoinHandle<Result<(), HboneError>> {
        let s = self.clone();
        tokio::spawn(async move {
            let (tcp, peer) = s.listener.accept().await.unwrap();
            let slot = s.handshakes.admit(Some(peer.ip())).unwrap();
            let config = tls::server_config(&s.ca.svid(CART), s.ca.roots(), "cluster.local").unwrap();
            let handler = Arc::new(NoStreams);
            hbone::serve_tls_holding(tcp, config, handler, &settings, CancellationToken::new(), slot).await
        })
    }

    async fn tls_client(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let addr = self.listener.local_addr().unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let config = tls::client_config(&self.ca.svid(WEB), self.ca.roots(), CART).unwrap();
        tls::connect(tcp, config, addr.ip(), Duration::from_secs(10))
            .await
            .unwrap()
    }

    async fn wait_held(&self, want: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.handshakes.held() != want {
            assert!(
                Instant::now() < deadline,
                "handshake slots held: {}, want {want}",
                self.handshakes.held()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_slot_is_freed_once_the_connection_is_set_up() {
    let s = Arc::new(setup().await);
    let server = s.serve_one(ServerSettings::default());
    let mut client = s.tls_client().await;
    // TLS done, no preface yet: still setting up.
    s.wait_held(1).await;
    assert!(s.handshakes.admit(None).is_err(), "a second handshake got a slot");
    client.write_all(PREFACE).await.unwrap();
    client.flush().await.unwrap();
    s.wait_held(0).await;
    assert!(
        !server.is_finished(),
        "the connection ended instead of being served"
    );
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_covers_tls_and_the_preface() {
    let s = Arc::new(setup().await);
    let settings = ServerSettings {
        tls_handshake_timeout: Duration::from_millis(800),
        preface_timeout: Duration::from_secs(30),
        ..ServerSettings::default()
    };
    let started = Instant::now();
    let server = s.serve_one(settings);
    let _silent_after_tls = s.tls_client().await;
    let result = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the server waited for the preface past the set-up deadline")
        .unwrap();
    let took = started.elapsed();
    assert!(matches!(result, Err(HboneError::Timeout(_))), "{result:?}");
    assert!(took < Duration::from_secs(5), "set-up cut off after {took:?}");
    assert_eq!(s.handshakes.held(), 0);
}
