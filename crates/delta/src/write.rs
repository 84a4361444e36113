//! A Delta writer on the kernel's own write path, so the tables are real Delta tables any
//! reader accepts: compaction's commits (see [`crate::compact`]) and sample tables for the
//! demo, benchmarks and tests. It covers what the kernel can commit with the change data feed
//! on: appends,
//! deletes that remove whole data files, and deletes of single rows with deletion vectors.
//! (With CDF on, the kernel refuses to add and remove data in one commit because it cannot
//! write `cdc` files yet, so an update is two commits: delete the old rows, append the new.)

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{Array, RecordBatch, StringArray};
use delta_kernel::actions::deletion_vector_writer::{KernelDeletionVector, StreamingDeletionVectorWriter};
use delta_kernel::committer::FileSystemCommitter;
use delta_kernel::engine::arrow_conversion::TryFromArrow;
use delta_kernel::engine::arrow_conversion::TryFromKernel;
use delta_kernel::engine::arrow_data::ArrowEngineData;
use delta_kernel::engine_data::FilteredEngineData;
use delta_kernel::expressions::Scalar;
use delta_kernel::object_store::buffered::BufWriter;
use delta_kernel::object_store::path::Path;
use delta_kernel::object_store::{DynObjectStore, ObjectStoreExt};
use delta_kernel::parquet::arrow::arrow_writer::ArrowWriterOptions;
use delta_kernel::parquet::arrow::async_writer::AsyncArrowWriter;
use delta_kernel::parquet::file::properties::WriterProperties;
use delta_kernel::schema::StructType;
use delta_kernel::transaction::create_table::create_table;
use delta_kernel::transaction::data_layout::DataLayout;
use delta_kernel::transaction::BoundWriteContext;
use delta_kernel::transaction::{CommitResult, Transaction, UpdateTableOperation};
use delta_kernel::{Engine, FileMeta, KernelError, Snapshot, SnapshotRef};
use delta_kernel_default_engine::build_add_file_metadata;
use delta_kernel_default_engine::executor::tokio::TokioMultiThreadExecutor;
use delta_kernel_default_engine::parquet::DataFileMetadata;
use delta_kernel_default_engine::stats::FileStatsAccumulator;
use delta_kernel_default_engine::{DefaultEngine, DefaultEngineBuilder};
use lakesync_core::Version;
use url::Url;

use crate::DeltaError;

pub(crate) const ENGINE_INFO: &str = concat!("lakesync/", env!("CARGO_PKG_VERSION"));

/// One source partition's position in an exactly-once append ([`DeltaWriter::append_once`]):
/// the rows appended are the application's from `from` (the version the table records for
/// it; `None`: none yet) up to `to`, which the commit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPosition {
    pub app_id: String,
    pub from: Option<i64>,
    pub to: i64,
}

/// The outcome of [`DeltaWriter::append_once`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Committed as `version`, with `files` data files.
    Committed { version: Version, files: usize },
    /// The table already records every application at its `to`: these rows were committed
    /// before (by this writer, whose commit landed although it reported an I/O error, or by
    /// one that stopped right after its commit). Nothing was written.
    AlreadyCommitted,
    /// The table records other versions than the appended rows start from (these, in the
    /// order asked): another writer is appending for the same applications. Nothing was
    /// written; the caller must start again from these versions.
    Moved(Vec<Option<i64>>),
}

/// What a writer needs to know of a table's layout.
#[derive(Debug, Clone)]
pub struct TableLayout {
    pub version: Version,
    /// The logical schema.
    pub schema: arrow_schema::SchemaRef,
    pub partition_columns: Vec<String>,
    pub change_data_feed: bool,
    /// `delta.setTransactionRetentionDuration`: `txn` versions older than this expire.
    pub txn_retention: Option<std::time::Duration>,
}

/// Writes commits to one Delta table.
pub struct DeltaWriter {
    uri: String,
    url: Url,
    store: Arc<DynObjectStore>,
    /// The kernel engine (with its own runtime) and a runtime for our async calls; `None` only
    /// while being dropped.
    kernel: Option<(Arc<DefaultEngine<TokioMultiThreadExecutor>>, tokio::runtime::Runtime)>,
}

impl Drop for DeltaWriter {
    fn drop(&mut self) {
        // Tokio refuses to drop a runtime on an async worker thread (it would block it), and a
        // writer held in async code is dropped there on every early return; hand the runtimes
        // to a thread of their own then.
        if let Some(kernel) = self.kernel.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                std::thread::spawn(move || drop(kernel));
            }
        }
    }
}

impl DeltaWriter {
    pub(crate) fn engine(&self) -> &DefaultEngine<TokioMultiThreadExecutor> {
        &self.kernel.as_ref().expect("present until drop").0
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.kernel.as_ref().expect("present until drop").1
    }

    /// Creates a new, empty table at the local directory `path` with the columns of `schema`
    /// and the given table properties (e.g. `delta.enableChangeDataFeed = true`).
    /// Must not be called from inside an async runtime's worker thread.
    pub fn create(
        path: &std::path::Path,
        schema: &arrow_schema::Schema,
        properties: &[(&str, &str)],
    ) -> Result<Self, DeltaError> {
        Self::create_partitioned(path, schema, &[], properties)
    }

    /// [`Self::create`] for a table partitioned by the columns `partition_by` of `schema`.
    pub fn create_partitioned(
        path: &std::path::Path,
        schema: &arrow_schema::Schema,
        partition_by: &[&str],
        properties: &[(&str, &str)],
    ) -> Result<Self, DeltaError> {
        std::fs::create_dir_all(path).map_err(|e| DeltaError::Shape {
            uri: path.display().to_string(),
            message: format!("cannot create directory: {e}"),
        })?;
        Self::open(path)?.init(schema, partition_by, properties)
    }

    /// Creates a new, empty table at `uri` (an object-store URI or an existing local
    /// directory), partitioned by `partition_by`, with the store configured by `options`.
    pub fn create_at(
        uri: &str,
        options: &crate::store::StorageOptions,
        schema: &arrow_schema::Schema,
        partition_by: &[&str],
        properties: &[(&str, &str)],
    ) -> Result<Self, DeltaError> {
        Self::open_with(uri, options)?.init(schema, partition_by, properties)
    }

    /// Commits version 0 of a new table.
    fn init(
        self,
        schema: &arrow_schema::Schema,
        partition_by: &[&str],
        properties: &[(&str, &str)],
    ) -> Result<Self, DeltaError> {
        let writer = self;
        let kernel_schema = Arc::new(StructType::try_from_arrow(schema).map_err(|e| writer.err(e.into()))?);
        let mut builder = create_table(writer.url.as_str(), kernel_schema, ENGINE_INFO, true)
            .with_table_properties(properties.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        if !partition_by.is_empty() {
            builder = builder.with_data_layout(DataLayout::partitioned(partition_by));
        }
        let result = builder
            .build(writer.engine(), Box::new(FileSystemCommitter::new()))
            .and_then(|txn| txn.commit(writer.engine()))
            .map_err(|e| writer.err(e))?;
        writer.commit(result)?;
        Ok(writer)
    }

    /// Opens an existing table at the local directory `path` for writing.
    pub fn open(path: &std::path::Path) -> Result<Self, DeltaError> {
        let uri = path.display().to_string();
        let abs =
            std::path::absolute(path).map_err(|e| DeltaError::Shape { uri: uri.clone(), message: e.to_string() })?;
        let mut writer = Self::open_with(&abs.display().to_string(), &crate::store::StorageOptions::default())?;
        writer.uri = uri;
        Ok(writer)
    }

    /// Opens the table at `uri` (a local path or any URI [`crate::DeltaTable::open_with`]
    /// takes) for writing, with the store configured the same way.
    pub fn open_with(uri: &str, options: &crate::store::StorageOptions) -> Result<Self, DeltaError> {
        let uri = uri.to_string();
        let shape = |message: String| DeltaError::Shape { uri: uri.clone(), message };
        let url = crate::store::table_url(&uri)?;
        let store = crate::store::build_store(&uri, &url, options)?;
        // The kernel's checkpoint writer needs the multi-threaded executor (it blocks on the
        // background one).
        let executor = TokioMultiThreadExecutor::new_owned_runtime(Some(1), None)
            .map_err(|source| DeltaError::Open { uri: uri.clone(), source })?;
        let engine = Arc::new(DefaultEngineBuilder::new(store.clone()).with_task_executor(Arc::new(executor)).build());
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| shape(e.to_string()))?;
        let writer = Self { uri, url, store, kernel: Some((engine, runtime)) };
        if crate::store::StoreKind::of(&writer.url) == Ok(crate::store::StoreKind::S3) {
            // One probe per bucket and settings (an endpoint option may name another store).
            let mut settings: Vec<String> = options.pairs().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            settings.sort();
            writer.check_conditional_puts(&settings.join("&"))?;
        }
        Ok(writer)
    }

    /// Refuses a store that ignores create-if-absent writes (`If-None-Match: *`; some MinIO
    /// and Ceph setups, older S3-compatible gateways): there, two writers could both commit
    /// one version, and one's commit would be lost. Probed once per bucket and process: an
    /// object under the table written twice with `PutMode::Create` must be refused the second
    /// time. (Delta commits are put-if-absent; nothing else makes them exclusive.)
    fn check_conditional_puts(&self, settings: &str) -> Result<(), DeltaError> {
        static CHECKED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let bucket = format!("{}://{}", self.url.scheme(), self.url.host_str().unwrap_or_default());
        let probed = format!("{bucket} {settings}");
        if CHECKED.lock().expect("probe lock").contains(&probed) {
            return Ok(());
        }
        let path = Path::from_url_path(format!("{}_lakesync_put_probe_{}", self.url.path(), uuid::Uuid::new_v4()))
            .map_err(|e| self.shape(e.to_string()))?;
        match self.block_on(crate::store::honours_create(self.store.as_ref(), &path)) {
            Ok(true) => {
                CHECKED.lock().expect("probe lock").push(probed);
                Ok(())
            }
            Ok(false) => Err(DeltaError::Unwritable {
                uri: self.uri.clone(),
                message: format!(
                    "the store ignores create-if-absent writes (If-None-Match: *): a second create of one object \
                     under the table succeeded. Two writers could then both commit the same Delta version and one \
                     commit would be lost, so lakesync does not write to {bucket}. Use a store (or a version of \
                     it) that honours If-None-Match on PUT, as AWS S3 does, or write from one process only. Nothing \
                     was changed"
                ),
            }),
            // Not allowed to write here, or the store is down: the write itself will say.
            Err(e) => {
                tracing::debug!(table = self.uri, error = %e, "conditional-write probe inconclusive");
                Ok(())
            }
        }
    }

    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    pub(crate) fn err(&self, source: KernelError) -> DeltaError {
        DeltaError::Write { uri: self.uri.clone(), source }
    }

    pub(crate) fn shape(&self, message: String) -> DeltaError {
        DeltaError::Shape { uri: self.uri.clone(), message }
    }

    /// Writes `rows` (logical, without partition columns) as one Parquet file under `ctx`;
    /// returns its add metadata (for `Transaction::add_files`) and its size in bytes.
    pub(crate) fn write_parquet(
        &self,
        rows: RecordBatch,
        ctx: &BoundWriteContext,
    ) -> Result<(RecordBatch, u64), DeltaError> {
        let data = ArrowEngineData::new(rows);
        let added = self.runtime().block_on(self.engine().write_parquet(&data, ctx)).map_err(|e| self.err(e))?;
        let meta: RecordBatch = (*ArrowEngineData::try_from_engine_data(added).map_err(|e| self.err(e))?).into();
        let size = meta
            .column_by_name("size")
            .and_then(|c| c.as_any().downcast_ref::<arrow_array::Int64Array>())
            .map_or(0, |s| (0..s.len()).map(|i| s.value(i).max(0) as u64).sum());
        Ok((meta, size))
    }

    /// A Parquet file written batch by batch under `ctx` (see [`FileWriter`]).
    pub(crate) fn file_writer<'a>(&'a self, ctx: &'a BoundWriteContext) -> FileWriter<'a> {
        FileWriter { writer: self, ctx, open: None, rows: 0 }
    }

    /// Writes a checkpoint of the latest version when `every` commits or more follow the last
    /// checkpoint (as named by `_delta_log/_last_checkpoint`); `every = 0` never does.
    pub fn checkpoint_if_due(&self, every: u64) -> Result<Option<Version>, DeltaError> {
        if every == 0 {
            return Ok(None);
        }
        let latest = self.latest()?.version();
        let path = delta_kernel::object_store::path::Path::from_url_path(format!(
            "{}_delta_log/_last_checkpoint",
            self.url.path()
        ))
        .map_err(|e| self.shape(e.to_string()))?;
        let last = match self.runtime().block_on(async { self.store.get(&path).await?.bytes().await }) {
            Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| v["version"].as_u64()),
            Err(delta_kernel::object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(self.err(KernelError::ObjectStore(e))),
        };
        let since = match last {
            Some(v) => latest.saturating_sub(v),
            None => latest + 1,
        };
        if since < every {
            return Ok(None);
        }
        self.checkpoint().map(Some)
    }

    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    pub(crate) fn store(&self) -> &DynObjectStore {
        self.store.as_ref()
    }

    /// Runs `f` to completion on the writer's own runtime.
    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime().block_on(f)
    }

    pub(crate) fn latest(&self) -> Result<SnapshotRef, DeltaError> {
        Snapshot::builder_for(self.url.as_str()).build(self.engine()).map_err(|e| self.err(e))
    }

    /// A transaction on the latest version, with that version's snapshot.
    fn begin(&self, operation: UpdateTableOperation) -> Result<(SnapshotRef, Transaction), DeltaError> {
        self.begin_with(operation, true)
    }

    /// A transaction on the latest version whose actions carry `data_change`.
    pub(crate) fn begin_with(
        &self,
        operation: UpdateTableOperation,
        data_change: bool,
    ) -> Result<(SnapshotRef, Transaction), DeltaError> {
        let snapshot = self.latest()?;
        let txn = snapshot
            .clone()
            .update_table(operation, ENGINE_INFO, data_change)
            .build(self.engine(), Box::new(FileSystemCommitter::new()))
            .map_err(|e| self.err(e))?;
        Ok((snapshot, txn))
    }

    /// The data files of `snapshot`: batches of the kernel's scan-file rows, each with the
    /// selection of live files (one entry per row).
    pub(crate) fn scan_files(&self, snapshot: &SnapshotRef) -> Result<Vec<(RecordBatch, Vec<bool>)>, DeltaError> {
        let scan = snapshot.clone().scan_builder().build().map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for meta in scan.scan_metadata(self.engine()).map_err(|e| self.err(e))? {
            let (data, mut selected) = meta.map_err(|e| self.err(e))?.scan_files.into_parts();
            let batch: RecordBatch = (*ArrowEngineData::try_from_engine_data(data).map_err(|e| self.err(e))?).into();
            selected.resize(batch.num_rows(), true);
            out.push((batch, selected));
        }
        Ok(out)
    }

    fn filtered(&self, batch: RecordBatch, selected: Vec<bool>) -> Result<FilteredEngineData, DeltaError> {
        FilteredEngineData::try_new(Box::new(ArrowEngineData::new(batch)), selected).map_err(|e| self.err(e))
    }

    /// The versions the table records for `app_ids` (its `txn` actions), `None` where it has
    /// none, in the order asked.
    pub fn app_versions(&self, app_ids: &[&str]) -> Result<Vec<Option<i64>>, DeltaError> {
        let snapshot = self.latest()?;
        app_ids.iter().map(|id| snapshot.get_app_id_version(id, self.engine()).map_err(|e| self.err(e))).collect()
    }

    /// The latest version's schema, partition columns and the properties writers care about.
    pub fn layout(&self) -> Result<TableLayout, DeltaError> {
        use delta_kernel::engine::arrow_conversion::TryFromKernel;
        let (snapshot, txn) = self.begin(UpdateTableOperation::Write)?;
        let schema =
            arrow_schema::Schema::try_from_kernel(snapshot.schema().as_ref()).map_err(|e| self.err(e.into()))?;
        let properties = snapshot.table_properties();
        Ok(TableLayout {
            version: snapshot.version(),
            schema: Arc::new(schema),
            partition_columns: txn.logical_partition_columns().to_vec(),
            change_data_feed: properties.enable_change_data_feed == Some(true),
            txn_retention: properties.set_transaction_retention_duration,
        })
    }

    /// Appends the rows of `batches` (all columns, partition columns included; a partitioned
    /// table gets one Parquet file per partition value per batch) and records every
    /// application's new position as a `txn` action, in ONE commit: the Delta protocol's
    /// exactly-once for streaming writers (what Spark's `txnAppId`/`txnVersion` do). A writer
    /// records, per source partition, the position to resume from; after a crash it reads
    /// them back with [`Self::app_versions`].
    ///
    /// The commit is a compare-and-set on the recorded versions: it happens only when the
    /// table records exactly each position's `from`, checked again after every lost commit
    /// race (a race lost to other writers' commits is retried on top of them with the same
    /// files). Otherwise nothing is written: [`Appended::AlreadyCommitted`] when it records
    /// every `to`, [`Appended::Moved`] when anything else.
    pub fn append_once(&self, batches: &[RecordBatch], positions: &[AppPosition]) -> Result<Appended, DeltaError> {
        if let Some(p) = positions.iter().find(|p| p.from.is_some_and(|from| from >= p.to)) {
            return Err(self.shape(format!("append for {} does not advance ({:?} to {})", p.app_id, p.from, p.to)));
        }
        self.commit_positions(batches, positions, &[])
    }

    /// Moves applications' positions anywhere (backwards too) in one commit without rows, as
    /// the same compare-and-set as [`Self::append_once`]; `why` goes into the commit's
    /// `operationMetrics`, so the table's history says who moved what and why (an operator's
    /// reset after a topic was recreated).
    pub fn reset_positions(&self, positions: &[AppPosition], why: &[(String, String)]) -> Result<Appended, DeltaError> {
        self.commit_positions(&[], positions, why)
    }

    fn commit_positions(
        &self,
        batches: &[RecordBatch],
        positions: &[AppPosition],
        metrics: &[(String, String)],
    ) -> Result<Appended, DeltaError> {
        let mut adds: Option<Vec<RecordBatch>> = None;
        for _ in 0..100 {
            let (snapshot, txn) = self.begin(UpdateTableOperation::Write)?;
            let recorded = positions
                .iter()
                .map(|p| snapshot.get_app_id_version(&p.app_id, self.engine()).map_err(|e| self.err(e)))
                .collect::<Result<Vec<_>, _>>()?;
            if !positions.is_empty() && positions.iter().zip(&recorded).all(|(p, r)| *r == Some(p.to)) {
                return Ok(Appended::AlreadyCommitted);
            }
            if positions.iter().zip(&recorded).any(|(p, r)| *r != p.from) {
                return Ok(Appended::Moved(recorded));
            }
            let mut txn = positions.iter().fold(txn, |t, p| t.with_transaction_id(p.app_id.clone(), p.to));
            if !metrics.is_empty() {
                txn = txn.with_operation_metrics(metrics.iter().map(|(k, v)| (k.clone(), Some(v.clone()))));
            }
            if adds.is_none() {
                let mut written = Vec::new();
                for batch in batches.iter().filter(|b| b.num_rows() > 0) {
                    written.extend(self.write_rows(&txn, batch)?);
                }
                adds = Some(written);
            }
            for add in adds.iter().flatten() {
                txn.add_files(Box::new(ArrowEngineData::new(add.clone())));
            }
            match txn.commit(self.engine()).map_err(|e| self.err(e))? {
                CommitResult::Committed(c) => {
                    let files = adds.as_ref().map_or(0, |a| a.iter().map(RecordBatch::num_rows).sum());
                    return Ok(Appended::Committed { version: c.commit_version(), files });
                }
                CommitResult::Conflicted(c) => {
                    tracing::debug!(
                        table = self.uri,
                        version = c.conflict_version(),
                        "append lost a race; retrying on top"
                    );
                }
                // The commit may have landed: the check at the top of the next round says.
                CommitResult::Retryable(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        let ids: Vec<&str> = positions.iter().map(|p| p.app_id.as_str()).collect();
        Err(self.shape(format!("the append with {ids:?} lost the commit race 100 times in a row")))
    }

    /// Writes `batch` (all columns) as Parquet files for `txn`: one file, or one per
    /// partition value for a partitioned table. Returns the files' add metadata.
    fn write_rows(&self, txn: &Transaction, batch: &RecordBatch) -> Result<Vec<RecordBatch>, DeltaError> {
        let partition_columns = txn.logical_partition_columns();
        let write_context = |values: Option<HashMap<String, Scalar>>| {
            txn.write_state()
                .and_then(|s| {
                    let builder = s.write_context_builder();
                    match values {
                        Some(values) => builder.with_partition_values(values).build(),
                        None => builder.build(),
                    }
                })
                .map_err(|e| self.err(e))
        };
        if partition_columns.is_empty() {
            return Ok(vec![self.write_parquet(batch.clone(), &write_context(None)?)?.0]);
        }
        let columns = partition_columns
            .iter()
            .map(|name| {
                batch
                    .column_by_name(name)
                    .cloned()
                    .ok_or_else(|| self.shape(format!("rows lack partition column {name}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Group row indexes by partition value (rendered as text, which is how Delta logs it).
        let options = arrow_cast::display::FormatOptions::default().with_null("\u{0}");
        let formatters = columns
            .iter()
            .map(|c| arrow_cast::display::ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.shape(e.to_string()))?;
        let mut groups: std::collections::BTreeMap<Vec<String>, Vec<u32>> = Default::default();
        for row in 0..batch.num_rows() {
            let key = formatters.iter().map(|f| f.value(row).to_string()).collect();
            groups.entry(key).or_default().push(row as u32);
        }
        let keep: Vec<usize> =
            (0..batch.num_columns()).filter(|&i| !partition_columns.contains(batch.schema().field(i).name())).collect();
        let data = batch.project(&keep).map_err(|e| self.shape(e.to_string()))?;
        let mut adds = Vec::new();
        for rows in groups.into_values() {
            let first = rows[0] as usize;
            let values = partition_columns
                .iter()
                .zip(&columns)
                .map(|(name, column)| {
                    Ok((
                        name.clone(),
                        scalar_at(column.as_ref(), first)
                            .map_err(|m| self.shape(format!("partition column {name}: {m}")))?,
                    ))
                })
                .collect::<Result<HashMap<_, _>, DeltaError>>()?;
            let indexes = arrow_array::UInt32Array::from(rows);
            let part = arrow_select::take::take_record_batch(&data, &indexes).map_err(|e| self.shape(e.to_string()))?;
            adds.push(self.write_parquet(part, &write_context(Some(values))?)?.0);
        }
        Ok(adds)
    }

    /// Appends `batches` (one Parquet file each) in one commit; returns the new version.
    pub fn append(&self, batches: &[RecordBatch]) -> Result<Version, DeltaError> {
        Ok(self.append_files(batches.iter().cloned())?.0)
    }

    /// Appends the batches of `batches` as one Parquet file each, generated lazily so only
    /// one is in memory at a time, in one commit. Returns the new version and the logged
    /// paths of the files, in input order.
    pub fn append_files(
        &self,
        batches: impl IntoIterator<Item = RecordBatch>,
    ) -> Result<(Version, Vec<String>), DeltaError> {
        let (_, mut txn) = self.begin(UpdateTableOperation::Write)?;
        let ctx = txn.write_state().and_then(|s| s.write_context_builder().build()).map_err(|e| self.err(e))?;
        let mut paths = Vec::new();
        for batch in batches {
            let (meta, _) = self.write_parquet(batch, &ctx)?;
            let path = path_column(&meta);
            paths.extend((0..meta.num_rows()).map(|i| path.value(i).to_string()));
            txn.add_files(Box::new(ArrowEngineData::new(meta)));
        }
        let version = self.commit(txn.commit(self.engine()).map_err(|e| self.err(e))?)?;
        Ok((version, paths))
    }

    /// Appends `batch` (the columns other than the partition columns) as one file of the
    /// partition whose string partition columns have `values`, in one commit.
    pub fn append_partition(&self, values: &[(&str, &str)], batch: RecordBatch) -> Result<Version, DeltaError> {
        let (_, mut txn) = self.begin(UpdateTableOperation::Write)?;
        let partition = values.iter().map(|(k, v)| (k.to_string(), Scalar::String(v.to_string()))).collect();
        let ctx = txn
            .write_state()
            .and_then(|s| s.write_context_builder().with_partition_values(partition).build())
            .map_err(|e| self.err(e))?;
        let (add, _) = self.write_parquet(batch, &ctx)?;
        txn.add_files(Box::new(ArrowEngineData::new(add)));
        self.commit(txn.commit(self.engine()).map_err(|e| self.err(e))?)
    }

    /// Writes a checkpoint of the latest version (as Spark does every few commits), so
    /// readers replay only the commits after it. Returns the version checkpointed.
    pub fn checkpoint(&self) -> Result<Version, DeltaError> {
        // (Tested by the continuous benchmark, which checkpoints every 10 commits.)
        let snapshot = self.latest()?;
        snapshot.checkpoint(self.engine(), None).map_err(|e| self.err(e))?;
        Ok(snapshot.version())
    }

    /// The data files of the latest version, as logged (relative paths).
    pub fn files(&self) -> Result<Vec<String>, DeltaError> {
        let mut paths = Vec::new();
        for (batch, selected) in self.scan_files(&self.latest()?)? {
            let path = path_column(&batch);
            paths.extend(selected.iter().enumerate().filter(|(_, s)| **s).map(|(i, _)| path.value(i).to_string()));
        }
        Ok(paths)
    }

    /// Deletes every row of the data files whose logged path satisfies `remove`, in one
    /// commit (a `DELETE` that removes whole files); returns the new version.
    pub fn remove_files(&self, remove: impl Fn(&str) -> bool) -> Result<Version, DeltaError> {
        let (snapshot, mut txn) = self.begin(UpdateTableOperation::Delete)?;
        for (batch, mut selected) in self.scan_files(&snapshot)? {
            let path = path_column(&batch);
            for (i, sel) in selected.iter_mut().enumerate() {
                *sel = *sel && remove(path.value(i));
            }
            txn.remove_files(self.filtered(batch, selected)?);
        }
        self.commit(txn.commit(self.engine()).map_err(|e| self.err(e))?)
    }

    /// Deletes rows by position with deletion vectors, in one commit (a `DELETE` that keeps
    /// the data files): `rows` maps a data file's logged path to the row indexes to delete in
    /// it. The files must not carry deletion vectors yet, and the table needs
    /// `delta.enableDeletionVectors = true`. Returns the new version.
    pub fn delete_rows(&self, rows: &HashMap<String, Vec<u64>>) -> Result<Version, DeltaError> {
        let (snapshot, mut txn) = self.begin(UpdateTableOperation::Delete)?;
        let ctx = txn.write_state().and_then(|s| s.write_context_builder().build()).map_err(|e| self.err(e))?;
        let dv_path = ctx.new_deletion_vector_path(String::new());
        let mut buffer = Vec::new();
        let mut descriptors = HashMap::new();
        {
            let mut writer = StreamingDeletionVectorWriter::new(&mut buffer);
            for (file, indexes) in rows {
                let mut dv = KernelDeletionVector::new();
                dv.add_deleted_row_indexes(indexes.iter());
                let written = writer.write_deletion_vector(dv).map_err(|e| self.err(e))?;
                descriptors.insert(file.clone(), written.to_descriptor(&dv_path));
            }
            writer.finalize().map_err(|e| self.err(e))?;
        }
        let file = dv_path.absolute_path().map_err(|e| self.err(e))?.to_file_path().map_err(|_| DeltaError::Shape {
            uri: self.uri.clone(),
            message: "deletion vectors need a local table".into(),
        })?;
        std::fs::write(&file, &buffer).map_err(|e| DeltaError::Shape {
            uri: self.uri.clone(),
            message: format!("writing {}: {e}", file.display()),
        })?;
        let files = self
            .scan_files(&snapshot)?
            .into_iter()
            .map(|(batch, selected)| self.filtered(batch, selected))
            .collect::<Result<Vec<_>, _>>()?;
        txn.update_deletion_vectors(descriptors, files.into_iter().map(Ok)).map_err(|e| self.err(e))?;
        self.commit(txn.commit(self.engine()).map_err(|e| self.err(e))?)
    }

    fn commit<S>(&self, result: CommitResult<S>) -> Result<Version, DeltaError> {
        match result {
            CommitResult::Committed(c) => Ok(c.commit_version()),
            CommitResult::Conflicted(c) => Err(DeltaError::Shape {
                uri: self.uri.clone(),
                message: format!("commit conflicted with version {}", c.conflict_version()),
            }),
            CommitResult::Retryable(_) => Err(DeltaError::Shape {
                uri: self.uri.clone(),
                message: "commit failed with a retryable I/O error".into(),
            }),
        }
    }
}

/// The value of `column` at `row` as a kernel scalar, for a partition value.
fn scalar_at(column: &dyn Array, row: usize) -> Result<Scalar, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Date32Type, Int16Type, Int32Type, Int64Type, Int8Type, TimestampMicrosecondType};
    use arrow_schema::DataType as A;
    use delta_kernel::schema::DataType as K;
    let null = |t: K| Ok(Scalar::Null(t));
    let valid = column.is_valid(row);
    match column.data_type() {
        A::Utf8 if valid => Ok(Scalar::String(column.as_string::<i32>().value(row).to_string())),
        A::Utf8 => null(K::STRING),
        A::Int64 if valid => Ok(Scalar::Long(column.as_primitive::<Int64Type>().value(row))),
        A::Int64 => null(K::LONG),
        A::Int32 if valid => Ok(Scalar::Integer(column.as_primitive::<Int32Type>().value(row))),
        A::Int32 => null(K::INTEGER),
        A::Int16 if valid => Ok(Scalar::Short(column.as_primitive::<Int16Type>().value(row))),
        A::Int16 => null(K::SHORT),
        A::Int8 if valid => Ok(Scalar::Byte(column.as_primitive::<Int8Type>().value(row))),
        A::Int8 => null(K::BYTE),
        A::Boolean if valid => Ok(Scalar::Boolean(column.as_boolean().value(row))),
        A::Boolean => null(K::BOOLEAN),
        A::Date32 if valid => Ok(Scalar::Date(column.as_primitive::<Date32Type>().value(row))),
        A::Date32 => null(K::DATE),
        A::Timestamp(arrow_schema::TimeUnit::Microsecond, tz) if valid => {
            let v = column.as_primitive::<TimestampMicrosecondType>().value(row);
            Ok(if tz.is_some() { Scalar::Timestamp(v) } else { Scalar::TimestampNtz(v) })
        }
        other => Err(format!("type {other} is not supported as a partition column by lakesync's writer")),
    }
}

pub(crate) fn path_column(batch: &RecordBatch) -> &StringArray {
    batch
        .column_by_name("path")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .expect("kernel scan files carry a string `path` column")
}

/// One Parquet data file streamed to the store: each logical batch is made physical, its
/// statistics collected and its rows encoded into the current row group, which is uploaded
/// (multipart) when full. Memory is one row group's encoded pages and one batch, whatever
/// the file's size; [`DeltaWriter::write_parquet`] holds the whole file instead.
pub(crate) struct FileWriter<'a> {
    writer: &'a DeltaWriter,
    ctx: &'a BoundWriteContext,
    open: Option<OpenFile>,
    rows: u64,
}

struct OpenFile {
    url: Url,
    parquet: AsyncArrowWriter<BufWriter>,
    stats: FileStatsAccumulator,
    to_physical: Arc<dyn delta_kernel::ExpressionEvaluator>,
}

/// Rows per row group of a streamed file: bounds the encoded pages held before an upload.
const ROW_GROUP_ROWS: usize = 256 * 1024;

impl FileWriter<'_> {
    /// Appends `rows` (logical, without partition columns).
    pub fn write(&mut self, rows: RecordBatch) -> Result<(), DeltaError> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let (w, ctx) = (self.writer, self.ctx);
        let err = |e: KernelError| w.err(e);
        if self.open.is_none() {
            let input = StructType::try_from_arrow(rows.schema().as_ref()).map_err(|e| err(e.into()))?;
            let to_physical = w
                .engine()
                .evaluation_handler()
                .new_expression_evaluator(
                    Arc::new(input),
                    ctx.logical_to_physical(),
                    ctx.physical_data_schema().clone().into(),
                )
                .map_err(err)?;
            let url = ctx
                .write_dir()
                .join(&format!("{}.parquet", uuid::Uuid::new_v4()))
                .map_err(|e| w.shape(e.to_string()))?;
            let path = Path::from_url_path(url.path()).map_err(|e| w.shape(e.to_string()))?;
            let schema = Arc::new(
                arrow_schema::Schema::try_from_kernel(ctx.physical_data_schema().as_ref())
                    .map_err(|e| err(e.into()))?,
            );
            let properties = WriterProperties::builder().set_max_row_group_row_count(Some(ROW_GROUP_ROWS)).build();
            let options = ArrowWriterOptions::new().with_skip_arrow_metadata(true).with_properties(properties);
            let object_writer = BufWriter::new(w.store.clone(), path);
            let parquet = AsyncArrowWriter::try_new_with_options(object_writer, schema, options)
                .map_err(|e| w.shape(format!("cannot start a Parquet file: {e}")))?;
            let stats = FileStatsAccumulator::new(ctx.stats_columns(), ctx.physical_data_schema().as_ref());
            self.open = Some(OpenFile { url, parquet, stats, to_physical });
        }
        let file = self.open.as_mut().expect("opened above");
        let physical = file.to_physical.evaluate(&ArrowEngineData::new(rows)).map_err(err)?;
        let physical: RecordBatch = (*ArrowEngineData::try_from_engine_data(physical).map_err(err)?).into();
        file.stats.merge(&physical).map_err(err)?;
        self.rows += physical.num_rows() as u64;
        w.block_on(file.parquet.write(&physical)).map_err(|e| w.shape(format!("writing Parquet: {e}")))
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Closes the file; returns its add metadata (for `Transaction::add_files`) and its size,
    /// `None` when no row was written (then there is no file).
    pub fn finish(self) -> Result<Option<(RecordBatch, u64)>, DeltaError> {
        let w = self.writer;
        let err = |e: KernelError| w.err(e);
        let Some(file) = self.open else { return Ok(None) };
        let OpenFile { url, parquet, stats, .. } = file;
        w.block_on(parquet.close()).map_err(|e| w.shape(format!("closing a Parquet file: {e}")))?;
        let path = Path::from_url_path(url.path()).map_err(|e| w.shape(e.to_string()))?;
        let head = w.block_on(w.store.head(&path)).map_err(|e| err(KernelError::ObjectStore(e)))?;
        let Some(stats) = stats.finish().map_err(err)? else { return Ok(None) };
        let meta = DataFileMetadata::new(FileMeta::new(url, head.last_modified.timestamp_millis(), head.size), stats);
        let added = build_add_file_metadata(meta, self.ctx).map_err(err)?;
        let added: RecordBatch = (*ArrowEngineData::try_from_engine_data(added).map_err(err)?).into();
        Ok(Some((added, head.size)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{customer_schema, customers};

    fn at(pairs: &[(&str, Option<i64>, i64)]) -> Vec<AppPosition> {
        pairs.iter().map(|(id, from, to)| AppPosition { app_id: id.to_string(), from: *from, to: *to }).collect()
    }

    #[test]
    fn an_append_with_offsets_commits_once_and_a_replay_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let w = DeltaWriter::create(&dir.path().join("t"), &customer_schema(), &[]).unwrap();
        assert_eq!(w.app_versions(&["ingest-0", "ingest-1"]).unwrap(), [None, None]);
        let first = at(&[("ingest-0", None, 10), ("ingest-1", None, 5)]);
        assert_eq!(
            w.append_once(&[customers(0..10, 0)], &first).unwrap(),
            Appended::Committed { version: 1, files: 1 }
        );
        assert_eq!(w.app_versions(&["ingest-0", "ingest-1"]).unwrap(), [Some(10), Some(5)]);
        // A writer that crashed after that commit replays the same rows: nothing is written.
        assert_eq!(w.append_once(&[customers(0..10, 0)], &first).unwrap(), Appended::AlreadyCommitted);
        assert_eq!(w.latest().unwrap().version(), 1);
        assert_eq!(w.files().unwrap().len(), 1);
        let next = at(&[("ingest-0", Some(10), 12), ("ingest-1", Some(5), 9)]);
        assert_eq!(
            w.append_once(&[customers(10..16, 0)], &next).unwrap(),
            Appended::Committed { version: 2, files: 1 }
        );
        // A writer that starts from other positions (a second writer with the same ids, or
        // one replaying a range the table has moved past) writes nothing and learns where
        // the table is.
        let stale = at(&[("ingest-0", Some(10), 14), ("ingest-1", Some(9), 11)]);
        assert_eq!(w.append_once(&[customers(16..17, 0)], &stale).unwrap(), Appended::Moved(vec![Some(12), Some(9)]));
        assert_eq!(w.latest().unwrap().version(), 2);
        let err = w.append_once(&[customers(16..17, 0)], &at(&[("ingest-0", Some(12), 12)])).unwrap_err();
        assert!(err.to_string().contains("does not advance"), "{err}");
    }

    #[test]
    fn a_partitioned_append_writes_one_file_per_partition_value_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let schema = customer_schema();
        let partition = schema.field(3).name().clone(); // segment: four values
        let w = DeltaWriter::create_partitioned(&path, &schema, &[&partition], &[]).unwrap();
        assert_eq!(w.layout().unwrap().partition_columns, std::slice::from_ref(&partition));
        let rows = customers(0..40, 0);
        let values: std::collections::BTreeSet<String> = {
            let options = arrow_cast::display::FormatOptions::default();
            let f = arrow_cast::display::ArrayFormatter::try_new(rows.column(3).as_ref(), &options).unwrap();
            (0..rows.num_rows()).map(|i| f.value(i).to_string()).collect()
        };
        let out = w.append_once(std::slice::from_ref(&rows), &at(&[("p0", None, 40)])).unwrap();
        assert_eq!(out, Appended::Committed { version: 1, files: values.len() });
        assert_eq!(w.files().unwrap().len(), values.len());
        let table = crate::DeltaTable::open(&path.display().to_string()).unwrap();
        let snapshot = table.snapshot(None).unwrap();
        let read: usize = snapshot.batches().unwrap().map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(read, 40);
    }

    #[test]
    fn writers_racing_on_one_table_each_commit_every_append_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        DeltaWriter::create(&path, &customer_schema(), &[]).unwrap();
        let writers: Vec<_> = (0..2u64)
            .map(|n| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let w = DeltaWriter::open(&path).unwrap();
                    let app = format!("ingest-{n}");
                    for i in 1..=15u64 {
                        let rows = customers(n * 1000 + i..n * 1000 + i + 1, 0);
                        let from = (i > 1).then_some(i as i64 - 1);
                        let out = w.append_once(&[rows], &[AppPosition { app_id: app.clone(), from, to: i as i64 }]);
                        assert!(matches!(out, Ok(Appended::Committed { .. })), "{out:?}");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let w = DeltaWriter::open(&path).unwrap();
        assert_eq!(w.files().unwrap().len(), 30);
        assert_eq!(w.app_versions(&["ingest-0", "ingest-1"]).unwrap(), [Some(15), Some(15)]);
        assert_eq!(w.latest().unwrap().version(), 30);
    }
}
