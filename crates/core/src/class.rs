//! How errors classify themselves, so the engine decides retries in one place.

/// The class of a failure: what a caller can sensibly do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Worth retrying as is: connection loss, I/O hiccups, lock timeouts.
    Transient,
    /// The source or target schema does not allow the operation (unsupported type, changed key).
    Schema,
    /// The user's input is wrong: bad URI, bad connection string, unknown column.
    Config,
    /// The data cannot be stored faithfully under the chosen policy (NULL key, duplicate key,
    /// NUL byte, out-of-range value). Retrying gives the same answer.
    Data,
    /// Another lakesync process holds the table; retry later.
    Busy,
    /// A bug or an invariant violation.
    Internal,
}

impl ErrorClass {
    /// Whether retrying the same operation later can succeed without anyone changing anything.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Transient | ErrorClass::Busy)
    }

    /// A short lowercase name, used in status output and run history.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Schema => "schema",
            ErrorClass::Config => "config",
            ErrorClass::Data => "data",
            ErrorClass::Busy => "busy",
            ErrorClass::Internal => "internal",
        }
    }
}

/// Implemented by every library crate's error enum.
pub trait Classify {
    /// What kind of failure this is.
    fn class(&self) -> ErrorClass;
}
