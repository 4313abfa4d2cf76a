//! The `mesh-node` binary: flags in, agent running until SIGTERM, one clear line on failure.
use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use tokio::net::TcpListener;
use tokio::sync::watch;

use mesh_node::config::{Cli, Command, Config, RunArgs};
use mesh_node::connections::{AccessLog, Connections};
use mesh_node::control::{self, ControlClient, NodeState};
use mesh_node::identity::{self, CaSigner, CertStore, IdentityManager};
use mesh_node::limits::Admission;
use mesh_node::logging::{self, LogControl};
use mesh_node::metrics::{self, Metrics};
use mesh_node::proxy::hbone::{Dialer, Pool, PoolConfig, ServerSettings};
use mesh_node::proxy::mesh::Mesh;
use mesh_node::proxy::{inbound, inbound_plain, outbound};
use mesh_node::{admin, ebpf, enrollment, health, httpd, memory, netlink, proxy, tls};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = match logging::init(&cli.run.log, cli.run.log_format) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("mesh-node: --log: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Some(Command::Uninstall { bpffs_dir }) => uninstall(&bpffs_dir),
        None => configure(cli.run).and_then(|cfg| run(cfg, log)),
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

fn uninstall(bpffs_dir: &std::path::Path) -> anyhow::Result<()> {
    ebpf::uninstall(bpffs_dir)?;
    info!(dir = %bpffs_dir.display(), "capture programs detached and pins removed");
    let removed = netlink::remove_capture_routing()?;
    info!(rules_and_routes = ?removed.removed, "capture routing removed");
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

fn run(cfg: Config, log: LogControl) -> anyhow::Result<()> {
    if cfg.preserve_source {
        let node_ips: Vec<IpAddr> = [
            cfg.datapath.proxy_ipv4.map(IpAddr::V4),
            cfg.datapath.proxy_ipv6.map(IpAddr::V6),
        ]
        .into_iter()
        .flatten()
        .collect();
        ebpf::preflight_source(&node_ips)?;
    }
    let open_files = raise_open_files_limit();
    info!(open_files, "open-files limit");
    memory::limit_arenas();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cfg.worker_threads > 0 {
        runtime.worker_threads(cfg.worker_threads);
    }
    info!(
        worker_threads = cfg.worker_threads,
        "async runtime (0: one thread per CPU)"
    );
    runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(Arc::new(cfg), log))
}

async fn serve(cfg: Arc<Config>, log: LogControl) -> anyhow::Result<()> {
    // Listeners first: with pins from a previous agent, capture is already live and every
    // moment without a listener is a refused connection.
    let listeners = cfg
        .outbound_listeners
        .iter()
        .map(|a| proxy::listener::bind(*a).with_context(|| format!("binding the outbound listener on {a}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let health_listener = TcpListener::bind(cfg.health_addr).await.with_context(|| {
        format!(
            "binding the readiness endpoint on {} (--health-addr)",
            cfg.health_addr
        )
    })?;
    let metrics_listener = TcpListener::bind(cfg.metrics_addr).await.with_context(|| {
        format!(
            "binding the metrics endpoint on {} (--metrics-addr)",
            cfg.metrics_addr
        )
    })?;
    let admin_listener = TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("binding the admin API on {} (--admin-addr)", cfg.admin_addr))?;
    let admin_socket = admin::bind_socket(&cfg.admin_socket).with_context(|| {
        format!(
            "binding the admin API on {} (--admin-socket)",
            cfg.admin_socket.display()
        )
    })?;
    let ca_file = &cfg.controller.ca_file;
    let roots = std::fs::read(ca_file)
        .with_context(|| format!("reading --controller-ca {}", ca_file.display()))
        .and_then(|pem| identity::roots_from_pem(&pem).map_err(anyhow::Error::msg))
        .with_context(|| format!("--controller-ca {}", ca_file.display()))?;

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let metrics = Arc::new(Metrics::new().context("registering the metrics")?);
    let connections = Connections::new(metrics.clone(), AccessLog::new(cfg.access_log_sample_rate));
    let (control, config) = ControlClient::new(cfg.controller.clone());
    let certs = CertStore::new();
    let roots_der = roots.clone();
    let certs_for_proxy = certs.clone();
    let identities = IdentityManager::new(CaSigner::new(cfg.controller.clone()), roots, certs.clone());
    let readiness = health::Readiness::new(Some(config.clone()));
    let refused = metrics.listener_refused.clone();
    let http_server = |name, router| httpd::Server::new(name, router, cfg.limits.http, Some(refused.clone()));
    let mut tasks = vec![
        tokio::spawn(control.run(stop.clone())),
        tokio::spawn(memory::trim_periodically(stop.clone())),
        tokio::spawn(identities.run(
            config.subscribe(),
            |s: &Arc<NodeState>| s.local_identities(),
            stop.clone(),
        )),
        tokio::spawn(http_server("readiness", health::router(readiness.clone())).serve(
            health_listener,
            false,
            stop.clone(),
        )),
        tokio::spawn(http_server("metrics", metrics.clone().router()).serve(
            metrics_listener,
            false,
            stop.clone(),
        )),
    ];

    let mut datapath = ebpf::Datapath::start(&cfg.datapath)?;
    datapath.set_tc(cfg.capture.marks, cfg.preserve_source)?;
    let reader = Arc::new(datapath.reopen()?);
    let (report_tx, report) = watch::channel(Arc::new(enrollment::Report::default()));
    let admin = admin::Admin {
        node: cfg.node_name.clone(),
        controller: control::display_target(&cfg.controller.target).to_string(),
        started: Instant::now(),
        config: config.clone(),
        readiness: readiness.clone(),
        certs: certs.clone(),
        connections: connections.clone(),
        datapath: reader.clone(),
        kernel: report.clone(),
        log,
    };
    tasks.push(tokio::spawn(
        http_server("admin", admin.clone().router(admin::Access::ReadOnly)).serve(
            admin_listener,
            true,
            stop.clone(),
        ),
    ));
    tasks.push(tokio::spawn(
        http_server("admin_socket", admin.router(admin::Access::ReadWrite))
            .serve_unix(admin_socket, stop.clone()),
    ));
    metrics::observe_node(&metrics, reader, certs.clone(), report.clone());
    let node_ips: Vec<IpAddr> = [
        cfg.datapath.proxy_ipv4.map(IpAddr::from),
        cfg.datapath.proxy_ipv6.map(IpAddr::from),
    ]
    .into_iter()
    .flatten()
    .collect();
    let routing = cfg.capture.resolve(&node_ips)?;
    netlink::ensure_capture_routing(&routing)?;
    // The HBONE listeners exist before any pod's inbound traffic is captured: a captured SYN
    // without a listener is dropped, not refused.
    let hbone_listeners = cfg
        .hbone_listeners()
        .iter()
        .map(|a| {
            proxy::listener::bind_transparent(*a)
                .with_context(|| format!("binding the HBONE listener on {a}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let plain_listeners = cfg
        .inbound_plain_listeners()
        .iter()
        .map(|a| {
            proxy::listener::bind_transparent(*a)
                .with_context(|| format!("binding the inbound plaintext listener on {a}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    readiness.set_capture_active(true);
    let reused_pins = datapath.reused_pins();
    info!(
        node = %cfg.node_name,
        reused_pins,
        pods_cgroup = %cfg.datapath.pods_cgroup.display(),
        "capture active"
    );
    let (reconcile_config, reconcile_stop) = (config.subscribe(), stop.clone());
    let kernel = enrollment::Kernel {
        pods_root: cfg.datapath.pods_cgroup.clone(),
        routing,
    };
    let interval = cfg.reconcile_interval;
    tasks.push(tokio::task::spawn_blocking(move || {
        enrollment::run(
            datapath,
            reconcile_config,
            kernel,
            interval,
            report_tx,
            reconcile_stop,
        )
    }));
    let tls = tls::ConfigCache::new(tls::roots_from_der(&roots_der)?, cfg.trust_domain.clone());
    // HBONE dials carry the proxy mark and keepalive like every other connection the proxy
    // makes, and are bounded by --connect-timeout.
    let (mark, keepalive) = (cfg.capture.marks.proxy, cfg.limits.carried.keepalive);
    let dialer: Dialer =
        Arc::new(move |src, dst| Box::pin(proxy::upstream::connect_marked(dst, src, mark, keepalive)));
    let pool_config = PoolConfig {
        connect_timeout: cfg.connect_timeout,
        idle_timeout: cfg.hbone_idle_timeout,
        ..PoolConfig::default()
    };
    let pool = Pool::with_dialer(pool_config, dialer);
    let observed = pool.clone();
    metrics.on_scrape(move |m| {
        let s = observed.stats();
        m.pool_connections.set(s.connections as i64);
        m.pool_streams.set(s.active_streams as i64);
    });
    let mesh = Arc::new(
        Mesh::new(
            config.clone(),
            certs_for_proxy,
            tls,
            pool,
            cfg.capture.marks.proxy,
            cfg.connect_timeout,
            connections,
        )
        .with_carried(cfg.limits.carried)
        .with_preserve_source(cfg.preserve_source)
        .with_kernel_report(report.clone()),
    );
    tasks.push(tokio::spawn(mesh.clone().maintain(stop.clone())));
    let (out_cfg, out_mesh) = (cfg.clone(), mesh.clone());
    let keepalive = cfg.limits.carried.keepalive;
    tasks.push(tokio::spawn(proxy::serve(
        "outbound",
        listeners,
        proxy::Accepting {
            keepalive,
            admission: None,
        },
        tracker.clone(),
        stop.clone(),
        move |c, p| outbound::handle(out_cfg.clone(), out_mesh.clone(), c, p),
    )));
    let plain_mesh = mesh.clone();
    // Plaintext clients are outside the mesh, so each address is held to the same cap as an
    // HBONE peer.
    tasks.push(tokio::spawn(proxy::serve(
        "inbound-plaintext",
        plain_listeners,
        proxy::Accepting {
            keepalive,
            admission: Some(Admission::new(
                "inbound_plaintext",
                usize::MAX,
                cfg.limits.hbone_max_connections_per_peer,
                Some(refused.clone()),
            )),
        },
        tracker.clone(),
        stop.clone(),
        move |c, p| inbound_plain::handle(plain_mesh.clone(), c, p),
    )));
    let in_stop = stop.clone();
    let limits = &cfg.limits;
    let in_limits = Arc::new(inbound::Limits {
        handshakes: Admission::handshakes("hbone", limits.hbone_max_handshakes, Some(refused.clone())),
        server: ServerSettings {
            tls_handshake_timeout: limits.hbone_handshake_timeout,
            preface_timeout: limits.hbone_handshake_timeout,
            idle_timeout: limits.carried.idle_timeout,
            ..ServerSettings::default()
        },
    });
    let per_peer = limits.hbone_max_connections_per_peer;
    tasks.push(tokio::spawn(proxy::serve(
        "inbound",
        hbone_listeners,
        proxy::Accepting {
            keepalive,
            admission: Some(Admission::new(
                "hbone",
                usize::MAX,
                per_peer,
                Some(refused.clone()),
            )),
        },
        tracker.clone(),
        stop.clone(),
        move |c, p| inbound::handle(mesh.clone(), in_limits.clone(), c, p, in_stop.clone()),
    )));
    info!(listeners = ?cfg.outbound_listeners, controller = %control::display_target(&cfg.controller.target), "ready");

    shutdown_signal().await?;
    info!(deadline = ?cfg.drain_timeout, "shutting down: draining connections");
    stop.cancel();
    for task in tasks {
        if let Err(e) = task.await {
            warn!(error = %e, "a task ended abnormally during shutdown");
        }
    }
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

/// Every proxied connection holds two descriptors; the usual soft limit of 1024 would cap a
/// node at a few hundred. Raise it to the hard limit the operator allows.
fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            ..lim
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
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
