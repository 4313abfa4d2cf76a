//! The `mesh-controller` binary: flags, logging and wiring; the work is in the library.

mod cli;

use std::net::IpAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use mesh_api::client::SERVER_NAME;
use mesh_controller::ca::{publish_trust_bundle, Ca, SecretRoot};
use mesh_controller::server::auth::{NodeAuthenticator, TokenFiles};
use mesh_controller::server::token_review::{TokenReviewAuth, TokenReviewConfig};
use mesh_controller::server::{self, Controller, Listeners};
use mesh_controller::sources::file::FileSource;
use mesh_controller::sources::kubernetes::{leader, KubernetesSource, Options};
use mesh_controller::sources::Source;
use mesh_controller::store::{random_epoch, Store};
use rcgen::SanType;
use tokio::net::{TcpListener, UnixListener};
use tracing_subscriber::EnvFilter;

use crate::cli::{Args, Command, KubernetesArgs, LogFormat, SourceArg};

/// The service account namespace file of a pod.
const SA_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// How often the trust bundle ConfigMap is checked (and restored if someone changed it).
const TRUST_BUNDLE_RESYNC: Duration = Duration::from_secs(300);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Crds { out_dir }) = &args.command {
        return write_crds(out_dir.as_deref());
    }
    // The Kubernetes client asks rustls for the process's provider; with more than one
    // compiled in (feature unification in a workspace build) there would be none.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    tokio::runtime::Runtime::new()
        .context("starting the runtime")?
        .block_on(run(args))
}

fn write_crds(out_dir: Option<&Path>) -> anyhow::Result<()> {
    let files = mesh_controller::crd::crd_files();
    match out_dir {
        None => files.iter().for_each(|f| print!("---\n{}", f.yaml)),
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for f in files {
                let path = dir.join(&f.name);
                std::fs::write(&path, f.yaml).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let epoch = random_epoch().context("the system random generator failed")?;
    let store = Arc::new(Store::new(epoch.clone()));
    if let Some(addr) = args.health_listen.0 {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-listen {addr}"))?;
        tokio::spawn(mesh_controller::health::serve(listener, store.clone()));
    }
    match args.source.clone() {
        Some(SourceArg::File(dir)) => {
            let source = FileSource::new(dir.clone())?;
            let auth = TokenFiles::new(args.tokens_dir.clone()).context("--tokens-dir")?;
            let ca = Ca::load_or_create(&args.ca_dir, args.cert_ttl).context("loading the CA")?;
            let described = format!("file:{}", dir.display());
            serve(&args, store, epoch, ca, auth, source, described).await
        }
        Some(SourceArg::Kubernetes) => run_kubernetes(&args, store, epoch).await,
        None => bail!("--source is required"),
    }
}

async fn run_kubernetes(args: &Args, store: Arc<Store>, epoch: String) -> anyhow::Result<()> {
    let k = &args.kubernetes;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let namespace = own_namespace(k);
    let identity = match &k.pod_name {
        Some(name) => name.clone(),
        None => hostname().context("no --pod-name (POD_NAME) and no host name")?,
    };

    // The CA first: without it nothing can be served. The API may be slow to answer at
    // start; keep trying (the health endpoint says live, not ready, meanwhile).
    let secret_root = SecretRoot::new(client.clone(), &namespace, &k.ca_secret);
    let mut delay = Duration::from_millis(500);
    let ca = loop {
        match Ca::from_store(&secret_root, args.cert_ttl).await {
            Ok(ca) => break ca,
            Err(mesh_controller::ca::CaError::Api(e)) => {
                tracing::error!(verb = e.verb, resource = %e.resource, "cannot load the mesh root: {e}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e).context("loading the mesh root"),
        }
    };
    tokio::spawn(keep_trust_bundle(
        client.clone(),
        namespace.clone(),
        k.trust_bundle.clone(),
        ca.root_pem().to_owned(),
    ));

    let (leading_tx, leading_rx) = tokio::sync::watch::channel(false);
    let lease = leader::LeaseConfig::new(&namespace, &k.lease, &identity);
    tokio::spawn(leader::run(client.clone(), lease, leading_tx));

    let auth = TokenReviewAuth::new(
        client.clone(),
        TokenReviewConfig {
            audience: k.token_audience.clone(),
            namespace: namespace.clone(),
            service_account: k.node_service_account.clone(),
        },
    );
    let source = KubernetesSource::new(client, leading_rx, Options::default());
    let described = format!("kubernetes (namespace {namespace}, replica {identity})");
    serve(args, store, epoch, ca, auth, source, described).await
}

/// Publishes the root in the trust bundle ConfigMap, and puts it back if it changes.
async fn keep_trust_bundle(client: kube::Client, namespace: String, name: String, root_pem: String) {
    loop {
        let next = match publish_trust_bundle(client.clone(), &namespace, &name, &root_pem).await {
            Ok(true) => {
                tracing::info!(configmap = %format!("{namespace}/{name}"), "published the trust bundle");
                TRUST_BUNDLE_RESYNC
            }
            Ok(false) => TRUST_BUNDLE_RESYNC,
            Err(e) => {
                tracing::error!(verb = e.verb, resource = %e.resource, "cannot publish the trust bundle: {e}");
                Duration::from_secs(10)
            }
        };
        tokio::time::sleep(next).await;
    }
}

fn own_namespace(k: &KubernetesArgs) -> String {
    k.namespace
        .clone()
        .or_else(|| {
            std::fs::read_to_string(SA_NAMESPACE_FILE)
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "mesh-system".to_owned())
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

async fn serve<A: NodeAuthenticator, S: Source>(
    args: &Args,
    store: Arc<Store>,
    epoch: String,
    ca: Ca,
    auth: A,
    source: S,
    described: String,
) -> anyhow::Result<()> {
    let ctl = Arc::new(Controller::new(
        store.clone(),
        Arc::new(ca),
        auth,
        args.trust_domain.clone(),
    ));

    let mut listeners = Listeners::default();
    if let Some(addr) = args.listen.0 {
        listeners.tcp = Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?,
        );
    }
    if let Some(path) = &args.socket {
        listeners.unix = Some(bind_unix(path)?);
    }
    if listeners.tcp.is_none() && listeners.unix.is_none() {
        bail!("nothing to serve on: give --listen ADDR or --socket PATH");
    }
    tracing::info!(
        %epoch,
        listen = ?args.listen.0,
        socket = ?args.socket,
        source = %described,
        trust_domain = %args.trust_domain,
        "mesh-controller starting"
    );

    let names = server_names(args)?;
    let mut source_task = tokio::spawn(source.run(store));
    let serving = server::serve(ctl, listeners, names, args.cert_ttl, shutdown_signal());
    tokio::select! {
        served = serving => served.context("serving")?,
        ended = &mut source_task => {
            ended.context("the source task failed")?.context("the source failed")?;
            bail!("the source stopped");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Binds the Unix socket, replacing a socket a previous run left behind (but no other file).
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("--socket {}: exists and is not a socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))
}

fn server_names(args: &Args) -> anyhow::Result<Vec<SanType>> {
    let mut names = vec![SERVER_NAME.to_owned(), "localhost".to_owned()];
    names.extend(
        args.listen
            .0
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .map(|ip| ip.to_string()),
    );
    names.extend(args.server_names.iter().cloned());
    names
        .into_iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(
                name.as_str()
                    .try_into()
                    .with_context(|| format!("server name {name:?}"))?,
            )),
        })
        .collect()
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the controller");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
    }
}
