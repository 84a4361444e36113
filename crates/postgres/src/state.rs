//! Sync state in Postgres (schema `lakesync`): one row per synced table and a run history.
//!
//! The synced version is only ever written inside the transaction that writes the data it
//! covers (see [`crate::snapshot`] and [`crate::apply`]); that is lakesync's exactly-once
//! guarantee. Runs are recorded as `running` when they start and finished in that same
//! transaction, or marked `failed` when they fail.

use lakesync_core::{PrimaryKey, TableName, Version};
use tokio_postgres::{Client, GenericClient};

use crate::PgError;

/// Table states, named like Lakebase synced tables.
pub mod states {
    /// The first snapshot has not completed.
    pub const PROVISIONING: &str = "PROVISIONING_INITIAL_SNAPSHOT";
    /// A sync run is applying changes.
    pub const UPDATING: &str = "ONLINE_TRIGGERED_UPDATE";
    /// Synced; the last run succeeded.
    pub const ONLINE: &str = "ONLINE_NO_PENDING_UPDATE";
    /// The last run failed; the table holds the last synced version.
    pub const ONLINE_FAILED: &str = "ONLINE_PIPELINE_FAILED";
    /// The last run failed and nothing was ever synced.
    pub const OFFLINE_FAILED: &str = "OFFLINE_FAILED";
}

/// The state tables. Each is created with its key only and gets every other column from one
/// `ADD COLUMN IF NOT EXISTS` list, so the same statements create new state and bring state
/// written by older builds (which lack later columns) up to date; a column is listed once.
pub(crate) const STATE_DDL: &str = r#"
CREATE TABLE IF NOT EXISTS lakesync.synced_tables (
    target_schema text NOT NULL,
    target_table text NOT NULL,
    PRIMARY KEY (target_schema, target_table)
);
ALTER TABLE lakesync.synced_tables
    ADD COLUMN IF NOT EXISTS source_uri text NOT NULL,
    ADD COLUMN IF NOT EXISTS primary_key text[] NOT NULL,
    ADD COLUMN IF NOT EXISTS synced_version bigint,
    ADD COLUMN IF NOT EXISTS synced_commit_timestamp timestamptz,
    ADD COLUMN IF NOT EXISTS row_count bigint,
    ADD COLUMN IF NOT EXISTS state text NOT NULL,
    ADD COLUMN IF NOT EXISTS last_error text,
    ADD COLUMN IF NOT EXISTS rows_inserted bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS rows_updated bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS rows_deleted bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS runs_succeeded bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS runs_failed bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS table_oid bigint,
    ADD COLUMN IF NOT EXISTS options jsonb;
CREATE TABLE IF NOT EXISTS lakesync.runs (
    run_id bigserial PRIMARY KEY
);
ALTER TABLE lakesync.runs
    ADD COLUMN IF NOT EXISTS target_schema text NOT NULL,
    ADD COLUMN IF NOT EXISTS target_table text NOT NULL,
    ADD COLUMN IF NOT EXISTS started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ADD COLUMN IF NOT EXISTS ended_at timestamptz,
    ADD COLUMN IF NOT EXISTS mode text NOT NULL,
    ADD COLUMN IF NOT EXISTS reason text,
    ADD COLUMN IF NOT EXISTS from_version bigint,
    ADD COLUMN IF NOT EXISTS to_version bigint,
    ADD COLUMN IF NOT EXISTS rows_inserted bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS rows_updated bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS rows_deleted bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS outcome text NOT NULL,
    ADD COLUMN IF NOT EXISTS error text,
    ADD COLUMN IF NOT EXISTS replica text;
CREATE TABLE IF NOT EXISTS lakesync.registry (
    kind text NOT NULL,
    name text NOT NULL,
    PRIMARY KEY (kind, name)
);
ALTER TABLE lakesync.registry
    ADD COLUMN IF NOT EXISTS spec jsonb NOT NULL,
    ADD COLUMN IF NOT EXISTS origin text NOT NULL,
    ADD COLUMN IF NOT EXISTS owner_key text NOT NULL,
    ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS removed_at timestamptz;
CREATE TABLE IF NOT EXISTS lakesync.replicas (
    replica_id text PRIMARY KEY
);
ALTER TABLE lakesync.replicas
    ADD COLUMN IF NOT EXISTS pid integer NOT NULL,
    ADD COLUMN IF NOT EXISTS address text,
    ADD COLUMN IF NOT EXISTS build text,
    ADD COLUMN IF NOT EXISTS started_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS heartbeat_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS session_name text;
CREATE INDEX IF NOT EXISTS runs_by_table ON lakesync.runs (target_schema, target_table, run_id DESC);
"#;

/// Marks state created (or brought up to date) by this build's [`STATE_DDL`] (a comment on
/// `lakesync.synced_tables`); change it whenever the DDL changes, so existing state gets the
/// new columns.
const STATE_MARK: &str = "lakesync state v6";

/// Creates the state schema if needed. Serialized by a transaction-level advisory lock so
/// concurrent first runs do not race on `CREATE ... IF NOT EXISTS`.
pub async fn ensure_schema(client: &mut Client) -> Result<(), PgError> {
    // The common case (every run of `serve`'s continuous tables) is one catalog lookup; state
    // left by an older build lacks the mark and is brought up to date below.
    let present: bool = client
        .query_one(
            "SELECT coalesce(obj_description(to_regclass('lakesync.synced_tables'), 'pg_class') = $1, false) \
             AND to_regclass('lakesync.runs_by_table') IS NOT NULL",
            &[&STATE_MARK],
        )
        .await
        .map_err(PgError::query("lakesync state", "look for the lakesync state schema"))?
        .get(0);
    if present {
        return Ok(());
    }
    let err = PgError::query("lakesync state", "create the lakesync state schema");
    let tx = client.transaction().await.map_err(err)?;
    let err = |e| PgError::Query {
        table: "lakesync state".into(),
        action: "create the lakesync state schema".into(),
        error: e,
    };
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('lakesync:state-ddl', 0))", &[]).await.map_err(err)?;
    // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists;
    // a least-privilege role gets a pre-created schema instead.
    let exists: bool = tx.query_one("SELECT to_regnamespace('lakesync') IS NOT NULL", &[]).await.map_err(err)?.get(0);
    if !exists {
        tx.batch_execute("CREATE SCHEMA lakesync").await.map_err(err)?;
    }
    tx.batch_execute(STATE_DDL).await.map_err(err)?;
    // COMMENT takes no parameters; the mark is a constant without quotes.
    tx.batch_execute(&format!("COMMENT ON TABLE lakesync.synced_tables IS '{STATE_MARK}'")).await.map_err(err)?;
    tx.commit().await.map_err(err)
}

/// The recorded state of one synced table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedTable {
    /// Target table.
    pub table: TableName,
    /// Delta table location.
    pub source: String,
    /// Primary-key columns.
    pub primary_key: Vec<String>,
    /// Last Delta version whose data the table holds.
    pub synced_version: Option<Version>,
    /// RFC 3339 commit timestamp of that version.
    pub synced_commit_timestamp: Option<String>,
    /// One of [`states`].
    pub state: String,
    /// The last failure, if the last run failed.
    pub last_error: Option<String>,
    /// The OID of the Postgres table lakesync created (or adopted), recorded with every
    /// checkpoint; `None` before the first snapshot (and in state written by builds before
    /// ownership was recorded).
    pub table_oid: Option<i64>,
    /// The options that shape the table's contents (see [`record_identity`]) as of its last
    /// successful run; `None` before it (and in state written by older builds).
    pub options: Option<serde_json::Value>,
}

/// Where a finished run leaves the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The Delta version the table now holds.
    pub version: Version,
    /// That version's commit timestamp, ms since the epoch.
    pub commit_timestamp_ms: Option<i64>,
}

/// Rows a run changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RowCounts {
    /// Rows inserted.
    pub inserted: u64,
    /// Rows whose values changed.
    pub updated: u64,
    /// Rows deleted.
    pub deleted: u64,
}

/// How a run got the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Full snapshot.
    Snapshot,
    /// Change data feed.
    Triggered,
    /// Nothing new.
    Noop,
}

impl RunMode {
    /// Name stored in the run history.
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::Snapshot => "snapshot",
            RunMode::Triggered => "triggered",
            RunMode::Noop => "noop",
        }
    }
}

/// Reads the state row of `table`.
pub async fn load(client: &impl GenericClient, table: &TableName) -> Result<Option<SyncedTable>, PgError> {
    let row = client
        .query_opt(
            "SELECT source_uri, primary_key, synced_version, \
             to_char(synced_commit_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), state, last_error, table_oid, options \
             FROM lakesync.synced_tables WHERE target_schema = $1 AND target_table = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(PgError::query(table, "read the sync state"))?;
    Ok(row.map(|r| SyncedTable {
        table: table.clone(),
        source: r.get(0),
        primary_key: r.get(1),
        synced_version: r.get::<_, Option<i64>>(2).map(|v| v as Version),
        synced_commit_timestamp: r.get(3),
        state: r.get(4),
        last_error: r.get(5),
        table_oid: r.get(6),
        options: r.get(7),
    }))
}

/// Registers `table` (first run) or checks that the source did not change; `existing` is its
/// state row as [`load`] read it under the table lock. (A changed key is the caller's to
/// handle: it calls for a snapshot, and [`record_identity`] then records it.)
pub async fn register(
    client: &Client,
    table: &TableName,
    existing: Option<SyncedTable>,
    source: &str,
    key: &PrimaryKey,
) -> Result<SyncedTable, PgError> {
    if let Some(existing) = existing {
        if existing.source != source {
            return Err(PgError::Mismatch {
                table: table.to_string(),
                message: format!(
                    "it is already synced from {}; refusing to sync it from {source} (drop the table and its row in lakesync.synced_tables to change the source)",
                    existing.source
                ),
            });
        }
        return Ok(existing);
    }
    client
        .execute(
            "INSERT INTO lakesync.synced_tables (target_schema, target_table, source_uri, primary_key, state) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&table.schema, &table.name, &source, &key.columns(), &states::PROVISIONING],
        )
        .await
        .map_err(PgError::query(table, "register the synced table"))?;
    load(client, table).await?.ok_or_else(|| PgError::Mismatch {
        table: table.to_string(),
        message: "state row vanished after registration".into(),
    })
}

/// Whose the target table is, as far as lakesync's state can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// No table of that name exists.
    Absent,
    /// The table lakesync created (or adopted): its OID is the one recorded with the last
    /// checkpoint. State written before OIDs were recorded counts a table with a synced
    /// version as owned; its next checkpoint records the OID.
    Owned,
    /// A table lakesync did not create: there is no state for it, the state never completed
    /// a snapshot, or the table was dropped and re-created by someone else (another OID).
    Foreign {
        /// The OID of the table that exists now.
        oid: i64,
        /// The OID lakesync recorded, if any.
        recorded: Option<i64>,
    },
}

/// The OID of `table`, if it exists.
pub async fn table_oid(client: &impl GenericClient, table: &TableName) -> Result<Option<i64>, PgError> {
    Ok(client
        .query_one("SELECT to_regclass($1)::oid::bigint", &[&crate::ddl::qualified(table)])
        .await
        .map_err(PgError::query(table, "look up the table"))?
        .get(0))
}

/// Whether the existing `table` is lakesync's, given its recorded state (`None`: no state row).
pub async fn ownership(
    client: &impl GenericClient,
    table: &TableName,
    recorded: Option<&SyncedTable>,
) -> Result<Ownership, PgError> {
    let Some(oid) = table_oid(client, table).await? else { return Ok(Ownership::Absent) };
    let recorded_oid = recorded.and_then(|r| r.table_oid);
    Ok(match recorded {
        Some(r) if r.table_oid == Some(oid) => Ownership::Owned,
        Some(r) if r.table_oid.is_none() && r.synced_version.is_some() => Ownership::Owned,
        _ => Ownership::Foreign { oid, recorded: recorded_oid },
    })
}

/// [`ownership`] of `table` as its recorded state says (none when lakesync never ran against
/// this database), for checks made outside a run.
pub async fn current_ownership(client: &impl GenericClient, table: &TableName) -> Result<Ownership, PgError> {
    let recorded = if exists(client).await? { load(client, table).await? } else { None };
    ownership(client, table, recorded.as_ref()).await
}

/// The error for a sync or purge of a table lakesync does not own; `what` says what was
/// refused.
pub fn not_owned(table: &TableName, ownership: Ownership, what: &str) -> PgError {
    let why = match ownership {
        Ownership::Foreign { oid, recorded: Some(recorded) } => format!(
            "it is not the table lakesync created: that one (OID {recorded}) was dropped and this one (OID {oid}) was created by someone else"
        ),
        _ => "it exists and lakesync did not create it".to_string(),
    };
    PgError::NotOwned { table: table.to_string(), message: format!("{why}; {what}") }
}

/// Records what shapes the table's contents after a successful run: the primary key and the
/// `options` (excluded columns, declared indexes, data policies). A later run whose options
/// differ does what the difference implies (see the engine). Written after the run's commit:
/// a crash in between only makes the next run redo that.
pub async fn record_identity(
    client: &impl GenericClient,
    table: &TableName,
    key: &PrimaryKey,
    options: &serde_json::Value,
) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE lakesync.synced_tables SET primary_key = $3, options = $4 \
             WHERE target_schema = $1 AND target_table = $2 AND (primary_key, options) IS DISTINCT FROM ($3, $4)",
            &[&table.schema, &table.name, &key.columns(), options],
        )
        .await
        .map_err(PgError::query(table, "record the table's options"))?;
    Ok(())
}

/// Marks runs left `running` by a crashed process as `abandoned` (call under the table lock).
pub async fn abandon_stale_runs(client: &Client, table: &TableName) -> Result<u64, PgError> {
    client
        .execute(
            "UPDATE lakesync.runs SET outcome = 'abandoned', ended_at = clock_timestamp(), \
             error = 'the process running it stopped before it finished; nothing it did was committed' \
             WHERE target_schema = $1 AND target_table = $2 AND outcome = 'running'",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(PgError::query(table, "mark abandoned runs"))
}

/// How much run history to keep per table: the newest `max_runs` runs, and none older than
/// `max_age` (when set). Runs still `running` are never removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunRetention {
    /// Runs kept per table.
    pub max_runs: u64,
    /// Runs older than this are removed.
    pub max_age: Option<std::time::Duration>,
}

impl Default for RunRetention {
    /// The last 10,000 runs, at most 30 days old.
    fn default() -> Self {
        Self { max_runs: 10_000, max_age: Some(std::time::Duration::from_secs(30 * 86_400)) }
    }
}

/// Removes `table`'s runs beyond `keep` (call under the table lock). Both conditions walk the
/// `runs_by_table` index of this table only.
pub async fn prune_runs(client: &Client, table: &TableName, keep: RunRetention) -> Result<u64, PgError> {
    let max_age_secs = keep.max_age.map(|d| d.as_secs_f64());
    client
        .execute(
            "DELETE FROM lakesync.runs WHERE target_schema = $1 AND target_table = $2 AND outcome <> 'running' \
             AND (run_id <= (SELECT run_id FROM lakesync.runs WHERE target_schema = $1 AND target_table = $2 \
                             ORDER BY run_id DESC OFFSET $3 LIMIT 1) \
                  OR started_at < clock_timestamp() - make_interval(secs => $4))",
            &[&table.schema, &table.name, &(keep.max_runs.min(i64::MAX as u64) as i64), &max_age_secs],
        )
        .await
        .map_err(PgError::query(table, "remove old runs from the history"))
}

/// Records the start of a run; returns its id.
pub async fn start_run(
    client: &Client,
    table: &TableName,
    mode: RunMode,
    reason: &str,
    from: Option<Version>,
    to: Version,
) -> Result<i64, PgError> {
    let row = client
        .query_one(
            "INSERT INTO lakesync.runs (target_schema, target_table, mode, reason, from_version, to_version, outcome, replica) \
             VALUES ($1, $2, $3, $4, $5, $6, 'running', nullif(current_setting('lakesync.replica', true), '')) RETURNING run_id",
            &[&table.schema, &table.name, &mode.as_str(), &reason, &from.map(|v| v as i64), &(to as i64)],
        )
        .await
        .map_err(PgError::query(table, "record the run start"))?;
    Ok(row.get(0))
}

/// Records a successful checkpoint: run outcome, counters, the table's row count and the
/// synced version. Must run inside the transaction that wrote the data. `total_rows` is the
/// table's row count after a snapshot; `None` after an incremental apply, where the count moves
/// by inserted minus deleted. Returns the new row count (`None` if it was never known).
///
/// A compare-and-set: the synced version moves only from `from` (the version the data
/// written in this transaction was based on). If another writer moved it meanwhile (two runs
/// past the advisory lock, e.g. through a transaction-pooling proxy), nothing is recorded and
/// [`PgError::Conflict`] is returned; the caller's transaction must then roll back. The
/// table's OID is recorded too, as the proof of ownership [`ownership`] checks. A fleet
/// replica's run (`fence`) commits only while the replica owns the table.
#[allow(clippy::too_many_arguments)]
pub async fn commit_checkpoint(
    tx: &impl GenericClient,
    table: &TableName,
    fence: Option<crate::fleet::Fence>,
    run_id: i64,
    from: Option<Version>,
    checkpoint: Checkpoint,
    counts: RowCounts,
    total_rows: Option<u64>,
    final_chunk: bool,
) -> Result<Option<u64>, PgError> {
    if let Some(fence) = fence {
        crate::fleet::check_owner(tx, table, fence).await?;
    }
    let err = PgError::query(table, "record the synced version");
    let (ins, upd, del) = (counts.inserted as i64, counts.updated as i64, counts.deleted as i64);
    let row = tx
        .query_opt(
            "UPDATE lakesync.synced_tables SET synced_version = $3, \
             synced_commit_timestamp = to_timestamp($4::bigint / 1000.0), state = $5, last_error = NULL, \
             rows_inserted = rows_inserted + $6, rows_updated = rows_updated + $7, rows_deleted = rows_deleted + $8, \
             runs_succeeded = runs_succeeded + $9, updated_at = clock_timestamp(), \
             row_count = COALESCE($10, row_count + $6 - $8), table_oid = to_regclass($12)::oid::bigint \
             WHERE target_schema = $1 AND target_table = $2 AND synced_version IS NOT DISTINCT FROM $11 \
             RETURNING row_count",
            &[
                &table.schema,
                &table.name,
                &(checkpoint.version as i64),
                &checkpoint.commit_timestamp_ms,
                &(if final_chunk { states::ONLINE } else { states::UPDATING }),
                &ins,
                &upd,
                &del,
                &(final_chunk as i64),
                &total_rows.map(|n| n as i64),
                &from.map(|v| v as i64),
                &crate::ddl::qualified(table),
            ],
        )
        .await
        .map_err(err)?;
    let Some(row) = row else {
        return Err(match load(tx, table).await? {
            None => {
                PgError::Mismatch { table: table.to_string(), message: "state row missing while committing".into() }
            }
            Some(now) => PgError::Conflict {
                table: table.to_string(),
                expected: from,
                found: now.synced_version,
                version: checkpoint.version,
            },
        });
    };
    let row_count = row.get::<_, Option<i64>>(0).map(|n| n as u64);
    tx.execute(
        "UPDATE lakesync.runs SET rows_inserted = rows_inserted + $2, rows_updated = rows_updated + $3, \
         rows_deleted = rows_deleted + $4, to_version = $5, \
         outcome = CASE WHEN $6 THEN 'succeeded' ELSE outcome END, \
         ended_at = CASE WHEN $6 THEN clock_timestamp() ELSE ended_at END WHERE run_id = $1",
        &[&run_id, &ins, &upd, &del, &(checkpoint.version as i64), &final_chunk],
    )
    .await
    .map_err(PgError::query(table, "record the run"))?;
    Ok(row_count)
}

/// Finishes a run that changed nothing (already at the requested version).
pub async fn finish_noop(client: &Client, table: &TableName, run_id: i64) -> Result<(), PgError> {
    let err = PgError::query(table, "record the run");
    client
        .execute(
            "UPDATE lakesync.runs SET outcome = 'succeeded', ended_at = clock_timestamp() WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .map_err(err)?;
    client
        .execute(
            "UPDATE lakesync.synced_tables SET state = $3, last_error = NULL, runs_succeeded = runs_succeeded + 1, \
             updated_at = clock_timestamp() WHERE target_schema = $1 AND target_table = $2",
            &[&table.schema, &table.name, &states::ONLINE],
        )
        .await
        .map_err(PgError::query(table, "record the run"))?;
    Ok(())
}

/// Records a run as failed without marking its table (the run, not the table, failed).
pub async fn end_run(client: &Client, table: &TableName, run_id: Option<i64>, error: &str) -> Result<(), PgError> {
    if let Some(run_id) = run_id {
        client
            .execute(
                "UPDATE lakesync.runs SET outcome = 'failed', error = $2, ended_at = clock_timestamp() WHERE run_id = $1",
                &[&run_id, &error],
            )
            .await
            .map_err(PgError::query(table, "record the failed run"))?;
    }
    Ok(())
}

/// Records a failed run and the error on the table (the data stays at the last checkpoint).
pub async fn fail_run(client: &Client, table: &TableName, run_id: Option<i64>, error: &str) -> Result<(), PgError> {
    end_run(client, table, run_id, error).await?;
    client
        .execute(
            "UPDATE lakesync.synced_tables SET last_error = $3, runs_failed = runs_failed + 1, \
             state = CASE WHEN synced_version IS NULL THEN $4 ELSE $5 END, updated_at = clock_timestamp() \
             WHERE target_schema = $1 AND target_table = $2",
            &[&table.schema, &table.name, &error, &states::OFFLINE_FAILED, &states::ONLINE_FAILED],
        )
        .await
        .map_err(PgError::query(table, "record the failure"))?;
    Ok(())
}

/// The advisory lock's key text: schema and name quoted as identifiers, so no two tables
/// share one (`"a.b"."c"` and `"a"."b.c"` differ where `a.b.c` would not).
pub fn lock_key(table: &TableName) -> String {
    format!("lakesync:table:{}", crate::ddl::qualified(table))
}

/// Releases the per-table advisory lock. (Closing the session releases it too, but only once
/// the server notices the disconnect; an explicit unlock lets the next run start at once.)
pub async fn unlock(client: &Client, table: &TableName) -> Result<(), PgError> {
    client
        .execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", &[&lock_key(table)])
        .await
        .map_err(PgError::query(table, "release the table's advisory lock"))?;
    Ok(())
}

/// Takes the per-table advisory lock on this session, waiting up to `wait` for its holder (or
/// the backend of a crashed run) to let go, else fails with [`PgError::Locked`].
pub async fn lock(client: &Client, table: &TableName, wait: std::time::Duration) -> Result<(), PgError> {
    let key = lock_key(table);
    let deadline = std::time::Instant::now() + wait;
    let mut logged = false;
    loop {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key])
            .await
            .map_err(PgError::query(table, "take the table's advisory lock"))?
            .get(0);
        if got {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(PgError::Locked { table: table.to_string() });
        }
        if !logged {
            tracing::info!(table = %table, "another run holds the table; waiting for it");
            logged = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The status of every synced table with its last run, for `lakesync status`.
#[derive(Debug, Clone)]
pub struct TableStatus {
    /// The state row.
    pub table: SyncedTable,
    /// Cumulative counters: inserted, updated, deleted.
    pub totals: RowCounts,
    /// The most recent run, if any.
    pub last_run: Option<RunRecord>,
}

/// One entry of the run history.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// Run id.
    pub run_id: i64,
    /// `snapshot`, `triggered` or `noop`.
    pub mode: String,
    /// Why this mode was chosen.
    pub reason: Option<String>,
    /// `running`, `succeeded`, `failed` or `abandoned`.
    pub outcome: String,
    /// Version range.
    pub from_version: Option<i64>,
    /// Version range end.
    pub to_version: Option<i64>,
    /// Rows changed.
    pub counts: RowCounts,
    /// RFC 3339 start time.
    pub started_at: String,
    /// Duration in seconds, when finished.
    pub duration_seconds: Option<f64>,
    /// Error text of a failed run.
    pub error: Option<String>,
    /// The replica that ran it (`lakesync serve` in a fleet; `None` for other runs).
    pub replica: Option<String>,
}

/// Whether the state tables exist (lakesync ran against this database before).
pub async fn exists(client: &impl GenericClient) -> Result<bool, PgError> {
    Ok(client
        .query_one("SELECT to_regclass('lakesync.synced_tables') IS NOT NULL", &[])
        .await
        .map_err(PgError::query("lakesync state", "read status"))?
        .get(0))
}

/// Reads the status of all synced tables (empty when lakesync never ran against this database).
pub async fn status(client: &Client) -> Result<Vec<TableStatus>, PgError> {
    status_where(client, None).await
}

/// Reads the status of one synced table.
pub async fn table_status(client: &Client, table: &TableName) -> Result<Option<TableStatus>, PgError> {
    Ok(status_where(client, Some(table)).await?.pop())
}

async fn status_where(client: &Client, only: Option<&TableName>) -> Result<Vec<TableStatus>, PgError> {
    if !exists(client).await? {
        return Ok(Vec::new());
    }
    let (schema, name) = only.map(|t| (t.schema.as_str(), t.name.as_str())).unzip();
    let rows = client
        .query(
            "SELECT s.target_schema, s.target_table, s.source_uri, s.primary_key, s.synced_version, \
             to_char(s.synced_commit_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), s.state, s.last_error, \
             s.rows_inserted, s.rows_updated, s.rows_deleted, \
             r.run_id, r.mode, r.reason, r.outcome, r.from_version, r.to_version, r.rows_inserted, r.rows_updated, r.rows_deleted, \
             to_char(r.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
             extract(epoch FROM r.ended_at - r.started_at)::float8, r.error, s.table_oid, s.options, to_jsonb(r)->>'replica' \
             FROM lakesync.synced_tables s LEFT JOIN LATERAL ( \
               SELECT * FROM lakesync.runs r WHERE r.target_schema = s.target_schema AND r.target_table = s.target_table \
               ORDER BY run_id DESC LIMIT 1) r ON true \
             WHERE $1::text IS NULL OR (s.target_schema = $1 AND s.target_table = $2) \
             ORDER BY s.target_schema, s.target_table",
            &[&schema, &name],
        )
        .await
        .map_err(PgError::query("lakesync state", "read status"))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let count = |i: usize| r.get::<_, Option<i64>>(i).unwrap_or(0) as u64;
            TableStatus {
                table: SyncedTable {
                    table: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    source: r.get(2),
                    primary_key: r.get(3),
                    synced_version: r.get::<_, Option<i64>>(4).map(|v| v as Version),
                    synced_commit_timestamp: r.get(5),
                    state: r.get(6),
                    last_error: r.get(7),
                    table_oid: r.get(23),
                    options: r.get(24),
                },
                totals: RowCounts { inserted: count(8), updated: count(9), deleted: count(10) },
                last_run: r.get::<_, Option<i64>>(11).map(|run_id| RunRecord {
                    run_id,
                    mode: r.get(12),
                    reason: r.get(13),
                    outcome: r.get(14),
                    from_version: r.get(15),
                    to_version: r.get(16),
                    counts: RowCounts { inserted: count(17), updated: count(18), deleted: count(19) },
                    started_at: r.get(20),
                    duration_seconds: r.get(21),
                    error: r.get(22),
                    replica: r.get(25),
                }),
            }
        })
        .collect())
}

/// The most recent `limit` runs of `table`, newest first.
pub async fn runs(client: &Client, table: &TableName, limit: i64) -> Result<Vec<RunRecord>, PgError> {
    if !exists(client).await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT run_id, mode, reason, outcome, from_version, to_version, rows_inserted, rows_updated, rows_deleted, \
             to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
             extract(epoch FROM ended_at - started_at)::float8, error, to_jsonb(runs)->>'replica' \
             FROM lakesync.runs WHERE target_schema = $1 AND target_table = $2 ORDER BY run_id DESC LIMIT $3",
            &[&table.schema, &table.name, &limit],
        )
        .await
        .map_err(PgError::query(table, "read the run history"))?;
    Ok(rows
        .into_iter()
        .map(|r| RunRecord {
            run_id: r.get(0),
            mode: r.get(1),
            reason: r.get(2),
            outcome: r.get(3),
            from_version: r.get(4),
            to_version: r.get(5),
            counts: RowCounts {
                inserted: r.get::<_, i64>(6) as u64,
                updated: r.get::<_, i64>(7) as u64,
                deleted: r.get::<_, i64>(8) as u64,
            },
            started_at: r.get(9),
            duration_seconds: r.get(10),
            error: r.get(11),
            replica: r.get(12),
        })
        .collect())
}

/// Drops `table` and forgets its sync state and run history, under the table's lock (waiting
/// up to `wait` for a run in progress elsewhere) and in one transaction. Staging tables a
/// crashed snapshot or apply left behind go too.
///
/// Drops only a table lakesync owns (see [`ownership`]); for any other table it fails with
/// [`PgError::NotOwned`] and changes nothing.
pub async fn forget(client: &Client, table: &TableName, wait: std::time::Duration) -> Result<(), PgError> {
    lock(client, table, wait).await?;
    let result = async {
        let err = PgError::query(table, "drop the table and its sync state");
        client.batch_execute("BEGIN").await.map_err(err)?;
        let has_state = exists(client).await?;
        match current_ownership(client, table).await? {
            Ownership::Absent => {}
            Ownership::Owned => client
                .batch_execute(&format!("DROP TABLE {}", crate::ddl::qualified(table)))
                .await
                .map_err(PgError::query(table, "drop the table"))?,
            foreign => {
                return Err(not_owned(
                    table,
                    foreign,
                    "refusing to drop it (nothing was changed); remove the synced table without purging its data to stop syncing and keep the table",
                ))
            }
        }
        if has_state {
            crate::snapshot::drop_staging_tables(client, table, true).await?;
            crate::apply::drop_part_tables(client, table).await?;
            for sql in [
                "DELETE FROM lakesync.runs WHERE target_schema = $1 AND target_table = $2",
                "DELETE FROM lakesync.synced_tables WHERE target_schema = $1 AND target_table = $2",
            ] {
                client
                    .execute(sql, &[&table.schema, &table.name])
                    .await
                    .map_err(PgError::query(table, "forget the sync state"))?;
            }
        }
        client.batch_execute("COMMIT").await.map_err(PgError::query(table, "drop the table and its sync state"))
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    let _ = unlock(client, table).await;
    result
}
