//! `lakesync-core`: the pure heart of lakesync.
//!
//! This crate owns the domain model (table names, primary keys, column types, sync modes,
//! data policies), the change planner that turns a Delta change data feed into one net
//! action per primary key, the error classification the engine uses to decide retries, and
//! the fleet's balancing planner ([`fleet`]).
//!
//! Invariants:
//! - No I/O, no async runtime, no Delta or Postgres types: everything here is testable with
//!   plain values (see the model-based property tests of [`plan`]).
//! - A [`plan::ChangePlan`] holds at most one action per key, and that action is the state of
//!   the key after the last change in the planned range.
//! - For a source that repeats keys (`dedup_by`), a [`plan::LogPlanner`]'s plan holds per key
//!   at most one delete and one upsert, each guarded by the order value, so that the target
//!   keeps each key's row with the greatest value whichever commit wrote it. It keeps a few
//!   images per key (memory O(keys) for an event log, O(`KEEP`) per event), and names the
//!   keys whose plan needs the images it let go, for a second read.

pub mod class;
pub mod fleet;
pub mod model;
pub mod plan;
pub mod schedule;
pub mod shape;
pub mod timings;

pub use class::{Classify, ErrorClass};
pub use model::{
    Column, ColumnType, DataPolicy, ModelError, NulBytePolicy, PrimaryKey, SchemaChange, SyncMode, TableName,
    TableSchema, Version,
};
pub use plan::{
    ChangeKind, ChangePlan, ChangePlanner, KeyMap, LogPlan, LogPlanner, PlanConflict, PlannedDelete, PlannedRow,
};
pub use schedule::{parse_duration, parse_size, Cron, Schedule, ScheduleError};
pub use shape::{ColumnChoice, DeleteMode, RowFilter, Shape};
pub use timings::Timings;
