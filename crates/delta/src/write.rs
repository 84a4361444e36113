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
use delta_kernel::engine::arrow_data::ArrowEngineData;
use delta_kernel::engine_data::FilteredEngineData;
use delta_kernel::expressions::Scalar;
use delta_kernel::object_store::{DynObjectStore, ObjectStoreExt};
use delta_kernel::schema::StructType;
use delta_kernel::transaction::create_table::create_table;
use delta_kernel::transaction::data_layout::DataLayout;
use delta_kernel::transaction::BoundWriteContext;
use delta_kernel::transaction::{CommitResult, Transaction, UpdateTableOperation};
use delta_kernel::{KernelError, Snapshot, SnapshotRef};
use delta_kernel_default_engine::executor::tokio::TokioMultiThreadExecutor;
use delta_kernel_default_engine::{DefaultEngine, DefaultEngineBuilder};
use lakesync_core::Version;
use url::Url;

use crate::DeltaError;

const ENGINE_INFO: &str = concat!("lakesync/", env!("CARGO_PKG_VERSION"));

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
        let writer = Self::open(path)?;
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
        Ok(Self { uri, url, store, kernel: Some((engine, runtime)) })
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

    fn latest(&self) -> Result<SnapshotRef, DeltaError> {
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
            let data = ArrowEngineData::new(batch);
            let added = self.runtime().block_on(self.engine().write_parquet(&data, &ctx)).map_err(|e| self.err(e))?;
            let meta: RecordBatch = (*ArrowEngineData::try_from_engine_data(added).map_err(|e| self.err(e))?).into();
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

pub(crate) fn path_column(batch: &RecordBatch) -> &StringArray {
    batch
        .column_by_name("path")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .expect("kernel scan files carry a string `path` column")
}
