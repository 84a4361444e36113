//! Row-selected reads of deletion-vector pairs in the change data feed.
//!
//! A commit that deletes rows with deletion vectors (Spark's `DELETE`, `UPDATE` and `MERGE`
//! without cdc files) removes each touched data file and adds it back with a new deletion
//! vector. The kernel's change data feed turns such a pair into the rows that the new vector
//! deletes and the old one did not (and, the other way round, the rows restored), but it
//! reads the whole file to find them and applies the difference afterwards: its Parquet read
//! gets no row selection (`TODO(#860)` in the kernel's `table_changes/scan.rs`). 40k updated
//! rows spread over a 50M-row table meant decoding the key column of all 50M rows.
//!
//! [`pair_selections`] reads the range's commits and, for every file that the range touches
//! *only* through such pairs, collects the union of the old and new vectors of every pair:
//! a superset of every row the kernel selects from that file in this range (the kernel
//! selects `new - old` and `old - new`, see its `resolve_dvs.rs`). The Parquet handler then
//! decodes only those rows ([`scatter`] puts them back at their positions), and fills every
//! other position with a copy of one of them, which the kernel's own selection then drops.
//!
//! Invariants: a file the range also adds or removes on its own (an append, a rewrite, a
//! `remove` without its `add`) or touches in a commit with cdc files is never row-selected,
//! because there the kernel keeps (nearly) every row; the map belongs to one change-feed
//! read (one engine made for it), never to the table; anything unexpected in the log (a
//! missing commit file, an unreadable vector) means no map, and the kernel reads as before.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_array::{RecordBatch, UInt32Array};
use delta_kernel::actions::deletion_vector::DeletionVectorDescriptor;
use delta_kernel::parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use delta_kernel::{Engine, KernelError, KernelResult, StorageHandler};
use lakesync_core::Version;
use url::Url;

/// Per data file (as the kernel locates it: the table root joined with the logged path),
/// the sorted, distinct row indexes its change-feed reads may select.
pub(crate) type Selections = HashMap<Url, Arc<Vec<u64>>>;

/// The row selections for the change feed of `start..=end` (see the module docs); empty
/// when no file qualifies or the log could not be read for them.
pub(crate) fn pair_selections(engine: &dyn Engine, table_root: &Url, start: Version, end: Version) -> Selections {
    match try_pair_selections(engine, table_root, start, end) {
        Ok(selections) => {
            if !selections.is_empty() {
                let rows: usize = selections.values().map(|r| r.len()).sum();
                tracing::debug!(table = %table_root, start, end, files = selections.len(), rows, "deletion-vector pairs read row-selected");
            }
            selections
        }
        Err(e) => {
            tracing::debug!(table = %table_root, start, end, error = %e, "no row-selected reads of deletion-vector pairs");
            Selections::new()
        }
    }
}

fn try_pair_selections(
    engine: &dyn Engine,
    table_root: &Url,
    start: Version,
    end: Version,
) -> KernelResult<Selections> {
    let storage = engine.storage_handler();
    let log = table_root.join("_delta_log/")?;
    let commits =
        (start..=end).map(|v| Ok((log.join(&format!("{v:020}.json"))?, None))).collect::<KernelResult<Vec<_>>>()?;
    let mut rows: HashMap<Url, Vec<u64>> = HashMap::new();
    let mut whole: HashSet<Url> = HashSet::new();
    for commit in storage.read_files(commits)? {
        let commit = commit?;
        let (mut adds, mut removes, mut cdc) = (Vec::new(), HashMap::new(), false);
        for line in commit.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
            let action: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| KernelError::generic(format!("a commit line is not JSON: {e}")))?;
            let file = |kind: &str| {
                let a = action.get(kind)?;
                let path = a.get("path")?.as_str()?.to_string();
                let data_change = a.get("dataChange").and_then(serde_json::Value::as_bool).unwrap_or(true);
                Some((path, data_change, a.get("deletionVector").filter(|d| !d.is_null()).cloned()))
            };
            if let Some(add) = file("add") {
                adds.push(add);
            } else if let Some((path, data_change, dv)) = file("remove") {
                removes.insert(path, (data_change, dv));
            } else if action.get("cdc").is_some() {
                cdc = true;
            }
        }
        let mut paired = HashSet::new();
        for (path, data_change, add_dv) in adds {
            if !data_change {
                continue;
            }
            let url = table_root.join(&path)?;
            match removes.get(&path) {
                Some((true, remove_dv)) if !cdc => {
                    let entry = rows.entry(url).or_default();
                    for dv in [add_dv.as_ref(), remove_dv.as_ref()].into_iter().flatten() {
                        entry.extend(row_indexes(dv, storage.clone(), table_root)?);
                    }
                    paired.insert(path);
                }
                _ => {
                    whole.insert(url);
                }
            }
        }
        for (path, (data_change, _)) in removes {
            if data_change && (cdc || !paired.contains(&path)) {
                whole.insert(table_root.join(&path)?);
            }
        }
    }
    Ok(rows
        .into_iter()
        .filter(|(url, rows)| !rows.is_empty() && !whole.contains(url))
        .map(|(url, mut rows)| {
            rows.sort_unstable();
            rows.dedup();
            (url, Arc::new(rows))
        })
        .collect())
}

fn row_indexes(dv: &serde_json::Value, storage: Arc<dyn StorageHandler>, table_root: &Url) -> KernelResult<Vec<u64>> {
    let descriptor: DeletionVectorDescriptor = serde_json::from_value(dv.clone())
        .map_err(|e| KernelError::generic(format!("a deletion vector descriptor does not parse: {e}")))?;
    descriptor.row_indexes(storage, table_root)
}

/// The Parquet row selection of `rows` (sorted, distinct) in a file of `total` rows; rows at
/// or past the end are not selected.
pub(crate) fn row_selection(rows: &[u64], total: u64) -> RowSelection {
    let mut selectors = Vec::new();
    let mut at = 0u64;
    for &row in rows.iter().take_while(|r| **r < total) {
        if row > at {
            selectors.push(RowSelector::skip((row - at) as usize));
        }
        selectors.push(RowSelector::select(1));
        at = row + 1;
    }
    if at < total {
        selectors.push(RowSelector::skip((total - at) as usize));
    }
    RowSelection::from(selectors)
}

/// Puts the decoded `compact` rows (the file's rows `rows`, in order) back at their positions
/// in batches of `batch_size` covering all `total` rows of the file. Every other position
/// holds a copy of the first decoded row: the kernel's selection never keeps those (see the
/// module docs), and the values stay valid for non-nullable columns.
pub(crate) fn scatter(
    compact: &[RecordBatch],
    rows: &[u64],
    total: u64,
    batch_size: usize,
) -> KernelResult<Vec<RecordBatch>> {
    let rows: Vec<u64> = rows.iter().copied().take_while(|r| *r < total).collect();
    let decoded: usize = compact.iter().map(RecordBatch::num_rows).sum();
    let first = compact.iter().find(|b| b.num_rows() > 0);
    let (Some(first), true) = (first, decoded == rows.len()) else {
        return Err(KernelError::generic(format!(
            "a row-selected read returned {decoded} rows for {} selected of {total}",
            rows.len()
        )));
    };
    let schema = first.schema();
    let mut parts: Vec<RecordBatch> = compact.to_vec();
    parts.push(first.slice(0, 1));
    let decoded_and_filler = arrow_select::concat::concat_batches(&schema, &parts)?;
    let filler = decoded as u32;
    let mut out = Vec::new();
    let mut next = 0usize;
    let mut start = 0u64;
    while start < total {
        let end = (start + batch_size.max(1) as u64).min(total);
        let indexes: UInt32Array = (start..end)
            .map(|row| {
                if rows.get(next) == Some(&row) {
                    next += 1;
                    (next - 1) as u32
                } else {
                    filler
                }
            })
            .collect();
        out.push(arrow_select::take::take_record_batch(&decoded_and_filler, &indexes)?);
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, Int64Array, StringArray};
    use arrow_schema::{DataType, Field, Schema};

    #[test]
    fn a_selection_skips_to_each_row_and_covers_the_file() {
        let selection = row_selection(&[0, 1, 5, 9, 12], 10);
        let selectors: Vec<RowSelector> = selection.into();
        assert_eq!(
            selectors,
            [
                RowSelector::select(2),
                RowSelector::skip(3),
                RowSelector::select(1),
                RowSelector::skip(3),
                RowSelector::select(1)
            ]
        );
        let selectors: Vec<RowSelector> = row_selection(&[3], 10).into();
        assert_eq!(selectors, [RowSelector::skip(3), RowSelector::select(1), RowSelector::skip(6)]);
    }

    #[test]
    fn scattered_rows_land_at_their_positions_and_the_rest_copy_a_decoded_row() {
        let schema =
            Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false), Field::new("v", DataType::Int64, true)]));
        let batch = |keys: &[&str], values: &[Option<i64>]| {
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(StringArray::from(keys.to_vec())), Arc::new(Int64Array::from(values.to_vec()))],
            )
            .unwrap()
        };
        // Rows 1, 4 and 5 of 7, decoded in two batches; batches of 3 rows out.
        let compact = [batch(&["b", "e"], &[Some(1), None]), batch(&["f"], &[Some(5)])];
        let out = scatter(&compact, &[1, 4, 5, 9], 7, 3).unwrap();
        assert_eq!(out.iter().map(RecordBatch::num_rows).collect::<Vec<_>>(), [3, 3, 1]);
        let all = arrow_select::concat::concat_batches(&schema, &out).unwrap();
        let keys = all.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let keys: Vec<&str> = (0..keys.len()).map(|i| keys.value(i)).collect();
        assert_eq!(keys, ["b", "b", "b", "b", "e", "f", "b"]);
        assert_eq!(all.column(0).null_count(), 0);
        let values = all.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        assert!(values.is_null(4) && values.value(5) == 5 && values.value(1) == 1);
        // A read that decoded another number of rows than selected is an error.
        assert!(scatter(&compact[..1], &[1, 4, 5], 7, 3).is_err());
    }
}
