//! CA throughput: what one `Ca.Sign` costs without the network. Reading the CSR (parse and
//! signature check), the decision and the signing are timed apart and together.
//! Run with `cargo bench -p mesh-controller --bench sign`; `SIGN_BENCH_N` sets the count.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mesh_api::{Identity, TrustDomain};
use mesh_controller::ca::{csr, Ca};
use rcgen::{CertificateParams, KeyPair, SanType};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn main() {
    let n: usize = std::env::var("SIGN_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::load_or_create(dir.path(), Duration::from_secs(24 * 3600)).expect("CA");
    let identity: Identity = WEB.parse().expect("identity");
    let allowed = BTreeSet::from([identity.clone()]);
    let trust_domain = TrustDomain::default();

    // A handful of distinct P-256 CSRs, as nodes send them, reused round-robin.
    let csrs: Vec<Vec<u8>> = (0..16)
        .map(|_| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::URI(WEB.try_into().expect("uri"))];
            params.serialize_request(&key).expect("csr").der().to_vec()
        })
        .collect();

    let mut inspected = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let info = csr::inspect(&csrs[i % csrs.len()]).expect("inspect");
        csr::decide("node-a", &identity, &trust_domain, &allowed, &info).expect("decide");
        inspected.push(info);
    }
    let checking = start.elapsed();
    let start = Instant::now();
    for info in &inspected {
        ca.sign(&identity, info).expect("sign");
    }
    let signing = start.elapsed();

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("CSR parse + verify + decide: {:>8.0} /s", rate(checking));
    println!("certificate signing:         {:>8.0} /s", rate(signing));
    println!(
        "Ca.Sign end to end (no I/O): {:>8.0} signatures/s over {n}",
        rate(checking + signing)
    );
}
