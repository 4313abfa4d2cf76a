//! HBONE over real TLS, real HTTP/2 and real TCP on 127.0.0.1: the pool, the server, the mesh's
//! certificate rules, and the wire format a ztunnel speaks.
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use mesh_node::proxy::hbone::{
    self, Deny, Handler, HboneError, Pool, PoolConfig, PoolKey, Request, ServerSettings,
};
use mesh_node::tls::{self, ConfigCache, RootCertStore, Svid, TlsError};

const TD: &str = "cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const TEST_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// PKI

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
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

    fn leaf_params(&self, id: &str) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p
    }

    fn sign(&self, p: CertificateParams) -> Svid {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Svid::new(vec![cert.der().clone()], key).unwrap()
    }

    fn svid(&self, id: &str) -> Svid {
        self.sign(self.leaf_params(id))
    }

    fn expired_svid(&self, id: &str) -> Svid {
        let mut p = self.leaf_params(id);
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2020, 1, 2);
        self.sign(p)
    }
}

// ---------------------------------------------------------------------------------------------
// Test server and upstreams

#[derive(Default)]
struct TestHandler {
    deny: bool,
    seen: Mutex<Vec<Request>>,
    finished: Mutex<Vec<(u64, u64)>>,
    bad_requests: Mutex<Vec<&'static str>>,
}

impl Handler for TestHandler {
    type Upstream = TcpStream;

    fn authorize(&self, req: &Request) -> Result<(), Deny> {
        self.seen.lock().unwrap().push(req.clone());
        if self.deny {
            return Err(Deny {
                policy: "shop/deny-all".into(),
            });
        }
        Ok(())
    }

    fn connect(&self, req: &Request) -> impl Future<Output = io::Result<TcpStream>> + Send {
        let dst = req.dst;
        async move { TcpStream::connect(dst).await }
    }

    fn bad_request(&self, reason: &'static str) {
        self.bad_requests.lock().unwrap().push(reason);
    }

    fn finished(&self, _req: &Request, result: &io::Result<(u64, u64)>) {
        match result {
            Ok(b) => self.finished.lock().unwrap().push(*b),
            Err(e) => eprintln!("server stream to {} ended with {e:?}", _req.dst),
        }
    }
}

struct TestServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<HboneError>>>,
    handler: Arc<TestHandler>,
    conns: Arc<Mutex<JoinSet<()>>>,
    stop: CancellationToken,
    /// Cancelled: open connections get a GOAWAY (the listener keeps accepting).
    drain: CancellationToken,
}

impl TestServer {
    async fn start(svid: &Svid, roots: Arc<RootCertStore>, handler: TestHandler) -> TestServer {
        Self::start_with(svid, roots, handler, ServerSettings::default()).await
    }

    async fn start_with(
        svid: &Svid,
        roots: Arc<RootCertStore>,
        handler: TestHandler,
        settings: ServerSettings,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = tls::server_config(svid, roots, TD).unwrap();
        let s = TestServer {
            addr,
            accepted: Arc::default(),
            open: Arc::default(),
            errors: Arc::default(),
            handler: Arc::new(handler),
            conns: Arc::new(Mutex::new(JoinSet::new())),
            stop: CancellationToken::new(),
            drain: CancellationToken::new(),
        };
        let (accepted, open, errors, handler, conns, stop, drain) = (
            s.accepted.clone(),
            s.open.clone(),
            s.errors.clone(),
            s.handler.clone(),
            s.conns.clone(),
            s.stop.clone(),
            s.drain.clone(),
        );
        let settings = Arc::new(settings);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => r.unwrap(),
                    _ = stop.cancelled() => return,
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                // Connections accepted after a drain are not drained.
                let drain = if drain.is_cancelled() {
                    CancellationToken::new()
                } else {
                    drain.clone()
                };
                let (config, handler, errors, open, settings) = (
                    config.clone(),
                    handler.clone(),
                    errors.clone(),
                    open.clone(),
                    settings.clone(),
                );
                conns.lock().unwrap().spawn(async move {
                    struct Dec(Arc<AtomicUsize>);
                    impl Drop for Dec {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    let _dec = Dec(open);
                    if let Err(e) = hbone::serve_tls(tcp, config, handler, &settings, drain).await {
                        errors.lock().unwrap().push(e);
                    }
                });
            }
        });
        s
    }

    /// Drops every accepted connection (as a crashed peer would).
    fn kill_connections(&self) {
        self.conns.lock().unwrap().abort_all();
    }

    async fn first_error(&self) -> HboneError {
        wait_for("a server-side error", || {
            self.errors.lock().unwrap().first().cloned()
        })
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
        self.conns.lock().unwrap().abort_all();
    }
}

/// A TCP echo server: echoes until EOF, then closes its write side.
async fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let s = match l.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Transient (ECONNABORTED, EMFILE under load): keep the listener.
                    eprintln!("echo upstream: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A port on 127.0.0.1 where nothing listens.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_DEADLINE, f)
        .await
        .expect("test deadline exceeded")
}

// ---------------------------------------------------------------------------------------------
// A client side

struct Client {
    pool: Pool,
    cache: Arc<ConfigCache>,
    svid: Svid,
    key: PoolKey,
}

impl Client {
    fn new(svid: Svid, roots: Arc<RootCertStore>, dst_identity: &str, server: SocketAddr) -> Client {
        Self::with_config(svid, roots, dst_identity, server, PoolConfig::default())
    }

    fn with_config(
        svid: Svid,
        roots: Arc<RootCertStore>,
        dst_identity: &str,
        server: SocketAddr,
        cfg: PoolConfig,
    ) -> Client {
        let key = PoolKey {
            src_identity: svid.identity().to_string(),
            dst_identity: dst_identity.to_string(),
            src: None,
            dst: server,
        };
        Client {
            pool: Pool::new(cfg),
            cache: Arc::new(ConfigCache::new(roots, TD)),
            svid,
            key,
        }
    }

    async fn connect(&self, target: SocketAddr) -> Result<hbone::HboneStream, HboneError> {
        let (cache, svid, dst_id) = (
            self.cache.clone(),
            self.svid.clone(),
            self.key.dst_identity.clone(),
        );
        let src: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        self.pool
            .connect(&self.key, move || cache.client(&svid, &dst_id), target, src)
            .await
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` through an HBONE stream to the echo upstream and checks it comes back intact.
async fn echo_through(stream: hbone::HboneStream, data: Vec<u8>) {
    let (mut r, mut w) = tokio::io::split(stream);
    let len = data.len();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        data
    });
    let mut back = Vec::with_capacity(len);
    r.read_to_end(&mut back).await.unwrap();
    let data = writer.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
}

struct Pki {
    ca: Ca,
    web: Svid,
    cart: Svid,
}

fn pki() -> Pki {
    let ca = Ca::new("mesh root");
    Pki {
        web: ca.svid(WEB),
        cart: ca.svid(CART),
        ca,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_10_mb_byte_exact() {
    within(async {
        let pki = pki();
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let upstream = echo_upstream().await;
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        let stream = client.connect(upstream).await.unwrap();
        echo_through(stream, pattern(10 * 1024 * 1024, 7)).await;

        // The server saw who called, from where, to where.
        let seen = server.handler.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].source_identity, WEB);
        assert_eq!(seen[0].dst, upstream);
        assert_eq!(seen[0].forwarded_for, Some("10.1.2.3:40000".parse().unwrap()));
        assert_eq!(seen[0].local_addr, server.addr);
        let finished = wait_for("the server to finish the stream", || {
            server.handler.finished.lock().unwrap().first().copied()
        })
        .await;
        assert_eq!(finished, (10 * 1024 * 1024, 10 * 1024 * 1024));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_other_direction_flowing() {
    within(async {
        let pki = pki();
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        // Upstream: reads the request to EOF, then answers with 1 MiB, then closes.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = l.local_addr().unwrap();
        let answer = pattern(1024 * 1024, 3);
        let expected = answer.clone();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            s.read_to_end(&mut req).await.unwrap();
            assert_eq!(req, b"hello, then EOF");
            s.write_all(&answer).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        let mut stream = client.connect(upstream).await.unwrap();
        stream.write_all(b"hello, then EOF").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert!(got == expected, "answer after half-close differs");

        // The other way round: upstream closes first, the client still sends.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            w.write_all(b"greeting").await.unwrap();
            w.shutdown().await.unwrap();
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            tx.send(rest).unwrap();
        });
        let mut stream = client.connect(upstream).await.unwrap();
        let mut greeting = Vec::new();
        stream.read_to_end(&mut greeting).await.unwrap();
        assert_eq!(greeting, b"greeting");
        let late = pattern(256 * 1024, 9);
        stream.write_all(&late).await.unwrap();
        stream.shutdown().await.unwrap();
        assert!(
            rx.await.unwrap() == late,
            "data sent after the upstream's EOF differs"
        );
        // Both tunnels went over one pooled connection.
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_wrong_server_identity() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        // The server at this address is `web`, but the client expects `cart`.
        let server = TestServer::start(&pki.web, pki.ca.roots(), TestHandler::default()).await;
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        let err = client.connect(upstream).await.unwrap_err();
        match &err {
            HboneError::Tls(TlsError::WrongIdentity { expected, presented }) => {
                assert_eq!(expected, CART);
                assert_eq!(presented, WEB);
            }
            other => panic!("expected WrongIdentity, got {other:?}"),
        }
        assert_eq!(err.reason(), "wrong_identity");
        assert!(server.handler.seen.lock().unwrap().is_empty());

        // A server certificate from another CA is refused as unknown_ca.
        let foreign = Ca::new("foreign root");
        let server = TestServer::start(&foreign.svid(CART), pki.ca.roots(), TestHandler::default()).await;
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        let err = client.connect(upstream).await.unwrap_err();
        assert!(matches!(err, HboneError::Tls(TlsError::UnknownCa)), "{err:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_foreign_ca_client() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let foreign = Ca::new("foreign root");
        let client = Client::new(foreign.svid(WEB), pki.ca.roots(), CART, server.addr);
        let err = client.connect(upstream).await.unwrap_err();
        assert!(
            matches!(
                err,
                HboneError::Tls(TlsError::PeerRejected(rustls::AlertDescription::UnknownCA))
            ),
            "the client learns the server refused its certificate: {err:?}"
        );
        let server_err = server.first_error().await;
        assert!(
            matches!(server_err, HboneError::Tls(TlsError::UnknownCa)),
            "{server_err:?}"
        );
        assert_eq!(server_err.reason(), "unknown_ca");
        assert!(server.handler.seen.lock().unwrap().is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_expired_client_cert() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let client = Client::new(pki.ca.expired_svid(WEB), pki.ca.roots(), CART, server.addr);
        let err = client.connect(upstream).await.unwrap_err();
        assert!(
            matches!(
                err,
                HboneError::Tls(TlsError::PeerRejected(
                    rustls::AlertDescription::CertificateExpired
                ))
            ),
            "{err:?}"
        );
        let server_err = server.first_error().await;
        assert!(
            matches!(server_err, HboneError::Tls(TlsError::Expired)),
            "{server_err:?}"
        );
        assert_eq!(server_err.reason(), "expired");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_client_without_cert_or_from_another_trust_domain() {
    within(async {
        let pki = pki();
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;

        // No client certificate at all.
        #[derive(Debug)]
        struct NoCert;
        impl rustls::client::ResolvesClientCert for NoCert {
            fn resolve(
                &self,
                _: &[&[u8]],
                _: &[rustls::SignatureScheme],
            ) -> Option<Arc<rustls::sign::CertifiedKey>> {
                None
            }
            fn has_certs(&self) -> bool {
                false
            }
        }
        let mut config = (*tls::client_config(&pki.web, pki.ca.roots(), CART).unwrap()).clone();
        config.client_auth_cert_resolver = Arc::new(NoCert);
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut s = tls::connect(tcp, Arc::new(config), server.addr.ip(), Duration::from_secs(5))
            .await
            .expect("the client side of the handshake completes in TLS 1.3");
        let mut buf = [0u8; 1];
        let _ = s.read(&mut buf).await; // the server's alert or EOF
        let server_err = server.first_error().await;
        assert!(
            matches!(server_err, HboneError::Tls(TlsError::NoClientCert)),
            "{server_err:?}"
        );
        assert_eq!(server_err.reason(), "no_client_cert");

        // A mesh-signed certificate of another trust domain.
        server.errors.lock().unwrap().clear();
        let upstream = echo_upstream().await;
        let other_td = pki.ca.svid("spiffe://other.domain/ns/shop/sa/web");
        let client = Client::new(other_td, pki.ca.roots(), CART, server.addr);
        assert!(client.connect(upstream).await.is_err());
        let server_err = server.first_error().await;
        assert!(
            matches!(server_err, HboneError::Tls(TlsError::ForeignTrustDomain { .. })),
            "{server_err:?}"
        );
    })
    .await
}

/// Opens a raw TLS + `h2` crate connection to the server, as a ztunnel would.
async fn raw_h2(
    client_svid: &Svid,
    roots: Arc<RootCertStore>,
    server: SocketAddr,
    server_id: &str,
) -> h2::client::SendRequest<Bytes> {
    let config = tls::client_config(client_svid, roots, server_id).unwrap();
    let tcp = TcpStream::connect(server).await.unwrap();
    let s = tls::connect(tcp, config, server.ip(), Duration::from_secs(5))
        .await
        .unwrap();
    let conn = s.get_ref().1;
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let suite = conn.negotiated_cipher_suite().unwrap().suite();
    assert!(matches!(
        suite,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    ));
    let group = conn.negotiated_key_exchange_group().unwrap().name();
    assert!(matches!(
        group,
        rustls::NamedGroup::X25519 | rustls::NamedGroup::secp256r1
    ));
    let (send, conn) = h2::client::handshake(s).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

async fn raw_status(send: &mut h2::client::SendRequest<Bytes>, req: http::Request<()>) -> u16 {
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _stream) = ready.send_request(req, false).unwrap();
    resp.await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let mut send = raw_h2(&pki.web, pki.ca.roots(), server.addr, CART).await;
        let get = http::Request::builder()
            .method("GET")
            .uri(format!("https://{upstream}/"))
            .body(())
            .unwrap();
        assert_eq!(raw_status(&mut send, get).await, 400);
        let host = http::Request::builder()
            .method("CONNECT")
            .uri("example.com:80")
            .body(())
            .unwrap();
        assert_eq!(raw_status(&mut send, host).await, 400);
        // An authority that is not the address dialled.
        let elsewhere = format!("127.0.0.2:{}", upstream.port());
        let other = http::Request::builder()
            .method("CONNECT")
            .uri(elsewhere)
            .body(())
            .unwrap();
        assert_eq!(raw_status(&mut send, other).await, 400);
        assert!(
            server.handler.seen.lock().unwrap().is_empty(),
            "malformed requests never reach policy"
        );
        assert_eq!(
            *server.handler.bad_requests.lock().unwrap(),
            vec!["not_connect", "bad_authority", "authority_mismatch"],
            "each 400 is reported to the handler, for metrics"
        );
        // And the connection still serves a good request.
        let ok = http::Request::builder()
            .method("CONNECT")
            .uri(upstream.to_string())
            .body(())
            .unwrap();
        assert_eq!(raw_status(&mut send, ok).await, 200);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_deny_is_403_and_a_typed_error() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let handler = TestHandler {
            deny: true,
            ..Default::default()
        };
        let server = TestServer::start(&pki.cart, pki.ca.roots(), handler).await;
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        let started = Instant::now();
        let err = client.connect(upstream).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "deny took {:?}",
            started.elapsed()
        );
        assert!(
            matches!(err, HboneError::Denied { status } if status == 403),
            "{err:?}"
        );
        assert_eq!(err.status().map(|s| s.as_u16()), Some(403));
        assert_eq!(server.handler.seen.lock().unwrap()[0].source_identity, WEB);
        // The connection survives a denied stream.
        assert!(client.connect(upstream).await.is_err());
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_is_503() {
    within(async {
        let pki = pki();
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        let err = client.connect(closed_port().await).await.unwrap_err();
        assert!(
            matches!(err, HboneError::UpstreamRefused { status } if status == 503),
            "{err:?}"
        );
        // The pooled connection still works for the next stream.
        let stream = client.connect(echo_upstream().await).await.unwrap();
        echo_through(stream, pattern(1000, 1)).await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_uses_one_handshake_for_sequential_and_concurrent_streams() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let client = Arc::new(Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr));

        // Concurrent callers on a cold pool share one dial.
        let mut set = JoinSet::new();
        for i in 0..50u64 {
            let client = client.clone();
            set.spawn(async move {
                let s = client.connect(upstream).await.unwrap();
                echo_through(s, pattern(4096, i)).await;
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        // Then sequential ones reuse it.
        for i in 0..20u64 {
            let s = client.connect(upstream).await.unwrap();
            echo_through(s, pattern(100, 100 + i)).await;
        }
        assert_eq!(
            server.accepted.load(Ordering::SeqCst),
            1,
            "one TCP connection, one handshake"
        );
        let stats = client.pool.stats();
        assert_eq!(stats.dials, 1);
        assert_eq!(stats.connections, 1);
        assert_eq!(
            wait_for("streams to close", || (client.pool.stats().active_streams == 0)
                .then_some(()))
            .await,
            ()
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_respect_the_stream_cap() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let cfg = PoolConfig {
            max_streams_per_connection: 100,
            ..Default::default()
        };
        let client = Arc::new(Client::with_config(
            pki.web.clone(),
            pki.ca.roots(),
            CART,
            server.addr,
            cfg,
        ));
        let max_active = Arc::new(AtomicUsize::new(0));
        let mut set = JoinSet::new();
        for i in 0..1000u64 {
            let (client, max_active) = (client.clone(), max_active.clone());
            set.spawn(async move {
                let s = client.connect(upstream).await.unwrap();
                let st = client.pool.stats();
                max_active.fetch_max(st.active_streams, Ordering::Relaxed);
                // A stream never finds more than the cap on its connection.
                assert!(st.active_streams <= 100 * st.connections.max(1));
                echo_through(s, pattern(2048, i)).await;
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        let accepted = server.accepted.load(Ordering::SeqCst);
        let dials = client.pool.stats().dials as usize;
        assert_eq!(accepted, dials);
        assert!(
            accepted >= 10,
            "1000 streams at 100 per connection need at least 10, got {accepted}"
        );
        assert!(accepted <= 30, "too many connections: {accepted}");
        println!(
            "1000 streams: {accepted} connections, max {} streams open at once",
            max_active.load(Ordering::Relaxed)
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_its_own_connection() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let settings = ServerSettings {
            tls_handshake_timeout: Duration::from_millis(500),
            preface_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let server =
            TestServer::start_with(&pki.cart, pki.ca.roots(), TestHandler::default(), settings).await;
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        let warm = client.connect(upstream).await.unwrap();

        // Not TLS at all.
        let mut junk = TcpStream::connect(server.addr).await.unwrap();
        junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = junk.read_to_end(&mut buf).await; // closed by the server
                                                  // TLS, then bytes that are not HTTP/2.
        let config = tls::client_config(&pki.web, pki.ca.roots(), CART).unwrap();
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut s = tls::connect(tcp, config, server.addr.ip(), Duration::from_secs(5))
            .await
            .unwrap();
        s.write_all(b"this is not an HTTP/2 client preface")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        // A peer that says nothing is dropped after the handshake timeout.
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let mut buf = Vec::new();
        let _ = silent.read_to_end(&mut buf).await;

        wait_for("three rejected connections", || {
            (server.errors.lock().unwrap().len() >= 3).then_some(())
        })
        .await;
        let reasons: Vec<_> = server.errors.lock().unwrap().iter().map(|e| e.reason()).collect();
        assert!(reasons.contains(&"not_h2"), "{reasons:?}");
        assert!(reasons.contains(&"timeout"), "{reasons:?}");

        // The warm stream and new streams on the pooled connection are unaffected.
        echo_through(warm, pattern(100_000, 5)).await;
        echo_through(client.connect(upstream).await.unwrap(), pattern(100_000, 6)).await;
        // And a fresh client can still connect.
        let fresh = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        echo_through(fresh.connect(upstream).await.unwrap(), pattern(1000, 8)).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_style_connect_is_accepted() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let send = raw_h2(&pki.web, pki.ca.roots(), server.addr, CART).await;
        // Exactly what ztunnel sends: :method CONNECT, :authority ip:port (no :scheme, no :path),
        // forwarded, baggage, traceparent.
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(upstream.to_string())
            .header("forwarded", "for=\"[fd00::7]:5555\"")
            .header("baggage", "k8s.namespace.name=shop,k8s.deployment.name=web")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .body(())
            .unwrap();
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, mut tx) = ready.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        tx.send_data(Bytes::from_static(b"ping over raw h2"), true)
            .unwrap();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, b"ping over raw h2");
        let seen = server.handler.seen.lock().unwrap()[0].clone();
        assert_eq!(seen.forwarded_for, Some("[fd00::7]:5555".parse().unwrap()));
        assert_eq!(seen.source_identity, WEB);
        drop(send);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_client_speaks_to_a_raw_h2_server_like_ztunnel_expects() {
    // The other direction of wire compatibility: our client's request, seen by a plain h2 server.
    within(async {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = tls::server_config(&pki.cart, pki.ca.roots(), TD).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (s, peer) = tls::accept(tcp, config, Duration::from_secs(5)).await.unwrap();
            // The client sent no SNI; the server picked its certificate by the address dialled.
            assert_eq!(s.get_ref().1.server_name(), None);
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let (parts, _) = req.into_parts();
            let _ = tx.send((parts, peer));
            let resp = http::Response::builder().status(401).body(()).unwrap();
            respond.send_response(resp, true).unwrap();
            while conn.accept().await.is_some() {}
        });
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, addr);
        let target: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let err = client.connect(target).await.unwrap_err();
        assert!(
            matches!(err, HboneError::Denied { status } if status == 401),
            "{err:?}"
        );
        let (parts, peer) = rx.await.unwrap();
        assert_eq!(peer, WEB);
        assert_eq!(parts.method, http::Method::CONNECT);
        assert_eq!(parts.uri.to_string(), "127.0.0.1:8080");
        assert!(parts.uri.scheme().is_none() && parts.uri.path_and_query().is_none());
        assert_eq!(parts.headers.get("forwarded").unwrap(), "for=\"10.1.2.3:40000\"");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_connection_is_evicted_and_redialled() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        echo_through(client.connect(upstream).await.unwrap(), pattern(1000, 1)).await;
        assert_eq!(client.pool.stats().connections, 1);

        server.kill_connections();
        wait_for("the pool to notice", || {
            (client.pool.stats().connections == 0).then_some(())
        })
        .await;
        echo_through(client.connect(upstream).await.unwrap(), pattern(1000, 2)).await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);

        // Broken while the pool still holds it: the next call retries on a fresh connection.
        server.kill_connections();
        echo_through(client.connect(upstream).await.unwrap(), pattern(1000, 3)).await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 3);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let cfg = PoolConfig {
            idle_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let client = Client::with_config(pki.web.clone(), pki.ca.roots(), CART, server.addr, cfg);
        let stream = client.connect(upstream).await.unwrap();
        // A connection with an open stream is not idle, however long the stream is quiet. The
        // pool's own clock says how long: a witness connection in the same pool, idle since
        // after the stream opened, is evicted (twice over); the busy one was due first, and stays.
        let witness_server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let witness = Client {
            pool: client.pool.clone(),
            cache: client.cache.clone(),
            svid: client.svid.clone(),
            key: PoolKey {
                dst: witness_server.addr,
                ..client.key.clone()
            },
        };
        for round in 0..2 {
            echo_through(witness.connect(upstream).await.unwrap(), pattern(100, round)).await;
            wait_for("the idle witness evicted", || {
                (witness_server.open.load(Ordering::SeqCst) == 0).then_some(())
            })
            .await;
            assert_eq!(client.pool.stats().connections, 1, "round {round}");
            assert_eq!(server.open.load(Ordering::SeqCst), 1, "round {round}");
        }
        echo_through(stream, pattern(1000, 1)).await;
        wait_for("idle eviction", || {
            (client.pool.stats().connections == 0).then_some(())
        })
        .await;
        wait_for("the server to see the close", || {
            (server.open.load(Ordering::SeqCst) == 0).then_some(())
        })
        .await;
        echo_through(client.connect(upstream).await.unwrap(), pattern(1000, 2)).await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dial_is_shared_by_concurrent_callers() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.web, pki.ca.roots(), TestHandler::default()).await;
        let mut client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        // Hold the dial at the TCP connect until all callers are waiting on it.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let g = gate.clone();
        let dialer: hbone::client::Dialer = Arc::new(move |_, addr| {
            let g = g.clone();
            Box::pin(async move {
                g.acquire().await.unwrap().forget();
                TcpStream::connect(addr).await
            })
        });
        client.pool = Pool::with_dialer(PoolConfig::default(), dialer);
        let client = Arc::new(client);
        let mut set = JoinSet::new();
        for _ in 0..20 {
            let client = client.clone();
            set.spawn(async move { client.connect(upstream).await.unwrap_err() });
        }
        wait_for("20 callers on one dial", || {
            (client.pool.stats().waiting == 20).then_some(())
        })
        .await;
        assert_eq!(client.pool.stats().dialing, 1);
        gate.add_permits(100);
        while let Some(r) = set.join_next().await {
            assert!(matches!(
                r.unwrap(),
                HboneError::Tls(TlsError::WrongIdentity { .. })
            ));
        }
        assert_eq!(client.pool.stats().dials, 1);
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
        // Nothing is cached from a failed dial: the next call dials again.
        assert!(client.connect(upstream).await.is_err());
        assert_eq!(client.pool.stats().dials, 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_goaway_lets_open_streams_finish_and_new_streams_redial() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        let mut stream = client.connect(upstream).await.unwrap();
        stream.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        stream.read_exact(&mut buf).await.unwrap();
        server.drain.cancel(); // GOAWAY on every open connection; the listener keeps accepting
                               // New streams keep working throughout: the server's graceful GOAWAY first still admits
                               // streams; once the final one is in, hyper notices only on the next request, which the
                               // pool then sends again over a new connection. Every connect must succeed until the
                               // pool has moved over.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut i = 0;
        while server.accepted.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "the pool never moved off the drained connection"
            );
            echo_through(client.connect(upstream).await.unwrap(), pattern(1000, i)).await;
            i += 1;
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
        // The stream that was open before the GOAWAY still works both ways.
        stream.write_all(b"after").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"after");
        drop(stream);
        wait_for("the drained connection to close", || {
            (server.open.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
    })
    .await
}

#[test]
fn svid_rejects_a_key_that_is_not_the_certificates() {
    let ca = Ca::new("mesh root");
    let a = ca.svid(WEB);
    let other = KeyPair::generate().unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(other.serialize_der()));
    let err = Svid::new(a.chain().to_vec(), key).unwrap_err();
    assert_eq!(err.reason(), "invalid_material");
    assert_eq!(tls::spiffe_id(&a.chain()[0]).unwrap(), WEB);
    assert_eq!(tls::trust_domain_of(WEB), Some(TD));
}

#[test]
fn config_cache_reuses_and_rebuilds_on_rotation() {
    let ca = Ca::new("mesh root");
    let cache = ConfigCache::new(ca.roots(), TD);
    let web = ca.svid(WEB);
    let a = cache.client(&web, CART).unwrap();
    let b = cache.client(&web, CART).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let c = cache
        .client(&web, "spiffe://cluster.local/ns/shop/sa/db")
        .unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
    let rotated = ca.svid(WEB);
    let d = cache.client(&rotated, CART).unwrap();
    assert!(!Arc::ptr_eq(&a, &d));
    let s1 = cache.server(&web).unwrap();
    assert!(Arc::ptr_eq(&s1, &cache.server(&web).unwrap()));
    cache.set_roots(ca.roots());
    assert!(!Arc::ptr_eq(&s1, &cache.server(&web).unwrap()));
    assert!(a.alpn_protocols == vec![b"h2".to_vec()] && !a.enable_sni);
}

// ---------------------------------------------------------------------------------------------
// What the source tells the destination: the dialled service and the source's baggage

/// A pod of Deployment `web` (ReplicaSet hash in its name and label), version v1.
fn web_pod() -> mesh_api::Workload {
    mesh_api::Workload {
        uid: "uid-web".into(),
        name: "web-7d4b9c8f6-x2k9q".into(),
        namespace: "shop".into(),
        node: "a".into(),
        service_account: "web".into(),
        identity: WEB.parse().unwrap(),
        ips: vec!["10.1.2.3".parse().unwrap()],
        enrolled: true,
        mtls_mode: mesh_api::MtlsMode::Strict,
        labels: [
            ("pod-template-hash", "7d4b9c8f6"),
            ("app", "web"),
            ("version", "v1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    }
}

/// What the outbound proxy announces for a connection of `web_pod()` to Service shop/server.
fn web_to_server() -> hbone::Origin {
    hbone::Origin {
        src: "10.1.2.3:40000".parse().unwrap(),
        service: Some(mesh_api::NamespacedName::new("shop", "server")),
        baggage: Some(hbone::Baggage::of(&web_pod())),
    }
}

impl Client {
    async fn connect_from(
        &self,
        target: SocketAddr,
        origin: hbone::Origin,
    ) -> Result<hbone::HboneStream, HboneError> {
        let (cache, svid, dst_id) = (
            self.cache.clone(),
            self.svid.clone(),
            self.key.dst_identity.clone(),
        );
        self.pool
            .connect(&self.key, move || cache.client(&svid, &dst_id), target, origin)
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialled_service_and_baggage_go_on_the_wire_as_ztunnel_sends_them() {
    within(async {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = tls::server_config(&pki.cart, pki.ca.roots(), TD).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (s, _) = tls::accept(tcp, config, Duration::from_secs(5)).await.unwrap();
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let _ = tx.send(req.into_parts().0.headers);
            let resp = http::Response::builder().status(401).body(()).unwrap();
            respond.send_response(resp, true).unwrap();
            while conn.accept().await.is_some() {}
        });
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, addr);
        let target: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        client.connect_from(target, web_to_server()).await.unwrap_err();
        let headers = rx.await.unwrap();
        assert_eq!(
            headers.get("forwarded").unwrap(),
            "for=\"10.1.2.3:40000\";host=server.shop.svc.cluster.local"
        );
        assert_eq!(
            headers.get_all("baggage").iter().collect::<Vec<_>>(),
            ["k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web,service.version=v1"]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_reads_the_dialled_service_and_baggage_and_ignores_garbage() {
    within(async {
        let pki = pki();
        let upstream = echo_upstream().await;
        let server = TestServer::start(&pki.cart, pki.ca.roots(), TestHandler::default()).await;
        let client = Client::new(pki.web.clone(), pki.ca.roots(), CART, server.addr);
        let stream = client.connect_from(upstream, web_to_server()).await.unwrap();
        echo_through(stream, pattern(1000, 1)).await;
        let seen = server.handler.seen.lock().unwrap()[0].clone();
        assert_eq!(
            seen.service,
            Some(mesh_api::NamespacedName::new("shop", "server"))
        );
        assert_eq!(seen.baggage, hbone::Baggage::of(&web_pod()));
        assert_eq!(seen.forwarded_for, Some("10.1.2.3:40000".parse().unwrap()));

        // Oversized baggage and a host that is no service hostname: the stream is served, the
        // claims are dropped.
        let send = raw_h2(&pki.web, pki.ca.roots(), server.addr, CART).await;
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(upstream.to_string())
            .header("forwarded", "for=\"10.1.2.3:40001\";host=evil.example.com")
            .header("baggage", format!("service.name={}", "x,".repeat(2000)))
            .body(())
            .unwrap();
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, _tx) = ready.send_request(req, false).unwrap();
        assert_eq!(resp.await.unwrap().status(), 200);
        let seen = server.handler.seen.lock().unwrap()[1].clone();
        assert_eq!(seen.service, None);
        assert_eq!(seen.baggage, hbone::Baggage::default());
        assert_eq!(seen.forwarded_for, Some("10.1.2.3:40001".parse().unwrap()));
        drop(send);
    })
    .await
}
