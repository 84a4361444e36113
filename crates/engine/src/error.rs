//! The engine's error type: source, sink or input errors, classified in one place.

use lakesync_core::{Classify, ErrorClass, ModelError};
use lakesync_delta::DeltaError;
use lakesync_postgres::PgError;

/// A failed sync run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Reading the Delta table failed.
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// Writing to Postgres failed.
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// The request is invalid.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The request cannot be honoured as asked.
    #[error("table {table}: {message}")]
    Request { table: String, message: String },
    /// The change data feed holds rows lakesync cannot interpret (e.g. an unknown change type).
    #[error("table {table}: the change data feed at version {version} cannot be applied: {reason}")]
    UnusableFeed { table: String, version: lakesync_core::Version, reason: String },
    /// A background task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
    /// The run panicked (a bug, in lakesync or a library); nothing it did was committed.
    #[error("internal error: the sync run panicked: {0}")]
    Panicked(String),
}

impl EngineError {
    /// Whether a fresh snapshot can serve what the change data feed could not: the feed is
    /// unavailable for the range, unreadable, or disagrees with the table's row count.
    pub fn calls_for_snapshot(&self) -> Option<String> {
        match self {
            EngineError::Delta(DeltaError::CdfUnavailable { reason, .. }) => Some(reason.clone()),
            EngineError::Postgres(e @ PgError::Drift { .. }) => Some(e.to_string()),
            EngineError::UnusableFeed { .. } => Some(self.to_string()),
            _ => None,
        }
    }
}

impl Classify for EngineError {
    fn class(&self) -> ErrorClass {
        match self {
            EngineError::Delta(e) => e.class(),
            EngineError::Postgres(e) => e.class(),
            EngineError::Model(e) => e.class(),
            EngineError::Request { .. } => ErrorClass::Config,
            EngineError::UnusableFeed { .. } => ErrorClass::Schema,
            EngineError::Internal(_) | EngineError::Panicked(_) => ErrorClass::Internal,
        }
    }
}
