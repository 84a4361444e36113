//! `lakesync serve` and `lakesync check-config`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use lakesync_api::AppState;
use lakesync_engine::config::{Config, TableMode};
use lakesync_engine::Daemon;

/// Validates the config and prints what it would run (never secrets).
pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    println!("{}: ok", path.display());
    println!("postgres: {}", config.postgres.target());
    println!(
        "api: listen {} ({}), mutating calls {}, reads {}",
        config.api.listen,
        if config.api.tls.is_some() { "https" } else { "http" },
        if config.api.token.is_some() { "enabled (bearer token set)" } else { "disabled (no token_env)" },
        match config.api.read_auth {
            lakesync_engine::config::ReadAuth::Open => "open",
            lakesync_engine::config::ReadAuth::Tokens(_) => "need a bearer token",
        }
    );
    if config.api.token.is_some() {
        println!("api policy (what POSTed tables and ingests may reach): {}", config.api.policy);
    }
    if let Some((cert, key)) = &config.api.tls {
        lakesync_api::https::server_config(cert, key).map_err(anyhow::Error::msg)?;
    }
    for t in &config.tables {
        let when = match &t.mode {
            TableMode::Snapshot { schedule: Some(s) } | TableMode::Triggered { schedule: Some(s) } => s.to_string(),
            TableMode::Snapshot { schedule: None } | TableMode::Triggered { schedule: None } => {
                "at start and on request".into()
            }
            TableMode::Continuous { poll } => format!("polling every {poll:?}"),
        };
        println!("table {}: {} -> {} ({}, {when})", t.name, t.source, t.target, t.mode.as_str());
    }
    for i in &config.ingests {
        println!(
            "ingest {}: kafka topic {} ({}, {}) -> {}",
            i.name,
            i.topic,
            i.brokers.join(","),
            i.security.protocol(),
            i.table
        );
    }
    let f = &config.fleet;
    println!(
        "fleet: replica {}, lease {:?}, heartbeat {:?}, {} wins on conflict, at most {} runs at once",
        f.replica_id,
        f.lease,
        f.heartbeat,
        match f.file_policy {
            lakesync_postgres::fleet::FilePolicy::FileWins => "the file",
            lakesync_postgres::fleet::FilePolicy::RegistryWins => "the registry",
        },
        f.max_concurrent_runs
    );
    Ok(())
}

/// Runs the daemon and the API until SIGTERM or SIGINT.
pub async fn run(path: &Path, grace: Duration) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.api.listen))?;
    // Locks, LISTEN and session settings must stay with their session: refuse a transaction
    // pooler at start, with the reason, rather than fail obscurely (or fence nothing) later.
    config.postgres.refuse_transaction_pooler().await?;
    if let Some(api) = &config.api.postgres {
        api.refuse_transaction_pooler().await.context("[api] postgres_url")?;
    }
    let daemon = Daemon::with_max_runs(config.postgres.clone(), config.fleet.max_concurrent_runs);
    // Certificate problems are found before any table starts.
    let tls = match &config.api.tls {
        Some((cert, key)) => Some(lakesync_api::https::server_config(cert, key).map_err(anyhow::Error::msg)?),
        None => None,
    };
    // An ingest's table exists before the tables synced from it start.
    for ingest in &config.ingests {
        lakesync_ingest::prepare(ingest).await?;
    }
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Every `serve` is a replica of a fleet (of one, unless others share its Postgres): the
    // file's tables and ingests go to the registry, and the coordinator runs this replica's
    // share of everything registered.
    let ingests: Vec<_> =
        config.ingest_configs.iter().cloned().zip(config.ingests.iter().map(|i| i.name.clone())).collect();
    lakesync_engine::fleet::join(
        &daemon,
        &config.fleet,
        &config.tables,
        &ingests,
        lakesync_engine::fleet::JoinOptions {
            address: Some(format!("{scheme}://{addr}")),
            policy: config.api.policy.clone(),
        },
    )
    .await
    .context("cannot join the fleet in Postgres")?;
    crate::logs::set_replica(&config.fleet.replica_id);
    let state = AppState::new(daemon.clone(), &config.api);
    println!(
        "lakesync serving {scheme}://{addr} as replica {} ({} synced tables, {} ingests in the file)",
        config.fleet.replica_id,
        config.tables.len(),
        config.ingests.len()
    );
    tracing::info!(%addr, scheme, "serving");
    let server = match tls {
        Some(tls) => tokio::spawn(lakesync_api::serve_tls(
            lakesync_api::https::TlsListener::new(listener, tls)?,
            state,
            stop_signal(),
        )),
        None => tokio::spawn(lakesync_api::serve(listener, state, stop_signal())),
    };
    let _ = server.await.context("API server task")?;
    tracing::info!("stopping: letting in-flight runs finish");
    daemon.shutdown(grace).await;
    // Not on stdout: whoever read the address line may have closed it.
    tracing::info!("stopped");
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
