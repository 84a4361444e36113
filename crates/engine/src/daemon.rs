//! The daemon: one worker task per synced table, each deciding when its table runs
//! (schedule, new commits, a request), retrying transient failures with backoff and parking
//! the table on the others. Tables are independent: one failing never stops another.
//!
//! In a fleet (`lakesync serve`, see [`crate::fleet`]) every replica has a worker for every
//! registered table, but a worker only runs while its replica owns the table; the others
//! stand by, showing the synced version recorded in Postgres.
//!
//! Invariants:
//! - A worker runs at most one sync at a time, and the per-table advisory lock in Postgres
//!   keeps other processes out too. In a fleet, runs are fenced by the replica's ownership
//!   lock as well ([`lakesync_postgres::fleet::check_owner`]).
//! - At most `max_concurrent_runs` runs are in flight per process, so its Postgres sessions
//!   are bounded however many tables it owns.
//! - Shutdown never interrupts a run by choice: workers stop taking work and in-flight runs
//!   finish (commit) within the grace period; past it they are dropped, which closes their
//!   connections and rolls their transaction back. Either way the table stays consistent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lakesync_core::{Classify, ErrorClass, SyncMode, Version};
use lakesync_delta::{DeltaError, DeltaTable};
use lakesync_ingest::{IngestSpec, IngestStatus, StartFrom};
use lakesync_postgres::state::{self, RunMode};
use lakesync_postgres::PgConfig;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{check_unique, ConfigError, TableMode, TableSpec};
use crate::{sync, EngineError, Progress, SyncOutcome};

/// How a failed run is followed up: the one place that decides retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again after this delay.
    After(Duration),
    /// Stop until someone asks for a sync (the error needs a human).
    Park,
}

/// The follow-up for the `failures`-th consecutive failure of class `class`.
pub fn retry_policy(class: ErrorClass, failures: u32) -> Retry {
    match class {
        // Connection loss, a restarting server, an unreadable source, another process holding
        // the table: these heal by themselves. Back off 1 s, 2 s, 4 s ... up to a minute.
        ErrorClass::Transient | ErrorClass::Busy => {
            Retry::After(Duration::from_secs(1 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60)))
        }
        // Bad data, schema, config or a bug: retrying gives the same answer.
        ErrorClass::Schema | ErrorClass::Config | ErrorClass::Data | ErrorClass::Internal => Retry::Park,
    }
}

/// What the daemon knows about a table right now.
#[derive(Debug, Clone, Default)]
pub struct LiveStatus {
    /// A run is in progress.
    pub running: bool,
    /// Last Delta version whose data the table holds (as of the last run or start-up).
    pub synced_version: Option<Version>,
    /// Newest Delta version seen in the source log.
    pub source_version: Option<Version>,
    /// When the oldest not yet synced commit was written (ms since the epoch).
    pub pending_since_ms: Option<i64>,
    /// Failed runs in a row.
    pub consecutive_failures: u32,
    /// The error that parked the table (it waits for a sync request).
    pub parked: Option<String>,
    /// The last failure's message, until a run succeeds.
    pub last_error: Option<String>,
    /// When the next retry of a transiently failed run is due.
    pub retry_at: Option<Instant>,
    /// In a fleet: the replica that owns the table (`None` while nobody does).
    pub owner: Option<String>,
}

impl LiveStatus {
    /// The table's state, named like Lakebase synced tables.
    pub fn state(&self, mode: &TableMode) -> &'static str {
        let failing = self.parked.is_some() || self.consecutive_failures > 0;
        match (self.synced_version, failing, self.running) {
            (None, true, _) => state::states::OFFLINE_FAILED,
            (None, false, _) => state::states::PROVISIONING,
            (Some(_), true, _) => state::states::ONLINE_FAILED,
            (Some(_), false, _) if matches!(mode, TableMode::Continuous { .. }) => "ONLINE_CONTINUOUS_UPDATE",
            (Some(_), false, true) => state::states::UPDATING,
            (Some(_), false, false) => state::states::ONLINE,
        }
    }

    /// Versions the table is behind its source.
    pub fn lag_versions(&self) -> Option<u64> {
        match (self.source_version, self.synced_version) {
            (Some(s), Some(t)) => Some(s.saturating_sub(t)),
            (Some(s), None) => Some(s + 1),
            _ => None,
        }
    }

    /// Seconds the oldest unsynced commit has been waiting (0 when caught up).
    pub fn lag_seconds(&self) -> f64 {
        match (self.lag_versions(), self.pending_since_ms) {
            (Some(n), Some(since)) if n > 0 => ((now_ms() - since) as f64 / 1000.0).max(0.0),
            _ => 0.0,
        }
    }
}

/// Upper bounds (seconds) of the run-duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// Counters since the process started, for `/metrics`.
#[derive(Debug, Default)]
pub struct TableMetrics {
    /// Rows inserted by runs.
    pub rows_inserted: AtomicU64,
    /// Rows updated by runs.
    pub rows_updated: AtomicU64,
    /// Rows deleted by runs.
    pub rows_deleted: AtomicU64,
    /// Runs that changed the table (snapshot or triggered).
    pub runs_applied: AtomicU64,
    /// Runs that found nothing to do.
    pub runs_noop: AtomicU64,
    /// Failed runs.
    pub runs_failed: AtomicU64,
    /// Run-duration histogram: cumulative counts per [`DURATION_BUCKETS`] bound.
    pub duration_buckets: [AtomicU64; DURATION_BUCKETS.len()],
    /// Sum of run durations, microseconds.
    pub duration_sum_micros: AtomicU64,
    /// Runs measured.
    pub duration_count: AtomicU64,
}

impl TableMetrics {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, bucket) in DURATION_BUCKETS.iter().zip(&self.duration_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.duration_sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.duration_count.fetch_add(1, Ordering::Relaxed);
    }
}

/// One synced table managed by the daemon.
#[derive(Debug)]
pub struct Worker {
    /// What to sync and how.
    pub spec: TableSpec,
    /// Counters for `/metrics`.
    pub metrics: TableMetrics,
    /// The running sync's progress.
    pub progress: Arc<Progress>,
    status: Mutex<LiveStatus>,
    wake: Notify,
    manual: std::sync::atomic::AtomicBool,
    stop: watch::Sender<bool>,
    /// Whether this process owns the table (always, outside a fleet).
    owned: watch::Sender<bool>,
    /// `true` while the worker stands by (no run in flight, none will start).
    idle: watch::Sender<bool>,
    /// Bumped to abandon the run in flight (the replica lost the table).
    cancel: watch::Sender<u64>,
    /// The table's ownership lock key in a fleet.
    pub owner_key: String,
}

impl Worker {
    /// A copy of the current status.
    pub fn status(&self) -> LiveStatus {
        self.status.lock().expect("status lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut LiveStatus)) {
        f(&mut self.status.lock().expect("status lock"))
    }

    /// Whether this process owns (runs) the table.
    pub fn owned(&self) -> bool {
        *self.owned.borrow()
    }
}

/// A worker and its task.
type Running = (Arc<Worker>, JoinHandle<()>);

/// An ingest and its task.
type RunningIngest = (Arc<IngestWorker>, Option<JoinHandle<()>>);

/// A Kafka ingest the daemon runs beside its tables (in a fleet, only while it owns it).
pub struct IngestWorker {
    pub spec: IngestSpec,
    pub status: Arc<IngestStatus>,
    /// The ingest's ownership lock key in a fleet.
    pub owner_key: String,
    /// Its registry entry's spec, when it came from the fleet's registry.
    pub config: Option<serde_json::Value>,
    /// In a fleet: the replica that runs it.
    pub owner: Mutex<Option<String>>,
    /// Stops the running ingest (it flushes first).
    stop: watch::Sender<bool>,
    /// An operator's reset of out-of-range positions for its next start, and when it was
    /// asked (it expires: a later gap must be seen again).
    reset: Mutex<Option<(StartFrom, Instant)>>,
}

/// How long an operator's reset waits for the ingest to start again before it lapses.
const RESET_LAPSES: Duration = Duration::from_secs(600);

/// Runs per process at once, unless configured (`[fleet] max_concurrent_runs`).
pub const DEFAULT_MAX_CONCURRENT_RUNS: usize = 8;

/// What a daemon in a fleet knows about its place in it.
pub struct FleetMember {
    /// This replica's id.
    pub replica: String,
    /// The coordinating session's backend pid, runs are fenced by (0 while disconnected).
    pub(crate) owner_pid: AtomicI32,
    /// The replica takes part in the fleet (for `/readyz`).
    pub(crate) ready: AtomicBool,
    /// Tells the coordinator to leave the fleet (after the workers stopped).
    pub(crate) leave: watch::Sender<bool>,
    pub(crate) task: Mutex<Option<JoinHandle<()>>>,
}

/// All synced tables and ingests of one process.
pub struct Daemon {
    postgres: PgConfig,
    workers: RwLock<BTreeMap<String, Running>>,
    ingests: RwLock<BTreeMap<String, RunningIngest>>,
    shutdown: watch::Sender<bool>,
    /// Bounds the runs in flight (and so the Postgres sessions they open).
    runs: Arc<Semaphore>,
    /// Set when the daemon joined a fleet ([`crate::fleet::join`]).
    pub(crate) fleet: OnceLock<Arc<FleetMember>>,
    /// When the API last added or removed each table here (see [`Daemon::touch`]).
    touched: Mutex<BTreeMap<String, Instant>>,
}

/// Why a table could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Invalid or conflicting table.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No table of that name.
    #[error("no synced table named {0:?}")]
    NotFound(String),
    /// Dropping the table's data failed.
    #[error(transparent)]
    Purge(#[from] EngineError),
    /// The daemon is shutting down.
    #[error("lakesync is shutting down")]
    ShuttingDown,
}

impl Daemon {
    /// A daemon writing to `postgres`, with no tables yet.
    pub fn new(postgres: PgConfig) -> Arc<Self> {
        Self::with_max_runs(postgres, DEFAULT_MAX_CONCURRENT_RUNS)
    }

    /// A daemon running at most `max_runs` syncs at once.
    pub fn with_max_runs(postgres: PgConfig, max_runs: usize) -> Arc<Self> {
        Arc::new(Self {
            postgres,
            workers: RwLock::new(BTreeMap::new()),
            ingests: RwLock::new(BTreeMap::new()),
            shutdown: watch::channel(false).0,
            runs: Arc::new(Semaphore::new(max_runs.max(1))),
            fleet: OnceLock::new(),
            touched: Mutex::new(BTreeMap::new()),
        })
    }

    /// This replica's place in its fleet, if it joined one.
    pub fn fleet(&self) -> Option<&Arc<FleetMember>> {
        self.fleet.get()
    }

    /// Ready to serve: outside a fleet always, in one while it takes part in it (and not
    /// shutting down).
    pub fn ready(&self) -> bool {
        !*self.shutdown.borrow() && self.fleet().is_none_or(|f| f.ready.load(Ordering::SeqCst))
    }

    /// The settings this process's sessions connect with (named after the replica in a fleet).
    pub fn session_config(&self) -> PgConfig {
        match self.fleet() {
            Some(f) => self.postgres.for_replica(&f.replica),
            None => self.postgres.clone(),
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// The Postgres connection settings.
    pub fn postgres(&self) -> &PgConfig {
        &self.postgres
    }

    /// Starts syncing `spec`. Fails if its name or target is taken.
    pub fn add(&self, spec: TableSpec) -> Result<Arc<Worker>, DaemonError> {
        if *self.shutdown.borrow() {
            return Err(DaemonError::ShuttingDown);
        }
        let mut workers = self.workers.write().expect("workers lock");
        addable(&workers, &spec)?;
        let fleet = self.fleet().cloned();
        let worker = Arc::new(Worker {
            owner_key: lakesync_postgres::fleet::table_owner_key(&spec.target),
            spec,
            metrics: TableMetrics::default(),
            progress: Arc::default(),
            status: Mutex::default(),
            wake: Notify::new(),
            manual: false.into(),
            stop: watch::channel(false).0,
            // Outside a fleet the process owns every table; in one, the coordinator decides.
            owned: watch::channel(fleet.is_none()).0,
            idle: watch::channel(true).0,
            cancel: watch::channel(0).0,
        });
        let env = WorkerEnv { postgres: self.session_config(), runs: self.runs.clone(), fleet };
        let task = tokio::spawn(run_worker(worker.clone(), env, self.shutdown.subscribe()));
        tracing::info!(table = %worker.spec.name, target = %worker.spec.target, mode = worker.spec.mode.as_str(), "syncing");
        workers.insert(worker.spec.name.clone(), (worker.clone(), task));
        Ok(worker)
    }

    /// Starts ingesting `spec`'s topic; it runs until shutdown, retrying transient failures
    /// itself (see [`lakesync_ingest::run`]) and stopping on the others (its status says why).
    pub fn add_ingest(&self, spec: IngestSpec) -> Result<Arc<IngestWorker>, DaemonError> {
        self.add_ingest_with(spec, None)
    }

    /// [`Daemon::add_ingest`], remembering the registry spec it was built from.
    pub(crate) fn add_ingest_with(
        &self,
        spec: IngestSpec,
        config: Option<serde_json::Value>,
    ) -> Result<Arc<IngestWorker>, DaemonError> {
        if *self.shutdown.borrow() {
            return Err(DaemonError::ShuttingDown);
        }
        let mut ingests = self.ingests.write().expect("ingests lock");
        if ingests.contains_key(&spec.name) {
            return Err(ConfigError::Invalid {
                scope: format!("ingest {}", spec.name),
                message: "the name is used by two ingests".into(),
            }
            .into());
        }
        let worker = Arc::new(IngestWorker {
            owner_key: lakesync_postgres::fleet::ingest_owner_key(&spec.name),
            config,
            spec,
            status: Arc::new(IngestStatus::new()),
            owner: Mutex::new(None),
            stop: watch::channel(false).0,
            reset: Mutex::new(None),
        });
        // In a fleet the ingest waits until the coordinator hands it to this replica.
        let task = self.fleet().is_none().then(|| start_ingest(&worker));
        ingests.insert(worker.spec.name.clone(), (worker.clone(), task));
        Ok(worker)
    }

    /// Starts the ingest of `key` on this replica (the coordinator claimed it).
    pub(crate) fn own_ingest(&self, key: &str) {
        let mut ingests = self.ingests.write().expect("ingests lock");
        if let Some((worker, task)) = ingests.values_mut().find(|(w, _)| w.owner_key == key) {
            // Not running here yet (an ingest that stopped on its own error stays stopped,
            // with its status saying why, as outside a fleet).
            if task.is_none() {
                worker.stop.send_replace(false);
                *task = Some(start_ingest(worker));
            }
        }
    }

    /// Stops the ingest of `key` (it flushes what it holds, up to `wait`).
    pub(crate) async fn disown_ingest(&self, key: &str, wait: Duration) {
        let running = {
            let mut ingests = self.ingests.write().expect("ingests lock");
            ingests.values_mut().find(|(w, _)| w.owner_key == key).and_then(|(w, t)| {
                w.stop.send_replace(true);
                t.take().map(|t| (w.clone(), t))
            })
        };
        if let Some((worker, mut task)) = running {
            if tokio::time::timeout(wait, &mut task).await.is_err() {
                tracing::warn!(ingest = %worker.spec.name, "ingest still flushing when handed over; its messages will be read again");
                task.abort();
            }
        }
    }

    /// The ingests this replica runs whose run ended on an error that needs a human (the
    /// ingest retries the others itself).
    pub(crate) fn failed_ingests(&self) -> Vec<Arc<IngestWorker>> {
        self.ingests
            .read()
            .expect("ingests lock")
            .values()
            .filter(|(w, t)| t.as_ref().is_some_and(|t| t.is_finished()) && w.status.get().state == "failed")
            .map(|(w, _)| w.clone())
            .collect()
    }

    /// Starts ingest `name` again here if its run ended on an error; `false` if there is no
    /// such ingest.
    pub(crate) fn restart_ingest_here(&self, name: &str) -> bool {
        let mut ingests = self.ingests.write().expect("ingests lock");
        let Some((worker, task)) = ingests.get_mut(name) else { return false };
        if task.as_ref().is_some_and(|t| t.is_finished()) {
            worker.stop.send_replace(false);
            *task = Some(start_ingest(worker));
        }
        true
    }

    /// Runs ingest `name` again after it stopped on an error that needs a human (fixed now):
    /// in a fleet every replica forgets that it failed there, and its owner, or the first
    /// replica to claim it, starts it. `false` if there is no such ingest.
    ///
    /// `reset` is the operator's choice for partitions whose recorded position is outside what
    /// they hold (see [`IngestSpec::reset_positions`]); it applies to the next start only.
    pub async fn restart_ingest(&self, name: &str, reset: Option<StartFrom>) -> Result<bool, DaemonError> {
        if self.ingest(name).is_none() {
            return Ok(false);
        }
        if self.fleet().is_none() {
            self.reset_ingest_positions(name, reset);
            return Ok(self.restart_ingest_here(name));
        }
        crate::fleet::request_restart(self, name, reset).await.map_err(EngineError::from)?;
        Ok(true)
    }

    /// Keeps `reset` for ingest `name`'s next start.
    pub(crate) fn reset_ingest_positions(&self, name: &str, reset: Option<StartFrom>) {
        if let (Some(worker), Some(to)) = (self.ingest(name), reset) {
            *worker.reset.lock().expect("reset lock") = Some((to, Instant::now()));
        }
    }

    /// Removes the ingest named `name`, telling it to stop; it flushes what it holds on its
    /// own (the returned task ends when it did).
    pub(crate) fn detach_ingest(&self, name: &str) -> Option<JoinHandle<()>> {
        let (worker, task) = self.ingests.write().expect("ingests lock").remove(name)?;
        worker.stop.send_replace(true);
        task
    }

    /// The ingests, by name.
    pub fn ingests(&self) -> Vec<Arc<IngestWorker>> {
        self.ingests.read().expect("ingests lock").values().map(|(w, _)| w.clone()).collect()
    }

    /// The ingest named `name`.
    pub fn ingest(&self, name: &str) -> Option<Arc<IngestWorker>> {
        self.ingests.read().expect("ingests lock").get(name).map(|(w, _)| w.clone())
    }

    /// The tables, by name.
    pub fn tables(&self) -> Vec<Arc<Worker>> {
        self.workers.read().expect("workers lock").values().map(|(w, _)| w.clone()).collect()
    }

    /// The table named `name`.
    pub fn table(&self, name: &str) -> Option<Arc<Worker>> {
        self.workers.read().expect("workers lock").get(name).map(|(w, _)| w.clone())
    }

    /// Asks for a run of `name` wherever it runs: here, or (in a fleet) on the replica that
    /// owns it, through Postgres. `false` if there is no such table.
    pub async fn request_sync(&self, name: &str) -> Result<bool, DaemonError> {
        let Some(worker) = self.table(name) else { return Ok(false) };
        if self.fleet().is_none() || worker.owned() {
            return Ok(self.sync_now(name));
        }
        crate::fleet::request_sync(self, name).await.map_err(EngineError::from)?;
        Ok(true)
    }

    /// Asks the table to sync now (un-parking it). `false` if there is no such table.
    pub fn sync_now(&self, name: &str) -> bool {
        match self.table(name) {
            Some(w) => {
                w.manual.store(true, Ordering::SeqCst);
                w.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Stops syncing `name` (an in-flight run finishes first) and, with `purge`, drops its
    /// Postgres table and its sync state.
    pub async fn remove(&self, name: &str, purge: bool) -> Result<(), DaemonError> {
        if purge {
            // Refuse before stopping anything when the table is not lakesync's to drop
            // (`forget` checks again under the table's lock).
            let target = self.table(name).ok_or_else(|| DaemonError::NotFound(name.into()))?.spec.target.clone();
            let client = self.postgres.connect().await.map_err(EngineError::from)?;
            let owner = state::current_ownership(&client, &target).await.map_err(EngineError::from)?;
            if let state::Ownership::Foreign { .. } = owner {
                return Err(EngineError::from(state::not_owned(
                    &target,
                    owner,
                    "refusing to drop it (nothing was changed, the table is still synced); remove it without purge_data to stop syncing and keep the table",
                ))
                .into());
            }
        }
        let worker = self.table(name).ok_or_else(|| DaemonError::NotFound(name.into()))?;
        // In a fleet every replica stops it (the owner first finishes its run in flight).
        self.touch(name);
        crate::fleet::deregister(self, name).await?;
        if let Some((_, task)) = self.detach_local(name) {
            // Again: a view read before the registry forgot it must not bring it back.
            self.touch(name);
            let _ = task.await;
        }
        if purge {
            let client = self.postgres.connect().await.map_err(EngineError::from)?;
            state::forget(&client, &worker.spec.target, Duration::from_secs(30)).await.map_err(EngineError::from)?;
            tracing::info!(table = %worker.spec.name, target = %worker.spec.target, "stopped and dropped");
        } else {
            tracing::info!(table = %worker.spec.name, "stopped");
        }
        Ok(())
    }

    /// Records that the API just added or removed `name` here, so a coordinator acting on a
    /// view of the registry read before that leaves it alone.
    pub(crate) fn touch(&self, name: &str) {
        self.touched.lock().expect("touched lock").insert(name.to_string(), Instant::now());
    }

    /// Whether the API added or removed `name` here after `since`.
    pub(crate) fn touched_since(&self, name: &str, since: Instant) -> bool {
        self.touched.lock().expect("touched lock").get(name).is_some_and(|t| *t >= since)
    }

    /// Checks that `spec` could be added (its name and target are free here).
    pub(crate) fn check_addable(&self, spec: &TableSpec) -> Result<(), DaemonError> {
        Ok(addable(&self.workers.read().expect("workers lock"), spec)?)
    }

    /// Forgets `name` in this process and tells its worker to stop; the returned task ends
    /// once its run in flight did.
    pub(crate) fn detach_local(&self, name: &str) -> Option<(Arc<Worker>, JoinHandle<()>)> {
        let (worker, task) = self.workers.write().expect("workers lock").remove(name)?;
        worker.stop.send_replace(true);
        worker.wake.notify_one();
        Some((worker, task))
    }

    /// Stops taking work and waits up to `grace` for in-flight runs; runs still going after
    /// that are dropped (their transactions roll back).
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.send_replace(true);
        let tasks: Vec<(String, JoinHandle<()>)> = {
            let mut workers = self.workers.write().expect("workers lock");
            std::mem::take(&mut *workers)
                .into_iter()
                .map(|(n, (w, t))| {
                    w.wake.notify_one();
                    (n, t)
                })
                .collect()
        };
        let ingests: Vec<(String, JoinHandle<()>)> = {
            let mut ingests = self.ingests.write().expect("ingests lock");
            std::mem::take(&mut *ingests)
                .into_iter()
                .filter_map(|(n, (w, t))| {
                    w.stop.send_replace(true);
                    t.map(|t| (n, t))
                })
                .collect()
        };
        let deadline = tokio::time::Instant::now() + grace;
        // Ingests flush what they hold as one last commit.
        for (name, mut task) in ingests {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(ingest = %name, "ingest still flushing after the grace period; its messages will be read again");
                task.abort();
            }
        }
        for (name, mut task) in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(table = %name, "run still in progress after the grace period; rolling it back");
                task.abort();
            }
        }
        // Nothing runs any more: hand every table over at once.
        if let Some(fleet) = self.fleet() {
            fleet.leave.send_replace(true);
            let task = fleet.task.lock().expect("fleet task").take();
            if let Some(mut task) = task {
                if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
                    task.abort();
                }
            }
        }
    }

    /// The table whose ownership key is `key`.
    pub(crate) fn table_by_key(&self, key: &str) -> Option<Arc<Worker>> {
        self.workers.read().expect("workers lock").values().find(|(w, _)| w.owner_key == key).map(|(w, _)| w.clone())
    }

    /// Hands `worker`'s table to this process (the coordinator claimed it).
    pub(crate) fn own(&self, worker: &Worker) {
        worker.owned.send_replace(true);
        worker.wake.notify_one();
    }

    /// Stops running `worker`'s table, waiting up to `wait` for its run in flight to finish
    /// and then abandoning it (its commit would fail the ownership fence anyway).
    pub(crate) async fn disown(&self, worker: &Worker, wait: Duration) {
        worker.owned.send_replace(false);
        worker.wake.notify_one();
        let mut idle = worker.idle.subscribe();
        if tokio::time::timeout(wait, idle.wait_for(|i| *i)).await.is_err() {
            tracing::warn!(table = %worker.spec.name, "run still in flight when handing the table over; abandoning it");
            worker.cancel.send_modify(|n| *n += 1);
            let _ = tokio::time::timeout(Duration::from_secs(5), idle.wait_for(|i| *i)).await;
        }
    }

    /// The coordinating session is gone, and with it every ownership lock: stop everything
    /// at once (runs in flight are abandoned; they could not commit anyway).
    pub(crate) fn fence_all(&self) {
        for w in self.tables() {
            if w.owned() {
                w.owned.send_replace(false);
                w.cancel.send_modify(|n| *n += 1);
                w.wake.notify_one();
            }
        }
        let mut ingests = self.ingests.write().expect("ingests lock");
        for (w, t) in ingests.values_mut() {
            w.stop.send_replace(true);
            if let Some(t) = t.take() {
                t.abort();
            }
        }
    }

    /// Records the owner of every table and ingest, and the synced version of the tables this
    /// process does not run (from the fleet's view).
    pub(crate) fn observe(
        &self,
        owners: &BTreeMap<String, Option<String>>,
        synced: &BTreeMap<String, Option<Version>>,
    ) {
        for w in self.tables() {
            let owner = owners.get(&w.owner_key).cloned().flatten();
            let version = synced.get(&w.spec.target.to_string()).copied().flatten();
            let owned = w.owned();
            w.update(|s| {
                s.owner = owner;
                if !owned {
                    s.synced_version = version.or(s.synced_version);
                    s.running = false;
                }
            });
        }
        for w in self.ingests() {
            *w.owner.lock().expect("owner lock") = owners.get(&w.owner_key).cloned().flatten();
        }
    }
}

/// Whether `spec` can join `workers`: names and targets stay unique.
fn addable(workers: &BTreeMap<String, Running>, spec: &TableSpec) -> Result<(), ConfigError> {
    let mut specs: Vec<TableSpec> = workers.values().map(|(w, _)| w.spec.clone()).collect();
    specs.push(spec.clone());
    check_unique(&specs)
}

/// Starts an ingest's task; it runs until its stop signal, retrying transient failures
/// itself (see [`lakesync_ingest::run`]) and stopping on the others (its status says why).
fn start_ingest(worker: &IngestWorker) -> JoinHandle<()> {
    let mut spec = worker.spec.clone();
    let reset = worker.reset.lock().expect("reset lock").take();
    spec.reset_positions = reset.filter(|(_, at)| at.elapsed() < RESET_LAPSES).map(|(to, _)| to);
    let run = lakesync_ingest::run(spec, worker.status.clone(), worker.stop.subscribe());
    let name = worker.spec.name.clone();
    tracing::info!(ingest = %worker.spec.name, topic = %worker.spec.topic, table = %worker.spec.table, "ingesting");
    tokio::spawn(async move {
        // The error is on the worker's status (and logged by the ingest).
        if run.await.is_err() {
            tracing::warn!(ingest = name, "ingest stopped on an error that needs a human");
        }
    })
}

/// What a worker needs besides its table.
struct WorkerEnv {
    /// The settings its sessions connect with.
    postgres: PgConfig,
    /// The process's run permits.
    runs: Arc<Semaphore>,
    /// Its replica's place in the fleet.
    fleet: Option<Arc<FleetMember>>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// How often idle snapshot/triggered tables look at their source for status and lag (and
/// continuous ones list their log, besides the HEAD of each poll).
const HEAD_REFRESH: Duration = Duration::from_secs(10);
/// A continuous table that just synced commits looks again this often (one HEAD each) ...
const HOT_POLL: Duration = Duration::from_millis(50);
/// ... for this long after its last commit, then at its `poll_interval` again.
const HOT_WINDOW: Duration = Duration::from_secs(30);

async fn run_worker(worker: Arc<Worker>, env: WorkerEnv, mut shutdown: watch::Receiver<bool>) {
    let spec = &worker.spec;
    let postgres = &env.postgres;
    let mut stop = worker.stop.subscribe();
    let mut owned = worker.owned.subscribe();
    let mut source: Option<DeltaTable> = None;
    let mut due = None;
    let mut next_head_check = Instant::now();
    // Until when a continuous table polls at HOT_POLL (commits are arriving).
    let mut hot_until: Option<Instant> = None;
    loop {
        if *shutdown.borrow() || *stop.borrow() {
            worker.idle.send_replace(true);
            return;
        }
        if !*owned.borrow_and_update() {
            // Standing by: another replica owns the table (or nobody yet).
            worker.idle.send_replace(true);
            tokio::select! {
                _ = owned.changed() => {}
                _ = shutdown.changed() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        if *worker.idle.borrow() {
            // Just became the owner: start from what Postgres records. Snapshot and triggered
            // tables run once at start; continuous ones whenever commits land.
            worker.idle.send_replace(false);
            {
                // A session of its own, counted against the process's runs like one.
                let _permit = env.runs.acquire().await;
                load_synced_version(&worker, postgres).await;
            }
            source = None;
            due = Some(Instant::now());
            next_head_check = Instant::now();
        }
        let manual = worker.manual.swap(false, Ordering::SeqCst);
        if manual {
            worker.update(|s| {
                s.parked = None;
                s.retry_at = None;
            });
        }
        let mut status = worker.status();
        let now = Instant::now();
        let retry_due = status.retry_at.is_some_and(|r| now >= r);
        if source.is_none() && status.parked.is_none() && (manual || retry_due || status.retry_at.is_none()) {
            match DeltaTable::open_with(&spec.source, &spec.storage) {
                Ok(s) => source = Some(s),
                Err(e) => {
                    record_failure(&worker, &EngineError::from(e));
                    status = worker.status();
                }
            }
        }
        let mut run = manual || (retry_due && status.parked.is_none());
        if let (Some(source), None) = (&source, &status.parked) {
            let due_now = due.is_some_and(|d| now >= d);
            let continuous = matches!(spec.mode, TableMode::Continuous { .. });
            if continuous || due_now || now >= next_head_check {
                let thorough = now >= next_head_check;
                let pending = refresh_head(&worker, source, thorough).await;
                if thorough {
                    next_head_check = now + HEAD_REFRESH;
                }
                // Commits arrived: a stream may be running, look often for a while.
                if pending && continuous {
                    hot_until = Some(now + HOT_WINDOW);
                }
                let waiting_to_retry = status.retry_at.is_some_and(|r| now < r);
                run |= !waiting_to_retry && (pending || status.synced_version.is_none()) && (continuous || due_now);
                if due_now {
                    due = next_due(&spec.mode);
                }
            }
        }
        if run && source.is_some() {
            let mode = match spec.mode {
                // Scheduled snapshots only run when the source moved (checked above); a
                // request always re-snapshots.
                TableMode::Snapshot { .. } => SyncMode::Snapshot,
                _ => SyncMode::Auto,
            };
            execute(&worker, &env, mode).await;
            if manual || retry_due {
                due = next_due(&spec.mode);
            }
            continue; // look again at once: more commits may have landed during the run
        }
        let status = worker.status();
        let mut wait = match spec.mode {
            TableMode::Continuous { poll } if hot_until.is_some_and(|h| Instant::now() < h) => poll.min(HOT_POLL),
            TableMode::Continuous { poll } => poll,
            _ => HEAD_REFRESH,
        };
        // Without an open source only a retry can make progress (a past `due` would spin).
        for at in [due.filter(|_| source.is_some()), status.retry_at].into_iter().flatten() {
            wait = wait.min(at.saturating_duration_since(Instant::now()));
        }
        if status.parked.is_some() {
            wait = Duration::from_secs(3600);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = worker.wake.notified() => {}
            _ = shutdown.changed() => {}
            _ = stop.changed() => {}
            _ = owned.changed() => {}
        }
    }
}

/// When a scheduled table runs next (from now).
fn next_due(mode: &TableMode) -> Option<Instant> {
    match mode {
        TableMode::Snapshot { schedule } | TableMode::Triggered { schedule } => {
            schedule.as_ref().map(|s| Instant::now() + s.delay_after(now_ms() as f64 / 1000.0))
        }
        TableMode::Continuous { .. } => None,
    }
}

/// Reads the synced version recorded in Postgres, so status is right before the first run.
async fn load_synced_version(worker: &Worker, postgres: &PgConfig) {
    let loaded = async {
        let client = postgres.connect().await?;
        if !state::exists(&client).await? {
            return Ok(None);
        }
        state::load(&client, &worker.spec.target).await
    }
    .await;
    match loaded {
        Ok(row) => worker.update(|s| s.synced_version = row.and_then(|r| r.synced_version)),
        Err(e) => tracing::warn!(table = %worker.spec.name, error = %e, "could not read the sync state yet"),
    }
}

/// Looks for commits after the synced version; `true` when there are some. One HEAD of the
/// next commit's file first (what an idle table costs its store per poll); only when it
/// exists, a listing for the newest version and the lag.
///
/// A `thorough` look lists even when the HEAD finds nothing: the commit after a long-synced
/// version may have been cleaned up from the log while newer ones exist.
async fn refresh_head(worker: &Worker, source: &DeltaTable, thorough: bool) -> bool {
    let synced = worker.status().synced_version;
    if synced.is_some() && !thorough {
        let next = {
            let source = source.clone();
            tokio::task::spawn_blocking(move || source.next_commit(synced)).await
        };
        if let Ok(Ok(None)) = next {
            worker.update(|s| {
                s.pending_since_ms = None;
                s.source_version = s.synced_version.max(s.source_version);
            });
            return false;
        }
        // There is a next commit, or the HEAD failed: the listing says more (or surfaces it).
    }
    let listed = {
        let source = source.clone();
        tokio::task::spawn_blocking(move || source.commits_after(synced)).await
    };
    match listed {
        Ok(Ok(new)) => {
            worker.update(|s| {
                s.pending_since_ms = new.map(|n| n.first_modified_ms);
                s.source_version = new.map(|n| n.latest).or(s.synced_version.max(s.source_version));
            });
            new.is_some()
        }
        Ok(Err(e)) => {
            tracing::debug!(table = %worker.spec.name, error = %e, "could not list the source log");
            // Let a run surface (and classify) the error.
            true
        }
        Err(_) => false,
    }
}

async fn execute(worker: &Worker, env: &WorkerEnv, mode: SyncMode) {
    let spec = &worker.spec;
    let postgres = &env.postgres;
    let Ok(_permit) = env.runs.clone().acquire_owned().await else { return };
    // In a fleet the run is fenced by the coordinating session that holds the table.
    let fence = match &env.fleet {
        Some(f) => match f.owner_pid.load(Ordering::SeqCst) {
            0 => return, // no coordinating session right now: nothing is owned
            owner_pid => Some(lakesync_postgres::fleet::Fence { owner_pid }),
        },
        None => None,
    };
    let mut cancel = worker.cancel.subscribe();
    let mut req = spec.request(postgres, mode, None, Duration::from_secs(5));
    req.progress = worker.progress.clone();
    req.fence = fence;
    worker.update(|s| s.running = true);
    let started = Instant::now();
    // The run is a task of its own, so a panic inside it (in the kernel, say) becomes this
    // table's failed run, retried with backoff, instead of a worker gone quiet. Dropping
    // this future (shutdown past the grace period) stops the run too.
    let name = spec.name.clone();
    let run = tokio::spawn(async move {
        if std::env::var_os(PANIC_FAILPOINT).is_some_and(|t| t == name.as_str()) {
            panic!("failpoint {PANIC_FAILPOINT} hit for table {name}");
        }
        sync(&req).await
    });
    let _stop_on_drop = AbortOnDrop(run.abort_handle());
    let joined = tokio::select! {
        joined = run => joined,
        _ = cancel.changed() => {
            // Dropping the task rolls its transaction back; the new owner starts over.
            tracing::warn!(table = %spec.name, "abandoned the run in flight: this replica no longer owns the table");
            worker.update(|s| s.running = false);
            return;
        }
    };
    let result = match joined {
        Ok(result) => result,
        Err(e) => {
            let e = EngineError::Panicked(panic_message(e));
            // The run could not record its failure itself; record it for `status` and the
            // API (best effort: the next run marks the run row abandoned either way).
            let recorded = async {
                let client = postgres.connect().await?;
                state::fail_run(&client, &spec.target, None, &e.to_string()).await
            };
            if let Err(record) = recorded.await {
                tracing::warn!(table = %spec.name, error = %record, "could not record the failed run");
            }
            Err(e)
        }
    };
    let elapsed = started.elapsed();
    worker.metrics.observe(elapsed);
    match result {
        Ok(out) => {
            tracing::debug!(table = %spec.name, mode = out.mode.as_str(), timings = %out.timings.display(), "run timings");
            succeeded(worker, &out)
        }
        Err(e) => record_failure(worker, &e),
    }
}

/// Test-only failpoint: a run of the table named in this environment variable panics, as a
/// bug in the kernel would (the supervision test sets it; nothing else should).
pub const PANIC_FAILPOINT: &str = "LAKESYNC_FAILPOINT_PANIC";

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The message a panicked task panicked with.
fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return "the run was cancelled".into();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The class that decides the retry. A source that was readable before (the table has a
/// synced version) and now is not is far more likely an unmounted volume or a storage outage
/// than a wrong path: retry it rather than park it.
fn retry_class(e: &EngineError, synced_before: bool) -> ErrorClass {
    match e {
        // A bug, but maybe one that a state it does not meet again set off: back off and
        // start over, with the panic's message on the table meanwhile.
        EngineError::Panicked(_) => ErrorClass::Transient,
        EngineError::Delta(DeltaError::NotATable { .. } | DeltaError::Open { .. }) if synced_before => {
            ErrorClass::Transient
        }
        _ => e.class(),
    }
}

fn record_failure(worker: &Worker, e: &EngineError) {
    worker.metrics.runs_failed.fetch_add(1, Ordering::Relaxed);
    let status = worker.status();
    let failures = status.consecutive_failures + 1;
    match retry_policy(retry_class(e, status.synced_version.is_some()), failures) {
        Retry::After(delay) => {
            tracing::warn!(table = %worker.spec.name, error = %e, retry_in = ?delay, "sync failed; retrying");
            worker.update(|s| {
                s.consecutive_failures = failures;
                s.last_error = Some(e.to_string());
                s.retry_at = Some(Instant::now() + delay);
            });
        }
        Retry::Park => park(worker, e),
    }
    worker.update(|s| s.running = false);
}

fn succeeded(worker: &Worker, out: &SyncOutcome) {
    let m = &worker.metrics;
    m.rows_inserted.fetch_add(out.counts.inserted, Ordering::Relaxed);
    m.rows_updated.fetch_add(out.counts.updated, Ordering::Relaxed);
    m.rows_deleted.fetch_add(out.counts.deleted, Ordering::Relaxed);
    if out.mode == RunMode::Noop {
        m.runs_noop.fetch_add(1, Ordering::Relaxed);
    } else {
        m.runs_applied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            table = %worker.spec.name,
            version = out.to_version,
            mode = out.mode.as_str(),
            inserted = out.counts.inserted,
            updated = out.counts.updated,
            deleted = out.counts.deleted,
            seconds = out.duration.as_secs_f64(),
            "synced"
        );
    }
    worker.update(|s| {
        s.running = false;
        s.synced_version = Some(out.to_version);
        s.source_version = s.source_version.max(Some(out.to_version));
        if s.source_version == s.synced_version {
            s.pending_since_ms = None;
        }
        s.consecutive_failures = 0;
        s.parked = None;
        s.last_error = None;
        s.retry_at = None;
    });
}

fn park(worker: &Worker, e: &EngineError) {
    tracing::error!(table = %worker.spec.name, class = e.class().as_str(), error = %e, "sync failed; the table waits for a fix and a sync request");
    worker.update(|s| {
        s.consecutive_failures += 1;
        s.parked = Some(e.to_string());
        s.last_error = Some(e.to_string());
        s.retry_at = None;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_back_off_to_a_minute_and_the_rest_park_the_table() {
        let delays: Vec<Retry> = (1..=9).map(|n| retry_policy(ErrorClass::Transient, n)).collect();
        let secs: Vec<u64> = delays
            .iter()
            .map(|r| match r {
                Retry::After(d) => d.as_secs(),
                Retry::Park => 0,
            })
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_policy(ErrorClass::Busy, 1), Retry::After(Duration::from_secs(1)));
        for class in [ErrorClass::Data, ErrorClass::Schema, ErrorClass::Config, ErrorClass::Internal] {
            assert_eq!(retry_policy(class, 1), Retry::Park);
        }
    }

    #[test]
    fn a_source_that_vanishes_after_syncing_is_retried_but_a_wrong_path_parks() {
        let gone = EngineError::from(DeltaTable::open("/nonexistent/lakesync/table").unwrap_err());
        assert_eq!(retry_class(&gone, false), ErrorClass::Config);
        assert_eq!(retry_class(&gone, true), ErrorClass::Transient);
    }

    #[test]
    fn the_state_reflects_failures_runs_and_mode() {
        let triggered = TableMode::Triggered { schedule: None };
        let continuous = TableMode::Continuous { poll: Duration::from_millis(100) };
        let mut s = LiveStatus::default();
        assert_eq!(s.state(&triggered), "PROVISIONING_INITIAL_SNAPSHOT");
        s.consecutive_failures = 1;
        assert_eq!(s.state(&triggered), "OFFLINE_FAILED");
        s.synced_version = Some(3);
        assert_eq!(s.state(&triggered), "ONLINE_PIPELINE_FAILED");
        s.consecutive_failures = 0;
        assert_eq!(s.state(&triggered), "ONLINE_NO_PENDING_UPDATE");
        assert_eq!(s.state(&continuous), "ONLINE_CONTINUOUS_UPDATE");
        s.running = true;
        assert_eq!(s.state(&triggered), "ONLINE_TRIGGERED_UPDATE");
        s.source_version = Some(5);
        assert_eq!(s.lag_versions(), Some(2));
    }
}
