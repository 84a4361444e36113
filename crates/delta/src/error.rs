//! The Delta source's error type.

use delta_kernel::KernelError;
use lakesync_core::{Classify, ErrorClass, Version};

/// Everything that can go wrong reading or writing a Delta table.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The table location could not be parsed or opened.
    #[error("cannot open Delta table {uri}: {source}{}", root_cause(.source))]
    Open {
        uri: String,
        #[source]
        source: KernelError,
    },
    /// The object store could not be configured (unknown option, bad credentials file,
    /// unsupported scheme). Never carries a secret.
    #[error("cannot open Delta table {uri}: {message}")]
    Store { uri: String, message: String },
    /// The store refused the credentials or denied access.
    #[error("access to Delta table {uri} was denied: {source}{}. Check the credentials lakesync runs with (the store's environment variables, storage_options, or the instance's role)", root_cause(.source))]
    Access {
        uri: String,
        #[source]
        source: KernelError,
    },
    /// No Delta log at the location.
    #[error("no Delta table at {uri}: there is no readable _delta_log ({source}{})", root_cause(.source))]
    NotATable {
        uri: String,
        #[source]
        source: KernelError,
    },
    /// The requested version is not in the log (never written, or the log was truncated).
    #[error("Delta table {uri} has no readable version {version}: {source}{}", root_cause(.source))]
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
    #[error("Delta table {uri}: reading version {version} failed: {source}{}", root_cause(.source))]
    Read {
        uri: String,
        version: Version,
        #[source]
        source: KernelError,
    },
    /// Writing a sample table failed.
    #[error("writing Delta table {uri} failed: {source}{}", root_cause(.source))]
    Write {
        uri: String,
        #[source]
        source: KernelError,
    },
    /// A batch did not match the expected shape.
    #[error("Delta table {uri}: {message}")]
    Shape { uri: String, message: String },
    /// The table's row filter or column choice does not fit the table (an unknown column, a
    /// literal that is not a value of its column). Nothing was read or written.
    #[error("Delta table {uri}: {message}")]
    Selection { uri: String, message: String },
    /// lakesync may not write the table as it is: its protocol needs the user's
    /// `--upgrade-protocol`, or it uses a feature lakesync does not enforce (see
    /// [`crate::protocol`]). Nothing was written.
    #[error("Delta table {uri}: {message}")]
    Unwritable { uri: String, message: String },
}

impl Classify for DeltaError {
    fn class(&self) -> ErrorClass {
        match self {
            DeltaError::Open { .. }
            | DeltaError::Store { .. }
            | DeltaError::Access { .. }
            | DeltaError::NotATable { .. }
            | DeltaError::CdfNotEnabled { .. } => ErrorClass::Config,
            DeltaError::UnsupportedType { .. } | DeltaError::CdfUnavailable { .. } => ErrorClass::Schema,
            DeltaError::VersionUnavailable { .. } => ErrorClass::Config,
            DeltaError::Read { source, .. } | DeltaError::Write { source, .. } => {
                if is_transient(source) {
                    ErrorClass::Transient
                } else if is_denied(source) {
                    ErrorClass::Config
                } else {
                    ErrorClass::Internal
                }
            }
            DeltaError::Shape { .. } => ErrorClass::Internal,
            DeltaError::Unwritable { .. } | DeltaError::Selection { .. } => ErrorClass::Config,
        }
    }
}

/// The causes of `err`, itself first. The kernel's transparent variants are unwrapped by
/// hand: their `source()` skips the wrapped error.
fn chain(err: &KernelError) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    let first: &(dyn std::error::Error + 'static) = match err {
        KernelError::IOError(e) => e,
        KernelError::ObjectStore(e) => e,
        other => other,
    };
    std::iter::successors(Some(first), |e| e.source())
}

/// The innermost cause of `err`, as `": cause"`, when the message does not already show it:
/// an object store's "error sending request" hides why (a certificate the machine does not
/// trust, a refused connection) one level down, where a user never sees it.
fn root_cause(err: &KernelError) -> String {
    let shown = err.to_string();
    match chain(err).last().map(|e| e.to_string()) {
        Some(cause) if !cause.is_empty() && !shown.contains(&cause) => format!(": {cause}"),
        _ => String::new(),
    }
}

/// The HTTP status an object store answered with, when a cause says. `object_store` turns
/// 403 and 404 into typed errors for reads but not for listings (a `Generic` error whose
/// message carries the status), so the message is read too.
fn http_status(err: &KernelError) -> Option<u16> {
    chain(err).find_map(|e| {
        let text = e.to_string();
        let at = text.find("non-2xx status code: ")? + "non-2xx status code: ".len();
        text.get(at..at + 3)?.parse().ok()
    })
}

/// Whether the store refused the credentials or denied access, however deep the cause.
pub(crate) fn is_denied(err: &KernelError) -> bool {
    use delta_kernel::object_store::Error as S;
    chain(err).any(|e| matches!(e.downcast_ref(), Some(S::PermissionDenied { .. } | S::Unauthenticated { .. })))
        || matches!(http_status(err), Some(401 | 403))
}

/// Object-store and I/O hiccups (timeouts, connection resets, 5xx, 429) are worth a retry;
/// missing files, refused credentials, other client errors and corrupt data are not.
pub(crate) fn is_transient(err: &KernelError) -> bool {
    use delta_kernel::object_store::Error as S;
    if is_denied(err) {
        return false;
    }
    if let Some(status) = http_status(err) {
        return status >= 500 || status == 408 || status == 429;
    }
    for e in chain(err) {
        if let Some(store) = e.downcast_ref::<S>() {
            // A remote store's generic error without a status is a failed request (reset,
            // timeout) that outlived its retries; the local file system's are not hiccups
            // (an invalid range is a corrupt or truncated file).
            return match store {
                S::Generic { store, .. } => *store != "LocalFileSystem",
                S::JoinError { .. } => true,
                _ => false,
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return !matches!(
                io.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidData
            );
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing_failed(status: &str) -> KernelError {
        KernelError::ObjectStore(delta_kernel::object_store::Error::Generic {
            store: "S3",
            source: format!(
                "Error performing list request: Error performing GET http://127.0.0.1/lake?list-type=2 in 3ms - \
                 Server returned non-2xx status code: {status}: <Error/>"
            )
            .into(),
        })
    }

    #[test]
    fn a_listing_answered_with_a_status_is_classified_by_that_status() {
        for denied in ["401 Unauthorized", "403 Forbidden"] {
            assert!(is_denied(&listing_failed(denied)), "{denied}");
            assert!(!is_transient(&listing_failed(denied)), "{denied}");
        }
        for hiccup in ["500 Internal Server Error", "503 Service Unavailable", "429 Too Many Requests"] {
            assert!(is_transient(&listing_failed(hiccup)), "{hiccup}");
        }
        // A missing bucket or a bad request is not retried.
        for client in ["404 Not Found", "400 Bad Request"] {
            assert!(!is_transient(&listing_failed(client)) && !is_denied(&listing_failed(client)), "{client}");
        }
        let read = DeltaError::Read { uri: "s3://lake/t".into(), version: 3, source: listing_failed("403 Forbidden") };
        assert_eq!(read.class(), ErrorClass::Config);
    }
}
