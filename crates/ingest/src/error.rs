//! One error type for the ingest, classified once.

use lakesync_core::{Classify, ErrorClass};
use lakesync_delta::DeltaError;

/// A failed ingest. Every variant names the ingest; none carries a message's value.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A setting is invalid.
    #[error("ingest {name}: {message}")]
    Config { name: String, message: String },
    /// The brokers failed or refused a request.
    #[error("ingest {name}: Kafka (brokers {brokers}): {message}")]
    Kafka { name: String, brokers: String, message: String, transient: bool },
    /// A message does not fit the table and the policy is to fail.
    #[error(
        "ingest {name}: topic {topic} partition {partition} offset {offset}: {reason} \
         (nothing from this flush was written; fix the producer, or set on_bad_record = \"dead_letter\" to set such messages aside)"
    )]
    BadRecord { name: String, topic: String, partition: i32, offset: i64, reason: String },
    /// Messages the table has not ingested were deleted from the topic by its retention.
    #[error(
        "ingest {name}: topic {topic} partition {partition}: offset {wanted} is no longer in the topic \
         (the earliest kept is {earliest}): messages were deleted by the topic's retention before they were ingested"
    )]
    OffsetGone { name: String, topic: String, partition: i32, wanted: i64, earliest: i64 },
    /// The table cannot take this ingest's rows (schema, layout, properties).
    #[error("ingest {name}: table {table}: {message}")]
    Table { name: String, table: String, message: String },
    /// The table records other positions than this ingest started from.
    #[error(
        "ingest {name}: table {table} records other Kafka positions than this ingest started from: \
         another process is ingesting under the same name; starting again from the table's positions"
    )]
    Moved { name: String, table: String },
    /// Reading or writing the Delta table failed.
    #[error("ingest {name}: {source}")]
    Delta {
        name: String,
        #[source]
        source: Box<DeltaError>,
    },
    /// A bug: a decoder or task failure that should not happen.
    #[error("ingest {name}: internal error: {message}")]
    Internal { name: String, message: String },
}

impl Classify for IngestError {
    fn class(&self) -> ErrorClass {
        match self {
            IngestError::Config { .. } => ErrorClass::Config,
            IngestError::Kafka { transient: true, .. } | IngestError::Moved { .. } => ErrorClass::Transient,
            IngestError::Kafka { transient: false, .. } => ErrorClass::Config,
            IngestError::BadRecord { .. } | IngestError::OffsetGone { .. } => ErrorClass::Data,
            IngestError::Table { .. } => ErrorClass::Schema,
            IngestError::Delta { source, .. } => source.class(),
            IngestError::Internal { .. } => ErrorClass::Internal,
        }
    }
}
