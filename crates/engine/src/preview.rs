//! Dry runs of a served table (`POST /api/v1/synced-tables/{name}/plan`): the run its worker
//! would make next, found without writing (see [`crate::SyncRequest::dry_run`]).

use std::time::Duration;

use lakesync_core::SyncMode;

use crate::config::TableMode;
use crate::daemon::Daemon;
use crate::{sync, EngineError, SyncOutcome};

impl Daemon {
    /// What the next run of `name` would do, on this replica, whoever owns the table (a dry
    /// run writes nothing, so it needs no ownership). `None` if there is no such table.
    pub async fn plan(&self, name: &str) -> Result<Option<SyncOutcome>, EngineError> {
        let Some(worker) = self.table(name) else { return Ok(None) };
        let spec = &worker.spec;
        let mode = match spec.mode {
            TableMode::Snapshot { .. } => SyncMode::Snapshot,
            _ => SyncMode::Auto,
        };
        // A run in flight holds the table's lock: the plan waits for it, then sees its result.
        let mut req = spec.request(self.postgres(), mode, None, Duration::from_secs(30));
        req.dry_run = true;
        Ok(Some(sync(&req).await?))
    }
}
