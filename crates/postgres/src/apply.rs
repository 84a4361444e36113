//! Triggered (incremental) apply: the net changes of a range of versions, written set-based
//! in one transaction that also records the new synced version.
//!
//! Upserted rows and deleted keys are bulk-loaded with binary COPY into temporary tables, then
//! applied with one `DELETE .. USING`, one `INSERT .. SELECT` of the rows whose key is new in
//! the range, and one `MERGE` (see [`crate::snapshot`]'s `merge_from`) for the rest. No
//! statement is issued per row.
//!
//! Large upsert sets go through a [`Stager`] instead: a second session copies them, part by
//! part, into unlogged tables of schema `lakesync` while the transaction inserts and merges the
//! parts already staged, so that the copying runs on another core. The transaction is still
//! the only writer of the target and of the synced version; the staged parts are copies that
//! are dropped after it ends.

use arrow_array::RecordBatch;
use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use lakesync_core::shape::{DELETED_AT_COLUMN, LINEAGE_TIMESTAMP_COLUMN, LINEAGE_VERSION_COLUMN};
use lakesync_core::{Column, ColumnType, DataPolicy, DeleteMode, TableName, TableSchema, Version};

use crate::copy::{HEADER, TRAILER};
use crate::ddl::{column_definition, column_list, ident, qualified};
use crate::snapshot::{merge_from, CopyLayout};
use crate::state::{self, Checkpoint, RowCounts};
use crate::{PgError, Sink};
use tokio_postgres::GenericClient;

/// Column holding, per upserted row, whether its key must not exist yet (first change in the
/// range was an insert).
pub const EXPECT_ABSENT_COLUMN: &str = "_lakesync_expect_absent";
/// Column holding the Delta version of each change.
pub const VERSION_COLUMN: &str = "_lakesync_change_version";
/// Under soft deletes, the column of the delete batches holding each version's commit
/// timestamp (what `_lakesync_deleted_at` is set to).
pub const CHANGE_TIMESTAMP_COLUMN: &str = "_lakesync_change_timestamp";
/// The columns staged upserts carry besides the table's.
const UPSERT_EXTRA: [(&str, ColumnType); 2] =
    [(EXPECT_ABSENT_COLUMN, ColumnType::Boolean), (VERSION_COLUMN, ColumnType::Int64)];

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
    fence: Option<crate::fleet::Fence>,
    delete_mode: DeleteMode,
    /// The DDL the transaction ran (columns added or widened).
    ddl: Vec<String>,
}

impl Sink {
    /// Begins applying one chunk of changes: opens the transaction and adds or widens columns.
    /// `evolved` is the columns the source added and those it widened since the previous
    /// chunk. `changed_rows` is how many deletes and upserts the chunk holds (it decides how
    /// Postgres joins them to the table).
    pub async fn begin_changes<'a>(
        &'a mut self,
        schema: &'a TableSchema,
        key: &'a [String],
        evolved: (&[Column], &[Column]),
        changed_rows: usize,
    ) -> Result<ChangeApply<'a>, PgError> {
        let target = self.table.clone();
        let policy = self.policy.clone();
        let t = qualified(&target);
        let tx = self.client.transaction().await.map_err(PgError::query(&target, "begin"))?;
        let (added_columns, widened_columns) = evolved;
        let mut ddl = Vec::new();
        if !added_columns.is_empty() || !widened_columns.is_empty() {
            // Widened columns keep every value through a cast (type widening never narrows);
            // the key's index is rebuilt by Postgres when a key column widens.
            let alters =
                added_columns
                    .iter()
                    .map(|c| format!("ADD COLUMN IF NOT EXISTS {}", column_definition(c, false)))
                    .chain(widened_columns.iter().map(|c| {
                        format!("ALTER COLUMN {0} TYPE {1} USING {0}::{1}", ident(&c.name), c.ty.postgres_type())
                    }))
                    .collect::<Vec<_>>()
                    .join(", ");
            let sql = format!("ALTER TABLE {t} {alters}");
            tx.batch_execute(&sql)
                .await
                .map_err(PgError::query(&target, "add or widen the source's changed columns"))?;
            ddl.push(sql);
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
        Ok(ChangeApply {
            tx,
            target,
            policy,
            schema,
            key,
            counts: RowCounts::default(),
            fence: self.fence,
            delete_mode: self.delete_mode,
            ddl,
        })
    }
}

impl<'a> ChangeApply<'a> {
    /// Deletes the keys in `deletes` (key columns plus [`VERSION_COLUMN`]). Under `dedup_by`
    /// the batches also hold that column, the greatest value among the key's deleted rows, and
    /// a key's row goes only if its own value is not greater (see [`keep_greater`]).
    pub async fn delete(&mut self, deletes: &[RecordBatch]) -> Result<(), PgError> {
        if !deletes.iter().any(|b| b.num_rows() > 0) {
            return Ok(());
        }
        if self.delete_mode == DeleteMode::Ignore {
            return Ok(());
        }
        let (tx, target, key) = (&self.tx, &self.target, self.key);
        let guard = self.order_guard("d", deletes);
        let mut columns: Vec<&Column> =
            key.iter().map(|k| self.schema.column(k).expect("key validated against schema")).collect();
        if let Some((column, _)) = &guard {
            columns.push(column);
        }
        let soft = self.delete_mode == DeleteMode::Soft;
        let mut extra = vec![(VERSION_COLUMN, ColumnType::Int64)];
        if soft {
            extra.push((CHANGE_TIMESTAMP_COLUMN, ColumnType::Timestamptz));
        }
        self.stage("_lakesync_deletes", &columns, &extra, deletes).await?;
        let on = key.iter().map(|k| format!("t.{0} = d.{0}", ident(k))).collect::<Vec<_>>().join(" AND ");
        let guard = guard.map(|(_, g)| format!(" AND {g}")).unwrap_or_default();
        let sql = if soft {
            // The row stays, marked (once: a row already marked keeps its first deletion).
            let mut set = vec![format!("{DELETED_AT_COLUMN} = d.{CHANGE_TIMESTAMP_COLUMN}")];
            if self.schema.column(LINEAGE_VERSION_COLUMN).is_some() {
                set.push(format!("{LINEAGE_VERSION_COLUMN} = d.{VERSION_COLUMN}"));
                set.push(format!("{LINEAGE_TIMESTAMP_COLUMN} = d.{CHANGE_TIMESTAMP_COLUMN}"));
            }
            format!(
                "UPDATE {} t SET {} FROM _lakesync_deletes d WHERE {on} AND t.{DELETED_AT_COLUMN} IS NULL{guard}",
                qualified(target),
                set.join(", ")
            )
        } else {
            format!("DELETE FROM {} t USING _lakesync_deletes d WHERE {on}{guard}", qualified(target))
        };
        self.counts.deleted += tx.execute(&sql, &[]).await.map_err(PgError::query(target, "delete rows"))?;
        Ok(())
    }

    /// Under `dedup_by` (a source that repeats keys), when `batches` carry its column: the
    /// column and the condition that the target row `t` may be replaced or deleted by `alias`'s.
    fn order_guard(&self, alias: &str, batches: &[RecordBatch]) -> Option<(&'a Column, String)> {
        let column = self.dedup_column()?;
        batches.iter().all(|b| b.column_by_name(&column.name).is_some()).then(|| (column, keep_greater(column, alias)))
    }

    /// The `dedup_by` column, unless the policy names none or a key column (whose values are
    /// equal across a key's rows, so there is nothing to order).
    fn dedup_column(&self) -> Option<&'a Column> {
        let name = self.policy.dedup_by.as_deref().filter(|c| !self.key.iter().any(|k| k == c))?;
        self.schema.column(name)
    }

    /// Inserts or updates the rows in `upserts` (the table's columns plus
    /// [`EXPECT_ABSENT_COLUMN`] and [`VERSION_COLUMN`]), staged in a temporary table.
    pub async fn upsert(&mut self, upserts: &[RecordBatch]) -> Result<(), PgError> {
        if !upserts.iter().any(|b| b.num_rows() > 0) {
            return Ok(());
        }
        let columns: Vec<&Column> = self.schema.columns.iter().collect();
        self.stage("_lakesync_upserts", &columns, &UPSERT_EXTRA, upserts).await?;
        self.apply_upserts("_lakesync_upserts", true, true).await
    }

    /// Inserts or updates the rows of one part that `stager` has staged (and committed; see
    /// [`Stager`]). `batch` is the part's rows, which tell whether it holds new keys, existing
    /// keys or both, so that no statement runs for nothing.
    pub async fn upsert_staged(&mut self, stager: &Stager, part: usize, batch: &RecordBatch) -> Result<(), PgError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let new = batch
            .column_by_name(EXPECT_ABSENT_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<arrow_array::BooleanArray>())
            .map(|c| c.true_count())
            .ok_or_else(|| PgError::Mismatch {
                table: self.target.to_string(),
                message: format!("a staged part without a boolean {EXPECT_ABSENT_COLUMN} column"),
            })?;
        self.apply_upserts(&stager.part_table(part), new > 0, new < batch.num_rows()).await
    }

    /// Applies the staged rows in `source`: the new keys by a plain `INSERT` (when `new`), the
    /// others by `MERGE` (when `existing`).
    async fn apply_upserts(&mut self, source: &str, new: bool, existing: bool) -> Result<(), PgError> {
        let (schema, key) = (self.schema, self.key);
        // Soft and ignored deletes leave rows behind: a key inserted again may still be
        // there, so every row goes through the merge.
        let keeps_rows = self.delete_mode != DeleteMode::Hard;
        let (new, existing) = if keeps_rows { (false, new || existing) } else { (new, existing) };
        let target = self.target.clone();
        let t = qualified(&target);
        // A key whose first change in the range is an insert must not be there already, so
        // those rows are plainly inserted: the key index's uniqueness check is the
        // existence check. If one is there, the source holds two rows with that key; the
        // savepoint lets us find which (and at which version) before failing the run.
        let cols = column_list(schema.columns.iter().map(|c| c.name.as_str()), None);
        let new_rows = if !new {
            Ok(0)
        } else {
            let sp =
                self.tx.savepoint("lakesync_new_rows").await.map_err(PgError::query(&target, "set a savepoint"))?;
            match sp
                .execute(
                    &format!("INSERT INTO {t} ({cols}) SELECT {cols} FROM {source} WHERE {EXPECT_ABSENT_COLUMN}"),
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
                            "SELECT {key_shown}, u.{VERSION_COLUMN} FROM {source} u JOIN {t} t ON {on} \
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
        let guard = self.dedup_column().map(|c| keep_greater(c, "u"));
        let (more_inserted, updated) = if existing {
            merge_from(
                &self.tx,
                &target,
                &if keeps_rows {
                    format!("(SELECT * FROM {source})")
                } else {
                    format!("(SELECT * FROM {source} WHERE NOT {EXPECT_ABSENT_COLUMN})")
                },
                "u",
                schema,
                key,
                guard.as_deref(),
            )
            .await?
        } else {
            (0, 0)
        };
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
        let (layout, defs) = staging_layout(&self.target, columns, extra, self.key, &self.policy);
        self.tx
            .batch_execute(&format!("CREATE TEMP TABLE {temp} ({defs}) ON COMMIT DROP"))
            .await
            .map_err(PgError::query(&self.target, format!("create {temp}")))?;
        let sink = self
            .tx
            .copy_in(&copy_sql(temp, &layout, "FORMAT binary"))
            .await
            .map_err(PgError::query(&self.target, "start COPY"))?;
        copy_batches(sink, &layout, batches).await
    }

    /// The DDL this transaction ran.
    pub fn ddl(&self) -> &[String] {
        &self.ddl
    }

    /// Ends a dry run: rolls everything back and returns what would have been applied.
    pub async fn rollback(self) -> Result<RowCounts, PgError> {
        let (tx, target, counts) = (self.tx, self.target, self.counts);
        tx.rollback().await.map_err(PgError::query(&target, "roll back the dry run"))?;
        Ok(counts)
    }

    /// Records `checkpoint` (and the run's progress; `final_chunk` marks the run succeeded)
    /// and commits, if the table was still at version `from` (see
    /// [`state::commit_checkpoint`]).
    ///
    /// `source_rows` is the source's row count at the checkpoint version, when known: if the
    /// table would then hold a different number of rows, the change feed disagrees with the
    /// table, nothing is committed and [`PgError::Drift`] is returned.
    pub async fn commit(
        self,
        run_id: i64,
        from: Version,
        checkpoint: Checkpoint,
        source_rows: Option<u64>,
        final_chunk: bool,
    ) -> Result<RowCounts, PgError> {
        let (tx, target, counts) = (self.tx, self.target, self.counts);
        let rows = state::commit_checkpoint(
            &tx,
            &target,
            self.fence,
            run_id,
            Some(from),
            checkpoint,
            counts,
            None,
            final_chunk,
        )
        .await?;
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

/// The condition under which the target's row `t` gives way to `alias`'s row of the same key
/// under `dedup_by = column`: its value is not greater, NULL being the least (the order a
/// snapshot keeps the greatest by). Equal values: the later change wins.
pub(crate) fn keep_greater(column: &Column, alias: &str) -> String {
    let c = ident(&column.name);
    let collate = order_collation(column);
    format!("(t.{c} IS NULL OR {alias}.{c}{collate} >= t.{c}{collate})")
}

/// How `dedup_by` values of `column` compare in SQL so that Postgres agrees with the change
/// planner, which orders them as bytes: text in code-point order (`COLLATE "C"`, the byte
/// order of UTF-8), whatever the database's or the column's collation.
pub(crate) fn order_collation(column: &Column) -> &'static str {
    if column.ty == ColumnType::Text {
        r#" COLLATE "C""#
    } else {
        ""
    }
}

/// How a staging table holds `columns` and our `extra` columns: the COPY layout for the
/// change rows, and the table's column definitions.
pub(crate) fn staging_layout(
    target: &TableName,
    columns: &[&Column],
    extra: &[(&str, ColumnType)],
    key: &[String],
    policy: &DataPolicy,
) -> (CopyLayout, String) {
    let layout = CopyLayout {
        target: target.clone(),
        columns: columns.iter().map(|c| c.name.clone()).chain(extra.iter().map(|(n, _)| n.to_string())).collect(),
        types: columns.iter().map(|c| c.ty).chain(extra.iter().map(|(_, ty)| *ty)).collect(),
        key: key.to_vec(),
        policy: policy.clone(),
    };
    let definitions = columns
        .iter()
        .map(|c| column_definition(c, false))
        .chain(extra.iter().map(|(name, ty)| format!("{name} {}", ty.postgres_type())))
        .collect::<Vec<_>>()
        .join(", ");
    (layout, definitions)
}

pub(crate) fn copy_sql(table: &str, layout: &CopyLayout, options: &str) -> String {
    format!("COPY {table} ({}) FROM STDIN ({options})", column_list(layout.columns.iter().map(String::as_str), None))
}

pub(crate) async fn copy_batches(
    sink: tokio_postgres::CopyInSink<Bytes>,
    layout: &CopyLayout,
    batches: &[RecordBatch],
) -> Result<(), PgError> {
    let err = |action: &'static str| PgError::query(&layout.target, action);
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

/// A second session that stages a chunk's upserted rows while the chunk's transaction applies
/// them. Part `k + 1` is copied into its own unlogged table, and committed so that the
/// transaction's next statement sees it, while the transaction merges part `k`: the COPY of
/// every part but the first then runs on the other core instead of on the transaction's path.
///
/// The part tables (`lakesync."stage_<hash of the target>_<k>"`) only hold copies of source
/// rows, so exactly-once still rests on the transaction alone. [`Stager::clear`] drops them
/// after the commit; whatever a crashed run left behind, the next [`Sink::open_stager`] for the
/// same table drops.
pub struct Stager {
    client: tokio_postgres::Client,
    target: TableName,
    prefix: String,
    layout: CopyLayout,
    /// The part tables' column definitions.
    definitions: String,
    /// A `stage` began its transaction and has not ended it (it failed or was stopped).
    in_transaction: std::sync::atomic::AtomicBool,
}

impl Sink {
    /// Opens a staging session for this table's upserts, with no part tables left from an
    /// earlier run (see [`Stager::clear`]). The future owns what it needs, so it can run on
    /// its own task while this session deletes.
    pub fn open_stager(
        &self,
        schema: &TableSchema,
        key: &[String],
    ) -> impl std::future::Future<Output = Result<Stager, PgError>> + Send + 'static {
        let (config, target, policy) = (self.config().clone(), self.table.clone(), self.policy.clone());
        let (schema, key) = (schema.clone(), key.to_vec());
        async move {
            let stager = Stager::open(&config, &target, &schema, &key, policy).await?;
            // Whatever a crashed run left goes first.
            stager.clear().await?;
            Ok(stager)
        }
    }
}

impl Stager {
    /// Connects the staging session for `target`, whose change rows have `schema` and `key`.
    pub async fn open(
        config: &crate::PgConfig,
        target: &TableName,
        schema: &TableSchema,
        key: &[String],
        policy: DataPolicy,
    ) -> Result<Self, PgError> {
        let client = config.connect().await?;
        // Dropping the part tables waits for the applying transaction's locks; never forever.
        client
            .batch_execute("SET lock_timeout = '10s'")
            .await
            .map_err(PgError::query(target, "configure the session"))?;
        let columns: Vec<&Column> = schema.columns.iter().collect();
        let (layout, definitions) = staging_layout(target, &columns, &UPSERT_EXTRA, key, &policy);
        Ok(Self {
            client,
            target: target.clone(),
            prefix: staging_prefix(target),
            layout,
            definitions,
            in_transaction: false.into(),
        })
    }

    /// The qualified name of part `part`'s table.
    pub fn part_table(&self, part: usize) -> String {
        format!("lakesync.{}", ident(&format!("{}_{part}", self.prefix)))
    }

    /// Creates part `part`'s table and copies `batch` into it; the rows are committed when
    /// this returns.
    ///
    /// The table is created in the COPY's transaction so that the rows go in frozen (`COPY ..
    /// FREEZE`): already marked visible to everyone, so the applying session's reads need not
    /// look up this transaction's outcome row by row and set hint bits on pages it then
    /// dirties.
    pub async fn stage(&self, part: usize, batch: &RecordBatch) -> Result<(), PgError> {
        let err = |action: &'static str| PgError::query(&self.target, action);
        let table = self.part_table(part);
        self.in_transaction.store(true, std::sync::atomic::Ordering::SeqCst);
        self.client
            .batch_execute(&format!("BEGIN; CREATE UNLOGGED TABLE {table} ({})", self.definitions))
            .await
            .map_err(err("create a staging table"))?;
        let copied = async {
            let sink = self
                .client
                .copy_in(&copy_sql(&table, &self.layout, "FORMAT binary, FREEZE"))
                .await
                .map_err(err("start COPY"))?;
            copy_batches(sink, &self.layout, std::slice::from_ref(batch)).await
        }
        .await;
        let end = if copied.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = self.client.batch_execute(end).await.map_err(err("commit a staging table"));
        if ended.is_ok() {
            self.in_transaction.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        copied.and(ended)
    }

    /// Drops the part tables (after the chunk's transaction ended: its reads hold locks on
    /// them until then).
    pub async fn clear(&self) -> Result<(), PgError> {
        // A stopped `stage` can leave its transaction open (and failed, if its COPY was cut
        // off); the drops must not run inside it.
        if self.in_transaction.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(PgError::query(&self.target, "end a staging transaction"))?;
        }
        drop_part_tables(&self.client, &self.target).await
    }
}

/// Drops the part tables a [`Stager`] of `target` made (or a crashed run left behind).
pub(crate) async fn drop_part_tables(client: &impl GenericClient, target: &TableName) -> Result<(), PgError> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'lakesync' AND c.relkind = 'r' AND left(c.relname, length($1)) = $1",
            &[&format!("{}_", staging_prefix(target))],
        )
        .await
        .map_err(PgError::query(target, "look for staging tables"))?;
    let drops: Vec<String> =
        rows.iter().map(|r| format!("DROP TABLE IF EXISTS lakesync.{}", ident(r.get::<_, &str>(0)))).collect();
    if drops.is_empty() {
        return Ok(());
    }
    client.batch_execute(&drops.join("; ")).await.map_err(PgError::query(target, "drop the staging tables"))
}

/// The name prefix of `target`'s staging tables (see [`Stager`]): `stage_` and a 64-bit
/// FNV-1a hash of the target's name, short enough for any target name (identifiers stop at
/// 63 bytes) and the same in every build and process, so a later run finds what a crashed
/// one left.
pub fn staging_prefix(target: &TableName) -> String {
    format!("stage_{:016x}", crate::ddl::fnv1a(format!("{}\0{}", target.schema, target.name).bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_tables_are_named_the_same_by_every_build() {
        // FNV-1a of "public\0people", computed independently (Python).
        assert_eq!(staging_prefix(&TableName::new("public", "people")), "stage_76672d63469be623");
        assert_ne!(
            staging_prefix(&TableName::new("public", "people")),
            staging_prefix(&TableName::new("publicp", "eople"))
        );
    }
}
