//! From change data feed batches to the net changes of a chunk of versions: keys to delete
//! and rows to upsert, as batches for [`lakesync_postgres::ChangeApply`].
//!
//! Two passes keep reads cheap: the first reads only the key columns (plus change type and
//! version) of every change row and plans the net action per key; the second reads whole rows
//! only for the versions that hold a winning insert or post-image. A version that only deletes
//! (for example a `DELETE` with deletion vectors, whose files must be decoded to find the
//! deleted rows) is never decoded beyond its key column.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow_row::{RowConverter, Rows, SortField};
use arrow_schema::{Field, Schema};
use lakesync_core::{ChangeKind, ChangePlanner, KeyMap, LogPlanner, PlanConflict, TableName, TableSchema, Version};
use lakesync_delta::{CHANGE_TYPE_COLUMN, COMMIT_VERSION_COLUMN};
use lakesync_postgres::apply::{EXPECT_ABSENT_COLUMN, VERSION_COLUMN};
use lakesync_postgres::{key_text, PgError};

use crate::EngineError;

/// Rows per batch handed to the sink (and per staged part, see [`staged_parts`]).
const OUT_BATCH_ROWS: usize = 8192;
/// Rows in the first batch of upserts. A staged apply waits for the first part's COPY
/// alone, so that part is small; the parts then double while the applying session works
/// through the previous one, up to [`OUT_BATCH_ROWS`].
const FIRST_UPSERT_ROWS: usize = 2048;

/// The sizes of the batches [`KeyPlan::into_upserts`] returns for `upserts` rows.
fn upsert_batch_sizes(upserts: usize) -> Vec<usize> {
    let (mut sizes, mut left, mut next) = (Vec::new(), upserts, FIRST_UPSERT_ROWS);
    while left > 0 {
        let n = next.min(left);
        sizes.push(n);
        left -= n;
        next = (next * 2).min(OUT_BATCH_ROWS);
    }
    sizes
}

/// How many batches (staged parts) [`KeyPlan::into_upserts`] returns for `upserts` rows.
pub fn staged_parts(upserts: usize) -> usize {
    upsert_batch_sizes(upserts).len()
}

/// A winning row image found on the second read.
struct Pick {
    batch: usize,
    row: usize,
    expect_absent: bool,
    version: Version,
}

/// A key's winning upsert: (version, expect_absent, tie-break).
type Winner = (Version, bool, Box<[u8]>);

/// A key to delete: (key, version, under `dedup_by` the greatest order among its deleted rows).
type Delete = (Box<[u8]>, Version, Option<Box<[u8]>>);

/// The net plan of a chunk, computed from key-only change rows.
pub struct KeyPlan {
    converter: Option<RowConverter>,
    /// The `dedup_by` column and its row encoder: the tie-break between row images of one
    /// key in one version.
    order_by: Option<(String, Option<RowConverter>)>,
    /// Winning upsert per key.
    upserts: KeyMap<Box<[u8]>, Winner>,
    /// Keys to delete, with the version and, under `dedup_by`, the greatest order among the
    /// key's deleted rows (the delete then removes only a row whose order is not greater).
    deletes: Vec<Delete>,
}

struct ChangeColumns {
    kinds: StringArray,
    versions: Int64Array,
    keys: Vec<ArrayRef>,
}

fn change_columns(table: &TableName, key: &[String], batch: &RecordBatch) -> Result<ChangeColumns, EngineError> {
    let internal = |m: String| EngineError::Internal(format!("table {table}: {m}"));
    let kinds = batch
        .column_by_name(CHANGE_TYPE_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
        .ok_or_else(|| internal("change batch without a string _change_type column".into()))?;
    let versions = batch
        .column_by_name(COMMIT_VERSION_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
        .ok_or_else(|| internal("change batch without an int64 _commit_version column".into()))?;
    let keys: Vec<ArrayRef> = key
        .iter()
        .map(|k| {
            batch.column_by_name(k).cloned().ok_or_else(|| internal(format!("change batch without key column {k:?}")))
        })
        .collect::<Result<_, _>>()?;
    for (k, arr) in key.iter().zip(&keys) {
        if arr.null_count() > 0 {
            let row = (0..arr.len()).find(|i| arr.is_null(*i)).unwrap_or(0);
            return Err(PgError::NullKey {
                table: table.to_string(),
                column: k.clone(),
                version: Some(versions.value(row) as Version),
            }
            .into());
        }
    }
    Ok(ChangeColumns { kinds, versions, keys })
}

fn kind_of(table: &TableName, kinds: &StringArray, version: Version, row: usize) -> Result<ChangeKind, EngineError> {
    ChangeKind::parse(kinds.value(row)).ok_or_else(|| EngineError::UnusableFeed {
        table: table.to_string(),
        version,
        reason: format!("unknown _change_type {:?}", kinds.value(row)),
    })
}

fn key_rows(converter: &mut Option<RowConverter>, keys: &[ArrayRef], table: &TableName) -> Result<Rows, EngineError> {
    let internal = |m: String| EngineError::Internal(format!("table {table}: {m}"));
    let conv = match converter {
        Some(c) => c,
        None => converter.insert(
            RowConverter::new(keys.iter().map(|a| SortField::new(a.data_type().clone())).collect())
                .map_err(|e| internal(e.to_string()))?,
        ),
    };
    conv.convert_columns(keys).map_err(|e| internal(e.to_string()))
}

/// The tie-break column of `batch` encoded as comparable bytes, when there is one.
fn order_rows(
    order_by: &mut Option<(String, Option<RowConverter>)>,
    batch: &RecordBatch,
    table: &TableName,
) -> Result<Option<Rows>, EngineError> {
    let Some((column, converter)) = order_by else { return Ok(None) };
    let values = batch.column_by_name(column).cloned().ok_or_else(|| {
        EngineError::Internal(format!("table {table}: change batch without the dedup_by column {column:?}"))
    })?;
    key_rows(converter, &[values], table).map(Some)
}

/// Pass one: reduces the change rows in `batches` (which need only the key columns, the
/// `order_by` column if any, the change type and the version) to one action per key. Row
/// images of one key in one version are a conflict, unless `order_by` (the `dedup_by`
/// policy) names a column: then the source is a log that repeats keys, planned by
/// [`LogPlanner`], and a key's row is its image with the greatest value whichever commit
/// wrote it, as in a snapshot (the upserts and deletes are guarded by that value).
///
/// What a planner does with one change row: (encoded key, version, kind, tie-break).
type ObserveFn<'a> = dyn FnMut(Box<[u8]>, Version, ChangeKind, &[u8]) -> Result<(), PlanConflict<Box<[u8]>>> + 'a;

/// Takes the batches as they are read (`read()`), so planning overlaps the reader's
/// decoding. Under `order_by` the planner keeps a few images per key (see [`LogPlanner`]);
/// the keys it cannot decide from them are planned again from a second `read()`.
pub fn plan_keys<I, E>(
    table: &TableName,
    key: &[String],
    order_by: Option<&str>,
    read: impl Fn() -> Result<I, EngineError>,
) -> Result<KeyPlan, EngineError>
where
    I: IntoIterator<Item = Result<RecordBatch, E>>,
    EngineError: From<E>,
{
    let mut planner: ChangePlanner<Box<[u8]>, ()> = ChangePlanner::new();
    let mut log: LogPlanner<Box<[u8]>, ()> = LogPlanner::new();
    let mut converter = None;
    let mut order_by = order_by.map(|c| (c.to_string(), None));
    let ordered = order_by.is_some();
    let observe = |converter: &mut Option<RowConverter>,
                   order_by: &mut Option<(String, Option<RowConverter>)>,
                   batches: I,
                   f: &mut ObserveFn<'_>|
     -> Result<(), EngineError> {
        for batch in batches {
            let batch = batch?;
            if batch.num_rows() == 0 {
                continue;
            }
            let cols = change_columns(table, key, &batch)?;
            let rows = key_rows(converter, &cols.keys, table)?;
            let order = order_rows(order_by, &batch, table)?;
            for i in 0..batch.num_rows() {
                let version = cols.versions.value(i) as Version;
                let kind = kind_of(table, &cols.kinds, version, i)?;
                let tie = order.as_ref().map(|o| o.row(i));
                let tie: &[u8] = tie.as_ref().map_or(&[], |r| r.as_ref());
                f(rows.row(i).as_ref().into(), version, kind, tie).map_err(|c| {
                    EngineError::Postgres(PgError::DuplicateKey {
                        table: table.to_string(),
                        key: key_text(&batch, key, i),
                        version: Some(c.version),
                    })
                })?;
            }
        }
        Ok(())
    };
    observe(&mut converter, &mut order_by, read()?, &mut |k, v, kind, tie| {
        if ordered {
            log.observe(k, v, kind, tie, ())
        } else {
            planner.observe_ordered(k, v, kind, tie, ())
        }
    })?;
    // A log that repeats keys (an append-only event table) never expects a key absent: an
    // insert there does not mean the key is new, so every upsert merges.
    let (plan, guarded) = if ordered {
        let first = log.finish();
        let plan = if first.uncertain.is_empty() {
            first.plan
        } else {
            tracing::debug!(table = %table, keys = first.uncertain.len(), "planning keys again from a second read");
            let mut again = LogPlanner::only(first.uncertain.iter().cloned());
            observe(&mut converter, &mut order_by, read()?, &mut |k, v, kind, tie| again.observe(k, v, kind, tie, ()))?;
            first.replace(again.finish().plan)
        };
        (plan, true)
    } else {
        (planner.finish(), false)
    };
    Ok(KeyPlan {
        converter,
        upserts: plan.upserts.into_iter().map(|r| (r.key, (r.version, r.expect_absent, r.order))).collect(),
        order_by,
        deletes: plan.deletes.into_iter().map(|d| (d.key, d.version, guarded.then_some(d.order))).collect(),
    })
}

impl KeyPlan {
    /// The versions whose full rows pass two must read.
    pub fn upsert_versions(&self) -> BTreeSet<Version> {
        self.upserts.values().map(|(v, _, _)| *v).collect()
    }

    /// Pass two: picks the winning row images out of full change rows (which must cover every
    /// version of [`KeyPlan::upsert_versions`]) and returns them in key order, as the table's
    /// columns plus [`EXPECT_ABSENT_COLUMN`] and [`VERSION_COLUMN`]. The deletes are taken
    /// before, with [`KeyPlan::take_deletes`].
    pub fn into_upserts(
        mut self,
        table: &TableName,
        schema: &TableSchema,
        key: &[String],
        full: &[RecordBatch],
    ) -> Result<Vec<RecordBatch>, EngineError> {
        let internal = |m: String| EngineError::Internal(format!("table {table}: {m}"));
        // The keys of every full batch, encoded once: the picks below refer to them (no copy
        // per winning row) and sort by them.
        let mut keys: Vec<Option<Rows>> = Vec::with_capacity(full.len());
        let mut picks: Vec<Pick> = Vec::with_capacity(self.upserts.len());
        for batch in full {
            if batch.num_rows() == 0 {
                keys.push(None);
                continue;
            }
            let bi = keys.len();
            let cols = change_columns(table, key, batch)?;
            let rows = key_rows(&mut self.converter, &cols.keys, table)?;
            let order = order_rows(&mut self.order_by, batch, table)?;
            for i in 0..batch.num_rows() {
                let version = cols.versions.value(i) as Version;
                if !kind_of(table, &cols.kinds, version, i)?.leaves_row() {
                    continue;
                }
                // Pass one rejected two row images of one key in one version with equal
                // tie-breaks, so a winning (key, version, tie-break) matches exactly one row.
                if let Some((v, expect_absent, tie)) = self.upserts.get(rows.row(i).as_ref()) {
                    let matches = match &order {
                        Some(o) => o.row(i).as_ref() == &**tie,
                        None => true,
                    };
                    if *v == version && matches {
                        picks.push(Pick { batch: bi, row: i, expect_absent: *expect_absent, version });
                    }
                }
            }
            keys.push(Some(rows));
        }
        if picks.len() != self.upserts.len() {
            return Err(internal(format!(
                "the second read found {} winning rows where the first planned {}",
                picks.len(),
                self.upserts.len()
            )));
        }
        // Existing keys first and new ones last, so that most output batches hold only keys to
        // merge or only new rows (plainly inserted), and a staged apply starts with its slowest
        // parts (merging a row costs more than staging it, so the stager keeps ahead). Then key
        // order (the row encoding sorts like the key): Postgres probes the index and visits
        // heap pages in order rather than at random, several times faster on tables larger
        // than memory, and the order the source files usually hold.
        let key_of = |p: &Pick| keys[p.batch].as_ref().expect("picked rows come from non-empty batches").row(p.row);
        picks.sort_unstable_by(|a, b| a.expect_absent.cmp(&b.expect_absent).then_with(|| key_of(a).cmp(&key_of(b))));
        let refs: Vec<&RecordBatch> = full.iter().collect();
        let names: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
        let mut out = Vec::new();
        let mut rest = picks.as_slice();
        for size in upsert_batch_sizes(picks.len()) {
            let (chunk, after) = rest.split_at(size);
            rest = after;
            let idx: Vec<(usize, usize)> = chunk.iter().map(|p| (p.batch, p.row)).collect();
            let mut cols = names
                .iter()
                .map(|n| {
                    let arrays: Vec<&dyn Array> = refs
                        .iter()
                        .map(|b| {
                            b.column_by_name(n)
                                .map(|c| c.as_ref())
                                .ok_or_else(|| internal(format!("missing column {n:?}")))
                        })
                        .collect::<Result<_, _>>()?;
                    arrow_select::interleave::interleave(&arrays, &idx).map_err(|e| internal(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            cols.push(Arc::new(BooleanArray::from(chunk.iter().map(|p| p.expect_absent).collect::<Vec<_>>())));
            cols.push(Arc::new(Int64Array::from(chunk.iter().map(|p| p.version as i64).collect::<Vec<_>>())));
            let mut all = names.clone();
            all.extend([EXPECT_ABSENT_COLUMN.to_string(), VERSION_COLUMN.to_string()]);
            out.push(batch_of(&all, cols).map_err(internal)?);
        }
        Ok(out)
    }

    /// How many keys end as upserts.
    pub fn upsert_count(&self) -> usize {
        self.upserts.len()
    }

    /// The keys to delete as batches of the key columns plus the version, in key order; the
    /// plan keeps only its upserts. Needs no second read, so Postgres can delete while the
    /// winning rows are read.
    pub fn take_deletes(&mut self, table: &TableName, key: &[String]) -> Result<Vec<RecordBatch>, EngineError> {
        let internal = |m: String| EngineError::Internal(format!("table {table}: {m}"));
        let mut deletes = std::mem::take(&mut self.deletes);
        let mut out = Vec::new();
        if deletes.is_empty() {
            return Ok(out);
        }
        deletes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let conv = self.converter.as_ref().expect("deletes imply rows were seen");
        for chunk in deletes.chunks(OUT_BATCH_ROWS) {
            let parser = conv.parser();
            let rows: Vec<_> = chunk.iter().map(|(k, ..)| parser.parse(k)).collect();
            let mut cols = conv.convert_rows(rows).map_err(|e| internal(e.to_string()))?;
            cols.push(Arc::new(Int64Array::from(chunk.iter().map(|(_, v, _)| *v as i64).collect::<Vec<_>>())));
            let mut all = key.to_vec();
            all.push(VERSION_COLUMN.into());
            // Under dedup_by: the deleted rows' greatest order, as the order column itself.
            if let Some((column, Some(order))) = self.order_by.as_ref().filter(|(c, _)| !key.contains(c)) {
                let parser = order.parser();
                let rows = chunk
                    .iter()
                    .map(|(_, _, o)| o.as_deref().map(|o| parser.parse(o)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| internal("a delete without its order".into()))?;
                let mut values = order.convert_rows(rows).map_err(|e| internal(e.to_string()))?;
                cols.push(values.remove(0));
                all.push(column.clone());
            }
            out.push(batch_of(&all, cols).map_err(internal)?);
        }
        Ok(out)
    }
}

/// Contiguous runs of `versions`, as inclusive ranges.
pub fn version_runs(versions: &BTreeSet<Version>) -> Vec<(Version, Version)> {
    let mut runs: Vec<(Version, Version)> = Vec::new();
    for &v in versions {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == v => *end = v,
            _ => runs.push((v, v)),
        }
    }
    runs
}

fn batch_of(names: &[String], cols: Vec<ArrayRef>) -> Result<RecordBatch, String> {
    let fields: Vec<Field> = names.iter().zip(&cols).map(|(n, c)| Field::new(n, c.data_type().clone(), true)).collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_batches_start_small_and_double_up_to_the_batch_size() {
        assert_eq!(upsert_batch_sizes(0), Vec::<usize>::new());
        assert_eq!(upsert_batch_sizes(100), [100]);
        assert_eq!(upsert_batch_sizes(5000), [2048, 2952]);
        assert_eq!(upsert_batch_sizes(30000), [2048, 4096, 8192, 8192, 7472]);
        assert_eq!(staged_parts(30000), 5);
    }

    #[test]
    fn versions_group_into_contiguous_runs() {
        let v: BTreeSet<Version> = [1, 2, 3, 7, 9, 10].into_iter().collect();
        assert_eq!(version_runs(&v), vec![(1, 3), (7, 7), (9, 10)]);
        assert!(version_runs(&BTreeSet::new()).is_empty());
    }
}

/// Each version's commit timestamp as the change feed's rows carry it, gathered while the
/// keys are planned: what a soft delete sets `_lakesync_deleted_at` to.
#[derive(Clone, Default)]
pub struct CommitStamps(Arc<std::sync::Mutex<std::collections::BTreeMap<i64, i64>>>);

impl CommitStamps {
    /// Notes the versions and timestamps of a change batch.
    pub fn observe<E>(&self, batch: &Result<RecordBatch, E>) {
        let Ok(batch) = batch else { return };
        let (Some(versions), Some(stamps)) = (
            batch.column_by_name(COMMIT_VERSION_COLUMN).and_then(|c| c.as_any().downcast_ref::<Int64Array>()),
            batch
                .column_by_name(lakesync_delta::COMMIT_TIMESTAMP_COLUMN)
                .and_then(|c| c.as_any().downcast_ref::<arrow_array::TimestampMicrosecondArray>()),
        ) else {
            return;
        };
        let mut seen = self.0.lock().expect("stamps lock");
        let mut last = None;
        for i in 0..versions.len() {
            let v = versions.value(i);
            if last != Some(v) && stamps.is_valid(i) {
                seen.entry(v).or_insert(stamps.value(i));
                last = Some(v);
            }
        }
    }

    /// `deletes` with each row's commit timestamp added (by its version).
    pub fn stamp(&self, table: &TableName, deletes: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, EngineError> {
        let seen = self.0.lock().expect("stamps lock");
        let internal = |m: String| EngineError::Internal(format!("table {table}: {m}"));
        deletes
            .into_iter()
            .map(|batch| {
                let versions = batch
                    .column_by_name(VERSION_COLUMN)
                    .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                    .ok_or_else(|| internal("a delete batch without its versions".into()))?;
                let stamps = (0..versions.len())
                    .map(|i| {
                        seen.get(&versions.value(i)).copied().ok_or_else(|| {
                            internal(format!("no commit timestamp was read for version {}", versions.value(i)))
                        })
                    })
                    .collect::<Result<Vec<i64>, _>>()?;
                let mut fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
                let mut columns = batch.columns().to_vec();
                let stamps = arrow_array::TimestampMicrosecondArray::from(stamps).with_timezone("UTC");
                fields.push(Field::new(
                    lakesync_postgres::apply::CHANGE_TIMESTAMP_COLUMN,
                    stamps.data_type().clone(),
                    false,
                ));
                columns.push(Arc::new(stamps));
                RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| internal(e.to_string()))
            })
            .collect()
    }
}
