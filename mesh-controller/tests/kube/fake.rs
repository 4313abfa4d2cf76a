//! A fake API server behind kube's documented test seam: `tower_test::mock::pair` gives a
//! mock service for `kube::Client::new(mock, "default")` and a handle that receives each
//! request; a task answers them from shared state. Several clients (controller replicas)
//! can share one fake.
//!
//! What it models, because the controller depends on it:
//! - lists with a `resourceVersion`; watches that resume from a resource version by
//!   replaying the event log, or answer `410 Gone` (an ERROR event) once the log has been
//!   compacted past it; watches can be ended, expired, or refused with HTTP 410;
//! - create (409 AlreadyExists), update with optimistic concurrency (409 Conflict on a stale
//!   `resourceVersion`), JSON merge patch (also on `/status`), `metadata.generation` bumped on
//!   spec changes;
//! - TokenReview answers by token; RBAC refusals (403) by verb and resource; a response
//!   delay (a slow API server). Every request is recorded with the client that sent it.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

type Body = BoxBody<Bytes, Infallible>;

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Call {
    pub client: String,
    pub method: Method,
    pub path: String,
    pub query: String,
}

impl Call {
    pub fn is_watch(&self) -> bool {
        self.query.contains("watch=true")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
}

struct Watch {
    plural: String,
    tx: mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// By plural, then (namespace, name).
    objects: HashMap<String, BTreeMap<(String, String), Value>>,
    /// (rv, plural, event JSON) of every change.
    log: Vec<(u64, String, Value)>,
    /// Resumes from before this need a relist.
    compacted: u64,
    watches: Vec<Watch>,
    refuse_next_watch: HashMap<String, u16>,
    forbidden: HashMap<(Verb, String), ()>,
    tokens: HashMap<String, Value>,
    delay: Duration,
    calls: Vec<Call>,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn full(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())).boxed())
        .unwrap()
}

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().unwrap();
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A path's (plural, namespace, name, subresource).
type Route = (String, Option<String>, Option<String>, Option<String>);

fn route(path: &str) -> Option<Route> {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| path.strip_prefix("/apis/").and_then(|p| p.splitn(3, '/').nth(2)))?;
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let own = |s: &&str| s.to_string();
    Some(match parts.as_slice() {
        [plural] => (plural.to_string(), None, None, None),
        ["namespaces", ns, plural] => (plural.to_string(), Some(own(ns)), None, None),
        ["namespaces", ns, plural, name] => (plural.to_string(), Some(own(ns)), Some(own(name)), None),
        ["namespaces", ns, plural, name, sub] => {
            (plural.to_string(), Some(own(ns)), Some(own(name)), Some(own(sub)))
        }
        [plural, name] => (plural.to_string(), None, Some(own(name)), None),
        _ => return None,
    })
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

impl FakeApi {
    pub fn new() -> Self {
        FakeApi::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// A client whose requests this fake answers; `name` tags its requests.
    pub fn client(&self, name: &str) -> kube::Client {
        let (mock, mut handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
        let fake = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let fake = fake.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let response = fake.answer(&name, request).await;
                    send.send_response(response);
                });
            }
        });
        kube::Client::new(mock, "default")
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    pub fn forbid(&self, verb: Verb, plural: &str) {
        self.lock().forbidden.insert((verb, plural.to_owned()), ());
    }

    pub fn allow_all(&self) {
        self.lock().forbidden.clear();
    }

    /// What a TokenReview of `token` answers (its `status`).
    pub fn token(&self, token: &str, review_status: Value) {
        self.lock().tokens.insert(token.to_owned(), review_status);
    }

    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(plural)
            .and_then(|m| m.get(&(namespace.to_owned(), name.to_owned())))
            .cloned()
    }

    /// Creates or replaces an object, as a client would; watchers see it.
    pub fn apply(&self, plural: &str, object: Value) {
        self.write(plural, object, true);
    }

    /// Changes an object without telling the open watches (as if they had missed it).
    pub fn apply_quietly(&self, plural: &str, object: Value) {
        self.write(plural, object, false);
    }

    pub fn delete(&self, plural: &str, namespace: &str, name: &str) {
        self.remove(plural, namespace, name, true);
    }

    pub fn delete_quietly(&self, plural: &str, namespace: &str, name: &str) {
        self.remove(plural, namespace, name, false);
    }

    /// Forgets the event log: resuming from any earlier version answers 410 Gone.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.compacted = s.rv;
        s.log.clear();
    }

    /// Sends `410 Gone` on the open watches of `plural` and ends them.
    pub fn expire_watches(&self, plural: &str) {
        let gone = status(410, "Expired", "too old resource version");
        let event = json!({ "type": "ERROR", "object": gone });
        let mut s = self.lock();
        s.watches.retain(|w| {
            if w.plural == plural {
                let _ = w.tx.send(Ok(Frame::data(line(&event))));
                false
            } else {
                true
            }
        });
    }

    /// Ends the open watches of `plural` normally (as the server's timeout does).
    pub fn end_watches(&self, plural: &str) {
        self.lock().watches.retain(|w| w.plural != plural);
    }

    /// Refuses the next watch request of `plural` with this HTTP status.
    pub fn refuse_next_watch(&self, plural: &str, code: u16) {
        self.lock().refuse_next_watch.insert(plural.to_owned(), code);
    }

    pub fn open_watches(&self, plural: &str) -> usize {
        self.lock()
            .watches
            .iter()
            .filter(|w| w.plural == plural && !w.tx.is_closed())
            .count()
    }

    fn write(&self, plural: &str, object: Value, notify: bool) -> Value {
        write(&mut self.lock(), plural, object, notify)
    }

    fn remove(&self, plural: &str, namespace: &str, name: &str, notify: bool) {
        let mut s = self.lock();
        let Some(mut object) = s
            .objects
            .get_mut(plural)
            .and_then(|m| m.remove(&(namespace.to_owned(), name.to_owned())))
        else {
            return;
        };
        s.rv += 1;
        object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let event = json!({ "type": "DELETED", "object": object });
        let rv = s.rv;
        s.log.push((rv, plural.to_owned(), event.clone()));
        if notify {
            broadcast(&mut s, plural, &event);
        }
    }

    async fn answer(&self, client: &str, request: Request<kube::client::Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        self.answer_parts(client, parts, body).await
    }

    /// Serves this fake over plain HTTP (for a real binary with a kubeconfig) until dropped.
    pub async fn serve_http(self, listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let fake = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let fake = fake.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        Ok::<_, Infallible>(fake.answer_parts("http", parts, body).await)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    }

    async fn answer_parts(&self, client: &str, parts: http::request::Parts, body: Bytes) -> Response<Body> {
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or_default().to_owned();
        let delay = {
            let mut s = self.lock();
            s.calls.push(Call {
                client: client.to_owned(),
                method: parts.method.clone(),
                path: path.clone(),
                query: query.clone(),
            });
            s.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let Some((plural, namespace, name, sub)) = route(&path) else {
            return full(404, &status(404, "NotFound", &format!("no route {path}")));
        };
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let watch = query.contains("watch=true");
        let verb = match (&parts.method, name.is_some(), watch) {
            (&Method::GET, _, true) => Verb::Watch,
            (&Method::GET, true, false) => Verb::Get,
            (&Method::GET, false, false) => Verb::List,
            (&Method::POST, ..) => Verb::Create,
            (&Method::PUT, ..) => Verb::Update,
            _ => Verb::Patch,
        };
        let resource = match &sub {
            Some(sub) => format!("{plural}/{sub}"),
            None => plural.clone(),
        };
        if self.lock().forbidden.contains_key(&(verb, resource.clone())) {
            let message = format!("{resource} is forbidden: User \"system:serviceaccount:mesh-system:mesh-controller\" cannot {verb:?} resource \"{resource}\"");
            return full(403, &status(403, "Forbidden", &message.to_lowercase()));
        }
        let ns = namespace.clone().unwrap_or_default();
        match verb {
            Verb::Watch => self.watch(&plural, &query),
            Verb::List => {
                let s = self.lock();
                let items: Vec<Value> = s
                    .objects
                    .get(&plural)
                    .map(|m| {
                        m.values()
                            .filter(|o| namespace.is_none() || o["metadata"]["namespace"] == json!(ns))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                full(
                    200,
                    &json!({ "metadata": { "resourceVersion": s.rv.to_string() }, "items": items }),
                )
            }
            Verb::Get => match self.get(&plural, &ns, name.as_deref().unwrap()) {
                Some(o) => full(200, &o),
                None => full(
                    404,
                    &status(
                        404,
                        "NotFound",
                        &format!("{plural} \"{}\" not found", name.unwrap()),
                    ),
                ),
            },
            Verb::Create if plural == "tokenreviews" => {
                let token = body["spec"]["token"].as_str().unwrap_or_default();
                let answer =
                    self.lock().tokens.get(token).cloned().unwrap_or_else(
                        || json!({ "authenticated": false, "error": "invalid bearer token" }),
                    );
                let mut review = body.clone();
                review["status"] = answer;
                full(201, &review)
            }
            Verb::Create => {
                let mut object = body;
                object["metadata"]["namespace"] = json!(ns);
                let key = key_of(&object);
                let mut s = self.lock();
                if s.objects.get(&plural).is_some_and(|m| m.contains_key(&key)) {
                    let message = format!("{plural} \"{}\" already exists", key.1);
                    return full(409, &status(409, "AlreadyExists", &message));
                }
                let stored = write(&mut s, &plural, object, true);
                full(201, &stored)
            }
            Verb::Update => {
                let name = name.unwrap();
                let mut s = self.lock();
                let Some(current) = s.objects.get(&plural).and_then(|m| m.get(&(ns.clone(), name))) else {
                    return full(404, &status(404, "NotFound", "not found"));
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    let message = "the object has been modified; please apply your changes to the latest version and try again";
                    return full(409, &status(409, "Conflict", message));
                }
                let stored = write(&mut s, &plural, body, true);
                full(200, &stored)
            }
            Verb::Patch => {
                let name = name.unwrap();
                let mut s = self.lock();
                let Some(mut object) = s
                    .objects
                    .get(&plural)
                    .and_then(|m| m.get(&(ns.clone(), name)))
                    .cloned()
                else {
                    return full(404, &status(404, "NotFound", "not found"));
                };
                match sub.as_deref() {
                    // The status subresource changes the status only.
                    Some("status") => merge_patch(&mut object["status"], &body["status"]),
                    _ => {
                        let mut patch = body;
                        if let Some(o) = patch.as_object_mut() {
                            o.remove("status");
                        }
                        merge_patch(&mut object, &patch);
                    }
                }
                let stored = write(&mut s, &plural, object, true);
                full(200, &stored)
            }
        }
    }

    fn watch(&self, plural: &str, query: &str) -> Response<Body> {
        let mut s = self.lock();
        if let Some(code) = s.refuse_next_watch.remove(plural) {
            return full(code, &status(code, "Expired", "too old resource version"));
        }
        let from: u64 = query_param(query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(s.rv);
        let (tx, rx) = mpsc::unbounded_channel();
        if from < s.compacted {
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", s.compacted),
            );
            let _ = tx.send(Ok(Frame::data(line(&json!({ "type": "ERROR", "object": gone })))));
        } else {
            for (_, _, event) in s.log.iter().filter(|(rv, p, _)| *rv > from && p == plural) {
                let _ = tx.send(Ok(Frame::data(line(event))));
            }
            s.watches.push(Watch {
                plural: plural.to_owned(),
                tx,
            });
        }
        let body = StreamBody::new(UnboundedReceiverStream::new(rx).map(|frame| frame));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(body.boxed())
            .unwrap()
    }
}

fn line(event: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(event).unwrap();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn broadcast(s: &mut State, plural: &str, event: &Value) {
    s.watches
        .retain(|w| w.plural != plural || w.tx.send(Ok(Frame::data(line(event)))).is_ok());
}

fn write(s: &mut State, plural: &str, mut object: Value, notify: bool) -> Value {
    s.rv += 1;
    let rv = s.rv;
    let key = key_of(&object);
    let previous = s.objects.get(plural).and_then(|m| m.get(&key)).cloned();
    let generation = match &previous {
        Some(p) if p["spec"] != object["spec"] => p["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
        Some(p) => p["metadata"]["generation"].as_i64().unwrap_or(1),
        None => 1,
    };
    let meta = object["metadata"].as_object_mut().unwrap();
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    meta.insert("generation".into(), json!(generation));
    if !meta.contains_key("uid") {
        let uid = previous
            .as_ref()
            .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("uid-{plural}-{}-{}", key.0, key.1));
        meta.insert("uid".into(), json!(uid));
    }
    let kind = if previous.is_some() { "MODIFIED" } else { "ADDED" };
    s.objects
        .entry(plural.to_owned())
        .or_default()
        .insert(key, object.clone());
    let event = json!({ "type": kind, "object": object });
    s.log.push((rv, plural.to_owned(), event.clone()));
    if notify {
        broadcast(s, plural, &event);
    }
    object
}
