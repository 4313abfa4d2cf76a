//! `meshctl node ...` and `meshctl version` against a stand-in node: an HTTP/1.1 server on
//! loopback and on a Unix socket serving the admin API documents of `tests/fixtures`, which can
//! also answer as a node of another API version, with errors, or not at all.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_api::admin::{self, BpfInfo, LogLevel, Status, WorkloadInfo, VERSION_HEADER};
use mesh_ctl::node;
use serde_json::Value;
use tokio::sync::oneshot;

use common::{meshctl, meshctl_with, one_line, Out};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// How the stand-in answers.
#[derive(Clone)]
struct Behaviour {
    /// The version header; none leaves it out.
    header: Option<&'static str>,
    /// The `api` in its status document.
    status_api: u32,
    /// Every answer this status and body instead.
    fail: Option<(u16, &'static str)>,
    /// Accept connections, never answer.
    hang: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            header: Some("1"),
            status_api: 1,
            fail: None,
            hang: false,
        }
    }
}

struct FakeNode {
    addr: SocketAddr,
    socket: PathBuf,
    log_filter: Arc<Mutex<String>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl FakeNode {
    fn start(behaviour: Behaviour) -> FakeNode {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tcp.set_nonblocking(true).unwrap();
        let unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        unix.set_nonblocking(true).unwrap();
        let addr = tcp.local_addr().unwrap();
        let log_filter = Arc::new(Mutex::new("info".to_owned()));
        let (stop, stopped) = oneshot::channel();
        let filter = log_filter.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(serve(tcp, unix, behaviour, filter, stopped));
        });
        FakeNode {
            addr,
            socket,
            log_filter,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn node(&self) -> String {
        self.addr.to_string()
    }

    /// `meshctl ARGS --node <this node>`
    fn meshctl(&self, args: &[&str]) -> Out {
        let mut all = args.to_vec();
        let node = self.node();
        all.extend(["--node", &node]);
        meshctl(&all)
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    tcp: std::net::TcpListener,
    unix: std::os::unix::net::UnixListener,
    behaviour: Behaviour,
    filter: Arc<Mutex<String>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
    let unix = tokio::net::UnixListener::from_std(unix).unwrap();
    let serve_one = |io: Box<dyn Io>| {
        let behaviour = behaviour.clone();
        let filter = filter.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let behaviour = behaviour.clone();
                let filter = filter.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, &behaviour, &filter).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service)
                .await;
        });
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            Ok((stream, _)) = tcp.accept() => serve_one(Box::new(stream)),
            Ok((stream, _)) = unix.accept() => serve_one(Box::new(stream)),
        }
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

async fn answer(request: Request<Incoming>, b: &Behaviour, filter: &Mutex<String>) -> Response<Full<Bytes>> {
    if b.hang {
        std::future::pending::<()>().await;
    }
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let (status, text) = match b.fail {
        Some((code, text)) => (code, text.to_owned()),
        None => route(&parts.method, parts.uri.path(), &body, b, filter),
    };
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json");
    if let Some(version) = b.header {
        response = response.header(VERSION_HEADER, version);
    }
    response.body(Full::new(Bytes::from(text))).unwrap()
}

fn route(method: &Method, path: &str, body: &[u8], b: &Behaviour, filter: &Mutex<String>) -> (u16, String) {
    let documents = [
        (admin::paths::WORKLOADS, "workloads"),
        (admin::paths::SERVICES, "services"),
        (admin::paths::POLICIES, "policies"),
        (admin::paths::CERTS, "certs"),
        (admin::paths::CONNECTIONS, "connections"),
        (admin::paths::BPF, "bpf"),
    ];
    match (method.clone(), path) {
        (Method::GET, admin::paths::STATUS) => {
            let mut status: Status = serde_json::from_str(&fixture("status")).unwrap();
            status.api = b.status_api;
            (200, serde_json::to_string(&status).unwrap())
        }
        (Method::GET, admin::paths::LOG_LEVEL) => (
            200,
            serde_json::to_string(&LogLevel {
                filter: filter.lock().unwrap().clone(),
            })
            .unwrap(),
        ),
        (Method::PUT, admin::paths::LOG_LEVEL) => match serde_json::from_slice::<LogLevel>(body) {
            Ok(level) => {
                *filter.lock().unwrap() = level.filter.clone();
                (200, serde_json::to_string(&level).unwrap())
            }
            Err(e) => (400, serde_json::json!({ "error": e.to_string() }).to_string()),
        },
        (Method::GET, path) => match documents.iter().find(|(p, _)| *p == path) {
            Some((_, name)) => (200, fixture(name)),
            None => (404, r#"{"error": "no such path"}"#.to_owned()),
        },
        _ => (405, r#"{"error": "method not allowed"}"#.to_owned()),
    }
}

#[test]
fn each_node_command_prints_its_table() {
    let node = FakeNode::start(Behaviour::default());
    let workloads: Vec<WorkloadInfo> = serde_json::from_str(&fixture("workloads")).unwrap();
    let bpf: BpfInfo = serde_json::from_str(&fixture("bpf")).unwrap();
    let out = node.meshctl(&["node", "workloads"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, node::workloads_table(&workloads, 80));
    let out = node.meshctl(&["node", "bpf"]);
    assert_eq!(out.stdout, node::bpf_tables(&bpf, 80));
    for (command, header) in [
        ("status", "node:"),
        ("services", "SERVICE"),
        ("policies", "POLICY"),
        ("certs", "IDENTITY"),
        ("connections", "DIR"),
    ] {
        let out = node.meshctl(&["node", command]);
        assert_eq!(out.code, 0, "{command}: {out:?}");
        assert!(out.stdout.starts_with(header), "{command}: {}", out.stdout);
        assert!(out.stderr.is_empty(), "{command}: {out:?}");
        for line in out.stdout.lines() {
            assert!(line.chars().count() <= 80, "{command}: {line:?}");
        }
    }
}

#[test]
fn json_and_yaml_are_the_node_s_documents() {
    let node = FakeNode::start(Behaviour::default());
    for (command, name) in [
        ("workloads", "workloads"),
        ("connections", "connections"),
        ("bpf", "bpf"),
    ] {
        let want: Value = serde_json::from_str(&fixture(name)).unwrap();
        let out = node.meshctl(&["node", command, "-o", "json"]);
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap(),
            want,
            "{command}"
        );
        let out = node.meshctl(&["-o", "yaml", "node", command]);
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(
            serde_norway::from_str::<Value>(&out.stdout).unwrap(),
            want,
            "{command}"
        );
    }
}

#[test]
fn over_the_unix_socket() {
    let node = FakeNode::start(Behaviour::default());
    let socket = node.socket.display().to_string();
    let out = meshctl(&["node", "status", "--socket", &socket]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("node:         node-a\n"), "{}", out.stdout);
    let out = meshctl_with(&["node", "status"], &[("MESHCTL_SOCKET", &socket)]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn tables_follow_the_terminal_width() {
    let node = FakeNode::start(Behaviour::default());
    let mut args = vec!["node", "connections", "--node"];
    let addr = node.node();
    args.push(&addr);
    let out = meshctl_with(&args, &[("COLUMNS", "200")]);
    assert!(
        out.stdout
            .contains("svc payments-processing-eu-west/ledger-reconciliation-api-internal\n"),
        "{}",
        out.stdout
    );
    let out = meshctl_with(&args, &[("COLUMNS", "70")]);
    assert!(
        out.stdout.lines().all(|l| l.chars().count() <= 70),
        "{}",
        out.stdout
    );
}

#[test]
fn version_shows_both_sides() {
    let node = FakeNode::start(Behaviour::default());
    let out = node.meshctl(&["version"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        format!(
            "meshctl    {} (admin API v1)\nmesh-node  0.1.0 (admin API v1) on node node-a at {}\n",
            env!("CARGO_PKG_VERSION"),
            node.node()
        )
    );
    let out = node.meshctl(&["version", "-o", "json"]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["node"]["name"], "node-a");
    assert_eq!(v["api"], 1);
}

#[test]
fn a_node_of_another_api_version_is_refused_in_one_line() {
    let node = FakeNode::start(Behaviour {
        header: Some("2"),
        fail: Some((404, r#"{"error": "no such path"}"#)),
        ..Behaviour::default()
    });
    for command in [&["node", "status"][..], &["node", "workloads"], &["version"]] {
        let out = node.meshctl(command);
        assert_eq!(out.code, 4, "{command:?}: {out:?}");
        assert_eq!(
            one_line(&out),
            format!(
                "meshctl: node {} speaks admin API v2, this meshctl speaks v1; use a matching meshctl",
                node.node()
            )
        );
    }
}

#[test]
fn a_status_of_another_api_version_is_refused() {
    let node = FakeNode::start(Behaviour {
        status_api: 2,
        ..Behaviour::default()
    });
    let out = node.meshctl(&["node", "status"]);
    assert_eq!(out.code, 4, "{out:?}");
    assert!(one_line(&out).contains("speaks admin API v2"), "{out:?}");
}

#[test]
fn something_else_on_the_port_is_not_a_node() {
    let node = FakeNode::start(Behaviour {
        header: None,
        ..Behaviour::default()
    });
    let out = node.meshctl(&["node", "status"]);
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        one_line(&out).contains("answered without the x-mesh-admin-api header"),
        "{out:?}"
    );
}

#[test]
fn a_node_error_is_its_message_and_exit_5() {
    let node = FakeNode::start(Behaviour {
        fail: Some((503, r#"{"error": "the datapath is not started yet"}"#)),
        ..Behaviour::default()
    });
    let out = node.meshctl(&["node", "bpf"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert_eq!(
        one_line(&out),
        format!(
            "meshctl: node {} answered 503 to GET /v1/bpf: the datapath is not started yet",
            node.node()
        )
    );
    let garbled = FakeNode::start(Behaviour {
        fail: Some((200, "[1, 2")),
        ..Behaviour::default()
    });
    let out = garbled.meshctl(&["node", "workloads"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        one_line(&out).contains("sent an unreadable answer to /v1/workloads"),
        "{out:?}"
    );
}

#[test]
fn a_node_that_never_answers_times_out() {
    let node = FakeNode::start(Behaviour {
        hang: true,
        ..Behaviour::default()
    });
    let started = Instant::now();
    let out = node.meshctl(&["node", "status", "--timeout", "500ms"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(one_line(&out).ends_with("no answer within 500ms"), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn the_log_level_is_read_and_set() {
    let node = FakeNode::start(Behaviour::default());
    let out = node.meshctl(&["node", "log-level"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "info\n"), "{out:?}");
    let out = node.meshctl(&["node", "log-level", "info,mesh_node::proxy=debug"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "info,mesh_node::proxy=debug\n");
    assert_eq!(*node.log_filter.lock().unwrap(), "info,mesh_node::proxy=debug");
}
