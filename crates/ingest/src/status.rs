//! What an ingest is doing, for the management API, `/metrics` and logs.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

/// A partition's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionProgress {
    /// The next offset the table records (everything before it is in the table).
    pub committed: Option<i64>,
    /// The partition's end as the broker last reported it.
    pub high_watermark: i64,
    /// With nothing of the partition held for the next commit: the offset it was read up to,
    /// past records that are not messages (transaction markers, aborted transactions' records),
    /// which are never in the table.
    pub read_to: Option<i64>,
}

impl PartitionProgress {
    /// Messages in the topic not yet in the table.
    pub fn lag(&self) -> i64 {
        let done = self.committed.unwrap_or(0).max(self.read_to.unwrap_or(0));
        (self.high_watermark - done).max(0)
    }
}

/// A snapshot of an ingest's state and counters (counters since the process started).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestState {
    /// `starting`, `running`, `retrying`, `failed` or `stopped`.
    pub state: &'static str,
    pub last_error: Option<String>,
    /// The error's class (`transient`, `data`, ...).
    pub error_class: Option<&'static str>,
    pub partitions: BTreeMap<i32, PartitionProgress>,
    /// Messages written as rows.
    pub rows: u64,
    /// Bytes of message keys and values written (rows and dead letters).
    pub bytes: u64,
    /// Messages set aside in the dead-letter table.
    pub dead_letters: u64,
    pub commits: u64,
    pub files: u64,
    pub compactions: u64,
    /// The table's version after the last commit.
    pub table_version: Option<u64>,
    pub last_commit_at: Option<SystemTime>,
}

/// Shared between the running ingest and its readers.
#[derive(Debug, Default)]
pub struct IngestStatus(Mutex<IngestState>);

impl IngestStatus {
    pub fn new() -> Self {
        Self(Mutex::new(IngestState { state: "starting", ..Default::default() }))
    }

    /// A copy of the current state.
    pub fn get(&self) -> IngestState {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut IngestState)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_read_past_a_trailing_transaction_marker_has_no_lag() {
        // Messages up to 9 are in the table; offset 10 is a commit marker; the end is 11.
        let mut p = PartitionProgress { committed: Some(10), high_watermark: 11, read_to: None };
        assert_eq!(p.lag(), 1);
        p.read_to = Some(11);
        assert_eq!(p.lag(), 0);
    }
}
