//! From change data feed batches to the net [`ChangeSet`] of a chunk of versions.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow_row::{RowConverter, SortField};
use arrow_schema::{Field, Schema};
use lakesync_core::{ChangeKind, ChangePlanner, TableName, TableSchema, Version};
use lakesync_delta::{CHANGE_TYPE_COLUMN, COMMIT_VERSION_COLUMN};
use lakesync_postgres::apply::{EXPECT_ABSENT_COLUMN, VERSION_COLUMN};
use lakesync_postgres::{key_text, ChangeSet, PgError};

use crate::EngineError;

/// Rows per batch handed to the sink.
const OUT_BATCH_ROWS: usize = 8192;

/// Reduces the change rows in `batches` to one action per key.
pub fn plan_changes(
    table: &TableName,
    schema: &TableSchema,
    key: &[String],
    batches: &[RecordBatch],
) -> Result<ChangeSet, EngineError> {
    let internal = |m: String| EngineError::Internal(format!("table {table}: {m}"));
    let mut planner: ChangePlanner<Box<[u8]>, (u32, u32)> = ChangePlanner::new();
    let mut converter: Option<RowConverter> = None;
    for (bi, batch) in batches.iter().enumerate() {
        if batch.num_rows() == 0 {
            continue;
        }
        let kinds = batch
            .column_by_name(CHANGE_TYPE_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
            .ok_or_else(|| internal("change batch without a string _change_type column".into()))?;
        let versions = batch
            .column_by_name(COMMIT_VERSION_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
            .ok_or_else(|| internal("change batch without an int64 _commit_version column".into()))?;
        let key_arrays: Vec<ArrayRef> = key
            .iter()
            .map(|k| {
                batch
                    .column_by_name(k)
                    .cloned()
                    .ok_or_else(|| internal(format!("change batch without key column {k:?}")))
            })
            .collect::<Result<_, _>>()?;
        for (k, arr) in key.iter().zip(&key_arrays) {
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
        let conv = match &mut converter {
            Some(c) => c,
            None => converter.insert(
                RowConverter::new(key_arrays.iter().map(|a| SortField::new(a.data_type().clone())).collect())
                    .map_err(|e| internal(e.to_string()))?,
            ),
        };
        let rows = conv.convert_columns(&key_arrays).map_err(|e| internal(e.to_string()))?;
        for i in 0..batch.num_rows() {
            let version = versions.value(i) as Version;
            let kind = ChangeKind::parse(kinds.value(i)).ok_or_else(|| EngineError::UnusableFeed {
                table: table.to_string(),
                version,
                reason: format!("unknown _change_type {:?}", kinds.value(i)),
            })?;
            planner.observe(rows.row(i).as_ref().into(), version, kind, (bi as u32, i as u32)).map_err(|c| {
                EngineError::Postgres(PgError::DuplicateKey {
                    table: table.to_string(),
                    key: key_text(batch, key, i),
                    version: Some(c.version),
                })
            })?;
        }
    }
    let plan = planner.finish();
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    let gather = |names: &[String], picks: &[(usize, usize)]| -> Result<Vec<ArrayRef>, EngineError> {
        names
            .iter()
            .map(|n| {
                let cols: Vec<&dyn Array> = refs
                    .iter()
                    .map(|b| {
                        b.column_by_name(n).map(|c| c.as_ref()).ok_or_else(|| internal(format!("missing column {n:?}")))
                    })
                    .collect::<Result<_, _>>()?;
                arrow_select::interleave::interleave(&cols, picks).map_err(|e| internal(e.to_string()))
            })
            .collect()
    };
    let names: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
    let mut out = ChangeSet::default();
    for chunk in plan.upserts.chunks(OUT_BATCH_ROWS) {
        let picks: Vec<(usize, usize)> = chunk.iter().map(|r| (r.row.0 as usize, r.row.1 as usize)).collect();
        let mut cols = gather(&names, &picks)?;
        cols.push(Arc::new(BooleanArray::from(chunk.iter().map(|r| r.expect_absent).collect::<Vec<_>>())));
        cols.push(Arc::new(Int64Array::from(chunk.iter().map(|r| r.version as i64).collect::<Vec<_>>())));
        let mut all_names = names.clone();
        all_names.push(EXPECT_ABSENT_COLUMN.into());
        all_names.push(VERSION_COLUMN.into());
        out.upserts.push(batch_of(&all_names, cols).map_err(internal)?);
    }
    // Deletes need only the key: take it from the row of any change to that key. Keys are
    // decoded from their row encoding.
    if !plan.deletes.is_empty() {
        let conv = converter.as_ref().expect("deletes imply rows were seen");
        for chunk in plan.deletes.chunks(OUT_BATCH_ROWS) {
            let parser = conv.parser();
            let rows: Vec<_> = chunk.iter().map(|(k, _)| parser.parse(k)).collect();
            let mut cols = conv.convert_rows(rows).map_err(|e| internal(e.to_string()))?;
            cols.push(Arc::new(Int64Array::from(chunk.iter().map(|(_, v)| *v as i64).collect::<Vec<_>>())));
            let mut all_names = key.to_vec();
            all_names.push(VERSION_COLUMN.into());
            out.deletes.push(batch_of(&all_names, cols).map_err(internal)?);
        }
    }
    Ok(out)
}

fn batch_of(names: &[String], cols: Vec<ArrayRef>) -> Result<RecordBatch, String> {
    let fields: Vec<Field> = names.iter().zip(&cols).map(|(n, c)| Field::new(n, c.data_type().clone(), true)).collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| e.to_string())
}
