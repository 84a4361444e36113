//! The Postgres sink's error type.

use lakesync_core::{Classify, ErrorClass, Version};
use tokio_postgres::error::SqlState;

/// Everything that can go wrong on the Postgres side.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The connection string does not parse. (Never echoes the string: it may hold a password.)
    #[error("invalid Postgres connection string: {0}")]
    InvalidConnection(String),
    /// Connecting failed.
    #[error("cannot connect to Postgres at {target}: {source}{}", causes(source))]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement failed.
    #[error("Postgres failed to {action} for table {table}: {source}{}", detail(source))]
    Query {
        table: String,
        action: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// Several source rows share one primary key.
    #[error("table {table}: the source holds more than one row with primary key {key}{} (choose another --primary-key, or --dedup-by <column> to keep the row with the greatest value of a column)", at_version(*version))]
    DuplicateKey { table: String, key: String, version: Option<Version> },
    /// A source row has NULL in a primary-key column.
    #[error("table {table}: primary key column {column:?} is NULL in a source row{}; Postgres primary keys cannot be NULL", at_version(*version))]
    NullKey { table: String, column: String, version: Option<Version> },
    /// A value Postgres cannot store faithfully.
    #[error("table {table}: column {column:?}{} for primary key {key}: {problem}", at_version(*version))]
    Value { table: String, column: String, version: Option<Version>, key: String, problem: String },
    /// Another process is syncing the table.
    #[error(
        "table {table} is being synced by another lakesync process (advisory lock held); try again when it finishes"
    )]
    Locked { table: String },
    /// The target or the state does not match what the sync expects.
    #[error("table {table}: {message}")]
    Mismatch { table: String, message: String },
    /// Applying the change feed would leave a different row count than the source holds.
    #[error("table {table}: after applying the change data feed up to version {version} it would hold {postgres_rows} rows, but the Delta table holds {source_rows}; nothing was committed")]
    Drift { table: String, version: Version, postgres_rows: u64, source_rows: u64 },
    /// Starting or stopping a local Postgres failed.
    #[error("local Postgres: {0}")]
    Cluster(String),
}

/// The causes below a connection error (e.g. the TLS failure under "error performing TLS
/// handshake"), which its own message leaves out.
fn causes(err: &tokio_postgres::Error) -> String {
    let mut out = String::new();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

fn at_version(version: Option<Version>) -> String {
    version.map(|v| format!(" at Delta version {v}")).unwrap_or_default()
}

fn detail(source: &tokio_postgres::Error) -> String {
    match source.as_db_error() {
        Some(db) => {
            let mut s = String::new();
            if let Some(d) = db.detail() {
                s.push_str(&format!(" (detail: {d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" (hint: {h})"));
            }
            s
        }
        None => String::new(),
    }
}

impl PgError {
    /// Wraps a failed statement with the table and what was being done.
    pub fn query(table: impl ToString, action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
        let table = table.to_string();
        let action = action.into();
        move |source| PgError::Query { table, action, source }
    }

    /// The SQLSTATE of a failed statement, if any.
    pub fn sql_state(&self) -> Option<&SqlState> {
        match self {
            PgError::Query { source, .. } | PgError::Connect { source, .. } => source.code(),
            _ => None,
        }
    }
}

impl Classify for PgError {
    fn class(&self) -> ErrorClass {
        match self {
            PgError::InvalidConnection(_) => ErrorClass::Config,
            PgError::Connect { .. } => ErrorClass::Transient,
            PgError::Query { source, .. } => classify_db(source),
            PgError::DuplicateKey { .. } | PgError::NullKey { .. } | PgError::Value { .. } => ErrorClass::Data,
            PgError::Locked { .. } => ErrorClass::Busy,
            PgError::Mismatch { .. } | PgError::Drift { .. } => ErrorClass::Schema,
            PgError::Cluster(_) => ErrorClass::Config,
        }
    }
}

fn classify_db(err: &tokio_postgres::Error) -> ErrorClass {
    if err.is_closed() {
        return ErrorClass::Transient;
    }
    let Some(code) = err.code() else { return ErrorClass::Transient };
    let c = code.code();
    if c.starts_with("08")
        || c.starts_with("53")
        || c.starts_with("57P")
        || code == &SqlState::T_R_SERIALIZATION_FAILURE
        || code == &SqlState::T_R_DEADLOCK_DETECTED
        || code == &SqlState::LOCK_NOT_AVAILABLE
    {
        ErrorClass::Transient
    } else if c.starts_with("23") || c.starts_with("22") {
        ErrorClass::Data
    } else if c.starts_with("42") {
        ErrorClass::Schema
    } else if c.starts_with("28") || c.starts_with("3D") {
        ErrorClass::Config
    } else {
        ErrorClass::Internal
    }
}
