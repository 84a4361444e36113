//! Triggered (incremental) apply: the net changes of a range of versions, written set-based
//! in one transaction that also records the new synced version.
//!
//! Upserted rows and deleted keys are bulk-loaded with binary COPY into temporary tables, then
//! applied with one `DELETE .. USING`, one `INSERT .. SELECT` of the rows whose key is new in
//! the range, and one `MERGE` (see [`crate::snapshot`]'s `merge_from`) for the rest. No
//! statement is issued per row.

use arrow_array::RecordBatch;
use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use lakesync_core::{Column, ColumnType, DataPolicy, TableName, TableSchema, Version};

use crate::copy::{HEADER, TRAILER};
use crate::ddl::{column_definition, column_list, ident, qualified};
use crate::snapshot::{merge_from, CopyLayout};
use crate::state::{self, Checkpoint, RowCounts};
use crate::{PgError, Sink};

/// Column holding, per upserted row, whether its key must not exist yet (first change in the
/// range was an insert).
pub const EXPECT_ABSENT_COLUMN: &str = "_lakesync_expect_absent";
/// Column holding the Delta version of each change.
pub const VERSION_COLUMN: &str = "_lakesync_version";

/// One chunk's transaction, open: deletes and upserts go in as they become known (the caller
/// can read the upserted rows while Postgres deletes), then [`ChangeApply::commit`] records
/// the checkpoint with them. Dropping it without committing rolls everything back.
pub struct ChangeApply<'a> {
    tx: tokio_postgres::Transaction<'a>,
    target: TableName,
    policy: DataPolicy,
    schema: &'a TableSchema,
    key: &'a [String],
    counts: RowCounts,
}

impl Sink {
    /// Begins applying one chunk of changes: opens the transaction and adds the source's new
    /// columns. `changed_rows` is how many deletes and upserts the chunk holds (it decides how
    /// Postgres joins them to the table).
    pub async fn begin_changes<'a>(
        &'a mut self,
        schema: &'a TableSchema,
        key: &'a [String],
        added_columns: &[Column],
        changed_rows: usize,
    ) -> Result<ChangeApply<'a>, PgError> {
        let target = self.table.clone();
        let policy = self.policy.clone();
        let t = qualified(&target);
        let tx = self.client.transaction().await.map_err(PgError::query(&target, "begin"))?;
        if !added_columns.is_empty() {
            let adds = added_columns
                .iter()
                .map(|c| format!("ADD COLUMN IF NOT EXISTS {}", column_definition(c, false)))
                .collect::<Vec<_>>()
                .join(", ");
            tx.batch_execute(&format!("ALTER TABLE {t} {adds}"))
                .await
                .map_err(PgError::query(&target, "add the source's new columns"))?;
        }
        // Change sets are usually tiny next to the table. Temporary tables have no statistics,
        // and without them the planner picks hash or merge joins that read the whole table;
        // probing the key index per change row is what a small change set wants. (ANALYZE of
        // the temporary tables would tell the planner, but costs more than the probes.)
        let table_rows: Option<i64> = tx
            .query_one(
                "SELECT row_count FROM lakesync.synced_tables WHERE target_schema = $1 AND target_table = $2",
                &[&target.schema, &target.name],
            )
            .await
            .map_err(PgError::query(&target, "read the row count"))?
            .get(0);
        // JIT compilation costs ~10 ms a statement and pays off only for long scans.
        tx.batch_execute("SET LOCAL jit = off").await.map_err(PgError::query(&target, "configure the transaction"))?;
        if table_rows.is_some_and(|n| (changed_rows as i64) * 10 < n) {
            tx.batch_execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
                .await
                .map_err(PgError::query(&target, "plan for a small change set"))?;
        }
        Ok(ChangeApply { tx, target, policy, schema, key, counts: RowCounts::default() })
    }
}

impl ChangeApply<'_> {
    /// Deletes the keys in `deletes` (key columns plus [`VERSION_COLUMN`]).
    pub async fn delete(&mut self, deletes: &[RecordBatch]) -> Result<(), PgError> {
        if !deletes.iter().any(|b| b.num_rows() > 0) {
            return Ok(());
        }
        let (tx, target, key) = (&self.tx, &self.target, self.key);
        let key_cols: Vec<&Column> =
            key.iter().map(|k| self.schema.column(k).expect("key validated against schema")).collect();
        self.stage("_lakesync_deletes", &key_cols, &[(VERSION_COLUMN, ColumnType::Int64)], deletes).await?;
        let on = key.iter().map(|k| format!("t.{0} = d.{0}", ident(k))).collect::<Vec<_>>().join(" AND ");
        self.counts.deleted += tx
            .execute(&format!("DELETE FROM {} t USING _lakesync_deletes d WHERE {on}", qualified(target)), &[])
            .await
            .map_err(PgError::query(target, "delete rows"))?;
        Ok(())
    }

    /// Inserts or updates the rows in `upserts` (the table's columns plus
    /// [`EXPECT_ABSENT_COLUMN`] and [`VERSION_COLUMN`]).
    pub async fn upsert(&mut self, upserts: &[RecordBatch]) -> Result<(), PgError> {
        if !upserts.iter().any(|b| b.num_rows() > 0) {
            return Ok(());
        }
        let (schema, key) = (self.schema, self.key);
        let target = self.target.clone();
        let t = qualified(&target);
        let columns: Vec<&Column> = schema.columns.iter().collect();
        let extra = [(EXPECT_ABSENT_COLUMN, ColumnType::Boolean), (VERSION_COLUMN, ColumnType::Int64)];
        self.stage("_lakesync_upserts", &columns, &extra, upserts).await?;
        // A key whose first change in the range is an insert must not be there already, so
        // those rows are plainly inserted: the key index's uniqueness check is the
        // existence check. If one is there, the source holds two rows with that key; the
        // savepoint lets us find which (and at which version) before failing the run.
        let cols = column_list(schema.columns.iter().map(|c| c.name.as_str()), None);
        let new_rows = {
            let sp =
                self.tx.savepoint("lakesync_new_rows").await.map_err(PgError::query(&target, "set a savepoint"))?;
            match sp
                .execute(
                    &format!(
                        "INSERT INTO {t} ({cols}) SELECT {cols} FROM _lakesync_upserts WHERE {EXPECT_ABSENT_COLUMN}"
                    ),
                    &[],
                )
                .await
            {
                Ok(n) => {
                    sp.commit().await.map_err(PgError::query(&target, "insert new rows"))?;
                    Ok(n)
                }
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    sp.rollback().await.map_err(PgError::query(&target, "insert new rows"))?;
                    Err(e)
                }
                Err(e) => return Err(PgError::query(&target, "insert new rows")(e)),
            }
        };
        let inserted = match new_rows {
            Ok(n) => n,
            Err(e) => {
                let on = key.iter().map(|k| format!("t.{0} = u.{0}", ident(k))).collect::<Vec<_>>().join(" AND ");
                let key_shown =
                    key.iter().map(|k| format!("u.{}::text", ident(k))).collect::<Vec<_>>().join(" || ',' || ");
                let dup = self
                    .tx
                    .query_opt(
                        &format!(
                            "SELECT {key_shown}, u.{VERSION_COLUMN} FROM _lakesync_upserts u JOIN {t} t ON {on} \
                             WHERE u.{EXPECT_ABSENT_COLUMN} LIMIT 1"
                        ),
                        &[],
                    )
                    .await
                    .map_err(PgError::query(&target, "check for duplicate keys"))?;
                return Err(match dup {
                    Some(row) => PgError::DuplicateKey {
                        table: target.to_string(),
                        key: format!("({})=({})", key.join(", "), row.get::<_, String>(0)),
                        version: Some(row.get::<_, i64>(1) as Version),
                    },
                    None => PgError::query(&target, "insert new rows")(e),
                });
            }
        };
        let (more_inserted, updated) = merge_from(
            &self.tx,
            &target,
            &format!("(SELECT * FROM _lakesync_upserts WHERE NOT {EXPECT_ABSENT_COLUMN})"),
            "u",
            schema,
            key,
        )
        .await?;
        self.counts.inserted += inserted + more_inserted;
        self.counts.updated += updated;
        Ok(())
    }

    /// Creates the temporary table `temp` (dropped at commit) with `columns` and our `extra`
    /// columns, and COPYs `batches` into it.
    async fn stage(
        &self,
        temp: &str,
        columns: &[&Column],
        extra: &[(&str, ColumnType)],
        batches: &[RecordBatch],
    ) -> Result<(), PgError> {
        let defs = columns
            .iter()
            .map(|c| column_definition(c, false))
            .chain(extra.iter().map(|(name, ty)| format!("{name} {}", ty.postgres_type())))
            .collect::<Vec<_>>()
            .join(", ");
        self.tx
            .batch_execute(&format!("CREATE TEMP TABLE {temp} ({defs}) ON COMMIT DROP"))
            .await
            .map_err(PgError::query(&self.target, format!("create {temp}")))?;
        let layout = CopyLayout {
            target: self.target.clone(),
            columns: columns.iter().map(|c| c.name.clone()).chain(extra.iter().map(|(n, _)| n.to_string())).collect(),
            types: columns.iter().map(|c| c.ty).chain(extra.iter().map(|(_, ty)| *ty)).collect(),
            key: self.key.to_vec(),
            policy: self.policy.clone(),
        };
        copy_batches(&self.tx, temp, &layout, batches).await
    }

    /// Records `checkpoint` (and the run's progress; `final_chunk` marks the run succeeded)
    /// and commits.
    ///
    /// `source_rows` is the source's row count at the checkpoint version, when known: if the
    /// table would then hold a different number of rows, the change feed disagrees with the
    /// table, nothing is committed and [`PgError::Drift`] is returned.
    pub async fn commit(
        self,
        run_id: i64,
        checkpoint: Checkpoint,
        source_rows: Option<u64>,
        final_chunk: bool,
    ) -> Result<RowCounts, PgError> {
        let (tx, target, counts) = (self.tx, self.target, self.counts);
        let rows = state::commit_checkpoint(&tx, &target, run_id, checkpoint, counts, None, final_chunk).await?;
        if let (Some(expected), Some(actual)) = (source_rows, rows) {
            if expected != actual {
                // Dropping `tx` rolls everything back.
                return Err(PgError::Drift {
                    table: target.to_string(),
                    version: checkpoint.version,
                    postgres_rows: actual,
                    source_rows: expected,
                });
            }
        }
        tx.commit().await.map_err(PgError::query(&target, "commit the changes"))?;
        Ok(counts)
    }
}

async fn copy_batches(
    tx: &tokio_postgres::Transaction<'_>,
    temp: &str,
    layout: &CopyLayout,
    batches: &[RecordBatch],
) -> Result<(), PgError> {
    let sql = format!(
        "COPY {temp} ({}) FROM STDIN (FORMAT binary)",
        column_list(layout.columns.iter().map(String::as_str), None)
    );
    let err = |action: &'static str| PgError::query(&layout.target, action);
    let sink = tx.copy_in::<_, Bytes>(sql.as_str()).await.map_err(err("start COPY"))?;
    futures_util::pin_mut!(sink);
    let mut buf = BytesMut::with_capacity(1 << 20);
    buf.extend_from_slice(HEADER);
    for batch in batches {
        let version = batch
            .column_by_name(VERSION_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<arrow_array::Int64Array>())
            .and_then(|v| (!v.is_empty()).then(|| v.value(0) as Version));
        layout.encode(batch, version, &mut buf)?;
        if buf.len() > 1 << 20 {
            sink.send(buf.split().freeze()).await.map_err(err("COPY rows"))?;
        }
    }
    buf.extend_from_slice(TRAILER);
    sink.send(buf.split().freeze()).await.map_err(err("COPY rows"))?;
    sink.finish().await.map_err(err("finish COPY"))?;
    Ok(())
}
