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
    /// The position the table records for a partition is outside what the partition holds:
    /// the topic was deleted and recreated, its log truncated, or messages deleted by
    /// retention before they were ingested. Nothing more is read from it until an operator
    /// chooses where it goes on (`--reset-positions`).
    #[error(
        "ingest {name}: topic {topic} partition {partition}: the table records offset {recorded}, but the partition \
         holds offsets {earliest}..{latest}: {}. Nothing was ingested from it. To go on, choose where it continues: \
         --reset-positions earliest (every message the partition holds now) or latest (only new ones), or \
         POST /api/v1/ingests/{name}/restart?reset_positions=earliest|latest; the reset is recorded in the table's commit",
        if recorded > latest {
            "the topic was deleted and recreated, or its log truncated (an unclean leader election)"
        } else {
            "messages were deleted by the topic's retention before they were ingested"
        }
    )]
    PositionOutOfRange { name: String, topic: String, partition: i32, recorded: i64, earliest: i64, latest: i64 },
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
            IngestError::BadRecord { .. } | IngestError::PositionOutOfRange { .. } => ErrorClass::Data,
            IngestError::Table { .. } => ErrorClass::Schema,
            IngestError::Delta { source, .. } => source.class(),
            IngestError::Internal { .. } => ErrorClass::Internal,
        }
    }
}
