//! The validated description of one ingest, shared by `lakesync ingest`, `[[ingest]]` in
//! the daemon's TOML file and the API (they all build it through the engine's config).

use std::time::Duration;

use arrow_schema::SchemaRef;
use lakesync_delta::StorageOptions;

use crate::decode::KafkaColumn;
use crate::kafka::{Security, StartFrom};

/// What to do with a message that does not parse or does not fit the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRecords {
    /// Stop, naming topic, partition, offset and field; nothing of the flush is written.
    Fail,
    /// Append it (raw key and value, the error) to this Delta table and go on.
    DeadLetter(String),
}

/// One Kafka topic into one Delta table.
#[derive(Debug, Clone)]
pub struct IngestSpec {
    /// Names the ingest in the API, metrics and the table's `txn` application ids.
    pub name: String,
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// TLS and SASL to the brokers.
    pub security: Security,
    pub topic: String,
    /// The Delta table: a local path or an object-store URI.
    pub table: String,
    pub storage: StorageOptions,
    /// The message fields' schema, required to create the table; checked against an existing
    /// table's. `None`: the existing table's columns.
    pub schema: Option<SchemaRef>,
    /// Partition columns of a table the ingest creates.
    pub partition_by: Vec<String>,
    /// Kafka metadata columns of a table the ingest creates.
    pub kafka_columns: Vec<KafkaColumn>,
    /// Commit when this many messages are buffered...
    pub flush_rows: usize,
    /// ...or when the oldest buffered message has waited this long.
    pub flush_interval: Duration,
    pub bad_records: BadRecords,
    /// Where partitions the table has no position for start.
    pub start: StartFrom,
    /// Write a checkpoint when this many commits follow the last one (0: never).
    pub checkpoint_every: u64,
    /// Compact the table's small files every this many ingest commits (0: never).
    pub compact_every: u64,
    /// Compaction's target file size, bytes.
    pub target_file_size: u64,
    /// Upgrade an existing table on a legacy protocol (writer versions 3-6, what Spark and
    /// delta-rs create change-feed tables with) to table features before writing; without
    /// it such a table is refused, naming the flag. See `lakesync_delta::protocol`.
    pub upgrade_protocol: bool,
    /// An operator's one-time choice for partitions whose recorded position is outside what
    /// they hold (a recreated topic, a truncated log, retention): continue from their earliest
    /// or latest offset, recorded in the table's commit. `None`: such a partition stops the
    /// ingest with an error naming topic, partition and offsets. Never part of the saved
    /// configuration: a later gap must be seen again.
    pub reset_positions: Option<StartFrom>,
    /// How long one request to the brokers may go unanswered before the connection is taken
    /// for lost and the ingest reconnects (Kafka clients' `request.timeout.ms`).
    pub request_timeout: Duration,
}

impl IngestSpec {
    /// Defaults for everything but where from and where to.
    pub fn new(name: &str, brokers: Vec<String>, topic: &str, table: &str) -> Self {
        Self {
            name: name.to_string(),
            brokers,
            security: Security::default(),
            topic: topic.to_string(),
            table: table.to_string(),
            storage: StorageOptions::default(),
            schema: None,
            partition_by: Vec::new(),
            kafka_columns: Vec::new(),
            flush_rows: 100_000,
            flush_interval: Duration::from_secs(1),
            bad_records: BadRecords::Fail,
            start: StartFrom::Earliest,
            checkpoint_every: 10,
            compact_every: 100,
            target_file_size: 128 * 1024 * 1024,
            upgrade_protocol: false,
            reset_positions: None,
            request_timeout: crate::kafka::DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The `txn` application id the table records `partition`'s next offset under.
    pub fn app_id(&self, partition: i32) -> String {
        format!("lakesync-ingest/{}/{}/{partition}", self.name, self.topic)
    }
}
