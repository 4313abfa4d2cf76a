//! Ca.Sign over the wire: a good request, and each refusal with its status code.

use mesh_api::client::ca_client;
use mesh_api::pb::SignRequest;
use rcgen::SanType;
use tonic::Code;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

use crate::harness::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

#[tokio::test]
async fn signs_an_svid_for_a_pod_on_the_node() {
    let h = Harness::start().await;
    let mut ca = ca_client(h.channel(&h.tcp_target()).await, credentials("node-a", "token-a"));
    let request = SignRequest {
        csr: csr(&[WEB], vec![]),
        identity: WEB.into(),
    };
    let chain = ca.sign(request).await.unwrap().into_inner().cert_chain;
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], h.root_pem, "the chain ends with the root");

    let (leaf_der, root_der) = (der_of_pem(&chain[0]), der_of_pem(&h.root_pem));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("signed by the root");
    assert_eq!(leaf.issuer(), root.subject());
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        [GeneralName::URI(WEB)],
        "the SPIFFE ID and nothing else"
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(leaf.validity().is_valid());
}

#[tokio::test]
async fn refusals_carry_the_right_status() {
    let h = Harness::start().await;
    let channel = h.channel(&h.tcp_target()).await;
    const DB: &str = "spiffe://cluster.local/ns/plain/sa/default";
    const FOREIGN: &str = "spiffe://evil.org/ns/shop/sa/web";
    let evil_dns = SanType::DnsName("evil.example".try_into().unwrap());
    struct Case {
        what: &'static str,
        node: &'static str,
        token: &'static str,
        identity: &'static str,
        csr: Vec<u8>,
        code: Code,
    }
    let case = |what, node, token, identity, csr, code| Case {
        what,
        node,
        token,
        identity,
        csr,
        code,
    };
    let cases = [
        case(
            "a pod of another node",
            "node-a",
            "token-a",
            CART,
            csr(&[CART], vec![]),
            Code::PermissionDenied,
        ),
        case(
            "a pod not enrolled",
            "node-a",
            "token-a",
            DB,
            csr(&[DB], vec![]),
            Code::PermissionDenied,
        ),
        case(
            "another trust domain",
            "node-a",
            "token-a",
            FOREIGN,
            csr(&[FOREIGN], vec![]),
            Code::PermissionDenied,
        ),
        case(
            "an unknown node",
            "node-z",
            "token-a",
            WEB,
            csr(&[WEB], vec![]),
            Code::Unauthenticated,
        ),
        case(
            "a wrong token",
            "node-a",
            "token-b",
            WEB,
            csr(&[WEB], vec![]),
            Code::Unauthenticated,
        ),
        case(
            "an extra SAN",
            "node-a",
            "token-a",
            WEB,
            csr(&[WEB], vec![evil_dns]),
            Code::InvalidArgument,
        ),
        case(
            "a SAN unlike the identity",
            "node-a",
            "token-a",
            WEB,
            csr(&[CART], vec![]),
            Code::InvalidArgument,
        ),
        case(
            "no CSR",
            "node-a",
            "token-a",
            WEB,
            b"garbage".to_vec(),
            Code::InvalidArgument,
        ),
        case(
            "no identity",
            "node-a",
            "token-a",
            "web",
            csr(&[WEB], vec![]),
            Code::InvalidArgument,
        ),
    ];
    for Case {
        what,
        node,
        token,
        identity,
        csr,
        code,
    } in cases
    {
        let mut ca = ca_client(channel.clone(), credentials(node, token));
        let status = ca
            .sign(SignRequest {
                csr,
                identity: identity.into(),
            })
            .await
            .expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(!status.message().is_empty(), "{what}");
    }

    // Without credentials at all.
    let mut bare = mesh_api::pb::ca_client::CaClient::new(channel.clone());
    let status = bare
        .sign(SignRequest {
            csr: csr(&[WEB], vec![]),
            identity: WEB.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // The same checks guard the config stream.
    let refused = Watch::open(channel.clone(), credentials("node-a", "nope"), "node-a", None)
        .await
        .err();
    assert_eq!(refused.map(|s| s.code()), Some(Code::Unauthenticated));
    let mut posing = Watch::open(channel, credentials("node-a", "token-a"), "node-b", None)
        .await
        .unwrap();
    assert_eq!(
        posing.next_result().await.unwrap_err().code(),
        Code::PermissionDenied
    );
}
