//! Dry runs: what a run would do to the target, found without writing anything that outlives
//! the session (no target rows, no state, no run row).
//!
//! - A snapshot's rows are loaded into a temporary table of this session (dropped with its
//!   transaction, which is rolled back); the counts are what [`Sink::finish_snapshot`] would
//!   report, computed by reading the target, never by changing it.
//! - The change feed is applied by the same [`crate::ChangeApply`] as a real run, in a
//!   transaction that is rolled back ([`crate::ChangeApply::rollback`]).
//! - DDL is listed, built by the same functions the real run executes.

use arrow_array::RecordBatch;
use lakesync_core::shape::{DELETED_AT_COLUMN, LINEAGE_TIMESTAMP_COLUMN, LINEAGE_VERSION_COLUMN};
use lakesync_core::{Column, DataPolicy, DeleteMode, TableName, TableSchema, Version};
use tokio::sync::mpsc;

use crate::ddl::{column_definitions, column_list, derived_name, ident, qualified};
use crate::snapshot::{index_changes, index_statements, schema_alters, staging_name, widens, FILLFACTOR};
use crate::state::RowCounts;
use crate::{PgConfig, PgError, Sink};

/// Batches per COPY statement while previewing a snapshot.
const BATCHES_PER_COPY: usize = 64;

impl Sink {
    /// Opens a session for a dry run: connects and takes the table's advisory lock (so the
    /// preview does not interleave with a real run), but creates nothing, not even the state
    /// schema, and changes no run history.
    pub async fn open_preview(
        config: &PgConfig,
        table: &TableName,
        policy: DataPolicy,
        lock_wait: std::time::Duration,
    ) -> Result<Self, PgError> {
        let client = Sink::session(config, table).await?;
        crate::state::lock(&client, table, lock_wait).await?;
        Ok(Self {
            config: config.clone(),
            client,
            table: table.clone(),
            policy,
            fence: None,
            delete_mode: DeleteMode::Hard,
        })
    }

    /// The DDL a snapshot of `schema` would execute, in order.
    pub async fn snapshot_ddl(
        &self,
        schema: &TableSchema,
        key: &[String],
        indexes: &[Vec<String>],
    ) -> Result<Vec<String>, PgError> {
        let target = &self.table;
        let mut ddl = Vec::new();
        if !self.schema_exists().await? {
            ddl.push(format!("CREATE SCHEMA {}", ident(&target.schema)));
        }
        let stage_name = staging_name(target, 0);
        let stage = qualified(&stage_name);
        ddl.push(format!(
            "CREATE TABLE {stage} ({}) WITH (fillfactor = {FILLFACTOR})",
            column_definitions(schema, &[])
        ));
        let exists = self.target_exists().await?;
        let pkey = if exists { derived_name(&stage_name.name, "_pkey") } else { derived_name(&target.name, "_pkey") };
        ddl.push(format!(
            "ALTER TABLE {stage} ADD CONSTRAINT {} PRIMARY KEY ({})",
            ident(&pkey),
            column_list(key.iter().map(String::as_str), None)
        ));
        if exists {
            let existing = crate::target_columns(&self.client, target).await?;
            let alters = schema_alters(&existing, schema);
            if !alters.is_empty() {
                ddl.push(format!("ALTER TABLE {} {}", qualified(target), alters.join(", ")));
            }
            ddl.extend(index_statements(target, &qualified(target), indexes, true).into_iter().map(|(_, s)| s));
            ddl.push(format!("DROP TABLE {stage}"));
        } else {
            ddl.extend(index_statements(target, &stage, indexes, false).into_iter().map(|(_, s)| s));
            ddl.push(format!("ALTER TABLE {stage} RENAME TO {}", ident(&target.name)));
        }
        Ok(ddl)
    }

    /// The statements that would bring the declared indexes from `old` to `new`.
    pub async fn index_ddl(&self, old: &[Vec<String>], new: &[Vec<String>]) -> Result<Vec<String>, PgError> {
        if !self.target_exists().await? {
            return Ok(Vec::new());
        }
        Ok(index_changes(&self.table, old, new).into_iter().map(|(_, s)| s).collect())
    }

    /// What a snapshot of the batches `rows` sends would change: loads them into a temporary
    /// table in a transaction that is rolled back, checks keys as the real load does (a
    /// repeated key is the same error), and compares with the target without changing it.
    pub async fn preview_snapshot(
        &mut self,
        schema: &TableSchema,
        key: &[String],
        version: Version,
        mut rows: mpsc::Receiver<RecordBatch>,
    ) -> Result<RowCounts, PgError> {
        let target = self.table.clone();
        let policy = self.policy.clone();
        let delete_mode = self.delete_mode;
        let exists = self.target_exists().await?;
        let existing = if exists { crate::target_columns(&self.client, &target).await? } else { Vec::new() };
        let tx = self.client.transaction().await.map_err(PgError::query(&target, "begin"))?;
        let preview = "_lakesync_preview";
        let columns: Vec<&Column> = schema.columns.iter().collect();
        let (layout, definitions) = crate::apply::staging_layout(&target, &columns, &[], key, &policy);
        tx.batch_execute(&format!("CREATE TEMP TABLE {preview} ({definitions}) ON COMMIT DROP"))
            .await
            .map_err(PgError::query(&target, "create the preview table"))?;
        let mut chunk = Vec::new();
        loop {
            let next = rows.recv().await;
            let done = next.is_none();
            chunk.extend(next);
            if chunk.len() >= BATCHES_PER_COPY || (done && !chunk.is_empty()) {
                let sink = tx
                    .copy_in(&crate::apply::copy_sql(preview, &layout, "FORMAT binary"))
                    .await
                    .map_err(PgError::query(&target, "start COPY"))?;
                crate::apply::copy_batches(sink, &layout, &chunk).await?;
                chunk.clear();
            }
            if done {
                break;
            }
        }
        let count = |sql: String, what: &'static str| {
            let tx = &tx;
            let target = &target;
            async move {
                let n: i64 = tx.query_one(&sql, &[]).await.map_err(PgError::query(target, what))?.get(0);
                Ok::<_, PgError>(n as u64)
            }
        };
        if let Some(col) = &policy.dedup_by {
            tx.execute(&crate::snapshot::dedup_sql(preview, schema, key, col), &[])
                .await
                .map_err(PgError::query(&target, format!("keep the latest row per key by {col}")))?;
        }
        let keys = column_list(key.iter().map(String::as_str), None);
        let key_shown = key.iter().map(|k| format!("{}::text", ident(k))).collect::<Vec<_>>().join(" || ',' || ");
        if let Some(row) = tx
            .query_opt(&format!("SELECT {key_shown} FROM {preview} GROUP BY {keys} HAVING count(*) > 1 LIMIT 1"), &[])
            .await
            .map_err(PgError::query(&target, "check for duplicate keys"))?
        {
            return Err(PgError::DuplicateKey {
                table: target.to_string(),
                key: format!("({})=({})", key.join(", "), row.get::<_, String>(0)),
                version: Some(version),
            });
        }
        let loaded = count(format!("SELECT count(*) FROM {preview}"), "count the rows").await?;
        if !exists {
            return Ok(RowCounts { inserted: loaded, updated: 0, deleted: 0 });
        }
        let t = qualified(&target);
        let on = key.iter().map(|k| format!("t.{0} = p.{0}", ident(k))).collect::<Vec<_>>().join(" AND ");
        let inserted = count(
            format!("SELECT count(*) FROM {preview} p WHERE NOT EXISTS (SELECT 1 FROM {t} t WHERE {on})"),
            "count new rows",
        )
        .await?;
        let has = |name: &str| existing.iter().any(|(n, _)| n == name);
        let gone = format!("NOT EXISTS (SELECT 1 FROM {preview} p WHERE {on})");
        let deleted = match delete_mode {
            DeleteMode::Hard => count(format!("SELECT count(*) FROM {t} t WHERE {gone}"), "count deleted rows").await?,
            DeleteMode::Soft if has(DELETED_AT_COLUMN) => {
                count(
                    format!("SELECT count(*) FROM {t} t WHERE t.{DELETED_AT_COLUMN} IS NULL AND {gone}"),
                    "count deleted rows",
                )
                .await?
            }
            DeleteMode::Soft => count(format!("SELECT count(*) FROM {t} t WHERE {gone}"), "count deleted rows").await?,
            DeleteMode::Ignore => 0,
        };
        // The target's value of each compared column as the snapshot's ALTER would leave it.
        let compared: Vec<&Column> = schema
            .columns
            .iter()
            .filter(|c| {
                !key.contains(&c.name) && ![LINEAGE_VERSION_COLUMN, LINEAGE_TIMESTAMP_COLUMN].contains(&c.name.as_str())
            })
            .collect();
        let updated = if compared.is_empty() {
            0
        } else {
            let old: Vec<String> = compared
                .iter()
                .map(|c| {
                    let ty = c.ty.postgres_type();
                    match existing.iter().find(|(n, _)| n == &c.name) {
                        Some((_, t)) if *t == ty => format!("t.{}", ident(&c.name)),
                        Some((_, t)) if widens(t, &c.ty) => format!("t.{}::{ty}", ident(&c.name)),
                        _ => format!("NULL::{ty}"),
                    }
                })
                .collect();
            let new = column_list(compared.iter().map(|c| c.name.as_str()), Some("p"));
            count(
                format!(
                    "SELECT count(*) FROM {preview} p JOIN {t} t ON {on} WHERE ({}) IS DISTINCT FROM ({new})",
                    old.join(", ")
                ),
                "count changed rows",
            )
            .await?
        };
        // Dropping the transaction rolls it back, and the temporary table with it.
        drop(tx);
        Ok(RowCounts { inserted, updated, deleted })
    }
}

/// The statements that create lakesync's state schema, when a database has none yet.
pub fn state_ddl() -> Vec<String> {
    let mut out = vec!["CREATE SCHEMA lakesync".to_string()];
    out.extend(crate::state::STATE_DDL.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string));
    out
}
