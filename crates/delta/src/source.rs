//! Reading a Delta table: snapshots and the change data feed.

use std::num::NonZero;
use std::sync::Arc;

use arrow_array::{Array, Int64Array, RecordBatch, StringArray, StructArray};
use delta_kernel::engine::arrow_data::ArrowEngineData;
use delta_kernel::table_changes::TableChanges;
use delta_kernel::{Engine, KernelError, Snapshot, SnapshotRef};
use delta_kernel_default_engine::executor::tokio::TokioBackgroundExecutor;
use delta_kernel_default_engine::DefaultEngineBuilder;
use lakesync_core::{TableSchema, Version};
use url::Url;

use crate::int96::HintedParquetReader;
use crate::read_ahead::ReadAheadEngine;
use crate::store::StorageOptions;
use crate::DeltaError;

/// Name of the change-type column of change data feed batches.
pub const CHANGE_TYPE_COLUMN: &str = "_change_type";
/// Name of the commit-version column of change data feed batches.
pub const COMMIT_VERSION_COLUMN: &str = "_commit_version";

/// Rows per Arrow batch read from Parquet by snapshot scans. The kernel's default (1000)
/// makes per-batch overhead dominate; 8192 keeps batches a few MB for typical tables, and a
/// snapshot holds a dozen of them in flight (peak RSS 140-180 MB at 5M rows; 230-265 MB with
/// 32768).
const READ_BATCH_ROWS: usize = 8192;
/// Rows per Arrow batch read by the change data feed. Its reads hold a few batches at a time,
/// and the kernel's transform and the planner pay per batch: a deletion-vector commit that
/// touches every file of a 5M-row table is planned in ~155 ms with 32768 against ~180 ms with
/// 8192.
const CHANGE_BATCH_ROWS: usize = 32768;
/// Data files read ahead concurrently. The kernel's default (1000) lets a large table hold
/// hundreds of files' batches in memory; a few keep the reader ahead of Postgres with
/// bounded memory.
const READ_AHEAD_FILES: usize = 4;

/// A change data feed batch: the table's columns followed by `_change_type`,
/// `_commit_version` and `_commit_timestamp`.
pub type ChangeBatch = RecordBatch;

/// An opened Delta table (local path or URI).
#[derive(Clone)]
pub struct DeltaTable {
    uri: String,
    url: Url,
    /// Reads the log and snapshot scans.
    engine: Arc<dyn Engine>,
    /// Reads the change data feed's rows (larger batches, see [`CHANGE_BATCH_ROWS`]).
    change_engine: Arc<dyn Engine>,
}

impl std::fmt::Debug for DeltaTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaTable").field("uri", &self.uri).finish()
    }
}

impl DeltaTable {
    /// Opens the table at `uri` (a local path or a URI) with the store configured from the
    /// environment only. Reads nothing yet.
    pub fn open(uri: &str) -> Result<Self, DeltaError> {
        Self::open_with(uri, &StorageOptions::default())
    }

    /// Opens the table at `uri` (a local path, `file://`, `s3://`, `s3a://`, `abfss://`,
    /// `az://` or `gs://`) with the store configured from the environment and `options`.
    /// Reads nothing yet.
    pub fn open_with(uri: &str, options: &StorageOptions) -> Result<Self, DeltaError> {
        let url = crate::store::table_url(uri)?;
        let store = crate::store::build_store(uri, &url, options)?;
        // Both engines share one background runtime (one thread): they differ only in
        // batch size.
        let executor = Arc::new(TokioBackgroundExecutor::new());
        let engine = |batch_rows: usize| -> Arc<dyn Engine> {
            let engine = DefaultEngineBuilder::new(store.clone())
                .with_task_executor(executor.clone())
                .with_batch_size(NonZero::new(batch_rows).expect("non-zero"))
                .with_buffer_size(NonZero::new(READ_AHEAD_FILES).expect("non-zero"))
                .build();
            let hinted = HintedParquetReader::new(store.clone(), executor.clone(), batch_rows, READ_AHEAD_FILES);
            Arc::new(ReadAheadEngine::with_int96_reader(Arc::new(engine), hinted))
        };
        Ok(Self {
            uri: uri.to_string(),
            url,
            engine: engine(READ_BATCH_ROWS),
            change_engine: engine(CHANGE_BATCH_ROWS),
        })
    }

    /// The engine snapshot scans read with (INT96-aware, reading ahead).
    pub(crate) fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// The location as the user gave it.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The normalized table URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The path Spark SQL would name this table by, for messages.
    fn sql_path(&self) -> String {
        self.url.to_file_path().map(|p| p.display().to_string()).unwrap_or_else(|_| self.url.to_string())
    }

    /// The snapshot at `version`, or the latest one.
    pub fn snapshot(&self, version: Option<Version>) -> Result<TableSnapshot, DeltaError> {
        let mut builder = Snapshot::builder_for(self.url.as_str());
        if let Some(v) = version {
            builder = builder.at_version(v);
        }
        let snap = builder.build(self.engine.as_ref()).map_err(|source| match version {
            // A store hiccup is retried, never taken for a missing table or version.
            _ if crate::error::is_denied(&source) => DeltaError::Access { uri: self.uri.clone(), source },
            _ if crate::error::is_transient(&source) => {
                DeltaError::Read { uri: self.uri.clone(), version: version.unwrap_or_default(), source }
            }
            Some(version) if !is_missing_table(&source) => {
                DeltaError::VersionUnavailable { uri: self.uri.clone(), version, source }
            }
            _ => DeltaError::NotATable { uri: self.uri.clone(), source },
        })?;
        Ok(TableSnapshot { table: self.clone(), snap })
    }

    /// The change data feed of `start..=end` as `shape` makes it: only the changes whose row
    /// image the filter keeps (the feed of the filtered table: an update that leaves the
    /// filter shows as its preimage alone, one that enters it as its postimage alone), the
    /// synced columns renamed (only `columns`, target names, when given) plus
    /// `_change_type`, `_commit_version` and `_commit_timestamp`, and with whole rows
    /// (`columns` = `None`) lakesync's added columns.
    ///
    /// Fails with [`DeltaError::CdfUnavailable`] when the feed cannot serve the range (not
    /// enabled at `start`, log truncated, schema differs between `start` and `end`, change files
    /// gone); the caller can fall back to a snapshot. With `columns`, only those columns and
    /// the filter's are decoded: reading just the key of every change row is far cheaper than
    /// reading whole rows.
    pub fn shaped_changes(
        &self,
        start: Version,
        end: Version,
        shape: &crate::ReadShape,
        columns: Option<&[String]>,
    ) -> Result<impl Iterator<Item = Result<ChangeBatch, DeltaError>>, DeltaError> {
        let mut names = shape.source_columns(columns);
        names.extend(crate::shape::CHANGE_COLUMNS.map(String::from));
        let shape = shape.clone();
        let columns = columns.map(<[String]>::to_vec);
        Ok(self
            .read_changes(start, end, Some(names))?
            .map(move |batch| shape.apply(batch?, columns.as_deref(), &crate::shape::CHANGE_COLUMNS, None)))
    }

    fn read_changes(
        &self,
        start: Version,
        end: Version,
        names: Option<Vec<String>>,
    ) -> Result<impl Iterator<Item = Result<ChangeBatch, DeltaError>>, DeltaError> {
        let unavailable = |e: KernelError| cdf_error(&self.uri, start, end, e);
        let changes =
            TableChanges::try_new(self.url.clone(), self.engine.as_ref(), start, Some(end)).map_err(unavailable)?;
        let projection = match names {
            Some(names) => {
                let full: delta_kernel::schema::SchemaRef = changes.schema().clone().into();
                Some(full.project(&names).map_err(unavailable)?)
            }
            None => None,
        };
        let scan = changes.into_scan_builder().with_schema(projection).build().map_err(unavailable)?;
        let iter = scan.execute(self.change_engine.clone()).map_err(unavailable)?;
        let uri = self.uri.clone();
        Ok(iter.map(move |data| {
            data.and_then(|d| ArrowEngineData::try_from_engine_data(d).map(|a| RecordBatch::from(*a))).map_err(
                |source| {
                    if is_missing_file(&source) {
                        DeltaError::CdfUnavailable {
                            uri: uri.clone(),
                            start,
                            end,
                            reason: format!("a change data file is missing (vacuumed?): {source}"),
                        }
                    } else {
                        DeltaError::Read { uri: uri.clone(), version: end, source }
                    }
                },
            )
        }))
    }

    /// Whether the commit after `after` exists, by one HEAD of its file (`_delta_log/<v>.json`):
    /// the cheapest question a store answers (no listing, no log replay). Its modification
    /// time (ms) when it does.
    pub fn next_commit(&self, after: Option<Version>) -> Result<Option<i64>, DeltaError> {
        let next = after.map_or(0, |v| v + 1);
        let read = |source: KernelError| {
            let uri = self.uri.clone();
            if crate::error::is_denied(&source) {
                DeltaError::Access { uri, source }
            } else {
                DeltaError::Read { uri, version: next, source }
            }
        };
        let file = self
            .url
            .join(&format!("_delta_log/{next:020}.json"))
            .map_err(|e| read(KernelError::generic(e.to_string())))?;
        match self.engine.storage_handler().head(&file) {
            Ok(meta) => Ok(Some(meta.last_modified)),
            Err(e) if is_missing_file(&e) => Ok(None),
            Err(e) => Err(read(e)),
        }
    }

    /// The commits after `after` (all commits when `None`), found by listing `_delta_log`
    /// from the next commit's file name: one cheap listing, no log replay, so continuous mode
    /// can poll it often. `None` when there is no newer commit.
    pub fn commits_after(&self, after: Option<Version>) -> Result<Option<NewCommits>, DeltaError> {
        let not_a_table = |source: KernelError| {
            let uri = self.uri.clone();
            if crate::error::is_denied(&source) {
                DeltaError::Access { uri, source }
            } else if crate::error::is_transient(&source) {
                DeltaError::Read { uri, version: after.map_or(0, |v| v + 1), source }
            } else {
                DeltaError::NotATable { uri, source }
            }
        };
        let log = self.url.join("_delta_log/").map_err(|e| not_a_table(KernelError::generic(e.to_string())))?;
        let start = match after {
            // The listing returns names strictly after the offset: `{v:020}` sorts just before
            // `{v:020}.json` and after every older commit.
            Some(v) => format!("{:020}", v + 1),
            None => "0".to_string(),
        };
        let from = log.join(&start).map_err(|e| not_a_table(KernelError::generic(e.to_string())))?;
        let listing = match self.engine.storage_handler().list_from(&from) {
            Ok(listing) => listing,
            Err(e) if is_missing_file(&e) => return Ok(None),
            Err(e) => return Err(not_a_table(e)),
        };
        let mut found: Option<NewCommits> = None;
        for file in listing {
            let file = match file {
                Ok(f) => f,
                Err(e) if is_missing_file(&e) => continue,
                Err(e) => return Err(not_a_table(e)),
            };
            let name = file.location.path_segments().and_then(|mut s| s.next_back()).unwrap_or_default();
            let Some(version) = commit_version(name) else { continue };
            if after.is_some_and(|a| version <= a) {
                continue;
            }
            found = Some(match found {
                None => NewCommits { latest: version, first_modified_ms: file.last_modified },
                Some(f) if version > f.latest => NewCommits { latest: version, ..f },
                Some(f) => f,
            });
        }
        Ok(found)
    }

    /// The error for a table whose latest version does not have the change data feed on.
    pub fn cdf_not_enabled(&self, version: Version) -> DeltaError {
        DeltaError::CdfNotEnabled { uri: self.uri.clone(), path: self.sql_path(), version }
    }
}

/// Commits newer than the synced version, from a log listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewCommits {
    /// The newest commit.
    pub latest: Version,
    /// Modification time of the oldest new commit's file (ms since the epoch): how long the
    /// newest data has been waiting.
    pub first_modified_ms: i64,
}

/// The version of a commit file name (`00000000000000000012.json`), or `None` for other
/// log files (checkpoints, CRC files, temporary files).
fn commit_version(name: &str) -> Option<Version> {
    let digits = name.strip_suffix(".json")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// A Delta schema exactly as logged, compared for equality (see [`TableSnapshot::schema_id`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaId(delta_kernel::schema::SchemaRef);

/// One version of a Delta table.
#[derive(Clone)]
pub struct TableSnapshot {
    table: DeltaTable,
    snap: SnapshotRef,
}

impl std::fmt::Debug for TableSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableSnapshot").field("uri", &self.table.uri).field("version", &self.version()).finish()
    }
}

impl TableSnapshot {
    /// The version this snapshot reads.
    pub fn version(&self) -> Version {
        self.snap.version()
    }

    /// The table's columns in lakesync terms.
    pub fn schema(&self) -> Result<TableSchema, DeltaError> {
        self.schema_without(&[])
    }

    /// The table's columns in lakesync terms, leaving out `excluded` (whose types are then
    /// not checked: excluding is how a user syncs a table with a column Postgres cannot hold).
    pub fn schema_without(&self, excluded: &[String]) -> Result<TableSchema, DeltaError> {
        crate::schema::table_schema(&self.table.uri, &self.snap.schema(), excluded)
    }

    /// The Delta schema exactly as logged (with field metadata such as comments): the change
    /// data feed can only read a range of versions whose schemas are all equal in this sense,
    /// even where lakesync's [`TableSchema`] sees no difference.
    pub fn schema_id(&self) -> SchemaId {
        SchemaId(self.snap.schema())
    }

    /// Whether `delta.enableChangeDataFeed` is on at this version.
    pub fn cdf_enabled(&self) -> bool {
        self.snap.table_properties().enable_change_data_feed.unwrap_or(false)
    }

    /// The commit timestamp of this version in milliseconds since the epoch (the in-commit
    /// timestamp when the table has them, else the commit file's modification time).
    pub fn commit_timestamp_ms(&self) -> Result<i64, DeltaError> {
        self.snap.get_timestamp(self.table.engine.as_ref()).map_err(|source| DeltaError::Read {
            uri: self.table.uri.clone(),
            version: self.version(),
            source,
        })
    }

    /// The number of live rows at this version, from the log alone (per-file `numRecords`
    /// statistics minus deletion-vector cardinalities); `None` when a file has no statistics.
    /// Reads no data files.
    pub fn row_count(&self) -> Result<Option<u64>, DeltaError> {
        let read_err = |source| DeltaError::Read { uri: self.table.uri.clone(), version: self.version(), source };
        let scan = self.snap.clone().scan_builder().build().map_err(read_err)?;
        let mut total: u64 = 0;
        for meta in scan.scan_metadata(self.table.engine.as_ref()).map_err(read_err)? {
            let (data, mut selected) = meta.map_err(read_err)?.scan_files.into_parts();
            let batch: RecordBatch = (*ArrowEngineData::try_from_engine_data(data).map_err(read_err)?).into();
            selected.resize(batch.num_rows(), true);
            let stats = batch.column_by_name("stats").and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
            let dv_cardinality = batch
                .column_by_name("deletionVector")
                .and_then(|c| c.as_any().downcast_ref::<StructArray>().cloned())
                .and_then(|dv| {
                    let card = dv.column_by_name("cardinality")?.as_any().downcast_ref::<Int64Array>()?.clone();
                    Some((dv, card))
                });
            let Some(stats) = stats else { return Ok(None) };
            for (i, sel) in selected.iter().enumerate() {
                if !*sel {
                    continue;
                }
                if stats.is_null(i) {
                    return Ok(None);
                }
                let parsed: serde_json::Value = match serde_json::from_str(stats.value(i)) {
                    Ok(v) => v,
                    Err(_) => return Ok(None),
                };
                let Some(n) = parsed.get("numRecords").and_then(|n| n.as_u64()) else { return Ok(None) };
                let deleted = match &dv_cardinality {
                    Some((dv, card)) if dv.is_valid(i) && card.is_valid(i) => card.value(i) as u64,
                    _ => 0,
                };
                total += n.saturating_sub(deleted);
            }
        }
        Ok(Some(total))
    }

    /// Streams every live row of this version (deletion vectors applied, logical column names).
    /// The table's columns as `shape` syncs them (chosen, renamed, lakesync's added).
    pub fn shaped_schema(&self, shape: &lakesync_core::Shape) -> Result<TableSchema, DeltaError> {
        crate::shape::shaped_schema(&self.table.uri, self.version(), &self.snap.schema(), shape)
    }

    /// `shape` bound to this version's schema.
    pub fn read_shape(&self, shape: &lakesync_core::Shape) -> Result<crate::ReadShape, DeltaError> {
        crate::ReadShape::bind(&self.table.uri, self.version(), &self.snap.schema(), shape)
    }

    /// The rows `shape` keeps, as it syncs them. Only the columns it needs are read, and the
    /// kernel skips the files whose statistics show that the filter keeps none of their rows.
    pub fn shaped_batches(
        &self,
        shape: &crate::ReadShape,
    ) -> Result<impl Iterator<Item = Result<RecordBatch, DeltaError>>, DeltaError> {
        let version = self.version();
        let uri = self.table.uri.clone();
        let read_err = move |source| DeltaError::Read { uri: uri.clone(), version, source };
        let lineage = Some((version, self.commit_timestamp_ms()?));
        let projection = self.snap.schema().project(&shape.source_columns(None)).map_err(read_err.clone())?;
        let scan = self
            .snap
            .clone()
            .scan_builder()
            .with_schema(projection)
            .with_predicate(shape.skipping())
            .build()
            .map_err(read_err.clone())?;
        let iter = scan.execute(self.table.engine.clone()).map_err(read_err.clone())?;
        let shape = shape.clone();
        Ok(iter.map(move |data| {
            let batch = data
                .and_then(|d| ArrowEngineData::try_from_engine_data(d).map(|a| RecordBatch::from(*a)))
                .map_err(read_err.clone())?;
            shape.apply(batch, None, &[], lineage)
        }))
    }

    pub fn batches(&self) -> Result<impl Iterator<Item = Result<RecordBatch, DeltaError>>, DeltaError> {
        let version = self.version();
        let uri = self.table.uri.clone();
        let read_err = move |source| DeltaError::Read { uri: uri.clone(), version, source };
        let scan = self.snap.clone().scan_builder().build().map_err(read_err.clone())?;
        let iter = scan.execute(self.table.engine.clone()).map_err(read_err.clone())?;
        Ok(iter.map(move |data| {
            data.and_then(|d| ArrowEngineData::try_from_engine_data(d).map(|a| RecordBatch::from(*a)))
                .map_err(read_err.clone())
        }))
    }
}

fn is_missing_table(err: &KernelError) -> bool {
    matches!(err, KernelError::EmptyLog | KernelError::MissingMetadataAndProtocol)
        || err.to_string().contains("No files in log segment")
}

/// Whether a data or change file was not found, however deep the kernel, Parquet and object
/// store layers wrapped the cause.
fn is_missing_file(err: &KernelError) -> bool {
    if matches!(
        err,
        KernelError::FileNotFound(_) | KernelError::ObjectStore(delta_kernel::object_store::Error::NotFound { .. })
    ) {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::NotFound {
                return true;
            }
        }
        if let Some(delta_kernel::object_store::Error::NotFound { .. }) = e.downcast_ref() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The error for a change feed that could not be opened for `start..=end`. A store or I/O
/// hiccup (timeout, 503, connection reset) is a [`DeltaError::Read`] the daemon retries with
/// backoff; only what the protocol says the feed cannot serve (not enabled, log truncated,
/// schema changed, files gone) is [`DeltaError::CdfUnavailable`], which a snapshot serves.
fn cdf_error(uri: &str, start: Version, end: Version, err: KernelError) -> DeltaError {
    if crate::error::is_transient(&err) {
        return DeltaError::Read { uri: uri.to_string(), version: start, source: err };
    }
    DeltaError::CdfUnavailable { uri: uri.to_string(), start, end, reason: describe_cdf_error(&err) }
}

fn describe_cdf_error(err: &KernelError) -> String {
    match err {
        KernelError::ChangeDataFeedUnsupported(v) => {
            format!("the change data feed is not enabled at version {v}")
        }
        KernelError::ChangeDataFeedIncompatibleSchema(_, _) => "the schema changed within the range".into(),
        _ if err.to_string().contains("schemas are different") => "the schema changed within the range".into(),
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{customer_schema, customers};
    use crate::write::DeltaWriter;
    use lakesync_core::{Classify, ErrorClass};

    #[test]
    fn a_store_hiccup_opening_the_change_feed_is_retried_and_only_protocol_reasons_call_for_a_snapshot() {
        let reset = KernelError::IOError(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer"));
        let e = cdf_error("s3://lake/t", 3, 5, reset);
        assert!(matches!(e, DeltaError::Read { .. }), "{e:?}");
        assert_eq!(e.class(), ErrorClass::Transient);
        let timeout = KernelError::ObjectStore(delta_kernel::object_store::Error::Generic {
            store: "S3",
            source: "operation timed out".into(),
        });
        assert_eq!(cdf_error("s3://lake/t", 3, 5, timeout).class(), ErrorClass::Transient);
        let off = cdf_error("s3://lake/t", 3, 5, KernelError::ChangeDataFeedUnsupported(3));
        assert!(matches!(off, DeltaError::CdfUnavailable { .. }), "{off:?}");
        let gone = KernelError::ObjectStore(delta_kernel::object_store::Error::NotFound {
            path: "_delta_log/00000000000000000003.json".into(),
            source: "no such key".into(),
        });
        assert!(matches!(cdf_error("s3://lake/t", 3, 5, gone), DeltaError::CdfUnavailable { .. }));
    }

    #[test]
    fn a_table_opens_from_a_path_or_a_file_uri_and_counts_its_rows_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
        w.append(&[customers(0..100, 0), customers(100..150, 0)]).unwrap();
        let uri = format!("file://{}", path.display());
        for location in [path.display().to_string(), uri] {
            let snap = DeltaTable::open(&location).unwrap().snapshot(None).unwrap();
            assert_eq!(snap.version(), 1);
            assert!(snap.cdf_enabled());
            assert_eq!(snap.row_count().unwrap(), Some(150));
            let rows: usize = snap.batches().unwrap().map(|b| b.unwrap().num_rows()).sum();
            assert_eq!(rows, 150);
        }
        assert_eq!(w.checkpoint().unwrap(), 1);
        assert!(path.join("_delta_log/00000000000000000001.checkpoint.parquet").exists());
        let table = DeltaTable::open(&path.display().to_string()).unwrap();
        assert_eq!(table.snapshot(None).unwrap().row_count().unwrap(), Some(150));
        assert_eq!(table.commits_after(None).unwrap().map(|c| c.latest), Some(1));
        assert_eq!(table.commits_after(Some(0)).unwrap().map(|c| c.latest), Some(1));
        assert_eq!(table.commits_after(Some(1)).unwrap(), None);
        assert!(table.next_commit(None).unwrap().is_some());
        assert!(table.next_commit(Some(0)).unwrap().is_some_and(|ms| ms > 1_600_000_000_000));
        assert_eq!(table.next_commit(Some(1)).unwrap(), None);
        assert_eq!(commit_version("00000000000000000010.checkpoint.parquet"), None);
        assert_eq!(commit_version("00000000000000000010.json"), Some(10));
        let err = DeltaTable::open(&dir.path().join("missing").display().to_string())
            .and_then(|t| t.snapshot(None))
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    /// (key, change type, version) of every change in `start..=end`, sorted.
    fn key_changes(table: &DeltaTable, start: Version, end: Version) -> Vec<(String, String, i64)> {
        let shape = table.snapshot(None).unwrap().read_shape(&lakesync_core::Shape::default()).unwrap();
        let mut out = Vec::new();
        for batch in table.shaped_changes(start, end, &shape, Some(&["customer_id".to_string()])).unwrap() {
            let batch = batch.unwrap();
            let text = |name: &str| {
                arrow_cast::cast(batch.column_by_name(name).unwrap(), &arrow_schema::DataType::Utf8).unwrap()
            };
            let (keys, kinds, versions) = (text("customer_id"), text("_change_type"), text("_commit_version"));
            let s = |a: &arrow_array::ArrayRef, i: usize| {
                a.as_any().downcast_ref::<arrow_array::StringArray>().unwrap().value(i).to_string()
            };
            for i in 0..batch.num_rows() {
                out.push((s(&keys, i), s(&kinds, i), s(&versions, i).parse().unwrap()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn deletion_vector_pairs_yield_exactly_the_deleted_rows_across_batches() {
        // Two files of 40k rows (two change-feed batches each), rows deleted by deletion
        // vectors on both sides of the batch boundary (v2), then an append (v3).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let w = DeltaWriter::create(
            &path,
            &customer_schema(),
            &[("delta.enableChangeDataFeed", "true"), ("delta.enableDeletionVectors", "true")],
        )
        .unwrap();
        let (_, files) = w.append_files([customers(0..40_000, 0), customers(40_000..80_000, 0)]).unwrap();
        let deleted: std::collections::HashMap<String, Vec<u64>> =
            [(files[0].clone(), vec![0, 5, 32_767, 32_768, 39_999]), (files[1].clone(), vec![17])].into();
        assert_eq!(w.delete_rows(&deleted).unwrap(), 2);
        assert_eq!(w.append(&[customers(80_000..80_010, 0)]).unwrap(), 3);
        let table = DeltaTable::open(&path.display().to_string()).unwrap();

        let key = |i: u64| format!("C{i:09}");
        let mut expected: Vec<(String, String, i64)> = [0, 5, 32_767, 32_768, 39_999, 40_017]
            .into_iter()
            .map(|i| (key(i), "delete".to_string(), 2))
            .chain((80_000..80_010).map(|i| (key(i), "insert".to_string(), 3)))
            .collect();
        expected.sort();
        assert_eq!(key_changes(&table, 2, 3), expected);
        // From version 1 the files are also added: every row an insert, then the deletes.
        let all = key_changes(&table, 1, 3);
        assert_eq!(all.iter().filter(|(_, kind, v)| kind == "insert" && *v == 1).count(), 80_000);
        assert_eq!(all.iter().filter(|(_, kind, v)| kind == "delete" && *v == 2).count(), 6);
        assert_eq!(all.len(), 80_016);
    }
}
