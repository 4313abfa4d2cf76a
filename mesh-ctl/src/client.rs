//! The node's admin API over HTTP/1.1, on TCP or a Unix socket: one connection per request,
//! bounded in time, with the API version checked on every answer before anything else is read.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use mesh_api::admin::{ErrorBody, API_VERSION, VERSION_HEADER};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::error::Error;

/// Admin answers are small documents; anything much larger is not one.
const MAX_BODY: usize = 64 << 20;

/// Where a node's admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`, resolved when connecting.
    Tcp(String),
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(addr) => f.write_str(addr),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Checks `--node`: a host (name, IPv4, or `[IPv6]`) and a port. Only the form is checked
/// here; whether the host resolves is found out when connecting.
pub fn parse_node_addr(value: &str) -> Result<String, String> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| format!("{value:?} is not HOST:PORT (e.g. 127.0.0.1:15000)"))?;
    if host.is_empty() {
        return Err(format!("{value:?} has no host (e.g. 127.0.0.1:15000)"));
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{value:?}: {v6:?} is not an IPv6 address"));
        }
    } else if host.contains(':') {
        return Err(format!(
            "{value:?}: write an IPv6 address in brackets, as in [::1]:15000"
        ));
    } else if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return Err(format!("{value:?}: {host:?} is not a host name or address"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(value.to_owned()),
        _ => Err(format!(
            "{value:?}: port {port:?} is not a number from 1 to 65535"
        )),
    }
}

/// What the answer's version header says about the node, decided without any I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiVersion {
    Matches,
    /// The node's version, as it wrote it.
    Differs(String),
    Missing,
}

pub fn api_version(header: Option<&HeaderValue>) -> ApiVersion {
    let Some(value) = header else {
        return ApiVersion::Missing;
    };
    let text = String::from_utf8_lossy(value.as_bytes()).trim().to_owned();
    if text.parse::<u32>() == Ok(API_VERSION) {
        ApiVersion::Matches
    } else {
        ApiVersion::Differs(text)
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    connect_timeout: Duration,
    timeout: Duration,
}

/// A connected stream of either kind.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

impl Client {
    pub fn new(target: Target, connect_timeout: Duration, timeout: Duration) -> Self {
        Client {
            target,
            connect_timeout,
            timeout,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let body = self.request(Method::GET, path, None).await?;
        self.decode(path, &body)
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, Error> {
        let json =
            serde_json::to_vec(body).map_err(|e| Error::Local(format!("encoding the request: {e}")))?;
        let answer = self.request(Method::PUT, path, Some(json)).await?;
        self.decode(path, &answer)
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T, Error> {
        serde_json::from_slice(body).map_err(|e| Error::BadAnswer {
            target: self.target.to_string(),
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    async fn request(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, Error> {
        let exchange = async {
            let stream = self.connect().await?;
            self.exchange(stream, method.clone(), path, body).await
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| self.unreachable(format!("no answer within {}", show(self.timeout))))?
    }

    fn unreachable(&self, reason: String) -> Error {
        Error::Unreachable {
            target: self.target.to_string(),
            reason,
        }
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, Error> {
        let within = |what: &str| format!("{what} did not succeed within {}", show(self.connect_timeout));
        match &self.target {
            Target::Tcp(addr) => {
                let addrs =
                    tokio::time::timeout(self.connect_timeout, tokio::net::lookup_host(addr.as_str()))
                        .await
                        .map_err(|_| self.unreachable(within("resolving the host")))?
                        .map_err(|e| self.unreachable(format!("cannot resolve the host: {e}")))?;
                let mut last = None;
                for sockaddr in addrs {
                    match tokio::time::timeout(self.connect_timeout, TcpStream::connect(sockaddr)).await {
                        Ok(Ok(stream)) => return Ok(Box::new(stream)),
                        // The address is worth naming only when the host was a name.
                        Ok(Err(e)) if sockaddr.to_string() == *addr => last = Some(describe(&e)),
                        Ok(Err(e)) => last = Some(format!("{sockaddr}: {}", describe(&e))),
                        Err(_) => last = Some(within(&format!("connecting to {sockaddr}"))),
                    }
                }
                Err(self.unreachable(last.unwrap_or_else(|| "the host has no address".into())))
            }
            Target::Unix(path) => tokio::time::timeout(self.connect_timeout, UnixStream::connect(path))
                .await
                .map_err(|_| self.unreachable(within("connecting")))?
                .map(|s| Box::new(s) as Box<dyn Stream>)
                .map_err(|e| self.unreachable(describe(&e))),
        }
    }

    async fn exchange(
        &self,
        stream: Box<dyn Stream>,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, Error> {
        let broken = |e: hyper::Error| self.unreachable(format!("the connection failed: {e}"));
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(broken)?;
        let driver = tokio::spawn(connection);
        let host = match &self.target {
            Target::Tcp(addr) => addr.as_str(),
            Target::Unix(_) => "localhost",
        };
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, host)
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.unreachable(format!("cannot address a request to it: {e}")))?;
        let response = sender.send_request(request).await.map_err(broken)?;
        let (parts, incoming) = response.into_parts();
        let target = self.target.to_string();
        // The version first: a node of another version may not even have this path.
        match api_version(parts.headers.get(VERSION_HEADER)) {
            ApiVersion::Matches => {}
            ApiVersion::Differs(node) => {
                return Err(Error::VersionMismatch {
                    target,
                    node,
                    ours: API_VERSION,
                })
            }
            ApiVersion::Missing => {
                return Err(Error::NotAdminApi {
                    target,
                    header: VERSION_HEADER,
                    ours: API_VERSION,
                })
            }
        }
        let bytes = Limited::new(incoming, MAX_BODY)
            .collect()
            .await
            .map_err(|e| self.unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        driver.abort();
        if parts.status.is_success() {
            return Ok(bytes);
        }
        Err(Error::NodeAnswered {
            target,
            method: method.to_string(),
            path: path.to_owned(),
            status: parts.status.as_u16(),
            message: error_message(parts.status, &bytes),
        })
    }
}

/// The node's own words for an error: its [`ErrorBody`], or the first line of whatever it sent.
fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(ErrorBody { error }) = serde_json::from_slice(body) {
        return error;
    }
    let text = String::from_utf8_lossy(body);
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => line.chars().take(200).collect(),
        None => status.canonical_reason().unwrap_or("error").to_owned(),
    }
}

/// An I/O error in words, without Rust's `(os error N)` suffix.
fn describe(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused (is mesh-node running, with its admin API there?)".into(),
        NotFound => "no such socket (is mesh-node running with --admin-socket there?)".into(),
        PermissionDenied => "permission denied (run as root or as mesh-node's user)".into(),
        _ => e.to_string(),
    }
}

fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses() {
        for good in [
            "127.0.0.1:15000",
            "node-a.example:15000",
            "[::1]:15000",
            "localhost:1",
        ] {
            assert_eq!(parse_node_addr(good).as_deref(), Ok(good));
        }
        for bad in [
            "127.0.0.1",
            ":15000",
            "::1:15000",
            "host:0",
            "host:http",
            "host:70000",
            "[nope]:15000",
            "a b:15000",
            "a/b:15000",
        ] {
            assert!(parse_node_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_version_header_decides_the_match() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(api_version(Some(&v("1"))), ApiVersion::Matches);
        assert_eq!(api_version(Some(&v(" 1 "))), ApiVersion::Matches);
        assert_eq!(api_version(Some(&v("2"))), ApiVersion::Differs("2".into()));
        assert_eq!(api_version(Some(&v("v1"))), ApiVersion::Differs("v1".into()));
        assert_eq!(api_version(None), ApiVersion::Missing);
    }

    #[test]
    fn error_answers_are_one_readable_line() {
        let body = serde_json::to_vec(&ErrorBody {
            error: "no such path".into(),
        })
        .unwrap();
        assert_eq!(error_message(StatusCode::NOT_FOUND, &body), "no such path");
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, b"\n  upstream down\nmore"),
            "upstream down"
        );
        assert_eq!(
            error_message(StatusCode::SERVICE_UNAVAILABLE, b""),
            "Service Unavailable"
        );
    }
}
