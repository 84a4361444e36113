//! `lakesync-postgres`: lakesync's Postgres side.
//!
//! This crate owns everything written to Postgres: target-table DDL from the lakesync model
//! (identifiers always quoted), binary `COPY` straight from Arrow arrays, snapshot loads
//! through a staging table, set-based incremental apply, the sync state in schema `lakesync`,
//! the per-table advisory lock, the fleet's registry, replicas and ownership locks
//! ([`fleet`]), and a private local Postgres for the demo and tests.
//!
//! Invariants:
//! - Never depends on Delta; takes Arrow batches and core model values.
//! - The synced version is written in the same transaction as the data it covers.
//! - A fenced run (a fleet replica's) writes nothing and commits no checkpoint unless its
//!   replica's coordinating session holds the table's ownership lock and the registry still
//!   has the table; the fence travels with the run, never as a session setting.
//! - No statement is built from untrusted text: identifiers go through [`ddl::ident`], values
//!   travel as parameters or COPY data.
//! - A dry run ([`preview`]) writes nothing that outlives its session: no state, no run row,
//!   no target rows or DDL (what it applies is rolled back, what it loads is temporary).
//! - The connection password never appears in errors or logs ([`PgConfig`]'s `Debug` and
//!   [`PgConfig::target`] omit it).

pub mod apply;
pub mod cluster;
pub mod connect;
pub mod copy;
pub mod ddl;
pub mod error;
pub mod fleet;
pub mod json;
pub mod pool;
pub mod preview;
pub mod query;
pub mod rows;
pub mod snapshot;
pub mod state;
pub mod tls;

use arrow_array::RecordBatch;
use lakesync_core::{DataPolicy, DeleteMode, TableName};
use tokio_postgres::{Client, GenericClient};

pub use apply::{ChangeApply, Stager};
pub use connect::PgConfig;
pub use error::PgError;
pub use snapshot::{ParallelCopy, Staging};
pub use state::{Checkpoint, Ownership, RowCounts, RunMode, RunRetention, SyncedTable, TableStatus};

/// A session that syncs one target table: it holds the table's advisory lock for its
/// lifetime, so no other lakesync process can sync the same table meanwhile.
pub struct Sink {
    config: PgConfig,
    client: Client,
    table: TableName,
    policy: DataPolicy,
    /// A fleet replica's fence, checked when the lock is taken and at every checkpoint.
    fence: Option<fleet::Fence>,
    /// What a delete does (soft and ignore keep rows the source no longer has).
    delete_mode: DeleteMode,
}

impl Sink {
    /// Connects, creates the state schema if needed, takes the table's advisory lock (waiting
    /// up to `lock_wait` for another run to finish, then failing with [`PgError::Locked`]) and
    /// marks runs a crashed process left behind as abandoned, and trims the run history to
    /// `history`. With a `fence` (a fleet replica's run), nothing is written unless the
    /// replica owns the table ([`fleet::check_owner`]), checked under the table's lock.
    pub async fn open(
        config: &PgConfig,
        table: &TableName,
        policy: DataPolicy,
        lock_wait: std::time::Duration,
        history: state::RunRetention,
        fence: Option<fleet::Fence>,
    ) -> Result<Self, PgError> {
        let mut client = Self::session(config, table).await?;
        state::ensure_schema(&mut client).await?;
        state::lock(&client, table, lock_wait).await?;
        if let Some(fence) = fence {
            if let Err(e) = fleet::check_owner(&client, table, fence).await {
                let _ = state::unlock(&client, table).await;
                return Err(e);
            }
        }
        state::abandon_stale_runs(&client, table).await?;
        state::prune_runs(&client, table, history).await?;
        Ok(Self { config: config.clone(), client, table: table.clone(), policy, fence, delete_mode: DeleteMode::Hard })
    }

    /// A session configured for syncing `table` (a run's or a dry run's).
    pub(crate) async fn session(config: &PgConfig, table: &TableName) -> Result<Client, PgError> {
        let client = config.connect().await?;
        // Change sets are staged in temporary tables; the default 8MB of temp buffers makes a
        // 50k-row change set spill to disk. Must be set before the session's first temp table.
        client
            .batch_execute("SET temp_buffers = '256MB'")
            .await
            .map_err(PgError::query(table, "configure the session"))?;
        // If this process dies mid-statement, its backend notices within a second and rolls
        // back, releasing the table lock for the next run (Postgres 14+; older servers keep
        // the statement running until it ends).
        let _ = client.batch_execute("SET client_connection_check_interval = '1s'").await;
        Ok(client)
    }

    /// Ends the session, releasing the table's advisory lock first.
    pub async fn close(self) {
        if let Err(e) = state::unlock(&self.client, &self.table).await {
            tracing::debug!(table = %self.table, error = %e, "could not release the advisory lock; the session end will");
        }
    }

    /// Sets what a delete does: a soft delete sets `_lakesync_deleted_at` (a column of the
    /// table's schema), `ignore` keeps the row as it is. Snapshots keep the rows the source
    /// no longer has the same way.
    pub fn set_delete_mode(&mut self, mode: DeleteMode) {
        self.delete_mode = mode;
    }

    /// The target table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The connection settings, for a second session such as a [`Stager`].
    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// The session's client (holding the lock), for state reads and writes.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The columns of `table` with `format_type` spellings, in column order.
pub async fn target_columns(client: &impl GenericClient, table: &TableName) -> Result<Vec<(String, String)>, PgError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(PgError::query(table, "read the table's columns"))?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `(k1, k2)=(v1, v2)` for row `row` of `batch`, for error messages.
pub fn key_text(batch: &RecordBatch, key: &[String], row: usize) -> String {
    let opts = arrow_cast::display::FormatOptions::default().with_null("NULL");
    let values: Vec<String> = key
        .iter()
        .map(|k| {
            batch
                .column_by_name(k)
                .and_then(|c| {
                    arrow_cast::display::ArrayFormatter::try_new(c.as_ref(), &opts)
                        .ok()
                        .map(|f| f.value(row).to_string())
                })
                .unwrap_or_else(|| "?".into())
        })
        .collect();
    format!("({})=({})", key.join(", "), values.join(", "))
}
