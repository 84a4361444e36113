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
        "api: listen {}, mutating calls {}",
        config.api.listen,
        if config.api.token.is_some() { "enabled (bearer token set)" } else { "disabled (no token_env)" }
    );
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
    Ok(())
}

/// Runs the daemon and the API until SIGTERM or SIGINT.
pub async fn run(path: &Path, grace: Duration) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.api.listen))?;
    let daemon = Daemon::new(config.postgres.clone());
    for table in config.tables {
        daemon.add(table)?;
    }
    let state = AppState::new(daemon.clone(), &config.api);
    let addr = listener.local_addr()?;
    println!("lakesync serving http://{addr} ({} synced tables)", daemon.tables().len());
    tracing::info!(%addr, "serving");
    let server = tokio::spawn(lakesync_api::serve(listener, state, stop_signal()));
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
