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
    /// A statement failed. The message says what the server said, but never a DETAIL that
    /// can hold row values ("Failing row contains (...)"); the error is not exposed as a
    /// `source` either, so nothing that prints error chains can show it.
    #[error("Postgres failed to {action} for table {table}: {}", describe(error))]
    Query { table: String, action: String, error: tokio_postgres::Error },
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
    /// The target table exists and is not lakesync's.
    #[error("table {table}: {message}")]
    NotOwned { table: String, message: String },
    /// Another writer moved the synced version while this run applied (two runs of one table
    /// past the advisory lock); this run's transaction was rolled back.
    #[error("table {table}: another lakesync run moved its synced version from {} to {} while this run was applying up to version {version}; this run's changes were rolled back", show_version(*expected), show_version(*found))]
    Conflict { table: String, expected: Option<Version>, found: Option<Version>, version: Version },
    /// The replica running this sync no longer owns the table (its coordinating session
    /// ended or handed the table over); nothing was committed.
    #[error("table {table}: this replica no longer owns it (its coordinating Postgres session ended or handed it over); nothing was committed, the owner syncs it")]
    NotOwner { table: String },
    /// This replica's id is in use by another live session.
    #[error("replica id {replica:?} is in use by another live lakesync session; give each replica its own id (LAKESYNC_REPLICA_ID or [fleet] replica_id)")]
    ReplicaIdInUse { replica: String },
    /// Applying the change feed would leave a different row count than the source holds.
    #[error("table {table}: after applying the change data feed up to version {version} it would hold {postgres_rows} rows, but the Delta table holds {source_rows}; nothing was committed")]
    Drift { table: String, version: Version, postgres_rows: u64, source_rows: u64 },
    /// Starting or stopping a local Postgres failed.
    #[error("local Postgres: {0}")]
    Cluster(String),
    /// The connection goes through a pooler that hands each transaction (or statement) a
    /// different server session; what lakesync keeps per session would be lost or leak.
    #[error("{}", pooler_message(target))]
    TransactionPooler { target: String },
}

/// Why a transaction pooler cannot carry lakesync's sessions, and what to do instead.
pub(crate) fn pooler_message(target: &str) -> String {
    format!(
        "Postgres at {target} is reached through a connection pooler in transaction or statement mode \
         (PgBouncer pool_mode = transaction, Supabase's port 6543, a Neon -pooler host, RDS Proxy): two \
         of lakesync's sessions were served by one Postgres backend. lakesync needs sessions of its own \
         (each table's advisory lock, the fleet's ownership locks and LISTEN, prepared statements, \
         session settings), which such a pooler shares between clients; nothing was written. Connect \
         directly to Postgres, or through the pooler's session mode"
    )
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

fn show_version(version: Option<Version>) -> String {
    version.map(|v| v.to_string()).unwrap_or_else(|| "none".into())
}

fn at_version(version: Option<Version>) -> String {
    version.map(|v| format!(" at Delta version {v}")).unwrap_or_default()
}

/// What the server said about a failed statement, without row values.
///
/// Data errors (SQLSTATE classes 22 and 23) are where the server quotes values: a CHECK or
/// NOT NULL violation's DETAIL is the whole row ("Failing row contains (...)"), a unique
/// violation's the key, and class 22 messages end in the offending value (`invalid input
/// syntax for type integer: "..."`). For those only the message up to the value, the
/// constraint and the column are kept. Other classes' details (dependent objects, lock
/// holders) name catalog objects and are kept, as are hints.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else { return format!("{error}{}", causes(error)) };
    let code = db.code().code();
    let holds_values = code.starts_with("22") || code.starts_with("23");
    let mut s = if holds_values {
        let message = db.message();
        let cut = message.find(": \"").map(|i| &message[..i]).unwrap_or(message);
        let mut s = format!("{cut} (SQLSTATE {code})");
        if let Some(c) = db.constraint() {
            s.push_str(&format!(" (constraint {c:?})"));
        }
        if let Some(c) = db.column() {
            s.push_str(&format!(" (column {c:?})"));
        }
        s
    } else {
        format!("{} (SQLSTATE {code})", db.message())
    };
    if let Some(d) = db.detail().filter(|_| !holds_values) {
        s.push_str(&format!(" (detail: {d})"));
    }
    if let Some(h) = db.hint() {
        s.push_str(&format!(" (hint: {h})"));
    }
    s
}

impl PgError {
    /// Wraps a failed statement with the table and what was being done.
    pub fn query(table: impl ToString, action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
        let table = table.to_string();
        let action = action.into();
        move |error| PgError::Query { table, action, error }
    }

    /// The SQLSTATE of a failed statement, if any.
    pub fn sql_state(&self) -> Option<&SqlState> {
        match self {
            PgError::Query { error: source, .. } | PgError::Connect { source, .. } => source.code(),
            _ => None,
        }
    }
}

impl Classify for PgError {
    fn class(&self) -> ErrorClass {
        match self {
            PgError::InvalidConnection(_) => ErrorClass::Config,
            PgError::Connect { .. } => ErrorClass::Transient,
            PgError::Query { error, .. } => classify_db(error),
            PgError::DuplicateKey { .. } | PgError::NullKey { .. } | PgError::Value { .. } => ErrorClass::Data,
            PgError::Locked { .. } | PgError::Conflict { .. } | PgError::NotOwner { .. } => ErrorClass::Busy,
            PgError::ReplicaIdInUse { .. } => ErrorClass::Transient,
            PgError::NotOwned { .. } => ErrorClass::Config,
            PgError::Mismatch { .. } | PgError::Drift { .. } => ErrorClass::Schema,
            PgError::Cluster(_) | PgError::TransactionPooler { .. } => ErrorClass::Config,
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
