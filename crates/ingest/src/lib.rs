//! `lakesync-ingest`: Kafka topics into Delta tables, exactly once.
//!
//! This crate owns reading a topic's partitions from given offsets ([`kafka`], with the pure
//! Rust `rskafka` client), decoding JSON message values into the table's Arrow schema with
//! the opt-in Kafka metadata columns ([`decode`]), and the loop that commits buffers of
//! messages to the Delta table ([`run`]), setting aside messages that do not fit in a
//! dead-letter table when asked to.
//!
//! Invariants:
//! - Exactly once: each flush is ONE Delta commit holding the data files and, per Kafka
//!   partition, a `txn` action (application id [`IngestSpec::app_id`], version = the next
//!   offset). Positions are only ever read back from the table, never from a consumer
//!   group, and a commit happens only if the table still records the positions the flush
//!   starts from (compare-and-set), so a crash anywhere, a restart or a second process with
//!   the same name never loses or duplicates a message.
//! - Offsets handed to the writer strictly increase per partition; records a broker repeats
//!   or returns from before the requested offset are dropped.
//! - A message that does not fit is never silently dropped: the ingest fails naming topic,
//!   partition, offset and field (never the value), or writes it to the dead-letter table
//!   before the flush's main commit (itself exactly once by the same `txn` rule).
//! - Depends on `core` and `delta` only, never on Postgres.

pub mod decode;
mod error;
pub mod kafka;
mod run;
pub mod spec;
pub mod status;

pub use decode::{Decoder, KafkaColumn, Message};
pub use error::IngestError;
pub use kafka::StartFrom;
pub use run::{prepare, run};
pub use spec::{BadRecords, IngestSpec};
pub use status::{IngestState, IngestStatus, PartitionProgress};
