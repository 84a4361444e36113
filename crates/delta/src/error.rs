//! The Delta source's error type.

use delta_kernel::KernelError;
use lakesync_core::{Classify, ErrorClass, Version};

/// Everything that can go wrong reading or writing a Delta table.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The table location could not be parsed or opened.
    #[error("cannot open Delta table {uri}: {source}")]
    Open {
        uri: String,
        #[source]
        source: KernelError,
    },
    /// No Delta log at the location.
    #[error("no Delta table at {uri}: there is no readable _delta_log ({source})")]
    NotATable {
        uri: String,
        #[source]
        source: KernelError,
    },
    /// The requested version is not in the log (never written, or the log was truncated).
    #[error("Delta table {uri} has no readable version {version}: {source}")]
    VersionUnavailable {
        uri: String,
        version: Version,
        #[source]
        source: KernelError,
    },
    /// A column whose Delta type lakesync cannot store in Postgres.
    #[error("Delta table {uri}: column {column:?} has type {ty}, which lakesync cannot sync to Postgres; exclude the column or cast it in a view")]
    UnsupportedType { uri: String, column: String, ty: String },
    /// The change data feed is not enabled at the latest version.
    #[error("Delta table {uri} does not have the change data feed enabled (at version {version}), so it can only be synced with --mode snapshot. To sync incrementally, run in Spark: ALTER TABLE delta.`{path}` SET TBLPROPERTIES (delta.enableChangeDataFeed = true)")]
    CdfNotEnabled { uri: String, path: String, version: Version },
    /// The change data feed cannot serve this range (enabled later, vacuumed change files,
    /// truncated log, schema change); a snapshot can still serve the end version.
    #[error("Delta table {uri}: the change data feed cannot serve versions {start}..={end}: {reason}")]
    CdfUnavailable { uri: String, start: Version, end: Version, reason: String },
    /// Reading data files failed.
    #[error("Delta table {uri}: reading version {version} failed: {source}")]
    Read {
        uri: String,
        version: Version,
        #[source]
        source: KernelError,
    },
    /// Writing a sample table failed.
    #[error("writing Delta table {uri} failed: {source}")]
    Write {
        uri: String,
        #[source]
        source: KernelError,
    },
    /// A batch did not match the expected shape.
    #[error("Delta table {uri}: {message}")]
    Shape { uri: String, message: String },
}

impl Classify for DeltaError {
    fn class(&self) -> ErrorClass {
        match self {
            DeltaError::Open { .. } | DeltaError::NotATable { .. } | DeltaError::CdfNotEnabled { .. } => {
                ErrorClass::Config
            }
            DeltaError::UnsupportedType { .. } | DeltaError::CdfUnavailable { .. } => ErrorClass::Schema,
            DeltaError::VersionUnavailable { .. } => ErrorClass::Config,
            DeltaError::Read { source, .. } | DeltaError::Write { source, .. } => {
                if is_transient(source) {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Internal
                }
            }
            DeltaError::Shape { .. } => ErrorClass::Internal,
        }
    }
}

/// Object-store and I/O hiccups are worth a retry; missing files and corrupt data are not.
pub(crate) fn is_transient(err: &KernelError) -> bool {
    use delta_kernel::KernelError as E;
    match err {
        E::IOError(e) => !matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied),
        E::ObjectStore(e) => !matches!(
            e,
            delta_kernel::object_store::Error::NotFound { .. }
                | delta_kernel::object_store::Error::PermissionDenied { .. }
                | delta_kernel::object_store::Error::Unauthenticated { .. }
        ),
        _ => false,
    }
}
