//! The management API: list, inspect, add, sync and remove synced tables.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use lakesync_engine::config::{IngestConfig, TableConfig, TableMode};
use lakesync_engine::daemon::DaemonError;
use lakesync_engine::{EngineError, Worker};
use lakesync_postgres::state::{self, RunRecord, TableStatus};
use lakesync_postgres::PgError;
use serde_json::{json, Value};

use crate::{ApiError, AppState};

pub(crate) fn json_response(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert("content-type", "application/json".parse().expect("valid header"));
    r
}

/// Checks the bearer token of a mutating call (constant-time comparison).
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.token else {
        return Err(ApiError::Forbidden(
            "mutating calls are disabled: set token_env in the [api] section of the config".into(),
        ));
    };
    if crate::bearer_matches(headers, &[token]) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn run_json(run: &RunRecord) -> Value {
    json!({
        "run_id": run.run_id,
        "mode": run.mode,
        "reason": run.reason,
        "outcome": run.outcome,
        "from_version": run.from_version,
        "to_version": run.to_version,
        "rows_inserted": run.counts.inserted,
        "rows_updated": run.counts.updated,
        "rows_deleted": run.counts.deleted,
        "started_at": run.started_at,
        "duration_seconds": run.duration_seconds,
        "error": run.error,
        "replica": run.replica,
    })
}

fn table_json(worker: &Worker, recorded: Option<&TableStatus>) -> Value {
    let mut live = worker.status();
    // A run's commit is in Postgres a moment before the worker's live status has it: one
    // answer must not say "synced at version 1" and "provisioning" (or a lag) at once.
    if live.synced_version.is_none() {
        live.synced_version = recorded.and_then(|r| r.table.synced_version);
    }
    let spec = &worker.spec;
    // Another replica runs the table: its state is what that replica recorded in Postgres,
    // and the source's head and the lag are known there only.
    let owned = worker.owned();
    let state = match recorded.map(|r| r.table.state.as_str()) {
        Some(s) if !owned && s == state::states::ONLINE && matches!(spec.mode, TableMode::Continuous { .. }) => {
            "ONLINE_CONTINUOUS_UPDATE"
        }
        Some(s) if !owned => s,
        _ => live.state(&spec.mode),
    };
    json!({
        "name": spec.name,
        "source": spec.source,
        "target": spec.target.to_string(),
        "primary_key": spec.primary_key.columns(),
        "mode": spec.mode.as_str(),
        "state": state,
        "synced_version": live.synced_version,
        "source_version": live.source_version.filter(|_| owned),
        "synced_commit_timestamp": recorded.and_then(|r| r.table.synced_commit_timestamp.clone()),
        "lag_versions": live.lag_versions().filter(|_| owned),
        "lag_seconds": owned.then(|| live.lag_seconds()),
        "running": live.running,
        "owner": live.owner,
        "last_error": live.last_error.or(recorded.and_then(|r| r.table.last_error.clone())),
        "last_run": recorded.and_then(|r| r.last_run.as_ref()).map(run_json),
        "config": spec.config,
    })
}

async fn recorded_status(state: &AppState) -> Result<Vec<TableStatus>, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::from_query)?;
    state::status(client.client()).await.map_err(ApiError::from_query)
}

/// `GET /api/v1/synced-tables`
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let recorded = recorded_status(&state).await?;
    let tables: Vec<Value> = state
        .daemon
        .tables()
        .iter()
        .map(|w| table_json(w, recorded.iter().find(|r| r.table.table == w.spec.target)))
        .collect();
    Ok(json_response(StatusCode::OK, json!({ "synced_tables": tables })))
}

fn worker(state: &AppState, name: &str) -> Result<Arc<Worker>, ApiError> {
    state.daemon.table(name).ok_or_else(|| ApiError::NotFound(format!("no synced table named {name:?}")))
}

/// `GET /api/v1/synced-tables/{name}`
pub async fn get_one(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let w = worker(&state, &name)?;
    let client = state.pool.get().await.map_err(ApiError::from_query)?;
    let recorded = state::table_status(client.client(), &w.spec.target).await.map_err(ApiError::from_query)?;
    Ok(json_response(StatusCode::OK, table_json(&w, recorded.as_ref())))
}

#[derive(serde::Deserialize)]
pub struct RunsQuery {
    limit: Option<i64>,
}

/// `GET /api/v1/synced-tables/{name}/runs?limit=N` (newest first, default 50, at most 1000)
pub async fn runs(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<RunsQuery>,
) -> Result<Response, ApiError> {
    let w = worker(&state, &name)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 1000".into()));
    }
    let client = state.pool.get().await.map_err(ApiError::from_query)?;
    let runs = state::runs(client.client(), &w.spec.target, limit).await.map_err(ApiError::from_query)?;
    Ok(json_response(StatusCode::OK, json!({ "runs": runs.iter().map(run_json).collect::<Vec<_>>() })))
}

/// `POST /api/v1/synced-tables/{name}/sync`
pub async fn sync_now(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    request_run(&state, &headers, name, "sync").await
}

/// `POST /api/v1/synced-tables/{name}/restart`: resumes a failed table (its error cleared, a
/// run now, on its owner); the same request as a sync, named for what an operator means.
pub async fn restart(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    request_run(&state, &headers, name, "restart").await
}

/// `POST /api/v1/synced-tables/{name}/plan`: what the table's next run would do (mode and
/// reason, versions, rows, DDL), found by a dry run that writes nothing.
pub async fn plan(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let Some(worker) = state.daemon.table(&name) else {
        return Err(ApiError::NotFound(format!("no synced table named {name:?}")));
    };
    match state.daemon.plan(&name).await {
        Ok(Some(out)) => {
            let mut body = out.plan_json(&worker.spec.target);
            body["name"] = name.into();
            Ok(json_response(StatusCode::OK, body))
        }
        Ok(None) => Err(ApiError::NotFound(format!("no synced table named {name:?}"))),
        Err(e) => Err(ApiError::from_engine(&e)),
    }
}

async fn request_run(state: &AppState, headers: &HeaderMap, name: String, what: &str) -> Result<Response, ApiError> {
    authorize(state, headers)?;
    // Routed to the replica that owns the table, wherever this request landed.
    let found = state.daemon.request_sync(&name).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if !found {
        return Err(ApiError::NotFound(format!("no synced table named {name:?}")));
    }
    Ok(json_response(StatusCode::ACCEPTED, json!({ "name": name, what: "requested" })))
}

/// `POST /api/v1/synced-tables` with a table entry as JSON (the config file's fields).
pub async fn add(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let config: TableConfig =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid table definition: {e}")))?;
    // Before anything is resolved, read or contacted: what the spec reaches is the policy's.
    state.policy.check_table(&config).map_err(ApiError::from_config)?;
    let spec = config.validate().map_err(ApiError::from_config)?;
    if !spec.adopt {
        // Refuse at once (and start nothing) when the target exists and is not lakesync's;
        // the run would refuse it too, but only after the table was added.
        let client = state.pool.get().await.map_err(ApiError::from_query)?;
        let owner = state::current_ownership(client.client(), &spec.target).await.map_err(ApiError::from_query)?;
        if let state::Ownership::Foreign { .. } = owner {
            let refused = state::not_owned(
                &spec.target,
                owner,
                "refusing to sync into it; set \"adopt\": true to take it over on purpose (its primary key must be the sync key and its columns the source's types)",
            );
            return Err(ApiError::Conflict(refused.to_string()));
        }
    }
    let worker = lakesync_engine::fleet::register(&state.daemon, spec).await.map_err(|e| match e {
        DaemonError::Config(e) => ApiError::Conflict(e.to_string()),
        DaemonError::ShuttingDown => ApiError::Unavailable(e.to_string()),
        other => ApiError::BadRequest(other.to_string()),
    })?;
    Ok(json_response(StatusCode::CREATED, table_json(&worker, None)))
}

#[derive(serde::Deserialize)]
pub struct RemoveQuery {
    purge_data: Option<bool>,
}

/// `DELETE /api/v1/synced-tables/{name}[?purge_data=true]`
pub async fn remove(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let purge = q.purge_data.unwrap_or(false);
    state.daemon.remove(&name, purge).await.map_err(|e| match e {
        DaemonError::NotFound(_) => ApiError::NotFound(e.to_string()),
        DaemonError::Purge(EngineError::Postgres(PgError::NotOwned { .. })) => ApiError::Conflict(e.to_string()),
        other => {
            tracing::error!(table = %name, error = %other, "removing the table failed");
            ApiError::Unavailable(other.to_string())
        }
    })?;
    state.shapes.lock().expect("shape cache").remove(&name);
    Ok(json_response(StatusCode::OK, json!({ "name": name, "stopped": true, "purged": purge })))
}

fn ingest_json(state: &AppState, worker: &lakesync_engine::IngestWorker) -> Value {
    let s = worker.status.get();
    let spec = &worker.spec;
    let owner = worker.owner.lock().expect("owner lock").clone();
    // In a fleet only the owner consumes the topic; the others stand by.
    let standby = state.daemon.fleet().is_some_and(|f| owner.as_deref() != Some(f.replica.as_str()));
    let partitions: Vec<Value> = s
        .partitions
        .iter()
        .map(|(p, progress)| {
            json!({
                "partition": p,
                "committed_offset": progress.committed,
                "high_watermark": progress.high_watermark,
                "lag": progress.lag(),
            })
        })
        .collect();
    let seconds_since_commit =
        s.last_commit_at.and_then(|t| t.elapsed().ok()).map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0);
    json!({
        "name": spec.name,
        "brokers": spec.brokers,
        "security_protocol": spec.security.protocol(),
        "topic": spec.topic,
        "table": spec.table,
        "owner": owner,
        "state": if standby { json!("standby") } else { json!(s.state) },
        "last_error": s.last_error,
        "error_class": s.error_class,
        "lag_messages": s.partitions.values().map(|p| p.lag()).sum::<i64>(),
        "partitions": partitions,
        "rows": s.rows,
        "bytes": s.bytes,
        "dead_letters": s.dead_letters,
        "commits": s.commits,
        "files": s.files,
        "compactions": s.compactions,
        "table_version": s.table_version,
        "seconds_since_commit": seconds_since_commit,
    })
}

/// `GET /api/v1/ingests`
pub async fn list_ingests(State(state): State<Arc<AppState>>) -> Response {
    let ingests: Vec<Value> = state.daemon.ingests().iter().map(|w| ingest_json(&state, w)).collect();
    json_response(StatusCode::OK, json!({ "ingests": ingests }))
}

/// `POST /api/v1/ingests`: an `[[ingest]]` entry as JSON. In a fleet it goes to the registry:
/// every replica learns it, one runs it, and it survives restarts.
pub async fn add_ingest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let config: IngestConfig =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid ingest definition: {e}")))?;
    // Before the schema file is read, a variable resolved or a broker contacted.
    state.policy.check_ingest(&config).map_err(ApiError::from_config)?;
    let spec = config.validate_with(&|name| std::env::var(name).ok()).map_err(ApiError::from_config)?;
    let worker = lakesync_engine::fleet::register_ingest(&state.daemon, &config, spec).await.map_err(|e| match e {
        DaemonError::Config(e) => ApiError::Conflict(e.to_string()),
        DaemonError::ShuttingDown => ApiError::Unavailable(e.to_string()),
        other => ApiError::BadRequest(other.to_string()),
    })?;
    Ok(json_response(StatusCode::CREATED, ingest_json(&state, &worker)))
}

/// `DELETE /api/v1/ingests/{name}`: stops it (after it commits what it holds) on every
/// replica; its table and the positions recorded there stay.
pub async fn remove_ingest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    lakesync_engine::fleet::remove_ingest(&state.daemon, &name).await.map_err(|e| match e {
        DaemonError::NotFound(_) => ApiError::NotFound(format!("no ingest named {name:?}")),
        other => {
            tracing::error!(ingest = %name, error = %other, "removing the ingest failed");
            ApiError::Unavailable(other.to_string())
        }
    })?;
    Ok(json_response(StatusCode::OK, json!({ "name": name, "stopped": true })))
}

/// `GET /api/v1/ingests/{name}`
pub async fn get_ingest(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let w = state.daemon.ingest(&name).ok_or_else(|| ApiError::NotFound(format!("no ingest named {name:?}")))?;
    Ok(json_response(StatusCode::OK, ingest_json(&state, &w)))
}

/// `POST /api/v1/ingests/{name}/restart`: runs an ingest that stopped on an error again (after
/// the cause was fixed). In a fleet, a replica it failed on hands it over and does not take it
/// back until this; after it every replica may try it again.
///
/// `?reset_positions=earliest|latest`: partitions whose recorded position is outside what they
/// hold (a recreated topic, a truncated log) go on from there, once; the reset is recorded in
/// the table's commit.
pub async fn restart_ingest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let mut reset = None;
    for (key, value) in &query {
        match key.as_str() {
            "reset_positions" => {
                reset = Some(
                    lakesync_ingest::StartFrom::parse(value)
                        .map_err(|e| ApiError::BadRequest(format!("reset_positions {e}")))?,
                )
            }
            other => {
                return Err(ApiError::BadRequest(format!("unknown parameter {other:?}; expected reset_positions")))
            }
        }
    }
    let found = state.daemon.restart_ingest(&name, reset).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if !found {
        return Err(ApiError::NotFound(format!("no ingest named {name:?}")));
    }
    let reset = reset.map(|r| r.as_str());
    Ok(json_response(StatusCode::ACCEPTED, json!({ "name": name, "restart": "requested", "reset_positions": reset })))
}
