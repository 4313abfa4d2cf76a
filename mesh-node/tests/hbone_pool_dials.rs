//! The HBONE pool's bookkeeping of dials in progress: a dial whose task ends before it finishes
//! (cancelled with its runtime, or panicking) leaves no pending entry behind and no caller
//! waiting on it.
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_node::proxy::hbone::{Dialer, HboneError, Pool, PoolConfig, PoolKey, PoolStats};
use mesh_node::tls::{self, TlsError};
use rustls::RootCertStore;

const DEADLINE: Duration = Duration::from_secs(10);

fn key() -> PoolKey {
    PoolKey {
        src_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
        dst_identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
        src: None,
        dst: "127.0.0.1:15008".parse().unwrap(),
    }
}

/// Any client config: these dials never get as far as TLS.
fn config() -> Result<Arc<tls::ClientConfig>, TlsError> {
    let cfg = tls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::InvalidMaterial(e.to_string()))?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

async fn connect(pool: &Pool) -> Result<(), HboneError> {
    let target: SocketAddr = "10.1.2.4:8080".parse().unwrap();
    let src: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    pool.connect(&key(), config, target, src).await.map(drop)
}

/// Waits (yielding to the runtime) until the pool's stats satisfy `f`.
async fn wait_stats(pool: &Pool, what: &str, f: impl Fn(&PoolStats) -> bool) {
    let start = Instant::now();
    loop {
        let s = pool.stats();
        if f(&s) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}; last seen {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

#[test]
fn a_dial_cancelled_before_it_finishes_leaves_nothing_pending() {
    // The first dial never connects; later ones are refused at once.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let dialer: Dialer = Arc::new(move |_, _| {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        Box::pin(async move {
            if first {
                std::future::pending::<()>().await;
            }
            Err(io::Error::from(io::ErrorKind::ConnectionRefused))
        })
    });
    let pool = Pool::with_dialer(PoolConfig::default(), dialer);

    let rt = runtime();
    rt.block_on(async {
        let caller = pool.clone();
        tokio::spawn(async move { connect(&caller).await });
        // Started means the dialer was called: a runtime shut down before that would leave the
        // never-connecting first dial to the next caller.
        let started = |s: &PoolStats| s.dialing == 1 && s.waiting == 1 && calls.load(Ordering::SeqCst) == 1;
        wait_stats(&pool, "the dial to start", started).await;
    });
    // Shutting the runtime down cancels the caller and the dial task mid-dial.
    drop(rt);
    assert_eq!(
        pool.stats(),
        PoolStats {
            dials: 1,
            ..PoolStats::default()
        },
        "the cancelled dial left its pending entry behind"
    );

    // The next caller dials afresh and hears that dial's own answer.
    let rt = runtime();
    let err = rt
        .block_on(async { tokio::time::timeout(DEADLINE, connect(&pool)).await })
        .expect("the second caller got an answer")
        .expect_err("the second dial was refused");
    assert_eq!(err.reason(), "connect", "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(pool.stats().dialing, 0);
}

#[test]
fn a_dial_whose_task_panics_fails_its_callers_and_leaves_nothing_pending() {
    let dialer: Dialer = Arc::new(|_, _| Box::pin(async { panic!("dialer bug") }));
    let pool = Pool::with_dialer(PoolConfig::default(), dialer);
    let rt = runtime();
    rt.block_on(async {
        let err = tokio::time::timeout(DEADLINE, connect(&pool))
            .await
            .expect("the caller heard of the failed dial instead of waiting on it forever")
            .expect_err("a dial that panicked cannot give a connection");
        assert_eq!(err.reason(), "cancelled", "{err}");
        let s = pool.stats();
        assert_eq!(
            s,
            PoolStats {
                dials: 1,
                ..PoolStats::default()
            },
            "one dial, and nothing left pending"
        );
    });
}
