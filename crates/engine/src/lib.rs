//! `lakesync-engine`: decides what a sync run does and drives the Delta source and the
//! Postgres sink through it.
//!
//! This crate owns the run logic: snapshot when nothing is synced or the change data feed
//! cannot serve the range, otherwise read the feed in chunks of versions, reduce each chunk to
//! net changes with [`lakesync_core::ChangePlanner`], and apply it in one Postgres transaction
//! that records the new synced version. It also owns the single place where errors are
//! classified for retries ([`lakesync_core::Classify`] for [`EngineError`]). The daemon also
//! runs the config's Kafka ingests (`lakesync_ingest`) beside the synced tables, and
//! [`fleet`] makes it one replica of a fleet coordinated through Postgres.
//!
//! Invariants:
//! - The synced version only moves inside the transaction that writes its data.
//! - A chunk is applied whole or not at all; a failure leaves the table at the last checkpoint.
//! - In a fleet, a replica runs a table only while it owns it, and stops everything when it
//!   cannot renew its heartbeat within half a lease (the others take over after a whole one).
//! - A spec that comes through the management API reaches only what the operator's
//!   `[api.policy]` allows ([`policy`]), checked before anything is read or contacted.
//! - Delta reads (blocking, kernel) run on blocking threads and feed Postgres through bounded
//!   channels, so memory stays bounded during snapshots.

pub mod changes;
pub mod config;
pub mod daemon;
pub mod error;
pub mod fleet;
pub mod policy;
pub mod preview;
pub mod progress;
pub mod sync;

pub use daemon::{Daemon, IngestWorker, LiveStatus, Worker};
pub use error::EngineError;
pub use progress::{Phase, Progress};
pub use sync::{sync, SyncOutcome, SyncRequest};
