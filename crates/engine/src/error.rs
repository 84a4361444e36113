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
    /// A background task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Classify for EngineError {
    fn class(&self) -> ErrorClass {
        match self {
            EngineError::Delta(e) => e.class(),
            EngineError::Postgres(e) => e.class(),
            EngineError::Model(e) => e.class(),
            EngineError::Request { .. } => ErrorClass::Config,
            EngineError::Internal(_) => ErrorClass::Internal,
        }
    }
}
