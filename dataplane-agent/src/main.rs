//! `dataplane-agent`: see `cli.rs` for the commands.
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dataplane_agent::agent::{self, Actions, AgentState, AgentStatus};
use dataplane_agent::cli::{CleanupArgs, Cli, Command, CleanupKubeProxyArgs, DoctorArgs, InstallCniArgs, Output, RunArgs, ServicesArgs, StatusArgs};
use dataplane_agent::maps::{Source, lb::LbMaps};
use dataplane_agent::reconcile::{self, Reconciler};
use dataplane_agent::model::ModelConfig;
use dataplane_agent::{doctor, http, source};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Status(args) => status(args, cli.output),
        Command::Services(args) => services(args, cli.output),
        Command::Doctor(args) => Ok(doctor_cmd(args, cli.output)),
        Command::Cleanup(args) => cleanup(args, cli.output),
        Command::InstallCni(args) => install_cni(args, cli.output),
        Command::CleanupKubeProxy(args) => cleanup_kube_proxy(args, cli.output),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cleanup_kube_proxy(args: CleanupKubeProxyArgs, output: Output) -> anyhow::Result<ExitCode> {
    let report = dataplane_agent::kube_proxy_cleanup::cleanup(args.dry_run)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => {
            let verb = if args.dry_run { "would remove" } else { "removed" };
            for (tool, table, chains) in &report.iptables {
                println!("{verb} {chains} kube-proxy chains from {tool} table {table}");
            }
            for t in &report.nftables {
                println!("{verb} nftables table {t}");
            }
            for what in &report.ipvs {
                println!("{verb} IPVS {what}");
            }
            if report.iptables.is_empty() && report.nftables.is_empty() && report.ipvs.is_empty() {
                println!("nothing of kube-proxy's found");
            }
            for s in &report.skipped {
                println!("skipped {s}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn install_cni(args: InstallCniArgs, output: Output) -> anyhow::Result<ExitCode> {
    let done = dataplane_agent::install::install(&args.plugin, &args.bin_dir, &args.conflist, &args.conf_dir, &args.conf_name)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&done)?),
        Output::Text => println!(
            "installed {} and {} (network {:?}, plugins {})",
            done.plugin.display(),
            done.conflist.display(),
            done.network,
            done.plugins.join(", ")
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let source_name = match &args.manifests {
            Some(dir) => format!("manifests:{}", dir.display()),
            None => "kube".to_string(),
        };
        let state = Arc::new(AgentState::new(source_name));
        let listener = http::bind(args.listen).await?;
        tracing::info!(addr = %args.listen, "serving /healthz /readyz /metrics /status");

        let (tx, rx) = source::channel();
        let filter = source::filter::Filter { service_proxy_name: args.service_proxy_name.clone(), nodes: args.node_selector.clone().unwrap_or_default() };
        match args.manifests.clone() {
            Some(dir) => {
                // Fail fast on a directory that is not there; later read errors keep the last good state.
                std::fs::read_dir(&dir).with_context(|| format!("--manifests {}", dir.display()))?;
                tokio::spawn(source::manifests::run(dir, Duration::from_millis(args.manifests_poll_ms), filter, tx));
            }
            None => {
                let client = kube_client(args.kubeconfig.as_deref()).await?;
                let opts = source::kube::Options {
                    debounce: Duration::from_millis(args.debounce_ms),
                    retry: source::retry::RetryConfig::with_max(Duration::from_millis(args.api_retry_max_ms)),
                    filter,
                };
                tokio::spawn(source::kube::run(client, tx, opts));
            }
        }
        let maps = if args.no_maps { None } else { Some(open_maps(&args)?) };
        if maps.is_some()
            && let Err(e) = state.metrics.attach_datapath(&args.pin_dir)
        {
            // Forwarding does not depend on its counters: serve without them rather than not at all.
            tracing::warn!(error = %dataplane_agent::errors::error_chain(&e), "data path counters not readable; /metrics has the agent's series only");
        }
        if maps.is_some() && args.conntrack.ct_gc_interval > 0 {
            let every = Duration::from_secs(args.conntrack.ct_gc_interval.into());
            dataplane_agent::gc::spawn(&args.pin_dir, every, state.metrics.ct_gc.clone()).context("starting the conntrack GC thread")?;
        }
        let actions = Actions {
            model: ModelConfig {
                node_name: args.node_name.clone(),
                service_proxy_name: args.service_proxy_name.clone(),
                node_port_addresses: args.nodeport_addresses.clone(),
            },
            routes: args.routes,
            node_file: (!args.no_node_file && args.node_name.is_some()).then(|| args.node_file.clone()),
            state_dir: Some(args.state_dir.clone()),
        };
        let sync = tokio::spawn(agent::sync_loop(rx, actions, maps, state.clone()));
        let server = tokio::spawn(http::serve(listener, state));

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: exiting; the data plane stays programmed"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: exiting; the data plane stays programmed"),
            r = server => anyhow::bail!("HTTP server stopped: {r:?}"),
            r = sync => anyhow::bail!("sync loop stopped: {r:?}"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `--kubeconfig` when given; else what kube infers (KUBECONFIG or ~/.kube/config, then the
/// in-cluster service account).
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("finding the API server (in-cluster config, KUBECONFIG or ~/.kube/config)")?,
    };
    kube::Client::try_from(config).context("building the API client")
}

/// Opens the service maps under `--pin-dir`: loading the object re-uses pinned maps that exist and
/// pins new ones otherwise; the reconciler then adopts whatever they hold. With `--uplink` or
/// `--cgroup-root` the programs are attached (or their pinned links adopted) first, and a task
/// keeps attaching TC to new Pod veths (`attach.rs`).
fn open_maps(args: &RunArgs) -> anyhow::Result<Reconciler> {
    let pin_dir = args.pin_dir.as_path();
    std::fs::create_dir_all(pin_dir).with_context(|| format!("creating --pin-dir {}", pin_dir.display()))?;
    if args.uplink.is_empty() && args.cgroup_root.is_none() {
        tracing::info!("no --uplink or --cgroup-root: programming the maps only, attaching nothing");
        let cfg = dataplane_agent::loader::Config { ct: args.conntrack.lifetimes(), ..Default::default() };
        let ebpf = dataplane_agent::loader::load_with(Some(pin_dir), &cfg).context("loading the eBPF object")?;
        drop(ebpf); // the pins keep the maps; the reconciler opens its own handles
    } else {
        attach_datapath(args)?;
    }
    let lb = LbMaps::open(Source::Pinned(pin_dir)).context("opening the pinned service maps")?;
    let stats = dataplane_agent::maps::stats::StatsMaps::open(Source::Pinned(pin_dir)).context("opening the pinned counter maps")?;
    let r = Reconciler::new(lb).context("adopting the service maps' content")?.with_counters(stats);
    tracing::info!(pin_dir = %pin_dir.display(), frontends = r.frontend_count(), backends = r.backend_count(), "service maps opened");
    Ok(r)
}

fn attach_datapath(args: &RunArgs) -> anyhow::Result<()> {
    use dataplane_agent::attach::{self, DataPath};
    // Check the cgroup before anything reaches the kernel: a bad path changes nothing.
    let cgroup = attach::cgroup_root(args.cgroup_root.as_deref())?;
    attach::check_cgroup2(&cgroup).with_context(|| format!("--cgroup-root {}", cgroup.display()))?;
    let node_ips = if args.node_ip.is_empty() { attach::interface_ipv4s(&args.uplink)? } else { args.node_ip.clone() };
    let cfg = dataplane_agent::loader::Config { node_ips, ct: args.conntrack.lifetimes(), ..Default::default() };
    attach::set_sysctls(&args.uplink)?;
    let ebpf = dataplane_agent::loader::load_with(Some(&args.pin_dir), &cfg).context("loading the eBPF object")?;
    let mut dp = DataPath::new(ebpf, &args.pin_dir)?;
    for iface in &args.uplink {
        let mode = dp.attach_uplink(iface)?;
        tracing::info!(iface, ?mode, node_ips = ?cfg.node_ips, "uplink served");
    }
    let outcome = dp.attach_cgroup(&cgroup)?;
    tracing::info!(cgroup = %cgroup.display(), ?outcome, "socket programs attached");
    let dp = Arc::new(std::sync::Mutex::new(dp));
    tokio::spawn(async move {
        if let Err(e) = attach::watch_pod_veths(dp).await {
            tracing::error!(error = %dataplane_agent::errors::error_chain(&e), "pod veth watcher stopped; new Pods get no TC program");
        }
    });
    Ok(())
}

fn services(args: ServicesArgs, output: Output) -> anyhow::Result<ExitCode> {
    let lb = LbMaps::open(Source::Pinned(&args.pin_dir))
        .with_context(|| format!("opening the service maps pinned under {} (is the agent installed on this node?)", args.pin_dir.display()))?;
    let rows = reconcile::table(&lb)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text => {
            println!("{:<24} {:<5} {:<9} {:<13} {:>5} {:>6}  BACKENDS", "FRONTEND", "PROTO", "SCOPE", "KIND", "FLAGS", "AFFIN");
            for r in &rows {
                let mut backends = r.backends.join(", ");
                if !r.terminating_backends.is_empty() {
                    backends.push_str(&format!(" | terminating: {}", r.terminating_backends.join(", ")));
                }
                println!("{:<24} {:<5} {:<9} {:<13} {:>5} {:>6}  {}", r.frontend, r.protocol, r.scope, r.kind, r.flags, r.affinity_timeout_s, if backends.is_empty() { "-".into() } else { backends });
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(args: StatusArgs, output: Output) -> anyhow::Result<ExitCode> {
    use dataplane_agent::maps::stats::{StatsMaps, fill_levels};
    let path = args.state_dir.join(agent::STATUS_FILE);
    let status: Option<AgentStatus> = match std::fs::read(&path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).with_context(|| format!("{} is not a status file", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut pins: Vec<String> = std::fs::read_dir(&args.pin_dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    pins.sort();
    let attached = dataplane_agent::attach::pinned_attachments(&args.pin_dir);
    // Everything below comes from the pins, so it is there while the agent is down.
    let maps = fill_levels(&args.pin_dir, &dataplane_agent::loader::PINNED_MAPS);
    let counters = StatsMaps::open(Source::Pinned(&args.pin_dir)).and_then(|m| Ok((m.drops()?, m.hooks()?)));
    let (drops, hooks, counters_error) = match &counters {
        Ok((d, h)) => (
            d.iter().map(|(r, c)| serde_json::json!({"reason": r.name(), "packets": c.packets, "bytes": c.bytes})).collect(),
            h.iter().map(|(h, c)| serde_json::json!({"hook": h.name(), "packets": c.packets, "bytes": c.bytes})).collect(),
            None,
        ),
        Err(e) => (Vec::new(), Vec::new(), Some(dataplane_agent::errors::error_chain(e))),
    };
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "status": status, "pins": pins, "attached": attached, "maps": maps,
                "drops": drops, "hooks": hooks, "counters_error": counters_error,
            }))?
        ),
        Output::Text => {
            match &status {
                None => println!("no status at {} (the agent has not synced on this node yet)", path.display()),
                Some(s) => {
                    let now = dataplane_agent::source::now_unix_ms();
                    let health = match (s.source_problem(now), s.api_reachable) {
                        (Some(p), _) => p,
                        (None, Some(true)) => "API server reachable".into(),
                        (None, _) if s.source_healthy => "ok".into(),
                        (None, _) => "no complete read yet".into(),
                    };
                    println!("source:    {} ({health})", s.source);
                    println!("ready:     {} ({} syncs, last took {:.2} ms)", s.ready, s.syncs, s.last_sync_duration_ms.unwrap_or(0.0));
                    println!("services:  {}  frontends: {}  backends: {}  routes: {}", s.services, s.frontends, s.backends, s.routes);
                    println!("maps:      {} frontend entries, {} backends ({} IPv6 frontends not programmed)", s.map_frontends, s.map_backends, s.skipped_ipv6_frontends);
                    println!("last error: {}", s.last_error.as_deref().unwrap_or("none"));
                    for e in &s.service_errors {
                        println!("  service error: {e}");
                    }
                }
            }
            println!("pins in {}: {}", args.pin_dir.display(), if pins.is_empty() { "none".to_string() } else { pins.join(", ") });
            println!("attached (pinned links): {}", if attached.is_empty() { "none" } else { "" });
            for a in &attached {
                match &a.error {
                    None => println!("  {:<40} {} link {} program {} ({})", a.pin, a.link_type.as_deref().unwrap_or("?"), a.link_id.unwrap_or(0), a.program.as_deref().unwrap_or("?"), a.program_id.unwrap_or(0)),
                    Some(e) => println!("  {:<40} unreadable: {e}", a.pin),
                }
            }
            println!("map fill levels:");
            println!("  {:<18} {:<14} {:>10} {:>10} {:>8}", "MAP", "TYPE", "ENTRIES", "MAX", "FILL");
            for m in &maps {
                let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                match &m.error {
                    Some(e) => println!("  {:<18} {e}", m.name),
                    None => println!(
                        "  {:<18} {:<14} {:>10} {:>10} {:>8}",
                        m.name,
                        m.map_type.as_deref().unwrap_or("?"),
                        // Per-CPU counter arrays have no fill level: every slot always exists.
                        // Socket storage neither: one value per socket, freed with it.
                        m.entries.map_or(if m.per_socket { "(per-socket)" } else { "(counters)" }.to_string(), |v| v.to_string()),
                        opt(m.max_entries.map(u64::from)),
                        m.percent.map_or("-".to_string(), |p| format!("{p:.2}%")),
                    ),
                }
            }
            match &counters_error {
                Some(e) => println!("drops: counters not readable: {e}"),
                None => {
                    let nonzero: Vec<&serde_json::Value> = drops.iter().filter(|d| d["packets"].as_u64() != Some(0)).collect();
                    println!("drops by reason (since the counters were pinned): {}", if nonzero.is_empty() { "none" } else { "" });
                    for d in nonzero {
                        println!("  {:<20} {:>12} packets {:>14} bytes", d["reason"].as_str().unwrap_or("?"), d["packets"].as_u64().unwrap_or(0), d["bytes"].as_u64().unwrap_or(0));
                    }
                    println!("packets per hook:");
                    for h in &hooks {
                        println!("  {:<20} {:>12} packets {:>14} bytes", h["hook"].as_str().unwrap_or("?"), h["packets"].as_u64().unwrap_or(0), h["bytes"].as_u64().unwrap_or(0));
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cleanup(args: CleanupArgs, output: Output) -> anyhow::Result<ExitCode> {
    let mut removed: Vec<String> = Vec::new();
    // Links first: removing their pins detaches the programs (nothing else holds them).
    removed.extend(dataplane_agent::attach::remove_pins(&args.pin_dir)?.iter().map(|p| p.display().to_string()));
    // Only the maps the loader pins (and those older versions pinned), then the directory if that
    // left it empty: a pin directory shared with something else keeps the rest.
    for name in dataplane_agent::loader::PINNED_MAPS.iter().chain(&dataplane_agent::loader::OBSOLETE_PINS) {
        let path = args.pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    if std::fs::remove_dir(&args.pin_dir).is_ok() {
        removed.push(args.pin_dir.display().to_string());
    }
    for path in [args.node_file.clone(), agent::readiness_file(&args.node_file), args.state_dir.join(agent::STATUS_FILE)] {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    if args.routes {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
        let changes = rt.block_on(async {
            let mut sync = dataplane_agent::routes::RouteSync::new().await?;
            sync.sync(&Default::default()).await
        })?;
        removed.extend(changes.removed.iter().map(|c| format!("route {c}")));
    }
    match output {
        Output::Json => println!("{}", serde_json::json!({ "removed": removed })),
        Output::Text if removed.is_empty() => println!("nothing to remove"),
        Output::Text => removed.iter().for_each(|r| println!("removed {r}")),
    }
    Ok(ExitCode::SUCCESS)
}

fn doctor_cmd(args: DoctorArgs, output: Output) -> ExitCode {
    let checks = doctor::run(&doctor::DoctorOptions {
        pin_dir: args.pin_dir,
        cgroup_root: args.cgroup_root,
        uplinks: args.uplink,
        load_object: !args.skip_load,
    });
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&checks).unwrap_or_default()),
        Output::Text => print!("{}", doctor::render_text(&checks)),
    }
    if checks.iter().all(|c| c.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
