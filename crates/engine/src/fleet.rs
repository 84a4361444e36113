//! A fleet of `lakesync serve` replicas on one Postgres: the registry of synced tables and
//! ingests lives in schema `lakesync`, and each replica's coordinator spreads its entries
//! over the live replicas.
//!
//! Every heartbeat the coordinator, on its own session:
//! 1. renews this replica's heartbeat (a replica that cannot within half a lease stops every
//!    table at once: it must have stopped before the others may take over);
//! 2. ends the sessions of replicas whose heartbeat is older than the lease (hung, or cut
//!    off without their sessions ending), which frees their ownership locks;
//! 3. reads the registry with who holds what, brings the daemon's tables and ingests in line
//!    with it, and runs [`lakesync_core::fleet::plan`]: release what is beyond this replica's
//!    quota (after its run in flight), claim free entries up to it;
//! 4. claims, beyond its quota, an entry that stayed free for a whole lease (the replicas
//!    whose share it is cannot run it: a variable or file they lack, an ingest that failed
//!    there, which they release and do not take back until restarted through the API).
//!
//! Ownership is the session advisory lock of [`lakesync_postgres::fleet`]; runs are fenced
//! by it. `NOTIFY` wakes the coordinators early (a registry change, a replica leaving) and
//! routes `POST .../sync` to the owner.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lakesync_core::Version;
use lakesync_ingest::StartFrom;
use lakesync_postgres::fleet::{self as registry, Coordinator, Entry, FilePolicy, Holder, Kind, Origin};
use lakesync_postgres::{PgConfig, PgError};
use tokio::sync::watch;

use crate::config::{ConfigError, FleetConfig, IngestConfig, TableConfig, TableSpec};
use crate::daemon::{Daemon, DaemonError, FleetMember};
use crate::EngineError;

/// How this replica takes part.
#[derive(Debug, Clone, Default)]
pub struct JoinOptions {
    /// Where its API listens, recorded for operators (`lakesync.replicas.address`).
    pub address: Option<String>,
    /// What entries added through the API (on any replica) may reach: this replica runs
    /// only those its own `[api.policy]` allows too.
    pub policy: crate::policy::ApiPolicy,
}

/// The registry entry of a synced table.
pub fn table_entry(spec: &TableSpec) -> Entry {
    Entry {
        kind: Kind::Table,
        name: spec.name.clone(),
        spec: serde_json::to_value(&spec.config).expect("a table config serializes"),
        owner_key: registry::table_owner_key(&spec.target),
    }
}

/// The registry entry of an ingest.
pub fn ingest_entry(config: &IngestConfig, name: &str) -> Entry {
    Entry {
        kind: Kind::Ingest,
        name: name.to_string(),
        spec: serde_json::to_value(config).expect("an ingest config serializes"),
        owner_key: registry::ingest_owner_key(name),
    }
}

/// Makes `daemon` a replica of the fleet on its Postgres: records the config file's tables and
/// ingests in the registry (as `fleet.file_policy` says) and starts the coordinator, which
/// adds every registered table and ingest to the daemon and claims this replica's share.
pub async fn join(
    daemon: &Arc<Daemon>,
    fleet: &FleetConfig,
    tables: &[TableSpec],
    ingests: &[(IngestConfig, String)],
    options: JoinOptions,
) -> Result<(), EngineError> {
    let member = Arc::new(FleetMember {
        replica: fleet.replica_id.clone(),
        owner_pid: AtomicI32::new(0),
        ready: AtomicBool::new(false),
        leave: watch::channel(false).0,
        task: Mutex::new(None),
    });
    if daemon.fleet.set(member.clone()).is_err() {
        return Err(EngineError::Internal("the daemon joined a fleet twice".into()));
    }
    let config = daemon.session_config();
    let mut client = config.connect().await?;
    let table_entries: Vec<Entry> = tables.iter().map(table_entry).collect();
    let ingest_entries: Vec<Entry> = ingests.iter().map(|(c, name)| ingest_entry(c, name)).collect();
    let mut changed = registry::reconcile(&mut client, Kind::Table, &table_entries, fleet.file_policy).await?;
    changed |= registry::reconcile(&mut client, Kind::Ingest, &ingest_entries, fleet.file_policy).await?;
    if changed {
        registry::notify(&client, "registry").await?;
    }
    tracing::info!(
        replica = %fleet.replica_id,
        lease = ?fleet.lease,
        on_conflict = match fleet.file_policy { FilePolicy::FileWins => "file", FilePolicy::RegistryWins => "registry" },
        "joining the fleet"
    );
    let coordinator = Coordinate {
        daemon: Arc::downgrade(daemon),
        member: member.clone(),
        config,
        settings: fleet.clone(),
        address: options.address,
        policy: options.policy,
        session: None,
        last_renewed: Instant::now(),
        held: BTreeSet::new(),
        refused: BTreeSet::new(),
        failed: BTreeSet::new(),
        free_since: BTreeMap::new(),
        rescued: BTreeSet::new(),
    };
    let task = tokio::spawn(coordinator.run());
    *member.task.lock().expect("fleet task") = Some(task);
    Ok(())
}

/// Adds a synced table through the API: in a fleet it is recorded in the registry (so every
/// replica runs it and it survives restarts) and this replica shows it at once.
pub async fn register(daemon: &Arc<Daemon>, spec: TableSpec) -> Result<Arc<crate::Worker>, DaemonError> {
    if daemon.fleet().is_some() {
        // Check locally first (name and target unique), then claim the name in the registry,
        // then show it here (unless this replica's coordinator was quicker).
        daemon.check_addable(&spec)?;
        let mut client = daemon.session_config().connect().await.map_err(EngineError::from)?;
        let entry = table_entry(&spec);
        daemon.touch(&entry.name);
        if !registry::put(&mut client, &entry, Origin::Api).await.map_err(EngineError::from)? {
            return Err(ConfigError::Invalid {
                scope: format!("table {}", entry.name),
                message: "the name is used by another synced table in the fleet's registry".into(),
            }
            .into());
        }
        registry::notify(&client, "registry").await.map_err(EngineError::from)?;
        let name = entry.name.clone();
        let added = match daemon.add(spec) {
            Ok(w) => Ok(w),
            Err(e) => daemon.table(&name).ok_or(e),
        };
        // Again: a view read before the registry had it must not take it away.
        daemon.touch(&name);
        return added;
    }
    daemon.add(spec)
}

/// Removes a table from the registry (in a fleet) so that no replica syncs it any more.
pub(crate) async fn deregister(daemon: &Daemon, name: &str) -> Result<(), DaemonError> {
    if daemon.fleet().is_none() {
        return Ok(());
    }
    let client = daemon.session_config().connect().await.map_err(EngineError::from)?;
    registry::remove(&client, Kind::Table, name).await.map_err(EngineError::from)?;
    registry::notify(&client, "registry").await.map_err(EngineError::from)?;
    Ok(())
}

/// The name the API's changes to ingest `name` are recorded under (see [`Daemon::touch`]),
/// apart from a table's of the same name.
fn ingest_touch(name: &str) -> String {
    format!("ingest:{name}")
}

/// Adds an ingest through the API: to the registry (in a fleet), so that every replica knows
/// it, one runs it and it survives restarts, then here. `config` is the entry as written
/// (`spec` its validated form); its password, if any, is named by variable, never stored.
pub async fn register_ingest(
    daemon: &Arc<Daemon>,
    config: &IngestConfig,
    spec: lakesync_ingest::IngestSpec,
) -> Result<Arc<crate::IngestWorker>, DaemonError> {
    let name = spec.name.clone();
    let taken = || -> DaemonError {
        ConfigError::Invalid { scope: format!("ingest {name}"), message: "the name is used by another ingest".into() }
            .into()
    };
    if daemon.ingest(&name).is_some() {
        return Err(taken());
    }
    if daemon.fleet().is_none() {
        return daemon.add_ingest(spec);
    }
    let mut client = daemon.session_config().connect().await.map_err(EngineError::from)?;
    let entry = ingest_entry(config, &name);
    daemon.touch(&ingest_touch(&name));
    if !registry::put(&mut client, &entry, Origin::Api).await.map_err(EngineError::from)? {
        return Err(taken());
    }
    registry::notify(&client, "registry").await.map_err(EngineError::from)?;
    let added = match daemon.add_ingest_with(spec, Some(entry.spec.clone())) {
        Ok(w) => Ok(w),
        // This replica's coordinator was quicker.
        Err(e) => daemon.ingest(&name).ok_or(e),
    };
    // Again: a view read before the registry had it must not take it away.
    daemon.touch(&ingest_touch(&name));
    added
}

/// Removes an ingest through the API: from the registry (in a fleet), so that no replica
/// runs it any more, then here, after it flushed what it held.
pub async fn remove_ingest(daemon: &Daemon, name: &str) -> Result<(), DaemonError> {
    if daemon.ingest(name).is_none() {
        return Err(DaemonError::NotFound(name.into()));
    }
    daemon.touch(&ingest_touch(name));
    if daemon.fleet().is_some() {
        let client = daemon.session_config().connect().await.map_err(EngineError::from)?;
        registry::remove(&client, Kind::Ingest, name).await.map_err(EngineError::from)?;
        registry::notify(&client, "registry").await.map_err(EngineError::from)?;
    }
    if let Some(task) = daemon.detach_ingest(name) {
        daemon.touch(&ingest_touch(name));
        let _ = task.await;
    }
    tracing::info!(ingest = %name, "stopped");
    Ok(())
}

/// Asks whichever replica owns table `name` for a run.
pub(crate) async fn request_sync(daemon: &Daemon, name: &str) -> Result<(), PgError> {
    let client = daemon.session_config().connect().await?;
    registry::notify(&client, &format!("sync:{name}")).await
}

/// Asks every replica to run ingest `name` again (see [`Daemon::restart_ingest`]).
pub(crate) async fn request_restart(daemon: &Daemon, name: &str, reset: Option<StartFrom>) -> Result<(), PgError> {
    let client = daemon.session_config().connect().await?;
    // Ingest names never hold '?' (the config refuses them).
    let reset = reset.map(|to| format!("?reset={}", to.as_str())).unwrap_or_default();
    registry::notify(&client, &format!("restart-ingest:{name}{reset}")).await
}

/// The coordinator's state.
struct Coordinate {
    daemon: std::sync::Weak<Daemon>,
    member: Arc<FleetMember>,
    config: PgConfig,
    settings: FleetConfig,
    address: Option<String>,
    policy: crate::policy::ApiPolicy,
    session: Option<Coordinator>,
    /// When the heartbeat was last renewed.
    last_renewed: Instant,
    /// Ownership keys this session holds.
    held: BTreeSet<String>,
    /// Registry entries this replica cannot run (invalid here), logged once.
    refused: BTreeSet<(Kind, String)>,
    /// Ingests that stopped here on an error that needs a human: released so that another
    /// replica can try (its variables or files may differ), and not claimed here again until
    /// restarted through the API.
    failed: BTreeSet<String>,
    /// Since when each entry this replica can run has been free.
    free_since: BTreeMap<String, Instant>,
    /// Entries this replica took beyond its quota because they stayed free for a lease (the
    /// replicas whose share they are cannot run them): kept out of its quota's count.
    rescued: BTreeSet<String>,
}

/// What a tick read from Postgres.
struct View {
    /// When the registry was read (changes the API made here later win over it).
    read_at: Instant,
    live: Vec<String>,
    items: Vec<registry::Item>,
    synced: BTreeMap<String, Option<Version>>,
}

impl Coordinate {
    async fn run(mut self) {
        let mut leave = self.member.leave.subscribe();
        loop {
            if *leave.borrow() {
                break;
            }
            self.tick().await;
            let wait = self.settings.heartbeat;
            let woke = async {
                match self.session.as_mut() {
                    Some(s) => s.notifications().recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = leave.changed() => {}
                // `None`: the session ended; the next tick notices and reconnects.
                n = woke => if let Some(n) = n {
                    self.on_notification(n.payload())
                },
            }
        }
        if let Some(session) = self.session.take() {
            match tokio::time::timeout(Duration::from_secs(5), session.leave()).await {
                Ok(Ok(())) => {
                    tracing::info!(replica = %self.member.replica, "left the fleet; the other replicas take over")
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not leave the fleet cleanly; the others take over when the session ends")
                }
                Err(_) => tracing::warn!("leaving the fleet timed out; the others take over when the session ends"),
            }
        }
    }

    /// A sync request reaches the owner's worker; a restart request makes every replica try
    /// the ingest again. (Any notification also ends the wait, so a registry change or a
    /// replica leaving is acted on at once, not at the next beat.)
    fn on_notification(&mut self, payload: &str) {
        let Some(daemon) = self.daemon.upgrade() else { return };
        if let Some(name) = payload.strip_prefix("sync:") {
            if daemon.table(name).is_some_and(|w| w.owned()) {
                daemon.sync_now(name);
            }
        } else if let Some(request) = payload.strip_prefix("restart-ingest:") {
            let (name, reset) = match request.split_once("?reset=") {
                Some((name, to)) => (name, StartFrom::parse(to).ok()),
                None => (request, None),
            };
            // Every replica keeps the reset: whichever starts the ingest next applies it.
            daemon.reset_ingest_positions(name, reset);
            if self.failed.remove(name) {
                tracing::info!(ingest = %name, "restart requested: this replica may run it again");
            }
            // Running here (its failure not yet handed over): start it again at once.
            if daemon.ingest(name).is_some_and(|w| self.held.contains(&w.owner_key)) {
                daemon.restart_ingest_here(name);
            }
        }
    }

    /// Fences this replica: its session (and with it every lock) is gone or unusable.
    fn lose_everything(&mut self, daemon: &Daemon, why: &str) {
        if self.session.take().is_some() || !self.held.is_empty() {
            tracing::warn!(replica = %self.member.replica, why, "lost the coordinating session; stopped every table until it reconnects");
        }
        self.member.owner_pid.store(0, Ordering::SeqCst);
        // Not ready until it takes part again (its reads would likely fail meanwhile too).
        self.member.ready.store(false, Ordering::SeqCst);
        self.held.clear();
        daemon.fence_all();
    }

    async fn tick(&mut self) {
        let Some(daemon) = self.daemon.upgrade() else { return };
        // Every statement of a tick must finish well within the lease: past half of it this
        // replica stops, and the others take over only after all of it.
        let budget = self.settings.lease / 4;
        if self.session.as_ref().is_none_or(|s| s.is_closed()) {
            if self.session.is_some() {
                self.lose_everything(&daemon, "the session closed");
            }
            match tokio::time::timeout(budget, Coordinator::connect(&self.config, &self.member.replica)).await {
                Ok(Ok(s)) => {
                    self.member.owner_pid.store(s.pid(), Ordering::SeqCst);
                    self.session = Some(s);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot reach Postgres to coordinate; retrying");
                    return;
                }
                Err(_) => {
                    tracing::warn!("connecting to Postgres to coordinate timed out; retrying");
                    return;
                }
            }
        }
        let view = tokio::time::timeout(budget, self.read_view()).await;
        let view = match view {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                if matches!(e, PgError::ReplicaIdInUse { .. }) {
                    tracing::error!(error = %e, "cannot join the fleet");
                    self.lose_everything(&daemon, "the replica id is in use");
                    return;
                }
                tracing::warn!(error = %e, "coordinating with the fleet failed");
                if self.last_renewed.elapsed() > self.settings.lease / 2 {
                    self.lose_everything(&daemon, "the heartbeat could not be renewed within half a lease");
                } else if self.session.as_ref().is_some_and(|s| s.is_closed()) {
                    self.lose_everything(&daemon, "the session closed");
                }
                return;
            }
            Err(_) => {
                tracing::warn!("coordinating with the fleet timed out");
                if self.last_renewed.elapsed() > self.settings.lease / 2 {
                    self.lose_everything(&daemon, "the heartbeat could not be renewed within half a lease");
                }
                return;
            }
        };
        if daemon.is_shutting_down() {
            // Keep the lease (runs in flight finish within the grace period) but take nothing.
            return;
        }
        if let Err(e) = tokio::time::timeout(budget, self.apply(&daemon, view)).await.unwrap_or(Ok(())) {
            tracing::warn!(error = %e, "rebalancing failed; retrying at the next heartbeat");
        }
        self.member.ready.store(true, Ordering::SeqCst);
    }

    async fn read_view(&mut self) -> Result<View, PgError> {
        let session = self.session.as_ref().expect("connected");
        session.heartbeat(self.address.as_deref()).await?;
        self.last_renewed = Instant::now();
        for gone in session.end_expired(self.settings.lease).await? {
            tracing::warn!(replica = %gone, "ended the sessions of a replica whose lease expired; taking over its tables");
        }
        let live = session.live(self.settings.lease).await?;
        let read_at = Instant::now();
        let items = session.items().await?;
        let synced = session.synced_versions().await?.into_iter().map(|(t, v)| (t.to_string(), v)).collect();
        Ok(View { read_at, live, items, synced })
    }

    /// Brings the daemon in line with the registry, then releases and claims.
    async fn apply(&mut self, daemon: &Arc<Daemon>, view: View) -> Result<(), PgError> {
        let me = self.member.replica.clone();
        let wait = self.settings.lease / 8;
        // An ingest that stopped here on an error that needs a human is handed over: another
        // replica may have the variable, file or network access this one lacks.
        for w in daemon.failed_ingests() {
            if self.held.contains(&w.owner_key) && self.failed.insert(w.spec.name.clone()) {
                tracing::warn!(
                    ingest = %w.spec.name,
                    error = w.status.get().last_error.as_deref().unwrap_or("?"),
                    "the ingest failed here; released so that another replica can try (POST /api/v1/ingests/{{name}}/restart to try here again)"
                );
                daemon.disown_ingest(&w.owner_key, Duration::ZERO).await;
            }
        }
        // Entries this replica can run (valid here); the others it neither claims nor shows.
        let mut runnable: Vec<(String, Option<String>)> = Vec::new();
        // Entries shown here but not claimed (they failed here): their owners, for the API.
        let mut shown: Vec<(String, Option<String>)> = Vec::new();
        let mut registered_tables = BTreeSet::new();
        let mut registered_ingests = BTreeSet::new();
        for item in &view.items {
            let e = &item.entry;
            let ok = match e.kind {
                // Removed through this replica's API after the view was read: leave it gone.
                Kind::Table if daemon.touched_since(&e.name, view.read_at) => false,
                Kind::Table => {
                    registered_tables.insert(e.name.clone());
                    self.ensure_table(daemon, e, item.origin).await
                }
                Kind::Ingest if daemon.touched_since(&ingest_touch(&e.name), view.read_at) => false,
                Kind::Ingest => {
                    registered_ingests.insert(e.name.clone());
                    self.ensure_ingest(daemon, e, item.origin).await
                }
            };
            let holder = match &item.holder {
                Holder::Free => None,
                Holder::Replica(id) => Some(id.clone()),
                Holder::Unknown => Some(String::from("?")),
            };
            // Failed here: shown, never claimed here again until restarted.
            if ok && e.kind == Kind::Ingest && self.failed.contains(&e.name) {
                shown.push((e.owner_key.clone(), holder));
            } else if ok {
                runnable.push((e.owner_key.clone(), holder));
            }
        }
        // Entries removed from the registry stop here (their locks are released below). Their
        // runs in flight end on their own: a tick never waits for a run, or the heartbeat
        // would lapse (and a run that outlives the lock cannot commit).
        for w in daemon.tables() {
            // (A table the API added here after the view was read is not in it yet.)
            if !registered_tables.contains(&w.spec.name) && !daemon.touched_since(&w.spec.name, view.read_at) {
                daemon.detach_local(&w.spec.name);
            }
        }
        for w in daemon.ingests() {
            if !registered_ingests.contains(&w.spec.name)
                && !daemon.touched_since(&ingest_touch(&w.spec.name), view.read_at)
            {
                daemon.detach_ingest(&w.spec.name);
            }
        }
        let session = self.session.as_ref().expect("connected");
        // Locks this session holds for entries that are gone or that it no longer runs.
        let keys: BTreeSet<&String> = runnable.iter().map(|(k, _)| k).collect();
        for key in self.held.clone() {
            if !keys.contains(&key) {
                session.release(&key).await?;
                self.held.remove(&key);
            }
        }
        // What the view says this replica holds is what the daemon runs: a claim that
        // failed half-way or a lost session must not leave them apart.
        for (key, holder) in &runnable {
            let mine = holder.as_deref() == Some(me.as_str());
            if mine {
                self.held.insert(key.clone());
                self.own(daemon, key);
            } else if self.held.contains(key) {
                self.held.remove(key);
            }
        }
        // An entry that stays free for a whole lease has no replica that both can run it and
        // has room for it (those whose share it is refuse it: a variable or file they lack,
        // an ingest that failed there): take it beyond the quota, outside the quota's count.
        let now = Instant::now();
        self.free_since.retain(|k, _| runnable.iter().any(|(key, h)| key == k && h.is_none()));
        for (key, holder) in &runnable {
            if holder.is_none() {
                self.free_since.entry(key.clone()).or_insert(now);
            }
        }
        self.rescued.retain(|k| self.held.contains(k));
        let planned: Vec<(String, Option<String>)> =
            runnable.iter().filter(|(k, _)| !self.rescued.contains(k)).cloned().collect();
        let moves = lakesync_core::fleet::plan(&me, &view.live, &planned);
        // Hand over at once, all together: each waits for its run in flight (up to `wait`,
        // then abandons it) before its lock is released.
        let mut stopping = tokio::task::JoinSet::new();
        for w in daemon.tables() {
            if w.owned() && (!self.held.contains(&w.owner_key) || moves.release.contains(&w.owner_key)) {
                let daemon = daemon.clone();
                stopping.spawn(async move { daemon.disown(&w, wait).await });
            }
        }
        for key in &moves.release {
            if daemon.table_by_key(key).is_none() {
                let (daemon, key) = (daemon.clone(), key.clone());
                stopping.spawn(async move { daemon.disown_ingest(&key, wait).await });
            }
        }
        while stopping.join_next().await.is_some() {}
        for key in &moves.release {
            session.release(key).await?;
            self.held.remove(key);
            tracing::info!(replica = %me, item = %key, "handed over");
        }
        let mut owners: BTreeMap<String, Option<String>> =
            runnable.iter().chain(&shown).map(|(k, h)| (k.clone(), h.clone().filter(|h| h != "?"))).collect();
        for (k, _) in runnable.iter().filter(|(k, _)| moves.release.contains(k)) {
            owners.insert(k.clone(), None);
        }
        let mut got = 0;
        for key in &moves.candidates {
            if got == moves.want {
                break;
            }
            if session.claim(key).await? {
                got += 1;
                self.held.insert(key.clone());
                self.own(daemon, key);
                owners.insert(key.clone(), Some(me.clone()));
                tracing::info!(replica = %me, item = %key, "took over");
            }
        }
        let orphans: Vec<String> = self
            .free_since
            .iter()
            .filter(|(k, since)| since.elapsed() >= self.settings.lease && owners.get(*k) == Some(&None))
            .map(|(k, _)| k.clone())
            .collect();
        for key in orphans {
            if session.claim(&key).await? {
                self.held.insert(key.clone());
                self.rescued.insert(key.clone());
                self.own(daemon, &key);
                owners.insert(key.clone(), Some(me.clone()));
                tracing::info!(replica = %me, item = %key, "took over an entry that stayed free for a lease (beyond this replica's share)");
            }
        }
        daemon.observe(&owners, &view.synced);
        Ok(())
    }

    fn own(&self, daemon: &Daemon, key: &str) {
        match daemon.table_by_key(key) {
            Some(w) if !w.owned() => daemon.own(&w),
            Some(_) => {}
            None => daemon.own_ingest(key),
        }
    }

    /// Makes sure the daemon runs registry table `e` with its registered spec; `false` when
    /// this replica cannot (the spec is invalid here, say an environment variable it names is
    /// missing).
    async fn ensure_table(&mut self, daemon: &Arc<Daemon>, e: &Entry, origin: Origin) -> bool {
        let config: TableConfig = match serde_json::from_value(e.spec.clone()) {
            Ok(c) => c,
            Err(err) => return self.refuse(e, &err.to_string()),
        };
        // An entry another replica's API accepted runs here only if this replica's policy
        // allows it too.
        if let (Origin::Api, Err(err)) = (origin, self.policy.check_table(&config)) {
            return self.refuse(e, &err.to_string());
        }
        if let Some(w) = daemon.table(&e.name) {
            if w.spec.config == config {
                return true;
            }
            // The spec changed (another replica started with a different file): restart it
            // (the new worker's run waits for the old one's through the table's run lock).
            let was_owned = w.owned();
            daemon.detach_local(&e.name);
            let added = config.validate().map_err(DaemonError::from).and_then(|spec| daemon.add(spec));
            return match added {
                Ok(w) => {
                    if was_owned {
                        daemon.own(&w);
                    }
                    true
                }
                Err(err) => self.refuse(e, &err.to_string()),
            };
        }
        let spec = match config.validate() {
            Ok(s) => s,
            Err(err) => return self.refuse(e, &err.to_string()),
        };
        match daemon.add(spec) {
            Ok(_) => {
                self.refused.remove(&(e.kind, e.name.clone()));
                true
            }
            Err(err) => self.refuse(e, &err.to_string()),
        }
    }

    async fn ensure_ingest(&mut self, daemon: &Arc<Daemon>, e: &Entry, origin: Origin) -> bool {
        let config: IngestConfig = match serde_json::from_value(e.spec.clone()) {
            Ok(c) => c,
            Err(err) => return self.refuse(e, &err.to_string()),
        };
        if let (Origin::Api, Err(err)) = (origin, self.policy.check_ingest(&config)) {
            return self.refuse(e, &err.to_string());
        }
        if let Some(w) = daemon.ingest(&e.name) {
            if w.config.as_ref() == Some(&e.spec) {
                return true;
            }
            let _stopping = daemon.detach_ingest(&e.name);
        }
        let spec = match config.validate_with(&|name| std::env::var(name).ok()) {
            Ok(s) => s,
            Err(err) => return self.refuse(e, &err.to_string()),
        };
        match daemon.add_ingest_with(spec, Some(e.spec.clone())) {
            Ok(_) => true,
            Err(err) => self.refuse(e, &err.to_string()),
        }
    }

    fn refuse(&mut self, e: &Entry, why: &str) -> bool {
        if self.refused.insert((e.kind, e.name.clone())) {
            tracing::error!(kind = e.kind.as_str(), name = %e.name, error = why, "this replica cannot run a registered entry; the others may");
        }
        false
    }
}
