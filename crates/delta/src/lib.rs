//! `lakesync-delta`: lakesync's Delta Lake side, built on `delta_kernel` and its default engine.
//!
//! This crate owns reading a Delta table (snapshot scans with deletion vectors and column
//! mapping applied, the change data feed), mapping Delta types to lakesync's
//! [`lakesync_core::ColumnType`], compaction (small files rewritten in a commit that changes
//! no data, see [`compact`]), and a writer on the kernel's write path (compaction's commits;
//! exactly-once appends that record each source partition's position as a `txn` action, for
//! streaming writers; sample tables for the demo, benchmarks and tests).
//!
//! Invariants:
//! - Never depends on Postgres; hands out Arrow `RecordBatch`es and core model values only.
//! - The kernel's API is synchronous and runs its own background runtime: every call here
//!   blocks, so async callers run them on a blocking thread.
//! - Every Parquet read decodes at most a couple of batches ahead of its consumer (see
//!   [`read_ahead`]), so memory is bounded by batch size and read-ahead depth, never by table
//!   size.
//! - Timestamps stored as Parquet INT96 (Spark's legacy encoding) are decoded at microseconds,
//!   never through a nanosecond `i64` that wraps outside 1677-2262 (see `int96`).
//! - Object stores are configured from the cloud's standard environment variables and the
//!   table's options (see [`store`]); no secret is ever printed or put in an error.
//! - Progress is tracked by commit version, never by timestamp (timestamps of copied tables
//!   are file mtimes).
//! - A table's [`lakesync_core::Shape`] (row filter, chosen and renamed columns, lineage) is
//!   applied here ([`shape`]): callers get batches as Postgres will hold them. The filter is
//!   evaluated on every row read; the predicate handed to the kernel for skipping files is
//!   implied by it, so skipping never drops a row the filter keeps.
//! - Kernel errors are mapped to [`DeltaError`] variants that say whether the change data feed
//!   cannot serve a range (the engine then snapshots) or something else went wrong.

pub mod compact;
pub mod error;
mod int96;
pub mod protocol;
pub mod read_ahead;
pub mod sample;
pub mod schema;
pub mod shape;
pub mod source;
pub mod store;
pub mod write;

pub use error::DeltaError;
pub use protocol::{Upgrade, WriteAccess};
pub use shape::{ReadShape, COMMIT_TIMESTAMP_COLUMN};
pub use source::{
    ChangeBatch, DeltaTable, NewCommits, SchemaId, TableSnapshot, CHANGE_TYPE_COLUMN, COMMIT_VERSION_COLUMN,
};
pub use store::{OptionUse, StorageOptions, StoreKind};
pub use write::{AppPosition, Appended, DeltaWriter, TableLayout};
