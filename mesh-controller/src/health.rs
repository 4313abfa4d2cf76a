//! A tiny plain-HTTP health endpoint for the kubelet's probes:
//! - `GET /healthz/live`: 200 while the process serves requests at all;
//! - `GET /healthz/ready`: 200 once the source has loaded the cluster state (nodes can be
//!   served), 503 before. It stays 200 when the API server goes away later: the controller
//!   keeps serving the last state, which is better than no controller.
//!
//! One short request per connection, read with a deadline and a size bound; nothing else
//! is served.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::store::Store;

const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 4096;

/// Status and body for a request line's path (pure).
pub fn respond(path: &str, ready: bool) -> (u16, &'static str) {
    match path {
        "/healthz/live" | "/livez" => (200, "ok\n"),
        "/healthz/ready" | "/readyz" if ready => (200, "ready\n"),
        "/healthz/ready" | "/readyz" => (503, "the cluster state is not loaded yet\n"),
        _ => (404, "not found\n"),
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, store: Arc<Store>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "health endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let store = store.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(READ_TIMEOUT, answer(stream, &store)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, store: &Store) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (status, body) = match (parts.next(), parts.next()) {
        (Some("GET" | "HEAD"), Some(path)) => respond(path, store.latest().is_some()),
        _ => (400, "bad request\n"),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterState;

    #[test]
    fn paths() {
        assert_eq!(respond("/healthz/live", false).0, 200);
        assert_eq!(respond("/healthz/ready", false).0, 503);
        assert_eq!(respond("/healthz/ready", true).0, 200);
        assert_eq!(respond("/", true).0, 404);
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(Store::new("e".into()));
        let server = tokio::spawn(serve(listener, store.clone()));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz/ready").await.starts_with("HTTP/1.1 503 "));
        store.publish(ClusterState::default());
        assert!(get("/healthz/ready").await.starts_with("HTTP/1.1 200 "));
        assert!(get("/healthz/live").await.starts_with("HTTP/1.1 200 "));
        server.abort();
    }
}
