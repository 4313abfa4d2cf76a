//! The certificate manager: keeps [`CertStore`] holding a valid certificate for every local
//! identity the control plane names, and nothing else.
//!
//! - An identity that appears gets a fresh key and a CSR at once.
//! - A certificate is renewed (new key, new CSR) at half its life, with jitter; the old one
//!   keeps serving until the new one has arrived and been verified.
//! - A failed request is retried with exponential backoff, faster as expiry nears; an
//!   expired certificate is withdrawn rather than served.
//! - An identity that left the node is forgotten: its request is cancelled, its certificate
//!   removed from the store, and its key wiped once the last connection using it lets go.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_api::Identity;
use rustls_pki_types::CertificateDer;
use tokio::sync::{watch, Semaphore};
use tokio::task::{AbortHandle, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::csr;
use super::schedule::{self, RenewPolicy, SlotView};
use super::signer::{SignError, Signer};
use super::store::{CertStore, Svid};
use super::verify::{verify_chain, VerifyError};

/// Re-plan at least this often, whatever the schedule says (a wall clock that jumped).
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Requests in flight at once: a node with many identities does not flood the CA.
const DEFAULT_CONCURRENCY: usize = 8;

/// Why one request for a certificate failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("generating the key or CSR: {0}")]
    Key(String),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("refused the signed certificate: {0}")]
    Verify(#[from] VerifyError),
}

struct Slot {
    current: Option<Arc<Svid>>,
    due: SystemTime,
    failures: u32,
    in_flight: Option<AbortHandle>,
}

impl Slot {
    fn view(&self) -> SlotView {
        SlotView {
            due: self.due,
            in_flight: self.in_flight.is_some(),
            not_after: self.current.as_ref().map(|s| s.not_after()),
        }
    }
}

type Outcome = (Identity, Result<Svid, RequestError>);

pub struct IdentityManager<S> {
    signer: Arc<S>,
    store: CertStore,
    roots: Arc<[CertificateDer<'static>]>,
    policy: RenewPolicy,
    permits: Arc<Semaphore>,
}

impl<S: Signer> IdentityManager<S> {
    /// A manager filling `store` with certificates from `signer`, accepted only when they
    /// chain to one of `roots` (the pinned mesh root, the `--controller-ca` file).
    pub fn new(signer: S, roots: Vec<CertificateDer<'static>>, store: CertStore) -> Self {
        IdentityManager {
            signer: Arc::new(signer),
            store,
            roots: roots.into(),
            policy: RenewPolicy::default(),
            permits: Arc::new(Semaphore::new(DEFAULT_CONCURRENCY)),
        }
    }

    pub fn with_policy(mut self, policy: RenewPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn store(&self) -> CertStore {
        self.store.clone()
    }

    /// Runs until `stop`, holding certificates for `identities(&desired)` as `desired`
    /// changes (for the control plane: `handle.subscribe()` and
    /// `|s| s.local_identities()`). If the sender goes away, the last set stays.
    pub async fn run<T, F>(self, mut desired: watch::Receiver<T>, identities: F, stop: CancellationToken)
    where
        T: Send + Sync,
        F: Fn(&T) -> BTreeSet<Identity> + Send,
    {
        let mut slots: BTreeMap<Identity, Slot> = BTreeMap::new();
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut want = identities(&desired.borrow_and_update());
        let mut desired_open = true;
        loop {
            let now = SystemTime::now();
            let views = slots.iter().map(|(id, s)| (id.clone(), s.view())).collect();
            let plan = schedule::plan(now, &want, &views);
            for id in plan.drop {
                if let Some(task) = slots.remove(&id).and_then(|s| s.in_flight) {
                    task.abort();
                }
                self.store.remove(&id);
                info!(identity = %id, "identity left this node; certificate and key dropped");
            }
            for id in plan.add {
                slots.insert(
                    id,
                    Slot {
                        current: None,
                        due: now,
                        failures: 0,
                        in_flight: None,
                    },
                );
            }
            for id in plan.expired {
                self.store.remove(&id);
                if let Some(slot) = slots.get_mut(&id) {
                    slot.current = None;
                }
                error!(identity = %id, "certificate expired before a renewal arrived; no longer served");
            }
            for id in plan.request {
                if let Some(slot) = slots.get_mut(&id) {
                    slot.in_flight = Some(tasks.spawn(request(
                        self.signer.clone(),
                        id,
                        self.roots.clone(),
                        self.permits.clone(),
                    )));
                }
            }
            let sleep = plan
                .wake_at
                .map_or(MAX_SLEEP, |t| t.duration_since(now).unwrap_or_default())
                .min(MAX_SLEEP);
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = desired.changed(), if desired_open => match changed {
                    Ok(()) => want = identities(&desired.borrow_and_update()),
                    Err(_) => desired_open = false,
                },
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    self.finished(joined, &mut slots);
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        tasks.abort_all();
    }

    fn finished(
        &self,
        joined: Result<(tokio::task::Id, Outcome), JoinError>,
        slots: &mut BTreeMap<Identity, Slot>,
    ) {
        let (task, result) = match joined {
            Ok((task, (_, result))) => (task, result),
            Err(e) if e.is_cancelled() => return,
            Err(e) => (
                e.id(),
                Err(RequestError::Key(format!("request task failed: {e}"))),
            ),
        };
        // A task of an identity dropped meanwhile finds no slot, and its result is dropped.
        let Some((id, slot)) = slots
            .iter_mut()
            .find(|(_, s)| s.in_flight.as_ref().is_some_and(|h| h.id() == task))
        else {
            return;
        };
        slot.in_flight = None;
        match result {
            Ok(svid) => {
                let svid = Arc::new(svid);
                slot.due = schedule::renew_at(
                    svid.received_at(),
                    svid.not_before(),
                    svid.not_after(),
                    &self.policy,
                    fastrand::f64(),
                );
                info!(
                    identity = %id,
                    serial = svid.serial(),
                    not_after = %humantime::format_rfc3339_seconds(svid.not_after()),
                    renew_at = %humantime::format_rfc3339_seconds(slot.due),
                    renewal = slot.current.is_some(),
                    "certificate issued"
                );
                slot.failures = 0;
                slot.current = Some(svid.clone());
                self.store.insert(svid);
            }
            Err(e) => {
                slot.failures = slot.failures.saturating_add(1);
                let now = SystemTime::now();
                let not_after = slot.current.as_ref().map(|s| s.not_after());
                slot.due = schedule::retry_at(now, slot.failures, not_after, &self.policy, fastrand::f64());
                let retry_in = slot.due.duration_since(now).unwrap_or_default();
                let serious = matches!(
                    e,
                    RequestError::Verify(_) | RequestError::Sign(SignError::Unauthenticated(_))
                );
                if serious {
                    error!(identity = %id, error = %e, failures = slot.failures, ?retry_in, "certificate request failed");
                } else {
                    warn!(identity = %id, error = %e, failures = slot.failures, ?retry_in, "certificate request failed");
                }
            }
        }
    }
}

/// One request: a new key, a CSR, the CA's answer, verified.
async fn request<S: Signer>(
    signer: Arc<S>,
    identity: Identity,
    roots: Arc<[CertificateDer<'static>]>,
    permits: Arc<Semaphore>,
) -> Outcome {
    let _permit = permits.acquire_owned().await;
    let result = async {
        let made = csr::generate(&identity).map_err(|e| RequestError::Key(e.to_string()))?;
        let chain = signer.sign(&identity, made.csr).await?;
        let now = SystemTime::now();
        let verified = verify_chain(&identity, &made.public_key, &chain, &roots, now)?;
        Ok(Svid::new(
            identity.clone(),
            verified,
            made.key,
            roots.clone(),
            now,
        ))
    }
    .await;
    (identity, result)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer;

    use super::*;
    use crate::identity::verify::tests::TestCa;

    /// Signs with a test CA; can be told to fail, or to sign for the wrong identity.
    struct FakeCa {
        ca: TestCa,
        lifetime: Duration,
        fail: AtomicBool,
        lie: AtomicBool,
        calls: AtomicUsize,
    }

    impl Signer for Arc<FakeCa> {
        async fn sign(&self, identity: &Identity, csr: Vec<u8>) -> Result<Vec<String>, SignError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(SignError::Unavailable("down for the test".into()));
            }
            let (_, req) = X509CertificationRequest::from_der(&csr).unwrap();
            let key = req
                .certification_request_info
                .subject_pki
                .subject_public_key
                .data
                .to_vec();
            let san = if self.lie.load(Ordering::SeqCst) {
                "spiffe://cluster.local/ns/shop/sa/someone-else".to_owned()
            } else {
                identity.to_string()
            };
            Ok(self.ca.sign(&key, &[&san], self.lifetime))
        }
    }

    fn id(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap()
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn requests_renews_keeps_serving_on_failure_and_drops() {
        let fake = Arc::new(FakeCa {
            ca: TestCa::new(),
            lifetime: Duration::from_secs(2),
            fail: AtomicBool::new(false),
            lie: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        let store = CertStore::new();
        let policy = RenewPolicy {
            min_interval: Duration::from_millis(100),
            backoff: crate::control::Backoff::new(Duration::from_millis(50), Duration::from_millis(200)),
            ..RenewPolicy::default()
        };
        let manager = IdentityManager::new(fake.clone(), vec![fake.ca.root_der.clone()], store.clone())
            .with_policy(policy);
        let (tx, rx) = watch::channel(BTreeSet::from([id("web"), id("api")]));
        let stop = CancellationToken::new();
        let task = tokio::spawn(manager.run(rx, BTreeSet::clone, stop.clone()));

        until("both certificates", || store.len() == 2).await;
        let first = store.get(&id("web")).unwrap();
        assert_eq!(first.identity(), &id("web"));
        // A 2 s certificate is renewed after about 1 s, with a new key.
        until("a renewal", || {
            store.get(&id("web")).unwrap().serial() != first.serial()
        })
        .await;
        let second = store.get(&id("web")).unwrap();
        assert_ne!(
            second.private_key().secret_der(),
            first.private_key().secret_der()
        );

        // The CA goes away: the certificate keeps serving while retries back off.
        fake.fail.store(true, Ordering::SeqCst);
        let calls = fake.calls.load(Ordering::SeqCst);
        until("retries", || fake.calls.load(Ordering::SeqCst) >= calls + 4).await;
        let held = store.get(&id("web")).expect("still served during the outage");
        assert!(held.is_valid_at(SystemTime::now()));
        // ... until it expires: then it is withdrawn, not served expired.
        until("expiry", || store.get(&id("web")).is_none()).await;
        // The CA is back: the identity gets a certificate again.
        fake.fail.store(false, Ordering::SeqCst);
        until("recovery", || store.get(&id("web")).is_some()).await;

        // A certificate for someone else is refused; the store keeps what it had.
        fake.lie.store(true, Ordering::SeqCst);
        tx.send_replace(BTreeSet::from([id("web"), id("api"), id("cart")]));
        let calls = fake.calls.load(Ordering::SeqCst);
        // A retry means the first answer was processed (and refused).
        until("a retry of the cart request", || {
            fake.calls.load(Ordering::SeqCst) >= calls + 2
        })
        .await;
        assert!(
            store.get(&id("cart")).is_none(),
            "a wrong certificate is never stored"
        );
        fake.lie.store(false, Ordering::SeqCst);
        until("cart", || store.get(&id("cart")).is_some()).await;

        // Identities that leave are dropped.
        tx.send_replace(BTreeSet::from([id("cart")]));
        until("web and api dropped", || store.len() == 1).await;
        assert!(store.get(&id("cart")).is_some());

        stop.cancel();
        task.await.unwrap();
    }
}
