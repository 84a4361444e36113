//! Compaction: a table's small data files rewritten into large ones, in one commit that
//! changes no data.
//!
//! Streaming writers (an ingest flushing every second, Spark micro-batches) leave many small
//! files; every reader pays per file. [`compact`] groups the live files smaller than the target
//! size by partition, reads each group (deletion vectors applied, Spark's INT96 timestamps at
//! microseconds, as every lakesync read), writes it back as files of about the target size,
//! and commits the adds and removes as one `OPTIMIZE` commit whose actions all say
//! `dataChange = false`.
//!
//! Invariants:
//! - The table's rows at the new version are exactly those at the version compacted: same
//!   values, same partitions. Change-feed readers (lakesync's sync included) see no change for
//!   the commit; nothing else is committed.
//! - A concurrent writer never loses a commit: the commit is put-if-absent. When another
//!   writer took the version, the same rewrite is committed on top of it (as Delta's conflict
//!   rules allow: appends do not touch the files rewritten), unless that writer removed one of
//!   them, gave one a new deletion vector or changed the schema: then the plan is made again
//!   from the newer version (files written for the old plan are left for `VACUUM`).
//! - Memory is bounded by one decoded batch and one encoded row group, whatever the target
//!   size: each bin is streamed into its output file (a multipart upload on object stores).

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow_array::{BooleanArray, RecordBatch};
use delta_kernel::engine::arrow_data::ArrowEngineData;
use delta_kernel::engine_data::FilteredEngineData;
use delta_kernel::expressions::Scalar;
use delta_kernel::scan::state::{transform_to_logical, ScanFile};
use delta_kernel::schema::DataType;
use delta_kernel::transaction::{CommitResult, UpdateTableOperation};
use delta_kernel::{FileMeta, KernelError};
use lakesync_core::Version;

use crate::protocol::{ensure_writable, Upgrade};
use crate::store::StorageOptions;
use crate::write::DeltaWriter;
use crate::{DeltaError, DeltaTable};

/// How to compact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactOptions {
    /// Files smaller than this are rewritten, into files of about this size (bytes).
    pub target_file_size: u64,
    /// A partition's small files are rewritten only when it has at least this many.
    pub min_files: usize,
    /// Write a checkpoint when this many commits or more follow the last one (0: never).
    pub checkpoint_every: u64,
    /// Upgrade a legacy protocol the kernel cannot write to table features first (the
    /// user's `--upgrade-protocol`; see [`crate::protocol`]). Without it such a table is
    /// refused, naming the flag.
    pub upgrade_protocol: bool,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self { target_file_size: 128 * 1024 * 1024, min_files: 2, checkpoint_every: 10, upgrade_protocol: false }
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// The version compacted (the latest when it started).
    pub read_version: Version,
    /// The `OPTIMIZE` commit; `None` when no partition had enough small files.
    pub version: Option<Version>,
    pub files_removed: usize,
    pub files_added: usize,
    pub bytes_removed: u64,
    pub bytes_added: u64,
    /// Live rows rewritten.
    pub rows: u64,
    /// The version a checkpoint was written at, if one was due.
    pub checkpoint: Option<Version>,
    /// The protocol upgrade committed first, if the table needed one.
    pub upgraded: Option<(Version, Upgrade)>,
}

/// Compacts the table at `uri` (any URI [`DeltaTable::open_with`] takes).
pub fn compact(uri: &str, storage: &StorageOptions, options: &CompactOptions) -> Result<CompactReport, DeltaError> {
    let reader = DeltaTable::open_with(uri, storage)?;
    let writer = DeltaWriter::open_with(uri, storage)?;
    let upgraded = ensure_writable(&writer, options.upgrade_protocol, "--upgrade-protocol")?;
    for _ in 0..PLANS {
        let Some(plan) = plan_and_write(&reader, &writer, options)? else { continue };
        if let Some(mut report) = commit(&writer, plan)? {
            report.upgraded = upgraded;
            report.checkpoint = writer.checkpoint_if_due(options.checkpoint_every)?;
            return Ok(report);
        }
        tracing::info!(table = uri, "another writer changed the files being compacted; planning again");
    }
    Err(writer.shape(format!(
        "the files being compacted were changed by another writer {PLANS} times; is something rewriting the table continuously?"
    )))
}

/// How many times a compaction is planned again after its files changed under it.
const PLANS: usize = 5;
/// How many times one plan is committed on top of newer commits.
const REBASES: usize = 100;

/// A rewrite written and not yet committed.
struct Plan {
    report: CompactReport,
    schema: delta_kernel::schema::SchemaRef,
    /// The add metadata of the written files.
    adds: Vec<RecordBatch>,
    /// The rewritten files, by logged path, with their deletion vector when planned.
    removed: HashMap<String, Option<String>>,
}

/// Commits `plan` on the latest version, again on each newer one while other writers win the
/// race; `None` when they changed what the plan rewrote.
fn commit(writer: &DeltaWriter, plan: Plan) -> Result<Option<CompactReport>, DeltaError> {
    let werr = |e: KernelError| writer.err(e);
    let mut report = plan.report;
    if plan.removed.is_empty() {
        return Ok(Some(report));
    }
    for _ in 0..REBASES {
        let (snapshot, mut txn) = writer.begin_with(UpdateTableOperation::Optimize, false)?;
        if snapshot.schema() != plan.schema {
            return Ok(None);
        }
        let mut live = 0;
        for (batch, mut selected) in writer.scan_files(&snapshot)? {
            let path = crate::write::path_column(&batch);
            for (i, sel) in selected.iter_mut().enumerate() {
                if !*sel {
                    continue;
                }
                match plan.removed.get(path.value(i)) {
                    None => *sel = false,
                    Some(dv) if *dv != deletion_vector(&batch, i) => return Ok(None),
                    Some(_) => live += 1,
                }
            }
            txn.remove_files(
                FilteredEngineData::try_new(Box::new(ArrowEngineData::new(batch)), selected).map_err(werr)?,
            );
        }
        if live != plan.removed.len() {
            return Ok(None);
        }
        for add in &plan.adds {
            txn.add_files(Box::new(ArrowEngineData::new(add.clone())));
        }
        match txn.commit(writer.engine()).map_err(werr)? {
            CommitResult::Committed(c) => {
                report.version = Some(c.commit_version());
                return Ok(Some(report));
            }
            CommitResult::Conflicted(c) => {
                tracing::debug!(
                    table = writer.uri(),
                    version = c.conflict_version(),
                    "compaction commit lost a race; rebasing"
                );
            }
            // The commit may have landed; if it did, the next round finds the rewritten files
            // gone and the caller plans again (finding nothing left to do).
            CommitResult::Retryable(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    Err(writer.shape(format!("the compaction commit lost the race to other writers {REBASES} times in a row")))
}

/// The deletion vector of scan row `i` (storage type, path or inline bytes, offset), if any.
fn deletion_vector(batch: &RecordBatch, i: usize) -> Option<String> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    let dv = batch.column_by_name("deletionVector")?.as_struct_opt()?;
    if dv.is_null(i) {
        return None;
    }
    let text = |name: &str| {
        dv.column_by_name(name).map(|c| arrow_cast::display::array_value_to_string(c, i).unwrap_or_default())
    };
    Some(format!("{:?}/{:?}/{:?}", text("storageType"), text("pathOrInlineDv"), text("offset")))
}

/// One live data file of the snapshot.
struct LiveFile {
    scan: ScanFile,
    /// Partition values by physical column name, in a stable order (the grouping key).
    partition: BTreeMap<String, String>,
}

/// Plans the rewrite on the latest version and writes its files; `None` when a plan was made
/// on a version the files changed in while planning (a caller plans again).
fn plan_and_write(
    reader: &DeltaTable,
    writer: &DeltaWriter,
    options: &CompactOptions,
) -> Result<Option<Plan>, DeltaError> {
    let (snapshot, txn) = writer.begin_with(UpdateTableOperation::Optimize, false).map_err(|e| match e {
        DeltaError::Write { uri, source: KernelError::Unsupported(why) } => DeltaError::Shape {
            uri,
            message: format!(
                "lakesync cannot commit to this table ({why}): delta_kernel writes tables whose writer features it \
                 supports. Nothing was changed"
            ),
        },
        other => other,
    })?;
    let read_version = snapshot.version();
    let werr = |e: KernelError| writer.err(e);
    let rerr = |source: KernelError| DeltaError::Read { uri: writer.uri().to_string(), version: read_version, source };
    let engine = reader.engine().clone();
    let scan = snapshot.clone().scan_builder().build().map_err(rerr)?;

    // Every live file, with its deletion vector as logged.
    let mut files: Vec<ScanFile> = Vec::new();
    let mut dvs: HashMap<String, Option<String>> = HashMap::new();
    for meta in scan.scan_metadata(engine.as_ref()).map_err(rerr)? {
        let meta = meta.map_err(rerr)?;
        files = meta.visit_scan_files(files, |files, file| files.push(file)).map_err(rerr)?;
        let (data, mut selected) = meta.scan_files.into_parts();
        let batch: RecordBatch = (*ArrowEngineData::try_from_engine_data(data).map_err(rerr)?).into();
        selected.resize(batch.num_rows(), true);
        let path = crate::write::path_column(&batch);
        for i in (0..batch.num_rows()).filter(|i| selected[*i]) {
            dvs.insert(path.value(i).to_string(), deletion_vector(&batch, i));
        }
    }

    // Small files by partition, packed into bins of at most the target size.
    let mut partitions: BTreeMap<BTreeMap<String, String>, Vec<LiveFile>> = BTreeMap::new();
    for scan in files {
        if scan.size.max(0) as u64 >= options.target_file_size {
            continue;
        }
        let partition: BTreeMap<String, String> = scan.partition_values.clone().into_iter().collect();
        partitions.entry(partition.clone()).or_default().push(LiveFile { scan, partition });
    }
    let mut bins: Vec<Vec<LiveFile>> = Vec::new();
    for (_, mut small) in partitions {
        if small.len() < options.min_files.max(2) {
            continue;
        }
        small.sort_by(|a, b| a.scan.path.cmp(&b.scan.path));
        let mut bin: Vec<LiveFile> = Vec::new();
        let mut bin_bytes = 0u64;
        for file in small {
            let size = file.scan.size.max(0) as u64;
            if !bin.is_empty() && bin_bytes + size > options.target_file_size {
                bins.push(std::mem::take(&mut bin));
                bin_bytes = 0;
            }
            bin_bytes += size;
            bin.push(file);
        }
        bins.push(bin);
    }
    bins.retain(|bin| bin.len() >= 2);
    let mut plan = Plan {
        report: CompactReport { read_version, ..Default::default() },
        schema: snapshot.schema(),
        adds: Vec::new(),
        removed: HashMap::new(),
    };
    if bins.is_empty() {
        return Ok(Some(plan));
    }
    let report = &mut plan.report;

    // Which logical columns are partition columns: those the data files do not hold.
    let logical = snapshot.schema();
    let stored: HashSet<&str> = scan.physical_schema().fields().map(|f| f.name().as_str()).collect();
    let physical_name = |f: &delta_kernel::schema::StructField| -> Option<String> {
        match f.metadata().get("delta.columnMapping.physicalName") {
            Some(delta_kernel::schema::MetadataValue::String(s)) => Some(s.clone()),
            _ => None,
        }
    };
    let partition_columns: Vec<(String, String, DataType)> = logical
        .fields()
        .filter(|f| {
            !stored.contains(f.name().as_str()) && !physical_name(f).is_some_and(|p| stored.contains(p.as_str()))
        })
        .map(|f| (f.name().clone(), physical_name(f).unwrap_or_else(|| f.name().clone()), f.data_type().clone()))
        .collect();

    let table_root = snapshot.table_root().clone();
    let write_state = txn.write_state().map_err(werr)?;
    for bin in bins {
        let mut ctx = write_state.write_context_builder();
        if !partition_columns.is_empty() {
            let partition = &bin[0].partition;
            let mut values = HashMap::new();
            for (name, physical, ty) in &partition_columns {
                let raw = partition.get(physical).or_else(|| partition.get(name));
                let value = match (raw, ty) {
                    (Some(raw), DataType::Primitive(p)) => p.parse_scalar(raw).map_err(werr)?,
                    _ => Scalar::Null(ty.clone()),
                };
                values.insert(name.clone(), value);
            }
            ctx = ctx.with_partition_values(values);
        }
        let ctx = ctx.build().map_err(werr)?;
        // The bin's live rows, logical, without the partition columns, streamed into one file
        // batch by batch: memory is a batch and a row group, never the bin.
        let mut out = writer.file_writer(&ctx);
        for file in &bin {
            let f = &file.scan;
            let location = table_root.join(&f.path).map_err(|e| rerr(KernelError::generic(e.to_string())))?;
            let meta = FileMeta { last_modified: f.modification_time, size: f.size.max(0) as u64, location };
            let keep = f.dv_info.get_selection_vector(engine.as_ref(), &table_root).map_err(rerr)?;
            let mut offset = 0usize;
            for data in engine
                .parquet_handler()
                .read_parquet_files(&[meta], scan.physical_schema().clone(), None)
                .map_err(rerr)?
            {
                let data = transform_to_logical(
                    engine.as_ref(),
                    data.map_err(rerr)?,
                    scan.physical_schema(),
                    scan.logical_schema(),
                    f.transform.clone(),
                )
                .map_err(rerr)?;
                let batch: RecordBatch = (*ArrowEngineData::try_from_engine_data(data).map_err(rerr)?).into();
                let read = batch.num_rows();
                let batch = match keep.as_ref() {
                    None => batch,
                    Some(keep) => {
                        // Rows past the end of a deletion vector's selection are kept.
                        let mask: BooleanArray = (0..batch.num_rows())
                            .map(|i| Some(keep.get(offset + i).copied().unwrap_or(true)))
                            .collect();
                        arrow_select::filter::filter_record_batch(&batch, &mask)
                            .map_err(|e| rerr(KernelError::generic(e.to_string())))?
                    }
                };
                offset += read;
                let data_columns: Vec<usize> = (0..batch.num_columns())
                    .filter(|i| !partition_columns.iter().any(|(name, _, _)| batch.schema().field(*i).name() == name))
                    .collect();
                out.write(batch.project(&data_columns).map_err(|e| rerr(KernelError::generic(e.to_string())))?)?;
            }
            report.files_removed += 1;
            report.bytes_removed += f.size.max(0) as u64;
            let Some(dv) = dvs.get(&f.path) else { return Ok(None) };
            plan.removed.insert(f.path.clone(), dv.clone());
        }
        report.rows += out.rows();
        // No file when every row was deleted: the removes alone say so.
        if let Some((add, bytes)) = out.finish()? {
            report.files_added += 1;
            report.bytes_added += bytes;
            plan.adds.push(add);
        }
    }
    Ok(Some(plan))
}
