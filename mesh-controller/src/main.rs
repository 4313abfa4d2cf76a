//! The `mesh-controller` binary: flags, logging and wiring; the work is in the library.

mod cli;

use std::net::IpAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use mesh_api::client::SERVER_NAME;
use mesh_controller::ca::Ca;
use mesh_controller::server::auth::TokenFiles;
use mesh_controller::server::{self, Controller, Listeners};
use mesh_controller::sources::file::FileSource;
use mesh_controller::sources::Source;
use mesh_controller::store::{random_epoch, Store};
use rcgen::SanType;
use tokio::net::{TcpListener, UnixListener};
use tracing_subscriber::EnvFilter;

use crate::cli::{Args, LogFormat, SourceArg};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    tokio::runtime::Runtime::new()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let SourceArg::File(dir) = &args.source;
    let source = FileSource::new(dir.clone())?;
    if !args.tokens_dir.is_dir() {
        bail!("--tokens-dir {}: not a directory", args.tokens_dir.display());
    }
    let ca = Ca::load_or_create(&args.ca_dir, args.cert_ttl).context("loading the CA")?;
    let epoch = random_epoch().context("the system random generator failed")?;
    let store = Arc::new(Store::new(epoch.clone()));
    let auth = TokenFiles::new(args.tokens_dir.clone());
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
        source = %dir.display(),
        trust_domain = %args.trust_domain,
        "mesh-controller starting"
    );

    let names = server_names(&args)?;
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
