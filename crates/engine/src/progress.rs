//! Progress of a running sync, shared with whoever displays it (lock-free counters).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use lakesync_core::Timings;

/// What the run is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Looking at the source and the target.
    Planning = 0,
    /// Copying snapshot rows into the staging table.
    Loading = 1,
    /// Building the primary key and indexes, then swapping.
    Indexing = 2,
    /// Applying change-feed chunks.
    Applying = 3,
}

/// Counters a run updates as it goes.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    rows_done: AtomicU64,
    rows_total: AtomicU64,
    /// Where the run's time went (see [`Timings`]).
    timings: std::sync::Mutex<Timings>,
}

impl Progress {
    /// Sets the phase.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Loading,
            2 => Phase::Indexing,
            3 => Phase::Applying,
            _ => Phase::Planning,
        }
    }

    /// Sets the expected number of rows (0 when unknown).
    pub fn set_total(&self, rows: u64) {
        self.rows_total.store(rows, Ordering::Relaxed);
    }

    /// Counts `rows` more rows done.
    pub fn add(&self, rows: u64) {
        self.rows_done.fetch_add(rows, Ordering::Relaxed);
    }

    /// (rows done, rows expected or 0).
    pub fn rows(&self) -> (u64, u64) {
        (self.rows_done.load(Ordering::Relaxed), self.rows_total.load(Ordering::Relaxed))
    }

    /// Adds `elapsed` to the run's `phase`.
    pub fn time(&self, phase: &'static str, elapsed: Duration) {
        self.timings.lock().expect("timings lock").add(phase, elapsed);
    }

    /// Adds the time since `started` to `phase`; returns now.
    pub fn lap(&self, phase: &'static str, started: Instant) -> Instant {
        self.timings.lock().expect("timings lock").lap(phase, started)
    }

    /// Adds every phase of `timings`.
    pub fn merge(&self, timings: &Timings) {
        self.timings.lock().expect("timings lock").extend(timings);
    }

    /// The run's timings so far, leaving none (a new run starts from nothing).
    pub fn take_timings(&self) -> Timings {
        std::mem::take(&mut *self.timings.lock().expect("timings lock"))
    }
}
