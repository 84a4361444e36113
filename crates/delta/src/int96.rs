//! Parquet reads that keep INT96 timestamps whole.
//!
//! Spark long wrote timestamps as Parquet INT96 (a Julian day and the nanoseconds of that
//! day), and Databricks tables still hold such files. The Parquet reader turns INT96 into
//! nanoseconds since the epoch in an `i64` unless told otherwise, which only reaches the years
//! 1677 to 2262: `9999-12-31`, the usual "end of time" of slowly changing dimensions, wraps
//! around to `1816-03-29` with no error. The kernel's default engine reads without a hint, so
//! [`HintedParquetReader`] reads the files of any read whose schema has a timestamp column
//! itself, the way the default engine does (same projection, row-group skipping, reordering
//! and fix-ups, from the kernel's own helpers), except that it asks the Parquet reader for
//! INT96 columns at microseconds, Delta's precision, which spans ±292,000 years.
//!
//! Files without INT96 columns are read exactly as the default engine reads them.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};
use delta_kernel::engine::arrow_data::ArrowEngineData;
use delta_kernel::engine::arrow_utils::{
    fixup_parquet_read, ordering_needs_row_indexes, parquet_read_plan, RowIndexBuilder,
};
use delta_kernel::engine::parquet_row_group_skipping::ParquetRowGroupSkipping;
use delta_kernel::object_store::path::Path;
use delta_kernel::object_store::DynObjectStore;
use delta_kernel::parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
#[allow(deprecated)]
use delta_kernel::parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
use delta_kernel::parquet::basic::Type as PhysicalType;
use delta_kernel::parquet::schema::types::SchemaDescriptor;
use delta_kernel::schema::{DataType as KernelType, SchemaRef};
use delta_kernel::{EngineData, FileMeta, KernelError, KernelResult, KernelResultIteratorStatic, PredicateRef};
use delta_kernel_default_engine::executor::tokio::TokioBackgroundExecutor;
use delta_kernel_default_engine::executor::TaskExecutor;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};

/// Reads Parquet files for the kernel with INT96 columns decoded at microseconds.
pub(crate) struct HintedParquetReader {
    store: Arc<DynObjectStore>,
    executor: Arc<TokioBackgroundExecutor>,
    batch_size: usize,
    files_ahead: usize,
}

impl HintedParquetReader {
    pub(crate) fn new(
        store: Arc<DynObjectStore>,
        executor: Arc<TokioBackgroundExecutor>,
        batch_size: usize,
        files_ahead: usize,
    ) -> Self {
        Self { store, executor, batch_size, files_ahead: files_ahead.max(1) }
    }

    /// Whether a read of `schema` can meet INT96 columns: only timestamps are stored so.
    pub(crate) fn needed_for(schema: &SchemaRef) -> bool {
        fn has_timestamp(ty: &KernelType) -> bool {
            match ty {
                KernelType::Primitive(p) => {
                    matches!(
                        p,
                        delta_kernel::schema::PrimitiveType::Timestamp
                            | delta_kernel::schema::PrimitiveType::TimestampNtz
                    )
                }
                KernelType::Struct(s) => s.fields().any(|f| has_timestamp(f.data_type())),
                KernelType::Array(a) => has_timestamp(a.element_type()),
                KernelType::Map(m) => has_timestamp(m.key_type()) || has_timestamp(m.value_type()),
                _ => false,
            }
        }
        schema.fields().any(|f| has_timestamp(f.data_type()))
    }

    /// Reads `files` as the default engine would, batch by batch.
    pub(crate) fn read(
        &self,
        files: &[FileMeta],
        schema: SchemaRef,
        predicate: Option<PredicateRef>,
    ) -> KernelResultIteratorStatic<Box<dyn EngineData>> {
        let (store, batch_size) = (self.store.clone(), self.batch_size);
        let files: Vec<FileMeta> = files.to_vec();
        let opens = files.into_iter().map(move |file| {
            let (store, schema, predicate) = (store.clone(), schema.clone(), predicate.clone());
            async move { open(store, schema, predicate, batch_size, file).await }
        });
        let batches: BoxStream<'static, KernelResult<Box<dyn EngineData>>> = stream::iter(opens)
            .buffered(self.files_ahead)
            .try_flatten()
            .map_ok(|data| -> Box<dyn EngineData> { Box::new(data) })
            .boxed();
        Box::new(Blocking { stream: Some(batches), executor: self.executor.clone() })
    }
}

/// Opens one file: its footer, the INT96 hint if it has such columns, the kernel's read plan.
async fn open(
    store: Arc<DynObjectStore>,
    schema: SchemaRef,
    predicate: Option<PredicateRef>,
    batch_size: usize,
    file: FileMeta,
) -> KernelResult<BoxStream<'static, KernelResult<ArrowEngineData>>> {
    let location = file.location.to_string();
    let path = Path::from_url_path(file.location.path())?;
    // The reader the default engine uses too (deprecated upstream in favour of hand-written
    // ones; kept so both read the same way).
    #[allow(deprecated)]
    let mut reader = if file.size != 0 {
        ParquetObjectReader::new(store, path).with_file_size(file.size)
    } else {
        ParquetObjectReader::new(store, path)
    };
    let options = ArrowReaderOptions::new().with_skip_arrow_metadata(true);
    let mut metadata = ArrowReaderMetadata::load_async(&mut reader, options.clone()).await?;
    if let Some(hint) = int96_at_microseconds(metadata.parquet_schema(), metadata.schema(), &location)? {
        metadata = ArrowReaderMetadata::try_new(metadata.metadata().clone(), options.with_schema(Arc::new(hint)))?;
    }
    let (ordering, mask) = parquet_read_plan(&schema, &metadata)?;
    let mut row_indexes =
        ordering_needs_row_indexes(&ordering).then(|| RowIndexBuilder::new(metadata.metadata().row_groups()));
    let mut builder = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, metadata).with_batch_size(batch_size);
    if let Some(mask) = mask {
        builder = builder.with_projection(mask);
    }
    if let Some(predicate) = predicate {
        builder = builder.with_row_group_filter(predicate.as_ref(), row_indexes.as_mut());
    }
    let mut row_indexes = row_indexes.map(|r| r.build()).transpose()?;
    let stream = builder.build()?;
    Ok(stream
        .map(move |batch| fixup_parquet_read(batch?, &ordering, row_indexes.as_mut(), Some(&location), Some(&schema)))
        .boxed())
}

/// The file's Arrow schema with every INT96 column as `Timestamp(Microsecond)` instead of the
/// reader's default nanoseconds; `None` when the file has no INT96 column. An INT96 column
/// this cannot place (inside a list or map) fails the read, naming the column, rather than
/// being read with values that may have wrapped.
fn int96_at_microseconds(parquet: &SchemaDescriptor, arrow: &Schema, location: &str) -> KernelResult<Option<Schema>> {
    let mut int96: Vec<Vec<String>> = parquet
        .columns()
        .iter()
        .filter(|c| c.physical_type() == PhysicalType::INT96)
        .map(|c| c.path().parts().to_vec())
        .collect();
    if int96.is_empty() {
        return Ok(None);
    }
    let fields: Fields = arrow.fields().iter().map(|f| retype(f, &mut Vec::new(), &mut int96)).collect();
    if let Some(left) = int96.first() {
        return Err(KernelError::generic(format!(
            "{location}: column {} stores timestamps as Parquet INT96 inside a list or map, which lakesync cannot \
             read at microsecond precision (values outside 1677-2262 would be wrong); exclude the column",
            left.join(".")
        )));
    }
    Ok(Some(Schema::new_with_metadata(fields, arrow.metadata().clone())))
}

/// `field` (at `path`) with the INT96 leaves named in `int96` retyped; found leaves are
/// removed from `int96`.
fn retype(field: &Arc<Field>, path: &mut Vec<String>, int96: &mut Vec<Vec<String>>) -> Arc<Field> {
    path.push(field.name().clone());
    let retyped = match field.data_type() {
        DataType::Timestamp(TimeUnit::Nanosecond, None) => match int96.iter().position(|p| p == path) {
            Some(i) => {
                int96.swap_remove(i);
                Some(DataType::Timestamp(TimeUnit::Microsecond, None))
            }
            None => None,
        },
        DataType::Struct(children) => Some(DataType::Struct(children.iter().map(|c| retype(c, path, int96)).collect())),
        _ => None,
    };
    path.pop();
    match retyped {
        Some(ty) => Arc::new(field.as_ref().clone().with_data_type(ty)),
        None => field.clone(),
    }
}

/// A stream of the kernel's read, consumed synchronously on the default engine's runtime
/// (as the default engine's own iterator does).
struct Blocking {
    stream: Option<BoxStream<'static, KernelResult<Box<dyn EngineData>>>>,
    executor: Arc<TokioBackgroundExecutor>,
}

impl Iterator for Blocking {
    type Item = KernelResult<Box<dyn EngineData>>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut stream = self.stream.take()?;
        let (item, stream) = self.executor.block_on(async move { (stream.next().await, stream) });
        if item.is_some() {
            self.stream = Some(stream);
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delta_kernel::parquet::schema::parser::parse_message_type;

    #[test]
    fn int96_columns_are_asked_for_at_microseconds_and_nothing_else_changes() {
        let message = "message spark_schema { \
            optional int96 valid_to; \
            optional int64 n; \
            optional group dim { optional int96 since; optional binary name (UTF8); } }";
        let parquet = SchemaDescriptor::new(Arc::new(parse_message_type(message).unwrap()));
        let ns = DataType::Timestamp(TimeUnit::Nanosecond, None);
        let arrow = Schema::new(vec![
            Field::new("valid_to", ns.clone(), true),
            Field::new("n", DataType::Int64, true),
            Field::new(
                "dim",
                DataType::Struct(
                    vec![Field::new("since", ns.clone(), true), Field::new("name", DataType::Utf8, true)].into(),
                ),
                true,
            ),
        ]);
        let hinted = int96_at_microseconds(&parquet, &arrow, "file:///t/part-0.parquet").unwrap().unwrap();
        let us = DataType::Timestamp(TimeUnit::Microsecond, None);
        assert_eq!(hinted.field(0).data_type(), &us);
        assert_eq!(hinted.field(1).data_type(), &DataType::Int64);
        let DataType::Struct(dim) = hinted.field(2).data_type() else { panic!("{hinted:?}") };
        assert_eq!((dim[0].data_type(), dim[1].data_type()), (&us, &DataType::Utf8));

        let plain = SchemaDescriptor::new(Arc::new(parse_message_type("message m { optional int64 n; }").unwrap()));
        let arrow = Schema::new(vec![Field::new("n", DataType::Int64, true)]);
        assert!(int96_at_microseconds(&plain, &arrow, "f").unwrap().is_none());
    }

    #[test]
    fn an_int96_column_inside_a_list_fails_naming_it() {
        let message = "message m { optional group events (LIST) { repeated group list { optional int96 element; } } }";
        let parquet = SchemaDescriptor::new(Arc::new(parse_message_type(message).unwrap()));
        let ns = DataType::Timestamp(TimeUnit::Nanosecond, None);
        let arrow =
            Schema::new(vec![Field::new("events", DataType::List(Arc::new(Field::new("element", ns, true))), true)]);
        let err = int96_at_microseconds(&parquet, &arrow, "file:///t/p.parquet").unwrap_err().to_string();
        assert!(err.contains("events.list.element") && err.contains("INT96"), "{err}");
    }
}
