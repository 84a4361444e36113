//! One sync run: choose snapshot, triggered or no-op, and carry it out exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use lakesync_core::{
    Classify, DataPolicy, DeleteMode, PrimaryKey, SchemaChange, Shape, SyncMode, TableName, TableSchema, Version,
};
use lakesync_delta::{DeltaError, DeltaTable, SchemaId, StorageOptions, TableSnapshot};
use lakesync_postgres::state::{self, Checkpoint, Ownership, RowCounts, RunMode, RunRetention};
use lakesync_postgres::{ChangeApply, PgConfig, Sink, Stager};

use crate::changes::{plan_keys, staged_parts, version_runs};
use crate::progress::Phase;
use crate::{EngineError, Progress};

/// What to sync and how.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    /// Delta table path or URI.
    pub source: String,
    /// Object-store options for `source` (besides the environment).
    pub storage: StorageOptions,
    /// Postgres connection.
    pub postgres: PgConfig,
    /// Target table.
    pub table: TableName,
    /// Primary-key columns.
    pub primary_key: PrimaryKey,
    /// What the run may do.
    pub mode: SyncMode,
    /// Stop at this Delta version instead of the latest.
    pub to_version: Option<Version>,
    /// COPY connections for snapshots.
    pub parallelism: usize,
    /// Secondary indexes to build (column lists).
    pub indexes: Vec<Vec<String>>,
    /// Policies for data Postgres cannot hold as is.
    pub policy: DataPolicy,
    /// At most this many versions per incremental transaction (bounds memory).
    pub versions_per_transaction: u64,
    /// What of the source the table holds (filter, columns, deletes, lineage).
    pub shape: Shape,
    /// How long to wait for another run of the same table to finish.
    pub lock_wait: Duration,
    /// Take over an existing Postgres table lakesync did not create (its primary key must be
    /// the sync key and its columns the source's types); without it such a table is refused.
    pub adopt: bool,
    /// When adopting, drop the table's columns the source lacks (otherwise refused).
    pub allow_drop_columns: bool,
    /// How much run history to keep for the table.
    pub history: RunRetention,
    /// Where the run reports progress, for a display.
    pub progress: Arc<Progress>,
    /// In a fleet, the ownership the run is fenced by (`None` for the CLI's `sync`).
    pub fence: Option<lakesync_postgres::fleet::Fence>,
    /// Find out what the run would do, writing nothing: no rows, no state, no run row (see
    /// [`lakesync_postgres::preview`]).
    pub dry_run: bool,
}

/// What a successful run did.
#[derive(Debug, Clone)]
pub struct SyncOutcome {
    /// Snapshot, triggered or no-op.
    pub mode: RunMode,
    /// Why this mode.
    pub reason: String,
    /// Version synced before the run.
    pub from_version: Option<Version>,
    /// Version synced now.
    pub to_version: Version,
    /// Rows changed.
    pub counts: RowCounts,
    /// Wall time.
    pub duration: Duration,
    /// A dry run's DDL: every statement the run would execute to create or change tables and
    /// indexes, in order (empty for a real run).
    pub ddl: Vec<String>,
    /// Where the run's time went, phase by phase.
    pub timings: lakesync_core::Timings,
}

impl SyncOutcome {
    /// A dry run's answer as JSON, the same for `sync --dry-run --json` and
    /// `POST /api/v1/synced-tables/{name}/plan`.
    pub fn plan_json(&self, table: &TableName) -> serde_json::Value {
        serde_json::json!({
            "table": table.to_string(),
            "dry_run": true,
            "mode": self.mode.as_str(),
            "reason": self.reason,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "inserted": self.counts.inserted,
            "updated": self.counts.updated,
            "deleted": self.counts.deleted,
            "ddl": self.ddl,
        })
    }
}

/// Runs one sync of `req`. On failure the run and the error are recorded in the state
/// tables (when Postgres is reachable) and the table stays at its last synced version.
pub async fn sync(req: &SyncRequest) -> Result<SyncOutcome, EngineError> {
    use tracing::Instrument;
    // Every event of the run carries the table and, once it has one, the run's id.
    let span = if req.dry_run {
        tracing::info_span!("dry_run", table = %req.table)
    } else {
        tracing::info_span!("sync", table = %req.table, run = tracing::field::Empty)
    };
    sync_in_span(req).instrument(span).await
}

/// Notes the run's id on the run's span (see [`sync`]).
fn record_run(id: i64) -> i64 {
    tracing::Span::current().record("run", id);
    id
}

async fn sync_in_span(req: &SyncRequest) -> Result<SyncOutcome, EngineError> {
    let started = Instant::now();
    req.progress.take_timings();
    let progress = &req.progress;
    // Opening the source (object store, engine) and connecting to Postgres (and taking the
    // table's lock) are independent: do both at once. The first failure ends both, so a bad
    // source is reported at once even while another run holds the table's lock.
    let opened = tokio::try_join!(
        async {
            let t = Instant::now();
            let (uri, storage) = (req.source.clone(), req.storage.clone());
            let opened = blocking(move || DeltaTable::open_with(&uri, &storage)).await?;
            progress.lap("open the source", t);
            Ok::<_, EngineError>(opened)
        },
        async {
            let t = Instant::now();
            let sink = if req.dry_run {
                Sink::open_preview(&req.postgres, &req.table, req.policy.clone(), req.lock_wait).await?
            } else {
                Sink::open(&req.postgres, &req.table, req.policy.clone(), req.lock_wait, req.history, req.fence).await?
            };
            progress.lap("connect + lock + state checks", t);
            Ok::<_, EngineError>(sink)
        }
    );
    let (source, mut sink) = match opened {
        Ok(both) => both,
        Err(e @ EngineError::Delta(_)) if !req.dry_run => {
            // The source could not be opened (its local directory is gone, its store cannot be
            // configured): a registered table shows it in its state row like any failed run
            // (failures reading the store come later, inside the run). Best effort, no lock.
            record_open_failure(req, &e).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let mut run_id = None;
    let result = run(req, &source, &mut sink, &mut run_id).await;
    let result = match result {
        Ok(mut outcome) => {
            outcome.duration = started.elapsed();
            outcome.timings = req.progress.take_timings();
            Ok(outcome)
        }
        Err(e) if req.dry_run => Err(e),
        Err(e) => {
            let message = e.to_string();
            // A run fenced out by a lost ownership failed, the table did not: its new owner
            // runs it, and this run must not mark it failed.
            let recorded = if matches!(e, EngineError::Postgres(lakesync_postgres::PgError::NotOwner { .. })) {
                state::end_run(sink.client(), &req.table, run_id, &message).await
            } else {
                state::fail_run(sink.client(), &req.table, run_id, &message).await
            };
            if let Err(record) = recorded {
                tracing::warn!(table = %req.table, error = %record, "could not record the failed run");
            }
            tracing::debug!(table = %req.table, class = e.class().as_str(), "sync failed");
            Err(e)
        }
    };
    sink.close().await;
    result
}

/// Records on the table's state row (if it has one) that its source could not be opened.
async fn record_open_failure(req: &SyncRequest, e: &EngineError) {
    let recorded = match req.postgres.connect().await {
        Ok(client) => state::fail_run(&client, &req.table, None, &e.to_string()).await,
        Err(connect) => Err(connect),
    };
    if let Err(record) = recorded {
        tracing::debug!(table = %req.table, error = %record, "could not record the failure to open the source");
    }
}

async fn run(
    req: &SyncRequest,
    source: &DeltaTable,
    sink: &mut Sink,
    run_id: &mut Option<i64>,
) -> Result<SyncOutcome, EngineError> {
    let table = &req.table;
    sink.set_delete_mode(req.shape.delete_mode);
    // The latest snapshot is read while Postgres looks at the target and the state.
    let t = Instant::now();
    let (recorded, latest) = tokio::join!(
        async {
            // A dry run creates no state: a database lakesync never ran against has none.
            let has_state = !req.dry_run || state::exists(sink.client()).await?;
            let recorded = if has_state { state::load(sink.client(), table).await? } else { None };
            let owner = state::ownership(sink.client(), table, recorded.as_ref()).await?;
            Ok::<_, EngineError>((recorded, owner, has_state))
        },
        async {
            let latest = snapshot_at(source, None).await;
            req.progress.lap("log replay", t);
            latest
        }
    );
    let (recorded, owner, has_state) = recorded?;
    // Never write into a table lakesync did not create, unless asked to adopt it.
    let adopting = matches!(owner, Ownership::Foreign { .. });
    if adopting && !req.adopt {
        return Err(state::not_owned(
            table,
            owner,
            "refusing to sync into it: a snapshot would replace its rows and drop its columns the Delta table lacks. \
             Choose another --table, or pass --adopt (adopt = true in the config) to take it over on purpose: \
             allowed when its primary key is the sync key and its columns have the source's types; \
             columns the source lacks are dropped only with --allow-drop-columns",
        )
        .into());
    }
    let latest = latest?;
    let end = match req.to_version {
        Some(v) if v > latest.version() => {
            return Err(EngineError::Request {
                table: table.to_string(),
                message: format!(
                    "--to-version {v} does not exist in {}: its latest version is {}",
                    source.uri(),
                    latest.version()
                ),
            })
        }
        Some(v) if v != latest.version() => snapshot_at(source, Some(v)).await?,
        _ => latest,
    };
    let schema = end.shaped_schema(&req.shape)?;
    // A filter that does not fit the table is refused before anything is written.
    end.read_shape(&req.shape)?;
    check_identifiers(table, source.uri(), &schema)?;
    req.primary_key.validate_against(&schema)?;
    let key = req.primary_key.columns().to_vec();
    if adopting {
        sink.check_adoptable(&schema, &key, req.allow_drop_columns).await?;
    }
    // What shaped the rows the table holds, as recorded by its last successful run.
    let (recorded_key, recorded_options) = match &recorded {
        Some(r) => (Some(r.primary_key.clone()), r.options.clone()),
        None => (None, None),
    };
    // Registered only once the run is known to be allowed: a refused run leaves no state.
    let t = Instant::now();
    let synced = if req.dry_run {
        recorded.and_then(|r| r.synced_version)
    } else {
        state::register(sink.client(), table, recorded, source.uri(), &req.primary_key).await?.synced_version
    };
    req.progress.lap("state reads and writes", t);
    let options = identity_options(req);
    let changed = |field: &str| recorded_options.as_ref().is_some_and(|o| o.get(field) != options.get(field));
    let reshaped = recorded_key
        .as_ref()
        .filter(|k| k.as_slice() != key.as_slice())
        .map(|k| format!("the primary key changed from ({}) to ({})", k.join(", "), key.join(", ")));
    let reshaped = reshaped.or_else(|| {
        ["exclude", "dedup_by", "nul_bytes", "filter", "columns", "delete_mode", "lineage"]
            .into_iter()
            .find(|f| changed(f))
            .map(|f| format!("the {f} option changed, which changes the rows the table holds"))
    });
    let mut outcome =
        execute_run(req, source, sink, run_id, RunPlan { owner, adopting, synced, reshaped }, &end, &schema, &key)
            .await?;
    // Declared indexes that were dropped from the config go; new ones were built by a
    // snapshot, or are built now.
    let old_indexes: Vec<Vec<String>> = match recorded_options.as_ref().and_then(|o| o.get("indexes")) {
        Some(v) => serde_json::from_value(v.clone()).unwrap_or_default(),
        None => req.indexes.clone(),
    };
    if req.dry_run {
        if changed("indexes") && outcome.mode != RunMode::Snapshot {
            outcome.ddl.extend(sink.index_ddl(&old_indexes, &req.indexes).await?);
        }
        if !has_state {
            outcome.ddl.splice(0..0, lakesync_postgres::preview::state_ddl());
        }
        return Ok(outcome);
    }
    let t = Instant::now();
    if changed("indexes") {
        sink.sync_indexes(&old_indexes, &req.indexes).await?;
    }
    state::record_identity(sink.client(), table, &req.primary_key, &options).await?;
    req.progress.lap("state reads and writes", t);
    Ok(outcome)
}

/// The options that shape a synced table's contents and indexes, recorded with it.
fn identity_options(req: &SyncRequest) -> serde_json::Value {
    let mut exclude = req.shape.exclude.clone();
    exclude.sort();
    // Options at their defaults are left out, so that tables synced before they existed
    // keep their identity.
    let mut options = serde_json::json!({
        "exclude": exclude,
        "indexes": req.indexes,
        "dedup_by": req.policy.dedup_by,
        "nul_bytes": match req.policy.nul_bytes {
            lakesync_core::NulBytePolicy::Error => "error",
            lakesync_core::NulBytePolicy::Strip => "strip",
        },
    });
    let shape = &req.shape;
    if let Some(filter) = &shape.filter {
        options["filter"] = filter.text().into();
    }
    if !shape.columns.is_empty() {
        options["columns"] = shape.columns.iter().map(|c| c.display()).collect::<Vec<_>>().into();
    }
    if shape.delete_mode != DeleteMode::Hard {
        options["delete_mode"] = shape.delete_mode.as_str().into();
    }
    if shape.lineage {
        options["lineage"] = true.into();
    }
    options
}

/// What the start of a run found out, for choosing what it does.
struct RunPlan {
    owner: Ownership,
    adopting: bool,
    synced: Option<Version>,
    /// Why the rows must be reloaded although the source may not have changed: the key or an
    /// option that shapes the rows changed since the last run.
    reshaped: Option<String>,
}

/// Chooses snapshot, change feed or no-op for a run that may go ahead, and carries it out.
#[allow(clippy::too_many_arguments)]
async fn execute_run(
    req: &SyncRequest,
    source: &DeltaTable,
    sink: &mut Sink,
    run_id: &mut Option<i64>,
    plan: RunPlan,
    end: &TableSnapshot,
    schema: &TableSchema,
    key: &[String],
) -> Result<SyncOutcome, EngineError> {
    let table = &req.table;
    let RunPlan { owner, adopting, synced, reshaped } = plan;
    let reason = match (req.mode, synced) {
        _ if adopting => "adopting the existing table (--adopt)".to_string(),
        // Another key or an option that shapes the rows: reload, also with --mode triggered.
        (_, Some(_)) if reshaped.is_some() => reshaped.unwrap_or_default(),
        (SyncMode::Snapshot, _) => "requested with --mode snapshot".to_string(),
        (_, None) => "initial snapshot: nothing synced yet".to_string(),
        // Dropped by hand: the data is gone, so the synced version means nothing; reload.
        (_, Some(_)) if owner == Ownership::Absent => "the target table is missing (dropped?)".to_string(),
        (_, Some(s)) if s == end.version() && req.dry_run => {
            return Ok(outcome(RunMode::Noop, "already at the requested version", synced, s, RowCounts::default()));
        }
        (_, Some(s)) if s == end.version() => {
            let id = record_run(
                state::start_run(sink.client(), table, RunMode::Noop, "already at the requested version", synced, s)
                    .await?,
            );
            *run_id = Some(id);
            state::finish_noop(sink.client(), table, id).await?;
            tracing::info!(table = %table, version = s, "nothing new to sync");
            return Ok(outcome(RunMode::Noop, "already at the requested version", synced, s, RowCounts::default()));
        }
        (_, Some(s)) if s > end.version() => {
            return Err(EngineError::Request {
                table: table.to_string(),
                message: format!(
                    "it is synced to Delta version {s}, newer than the requested version {}; use --mode snapshot to go back",
                    end.version()
                ),
            })
        }
        (mode, Some(s)) => {
            if !end.cdf_enabled() {
                return Err(source.cdf_not_enabled(end.version()).into());
            }
            match triggered(req, source, sink, run_id, s, end, key).await {
                Ok(done) => return Ok(done),
                Err(e) if mode == SyncMode::Auto && e.calls_for_snapshot().is_some() => {
                    let reason = e.calls_for_snapshot().unwrap_or_default();
                    tracing::warn!(table = %table, error = %e, "falling back to a snapshot");
                    // Close the triggered run (if one started) before the fallback run.
                    if let Some(id) = run_id.take().filter(|_| !req.dry_run) {
                        state::fail_run(sink.client(), table, Some(id), &format!("falling back to a snapshot: {reason}")).await?;
                    }
                    format!("the change data feed cannot serve versions {}..={}: {reason}", s + 1, end.version())
                }
                Err(e) => return Err(e),
            }
        }
    };
    if req.dry_run {
        return preview_snapshot(req, sink, synced, end, schema, key, &reason).await;
    }
    tracing::info!(table = %table, version = end.version(), reason = %reason, "snapshot");
    snapshot(req, sink, run_id, synced, end, schema, key, &reason).await
}

/// Postgres keeps the first 63 bytes of an identifier: a longer column name would be
/// truncated (and could then collide with another column, the key among them). Refused,
/// naming the column, before anything is written.
fn check_identifiers(table: &TableName, uri: &str, schema: &TableSchema) -> Result<(), EngineError> {
    match schema.columns.iter().find(|c| c.name.len() > 63) {
        None => Ok(()),
        Some(c) => Err(EngineError::Request {
            table: table.to_string(),
            message: format!(
                "column {:?} of {uri} is {} bytes long, but Postgres identifiers hold at most 63 bytes (a longer name \
                 would be truncated and could collide with another column); exclude it with --exclude, or rename it",
                c.name,
                c.name.len()
            ),
        }),
    }
}

fn outcome(mode: RunMode, reason: &str, from: Option<Version>, to: Version, counts: RowCounts) -> SyncOutcome {
    SyncOutcome {
        mode,
        reason: reason.to_string(),
        from_version: from,
        to_version: to,
        counts,
        duration: Duration::ZERO,
        ddl: Vec::new(),
        timings: Default::default(),
    }
}

/// Reads the rows `shape` keeps from `end` on a blocking thread into `sender`, counting them
/// in `progress` with the reader's own time (what a load waits for when COPY keeps up). Stops
/// early when the receiver is gone: its owner failed, and reports why.
fn spawn_reader(
    end: &TableSnapshot,
    shape: &Shape,
    sender: tokio::sync::mpsc::Sender<RecordBatch>,
    progress: Arc<Progress>,
) -> tokio::task::JoinHandle<Result<(), DeltaError>> {
    let (end, shape) = (end.clone(), shape.clone());
    tokio::task::spawn_blocking(move || {
        let shape = end.read_shape(&shape)?;
        // With a filter the source's count is an upper bound; the display shows it.
        progress.set_total(end.row_count().ok().flatten().unwrap_or(0));
        let mut reading = Duration::ZERO;
        let mut batches = end.shaped_batches(&shape)?;
        loop {
            let r = Instant::now();
            let Some(batch) = batches.next() else { break };
            reading += r.elapsed();
            let batch = batch?;
            progress.add(batch.num_rows() as u64);
            if sender.blocking_send(batch).is_err() {
                break;
            }
        }
        progress.time("read Delta (within the load)", reading);
        Ok(())
    })
}

/// What a snapshot would do (a dry run): its DDL, and its counts from the rows loaded into a
/// temporary table and compared with the target (see [`Sink::preview_snapshot`]).
async fn preview_snapshot(
    req: &SyncRequest,
    sink: &mut Sink,
    synced: Option<Version>,
    end: &TableSnapshot,
    schema: &TableSchema,
    key: &[String],
    reason: &str,
) -> Result<SyncOutcome, EngineError> {
    let ddl = sink.snapshot_ddl(schema, key, &req.indexes).await?;
    let (sender, rows) = tokio::sync::mpsc::channel(4);
    let reader = spawn_reader(end, &req.shape, sender, req.progress.clone());
    let counts = sink.preview_snapshot(schema, key, end.version(), rows).await;
    reader.await.map_err(|e| EngineError::Internal(format!("snapshot reader panicked: {e}")))??;
    let mut done = outcome(RunMode::Snapshot, reason, synced, end.version(), counts?);
    done.ddl = ddl;
    Ok(done)
}

#[allow(clippy::too_many_arguments)]
async fn snapshot(
    req: &SyncRequest,
    sink: &mut Sink,
    run_id: &mut Option<i64>,
    synced: Option<Version>,
    end: &TableSnapshot,
    schema: &TableSchema,
    key: &[String],
    reason: &str,
) -> Result<SyncOutcome, EngineError> {
    let version = end.version();
    let t = Instant::now();
    let id = record_run(state::start_run(sink.client(), &req.table, RunMode::Snapshot, reason, synced, version).await?);
    *run_id = Some(id);
    // The version the snapshot replaces: `synced`, or where a fallen-back triggered run's
    // committed chunks left it. Read under the table lock; the checkpoint moves it only from
    // there (a compare-and-set).
    let from = state::load(sink.client(), &req.table).await?.and_then(|r| r.synced_version);
    let t = req.progress.lap("state reads and writes", t);
    let staging = sink.prepare_staging(schema, id).await?;
    let t = req.progress.lap("staging table", t);
    let copy = sink.copy_into(&staging, schema, key, version, req.parallelism);
    let sender = copy.sender();
    req.progress.set_phase(Phase::Loading);
    let reader = spawn_reader(end, &req.shape, sender, req.progress.clone());
    let read = reader.await.map_err(|e| EngineError::Internal(format!("snapshot reader panicked: {e}")));
    let loaded = copy.finish().await;
    let t = req.progress.lap("load (read Delta + COPY)", t);
    let result = async {
        let rows = loaded?;
        read??;
        let checkpoint = Checkpoint { version, commit_timestamp_ms: Some(commit_ts(end).await?) };
        let t = req.progress.lap("commit timestamp", t);
        tracing::debug!(table = %req.table, rows, "staging loaded");
        req.progress.set_phase(Phase::Indexing);
        let mut timings = lakesync_core::Timings::default();
        let finished =
            sink.finish_snapshot(&staging, schema, key, &req.indexes, rows, id, from, checkpoint, &mut timings).await;
        req.progress.merge(&timings);
        let _ = t;
        Ok::<_, EngineError>(finished?)
    }
    .await;
    match result {
        Ok(counts) => Ok(outcome(RunMode::Snapshot, reason, synced, version, counts)),
        Err(e) => {
            sink.discard_staging(&staging).await;
            Err(e)
        }
    }
}

/// Applies the change data feed from `synced + 1` to `end`, split at schema changes and in
/// chunks of versions, each chunk one transaction with its checkpoint.
#[allow(clippy::too_many_arguments)]
async fn triggered(
    req: &SyncRequest,
    source: &DeltaTable,
    sink: &mut Sink,
    run_id: &mut Option<i64>,
    synced: Version,
    end: &TableSnapshot,
    key: &[String],
) -> Result<SyncOutcome, EngineError> {
    let table = &req.table;
    let end_version = end.version();
    let unavailable = |reason: String| {
        EngineError::Delta(DeltaError::CdfUnavailable {
            uri: source.uri().to_string(),
            start: synced + 1,
            end: end_version,
            reason,
        })
    };
    // The schema the Postgres table holds: the source's at the synced version.
    // The synced version's snapshot is read while Postgres records the run's start.
    let t = Instant::now();
    let (at_synced, id) = tokio::join!(snapshot_at(source, Some(synced)), async {
        if req.dry_run {
            return Ok(0);
        }
        state::start_run(sink.client(), table, RunMode::Triggered, "change data feed", Some(synced), end_version).await
    });
    let id = id?;
    req.progress.lap("log replay", t);
    if !req.dry_run {
        *run_id = Some(record_run(id));
    }
    let mut ddl = Vec::new();
    let (mut schema, mut schema_id, mut shape) = match at_synced {
        Ok(s) => (s.shaped_schema(&req.shape)?, s.schema_id(), s.read_shape(&req.shape)?),
        // A store hiccup is retried; only a version the log no longer has calls for a snapshot.
        Err(e) if e.class() == lakesync_core::ErrorClass::Transient => return Err(e),
        Err(e) => return Err(unavailable(format!("version {synced} is no longer readable: {e}"))),
    };
    let end_id = end.schema_id();
    let mut total = RowCounts::default();
    let mut start = synced + 1;
    while start <= end_version {
        // The segment [start, seg_end] has one Delta schema (exactly as logged: the feed reads
        // no range across a change, even of a column comment); a change at seg_end + 1 starts
        // the next. What the change means for Postgres is read from lakesync's schema.
        let (seg_end, evolved) = if schema_id == end_id {
            (end_version, (Vec::new(), Vec::new()))
        } else {
            let first_change = first_schema_change(source, &schema_id, start, end_version).await?;
            if first_change > start {
                (first_change - 1, (Vec::new(), Vec::new()))
            } else {
                let at_change = snapshot_at(source, Some(first_change)).await?;
                let new_schema = at_change.shaped_schema(&req.shape)?;
                let evolved = match schema.change_to(&new_schema) {
                    SchemaChange::Evolved { added, widened } => {
                        tracing::info!(table = %table, version = first_change, added = added.len(), widened = widened.len(), "source added or widened columns");
                        (added, widened)
                    }
                    SchemaChange::Breaking(why) => {
                        return Err(unavailable(format!("at version {first_change}: {why}")))
                    }
                    // Comments, field metadata, nullability or excluded columns: nothing
                    // for Postgres to do.
                    SchemaChange::None => (Vec::new(), Vec::new()),
                };
                schema = new_schema;
                schema_id = at_change.schema_id();
                shape = at_change.read_shape(&req.shape)?;
                let seg_end = if schema_id == end_id {
                    end_version
                } else {
                    first_schema_change(source, &schema_id, start + 1, end_version).await? - 1
                };
                (seg_end, evolved)
            }
        };
        let mut evolved = evolved;
        let mut chunk_start = start;
        while chunk_start <= seg_end {
            // A dry run rolls back each transaction, so it takes a segment in one: a later
            // chunk would otherwise be counted against a table without the earlier ones.
            let per_transaction = if req.dry_run { u64::MAX / 2 } else { req.versions_per_transaction.max(1) };
            let chunk_end = (chunk_start + per_transaction - 1).min(seg_end);
            let t = std::time::Instant::now();
            // Only soft deletes need each version's commit timestamp.
            let stamps = (req.shape.delete_mode == DeleteMode::Soft).then(crate::changes::CommitStamps::default);
            let mut plan = {
                let (source, table, key, shape) = (source.clone(), table.clone(), key.to_vec(), shape.clone());
                let dedup_by = req.policy.dedup_by.clone();
                let stamps = stamps.clone();
                tokio::task::spawn_blocking(move || {
                    let mut columns = key.clone();
                    columns.extend(dedup_by.iter().filter(|c| !key.contains(c)).cloned());
                    plan_keys(&table, &key, dedup_by.as_deref(), || {
                        let stamps = stamps.clone();
                        Ok(source.shaped_changes(chunk_start, chunk_end, &shape, Some(&columns))?.inspect(move |b| {
                            if let Some(stamps) = &stamps {
                                stamps.observe(b)
                            }
                        }))
                    })
                })
                .await
                .map_err(|e| EngineError::Internal(format!("change planner panicked: {e}")))??
            };
            let planned_ms = t.elapsed().as_millis();
            let phase = req.progress.lap("plan (change feed keys)", t);
            let mut deletes = plan.take_deletes(table, key)?;
            if let Some(stamps) = &stamps {
                deletes = stamps.stamp(table, deletes)?;
            }
            let changed_rows = deletes.iter().map(|b| b.num_rows()).sum::<usize>() + plan.upsert_count();
            // Upserts of more than one part are staged by a second session (see `Stager`),
            // which connects (and drops what a crashed run left) while this session deletes.
            let parts = staged_parts(plan.upsert_count());
            let stager = (parts > 1 && !req.dry_run).then(|| tokio::spawn(sink.open_stager(&schema, key)));
            // Pass two (the winning rows) and the checkpoint's facts are read while Postgres
            // deletes.
            let pass_two = {
                let (source, table, key, schema, end, shape) =
                    (source.clone(), table.clone(), key.to_vec(), schema.clone(), end.clone(), shape.clone());
                // With --dedup-by or a filter the table holds fewer rows than the source by
                // design, with soft or ignored deletes more: the row-count check cannot apply.
                let count_rows = req.policy.dedup_by.is_none()
                    && req.shape.filter.is_none()
                    && req.shape.delete_mode == DeleteMode::Hard;
                tokio::task::spawn_blocking(move || -> Result<_, EngineError> {
                    let mut full = Vec::new();
                    for (a, b) in version_runs(&plan.upsert_versions()) {
                        full.extend(source.shaped_changes(a, b, &shape, None)?.collect::<Result<Vec<_>, _>>()?);
                    }
                    let upserts = plan.into_upserts(&table, &schema, &key, &full)?;
                    drop(full);
                    let at = if chunk_end == end_version { end } else { source.snapshot(Some(chunk_end))? };
                    let checkpoint =
                        Checkpoint { version: chunk_end, commit_timestamp_ms: Some(at.commit_timestamp_ms()?) };
                    let source_rows = if count_rows { at.row_count()? } else { None };
                    Ok((upserts, checkpoint, source_rows))
                })
            };
            // Columns are added or widened by the segment's first chunk only.
            let (added, widened) = std::mem::take(&mut evolved);
            let mut apply = sink.begin_changes(&schema, key, (&added, &widened), changed_rows).await?;
            apply.delete(&deletes).await?;
            drop(deletes);
            let phase = req.progress.lap("delete", phase);
            let (upserts, checkpoint, source_rows) =
                pass_two.await.map_err(|e| EngineError::Internal(format!("change reader panicked: {e}")))??;
            let phase = req.progress.lap("read changed rows (beyond the delete)", phase);
            tracing::debug!(table = %table, from = chunk_start, to = chunk_end, planned_ms, read_ms = t.elapsed().as_millis(), "read the change feed");
            // Without a staging session (a small chunk, or one that could not connect or
            // create its tables: the temporary-table path needs neither) the rows go through
            // a temporary table of this session.
            let stager = match stager {
                None => None,
                Some(opening) => match opening.await {
                    Ok(Ok(stager)) => Some(Arc::new(stager)),
                    Ok(Err(e)) => {
                        tracing::warn!(table = %table, error = %e, "no staging session; upserting through a temporary table");
                        None
                    }
                    Err(e) => return Err(EngineError::Internal(format!("stager panicked: {e}"))),
                },
            };
            let counts = match stager {
                None if req.dry_run => {
                    apply.upsert(&upserts).await?;
                    ddl.extend(apply.ddl().iter().cloned());
                    let counts = apply.rollback().await?;
                    req.progress.lap("upsert and commit", phase);
                    counts
                }
                None => {
                    apply.upsert(&upserts).await?;
                    drop(upserts);
                    let counts =
                        apply.commit(id, chunk_start - 1, checkpoint, source_rows, chunk_end == end_version).await?;
                    req.progress.lap("upsert and commit", phase);
                    counts
                }
                Some(stager) => {
                    let applied = async {
                        apply_staged(&mut apply, &stager, upserts).await?;
                        Ok::<_, EngineError>(
                            apply
                                .commit(id, chunk_start - 1, checkpoint, source_rows, chunk_end == end_version)
                                .await?,
                        )
                    }
                    .await;
                    let dropping = req.progress.lap("upsert and commit", phase);
                    // The part tables go either way (a failed chunk's transaction is rolled
                    // back by now, releasing them); the next run drops whatever this leaves.
                    if let Err(e) = stager.clear().await {
                        tracing::warn!(table = %table, error = %e, "could not drop the staging tables; the next run will");
                    }
                    req.progress.lap("drop the staged parts", dropping);
                    applied?
                }
            };
            tracing::info!(table = %table, from = chunk_start, to = chunk_end, inserted = counts.inserted, updated = counts.updated, deleted = counts.deleted, "applied changes");
            total.inserted += counts.inserted;
            total.updated += counts.updated;
            total.deleted += counts.deleted;
            chunk_start = chunk_end + 1;
        }
        start = seg_end + 1;
    }
    let mut done = outcome(RunMode::Triggered, "change data feed", Some(synced), end_version, total);
    done.ddl = ddl;
    Ok(done)
}

/// Applies `upserts` part by part while a second session stages the next part: the COPY of
/// part `k + 1` overlaps the `MERGE` of part `k`.
async fn apply_staged(
    apply: &mut ChangeApply<'_>,
    stager: &Arc<Stager>,
    upserts: Vec<RecordBatch>,
) -> Result<(), EngineError> {
    let upserts = Arc::new(upserts);
    let (staged_tx, mut staged) = tokio::sync::mpsc::unbounded_channel();
    let copier = {
        let (stager, upserts) = (stager.clone(), upserts.clone());
        tokio::spawn(async move {
            for (part, batch) in upserts.iter().enumerate() {
                stager.stage(part, batch).await?;
                if staged_tx.send(part).is_err() {
                    break;
                }
            }
            Ok::<_, lakesync_postgres::PgError>(())
        })
    };
    for (part, batch) in upserts.iter().enumerate() {
        match staged.recv().await {
            Some(p) if p == part => {}
            // The copier stopped early: its own error says why.
            _ => {
                copier.await.map_err(|e| EngineError::Internal(format!("stager panicked: {e}")))??;
                return Err(EngineError::Internal(format!("part {part} of the upserts was never staged")));
            }
        }
        if let Err(e) = apply.upsert_staged(stager, part, batch).await {
            // Stopped for sure before the caller clears the staging tables.
            copier.abort();
            let _ = copier.await;
            return Err(e.into());
        }
    }
    copier.await.map_err(|e| EngineError::Internal(format!("stager panicked: {e}")))??;
    Ok(())
}

/// The first version in `lo..=hi` whose Delta schema differs from `schema` (binary search;
/// assumes the schema does not change back and forth).
async fn first_schema_change(
    source: &DeltaTable,
    schema: &SchemaId,
    lo: Version,
    hi: Version,
) -> Result<Version, EngineError> {
    let (mut lo, mut hi) = (lo, hi);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if snapshot_at(source, Some(mid)).await?.schema_id() == *schema {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

async fn snapshot_at(source: &DeltaTable, version: Option<Version>) -> Result<TableSnapshot, EngineError> {
    let source = source.clone();
    Ok(blocking(move || source.snapshot(version)).await?)
}

async fn commit_ts(snap: &TableSnapshot) -> Result<i64, EngineError> {
    let snap = snap.clone();
    Ok(blocking(move || snap.commit_timestamp_ms()).await?)
}

/// Runs blocking kernel work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DeltaError> + Send + 'static,
) -> Result<T, DeltaError> {
    tokio::task::spawn_blocking(f).await.expect("blocking Delta task panicked")
}
