//! Read-ahead for the kernel's Parquet reads: decoding overlaps the caller's work.
//!
//! The default engine decodes Parquet on its background runtime, but hands the batches out
//! through an iterator that decodes the next batch only when asked for it. The caller (the
//! kernel's change data feed transform, then our planner) and the decoder therefore take
//! turns on one core: with a deletion-vector commit that touches every data file, reading the
//! keys of a 5M-row table spent about half of its time waiting on each side. [`ReadAheadEngine`]
//! wraps the default engine so every Parquet read is drained by a thread of its own into a
//! small bounded channel: the decoder runs up to [`READ_AHEAD_BATCHES`] batches ahead while
//! the caller works, and memory stays bounded.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use delta_kernel::schema::SchemaRef;

use crate::int96::HintedParquetReader;
use delta_kernel::{
    CancellationTokenRef, Engine, EngineData, EvaluationHandler, FileDataReadResultIterator, FileMeta, FileSize,
    JsonHandler, KernelResult, KernelResultIteratorStatic, ParquetFooter, ParquetHandler, PredicateRef, StorageHandler,
};

/// Batches a Parquet read may decode ahead of its consumer. Two keep the decoder busy
/// through a slow batch on the other side; more would only hold memory.
pub const READ_AHEAD_BATCHES: usize = 2;

/// An [`Engine`] whose Parquet reads decode ahead of their consumer; everything else is the
/// wrapped engine's.
pub struct ReadAheadEngine {
    inner: Arc<dyn Engine>,
    parquet: Arc<ReadAheadParquet>,
}

impl ReadAheadEngine {
    /// Wraps `inner`, whose Parquet handler does the reading.
    pub fn new(inner: Arc<dyn Engine>) -> Self {
        let parquet = Arc::new(ReadAheadParquet { inner: inner.parquet_handler(), hinted: None });
        Self { inner, parquet }
    }

    /// Wraps `inner`; reads whose schema has timestamps go through `hinted` instead, which
    /// keeps INT96 timestamps whole (see [`crate::int96`]).
    pub(crate) fn with_int96_reader(inner: Arc<dyn Engine>, hinted: HintedParquetReader) -> Self {
        let parquet = Arc::new(ReadAheadParquet { inner: inner.parquet_handler(), hinted: Some(hinted) });
        Self { inner, parquet }
    }
}

impl Engine for ReadAheadEngine {
    fn evaluation_handler(&self) -> Arc<dyn EvaluationHandler> {
        self.inner.evaluation_handler()
    }

    fn storage_handler(&self) -> Arc<dyn StorageHandler> {
        self.inner.storage_handler()
    }

    fn json_handler(&self) -> Arc<dyn JsonHandler> {
        self.inner.json_handler()
    }

    fn parquet_handler(&self) -> Arc<dyn ParquetHandler> {
        self.parquet.clone()
    }
}

/// The Parquet half of [`ReadAheadEngine`].
struct ReadAheadParquet {
    inner: Arc<dyn ParquetHandler>,
    hinted: Option<HintedParquetReader>,
}

impl ReadAheadParquet {
    /// The INT96-aware reader, when this read needs it: a schema with timestamps, files in
    /// the table's store (not presigned URLs, which only the default engine fetches).
    fn hinted_for(&self, files: &[FileMeta], schema: &SchemaRef) -> Option<&HintedParquetReader> {
        let presigned = files.iter().any(|f| matches!(f.location.scheme(), "http" | "https"));
        self.hinted.as_ref().filter(|_| !presigned && HintedParquetReader::needed_for(schema))
    }
}

impl ParquetHandler for ReadAheadParquet {
    fn read_parquet_files(
        &self,
        files: &[FileMeta],
        physical_schema: SchemaRef,
        predicate: Option<PredicateRef>,
    ) -> KernelResult<FileDataReadResultIterator> {
        if let Some(hinted) = self.hinted_for(files, &physical_schema) {
            return Ok(read_ahead(hinted.read(files, physical_schema, predicate)));
        }
        Ok(read_ahead(self.inner.read_parquet_files(files, physical_schema, predicate)?))
    }

    fn read_parquet_files_with_cancellation(
        &self,
        files: &[FileMeta],
        physical_schema: SchemaRef,
        predicate: Option<PredicateRef>,
        cancellation_token: Option<CancellationTokenRef>,
    ) -> KernelResult<FileDataReadResultIterator> {
        if let Some(hinted) = self.hinted_for(files, &physical_schema) {
            // Reads of table data are not cancelled by lakesync; the token is honoured
            // between reads by the kernel.
            return Ok(read_ahead(hinted.read(files, physical_schema, predicate)));
        }
        Ok(read_ahead(self.inner.read_parquet_files_with_cancellation(
            files,
            physical_schema,
            predicate,
            cancellation_token,
        )?))
    }

    fn write_parquet_file(
        &self,
        location: url::Url,
        data: KernelResultIteratorStatic<Box<dyn EngineData>>,
    ) -> KernelResult<FileSize> {
        self.inner.write_parquet_file(location, data)
    }

    fn read_parquet_footer(&self, file: &FileMeta) -> KernelResult<ParquetFooter> {
        self.inner.read_parquet_footer(file)
    }

    fn read_parquet_footer_with_cancellation(
        &self,
        file: &FileMeta,
        cancellation_token: Option<CancellationTokenRef>,
    ) -> KernelResult<ParquetFooter> {
        self.inner.read_parquet_footer_with_cancellation(file, cancellation_token)
    }
}

/// Drains `batches` on a thread of its own, at most [`READ_AHEAD_BATCHES`] ahead of the
/// returned iterator. Dropping the iterator stops the thread after the batch it is decoding.
fn read_ahead<T: Send + 'static>(batches: KernelResultIteratorStatic<T>) -> KernelResultIteratorStatic<T> {
    let (tx, rx) = sync_channel(READ_AHEAD_BATCHES);
    let spawned = std::thread::Builder::new().name("delta-read-ahead".to_string()).spawn(move || {
        for batch in batches {
            if tx.send(batch).is_err() {
                break; // the consumer is gone
            }
        }
    });
    match spawned {
        Ok(_) => Box::new(Drained { rx }),
        // No thread could be started. The read's iterator went down with the closure that
        // failed to start, so the read fails, saying why.
        Err(e) => Box::new(std::iter::once(Err(delta_kernel::KernelError::generic(format!(
            "could not start a Parquet read-ahead thread: {e}"
        ))))),
    }
}

/// The receiving end of [`read_ahead`].
struct Drained<T> {
    rx: Receiver<KernelResult<T>>,
}

impl<T> Iterator for Drained<T> {
    type Item = KernelResult<T>;

    fn next(&mut self) -> Option<Self::Item> {
        // A closed channel is the end of the read: the thread sends every item, errors
        // included, before it exits.
        self.rx.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_ahead_yields_every_item_in_order_errors_included() {
        let items: Vec<KernelResult<u32>> =
            vec![Ok(1), Ok(2), Err(delta_kernel::KernelError::generic("bad batch")), Ok(4), Ok(5)];
        let out: Vec<_> = read_ahead(Box::new(items.into_iter())).collect();
        let shown: Vec<String> = out
            .iter()
            .map(|r| match r {
                Ok(v) => v.to_string(),
                Err(e) => format!("error: {e}"),
            })
            .collect();
        assert_eq!(shown, ["1", "2", "error: Generic delta kernel error: bad batch", "4", "5"]);
    }

    #[test]
    fn dropping_a_read_ahead_early_stops_its_thread() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pulled = Arc::new(AtomicUsize::new(0));
        let counter = pulled.clone();
        let endless = std::iter::repeat_with(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(0u8)
        });
        let mut reader = read_ahead(Box::new(endless));
        assert!(reader.next().is_some());
        drop(reader);
        // The thread owns the endless iterator (and so a clone of `pulled`): the count falls
        // back to one when the thread has stopped and dropped it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&pulled) > 1 {
            assert!(std::time::Instant::now() < deadline, "the read-ahead thread kept running");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // At most the channel's capacity, the item taken and the one in flight were pulled.
        let total = pulled.load(Ordering::SeqCst);
        assert!(total <= READ_AHEAD_BATCHES + 2, "pulled {total}");
    }
}
