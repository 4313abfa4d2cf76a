//! The `mesh-node` binary: flags in, agent running until SIGTERM, one clear line on failure.
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use mesh_node::config::{Cli, Command, Config, LogFormat, RunArgs};
use mesh_node::workloads::FileSource;
use mesh_node::{ebpf, enrollment, proxy};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.run.log, cli.run.log_format) {
        eprintln!("mesh-node: --log: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Some(Command::Uninstall { bpffs_dir }) => ebpf::uninstall(&bpffs_dir)
            .map(|()| info!(dir = %bpffs_dir.display(), "capture programs detached and pins removed"))
            .map_err(Into::into),
        None => configure(cli.run).and_then(run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Expected failures (missing kernel support, bad flags) are one line, no backtrace.
            eprintln!("mesh-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, format: LogFormat) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = EnvFilter::try_new(filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

fn configure(args: RunArgs) -> anyhow::Result<Config> {
    let pods_root = ebpf::cgroup2_mount_point()?;
    let own = ebpf::own_cgroup()?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    Ok(args.into_config(pods_root, own, host)?)
}

fn run(cfg: Config) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(Arc::new(cfg)))
}

async fn serve(cfg: Arc<Config>) -> anyhow::Result<()> {
    // Listeners first: with pins from a previous agent, capture is already live and every
    // moment without a listener is a refused connection.
    let listeners = cfg
        .outbound_listeners
        .iter()
        .map(|a| proxy::listener::bind(*a).with_context(|| format!("binding the outbound listener on {a}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let datapath = ebpf::Datapath::start(&cfg.datapath)?;
    info!(
        node = %cfg.node_name,
        reused_pins = datapath.reused_pins(),
        pods_cgroup = %cfg.datapath.pods_cgroup.display(),
        "capture active"
    );

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let source = cfg.workloads_file.clone().map(FileSource::new);
    let reconcile = tokio::spawn(enrollment::run(
        datapath,
        source,
        cfg.reconcile_interval,
        stop.clone(),
    ));
    let outbound = tokio::spawn(proxy::serve_outbound(
        cfg.clone(),
        listeners,
        tracker.clone(),
        stop.clone(),
    ));
    info!(listeners = ?cfg.outbound_listeners, "ready");

    shutdown_signal().await?;
    info!(deadline = ?cfg.drain_timeout, "shutting down: draining connections");
    stop.cancel();
    let _ = tokio::join!(reconcile, outbound);
    tracker.close();
    if tokio::time::timeout(cfg.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = tracker.len(),
            "drain deadline passed; closing the remaining connections"
        );
    }
    info!("stopped; capture stays attached for the next agent");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
