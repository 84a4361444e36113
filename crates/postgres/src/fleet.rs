//! The fleet's shared state in Postgres (schema `lakesync`): the registry of synced tables
//! and ingests, the replicas with their heartbeats, and ownership.
//!
//! Ownership is a session advisory lock on a per-item key, held by the owning replica's
//! coordinating session ([`Coordinator`]): Postgres releases it the moment that session ends,
//! and no other session can take it meanwhile. Runs are fenced by it: a run carries its
//! coordinating session's pid ([`Fence`]) and [`check_owner`] refuses the run when it takes
//! the table's lock and the checkpoint in the committing transaction, unless that session
//! still holds the table's lock and the registry still has the table. Together with the
//! per-table run lock and the compare-and-set of the synced version, no two replicas ever
//! apply to one table.
//!
//! A replica that is connected but hung stops renewing its heartbeat; once its lease expires
//! the others end its sessions ([`Coordinator::end_expired`]), which frees its locks.

use std::time::Duration;

use lakesync_core::{TableName, Version};
use tokio_postgres::{Client, GenericClient, Notification};

use crate::state::{self, lock_key};
use crate::{PgConfig, PgError};

/// The `LISTEN`/`NOTIFY` channel replicas talk on: `sync:<name>` asks the owner of a synced
/// table for a run, `registry` says the registry changed, `left:<replica>` that a replica
/// handed its items over.
pub const CHANNEL: &str = "lakesync_fleet";

const SCOPE: &str = "lakesync fleet";

/// Replica ids name sessions and history rows: 1 to 63 characters out of letters, digits,
/// `.`, `_` and `-` (a Kubernetes pod name fits).
pub fn valid_replica_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 63 {
        return Err(format!("replica id {id:?} must be 1 to 63 characters long"));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("replica id {id:?} has {c:?}; use letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// The `application_name` of a replica's sessions, how the others find and end them when its
/// lease expires: `lakesync/<id>` when that fits in the 63 bytes Postgres keeps (it truncates
/// longer names silently), else a prefix of the id and a hash of the whole of it, so that a
/// Kubernetes pod name of any length is never mistaken for, nor lost beside, another.
pub fn session_name(replica: &str) -> String {
    const MAX: usize = 63;
    let full = format!("lakesync/{replica}");
    if full.len() <= MAX {
        return full;
    }
    let tail = format!("~{:016x}", crate::ddl::fnv1a(replica.bytes()));
    // Replica ids are ASCII (see `valid_replica_id`), so any cut is a character boundary.
    format!("{}{tail}", &full[..MAX - tail.len()])
}

/// What a registry entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A synced table (`[[tables]]`, `POST /api/v1/synced-tables`).
    Table,
    /// A Kafka ingest (`[[ingest]]`).
    Ingest,
}

impl Kind {
    /// The name stored in the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Table => "table",
            Kind::Ingest => "ingest",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "table" => Some(Kind::Table),
            "ingest" => Some(Kind::Ingest),
            _ => None,
        }
    }
}

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A replica's config file.
    File,
    /// The management API.
    Api,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::File => "file",
            Origin::Api => "api",
        }
    }

    /// Anything not written by a file counts as the API's (the stricter of the two).
    fn parse(s: &str) -> Self {
        if s == "file" {
            Origin::File
        } else {
            Origin::Api
        }
    }
}

/// Which side wins when the config file and the registry disagree at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilePolicy {
    /// Declarative (the default): every entry of the file exists with the file's spec
    /// (replacing an API entry of that name), and file entries no longer in the file are
    /// removed. Entries added through the API stay.
    FileWins,
    /// The file only seeds: its entries are added when the registry never had them; what the
    /// API changed or removed stays that way.
    RegistryWins,
}

/// The ownership lock key of a synced table (by target, the thing that must have one writer).
pub fn table_owner_key(table: &TableName) -> String {
    format!("lakesync:owner:{}", lock_key(table))
}

/// The ownership lock key of an ingest.
pub fn ingest_owner_key(name: &str) -> String {
    format!("lakesync:owner:ingest:{name}")
}

/// A registry entry as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Table or ingest.
    pub kind: Kind,
    /// Its name in the API.
    pub name: String,
    /// The entry as in the config file (secrets only ever by environment-variable name).
    pub spec: serde_json::Value,
    /// Its ownership lock key ([`table_owner_key`], [`ingest_owner_key`]).
    pub owner_key: String,
}

/// Who holds an item's ownership lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nobody: the item is free to claim.
    Free,
    /// A registered replica.
    Replica(String),
    /// A session that is not a registered replica (say, one whose row was cleaned up).
    Unknown,
}

/// A registry entry with its current holder.
#[derive(Debug, Clone)]
pub struct Item {
    /// The entry.
    pub entry: Entry,
    /// Who holds it.
    pub holder: Holder,
    /// Where it came from.
    pub origin: Origin,
}

fn q(action: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    PgError::query(SCOPE, action)
}

/// Brings the registry in line with a config file's entries of `kind`, as `policy` says,
/// serialized against other replicas starting at the same time. Returns whether anything
/// changed.
pub async fn reconcile(client: &mut Client, kind: Kind, file: &[Entry], policy: FilePolicy) -> Result<bool, PgError> {
    state::ensure_schema(client).await?;
    let tx = client.transaction().await.map_err(q("reconcile the registry"))?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('lakesync:registry', 0))", &[])
        .await
        .map_err(q("lock the registry"))?;
    let mut changed = 0;
    for e in file {
        changed += match policy {
            FilePolicy::FileWins => tx
                .execute(
                    "INSERT INTO lakesync.registry (kind, name, spec, origin, owner_key) VALUES ($1, $2, $3, 'file', $4) \
                     ON CONFLICT (kind, name) DO UPDATE SET spec = EXCLUDED.spec, origin = 'file', \
                     owner_key = EXCLUDED.owner_key, updated_at = clock_timestamp(), removed_at = NULL \
                     WHERE (registry.spec, registry.origin, registry.owner_key, registry.removed_at) \
                     IS DISTINCT FROM (EXCLUDED.spec, 'file', EXCLUDED.owner_key, NULL::timestamptz)",
                    &[&kind.as_str(), &e.name, &e.spec, &e.owner_key],
                )
                .await
                .map_err(q("write the registry"))?,
            FilePolicy::RegistryWins => tx
                .execute(
                    "INSERT INTO lakesync.registry (kind, name, spec, origin, owner_key) VALUES ($1, $2, $3, 'file', $4) \
                     ON CONFLICT (kind, name) DO NOTHING",
                    &[&kind.as_str(), &e.name, &e.spec, &e.owner_key],
                )
                .await
                .map_err(q("write the registry"))?,
        };
    }
    if policy == FilePolicy::FileWins {
        let names: Vec<&str> = file.iter().map(|e| e.name.as_str()).collect();
        changed += tx
            .execute(
                "UPDATE lakesync.registry SET removed_at = clock_timestamp(), updated_at = clock_timestamp() \
                 WHERE kind = $1 AND origin = 'file' AND removed_at IS NULL AND NOT (name = ANY($2))",
                &[&kind.as_str(), &names],
            )
            .await
            .map_err(q("write the registry"))?;
    }
    tx.commit().await.map_err(q("commit the registry"))?;
    Ok(changed > 0)
}

/// Adds an entry through the API. `false` (nothing written) when a live entry has that name.
pub async fn put(client: &mut Client, entry: &Entry, origin: Origin) -> Result<bool, PgError> {
    state::ensure_schema(client).await?;
    let n = client
        .execute(
            "INSERT INTO lakesync.registry (kind, name, spec, origin, owner_key) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (kind, name) DO UPDATE SET spec = EXCLUDED.spec, origin = EXCLUDED.origin, \
             owner_key = EXCLUDED.owner_key, created_at = clock_timestamp(), updated_at = clock_timestamp(), removed_at = NULL \
             WHERE registry.removed_at IS NOT NULL",
            &[&entry.kind.as_str(), &entry.name, &entry.spec, &origin.as_str(), &entry.owner_key],
        )
        .await
        .map_err(q("add to the registry"))?;
    Ok(n == 1)
}

/// Removes an entry (kept as a tombstone, so a seeding file does not bring it back). `false`
/// when there was no live entry of that name.
pub async fn remove(client: &impl GenericClient, kind: Kind, name: &str) -> Result<bool, PgError> {
    let n = client
        .execute(
            "UPDATE lakesync.registry SET removed_at = clock_timestamp(), updated_at = clock_timestamp() \
             WHERE kind = $1 AND name = $2 AND removed_at IS NULL",
            &[&kind.as_str(), &name],
        )
        .await
        .map_err(q("remove from the registry"))?;
    Ok(n == 1)
}

/// Sends `payload` to every replica listening on [`CHANNEL`].
pub async fn notify(client: &impl GenericClient, payload: &str) -> Result<(), PgError> {
    client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await.map_err(q("notify the fleet"))?;
    Ok(())
}

/// What a fleet replica's run is fenced by: the backend pid of the replica's coordinating
/// session, which must hold the table's ownership lock. It travels with the run (in the
/// request, not as a session setting a connection pooler could drop), so a fenced run can
/// never pass for an unfenced one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The coordinating session's backend pid.
    pub owner_pid: i32,
}

/// The fence: fails with [`PgError::NotOwner`] unless `fence`'s coordinating session holds
/// `table`'s ownership lock and the registry still has a live entry for the table (a table
/// removed or purged through any replica is never written again, even by a run that started
/// before its owner noticed). Checked when a run takes the table's lock, before it writes
/// anything, and in every committing transaction.
pub async fn check_owner(tx: &impl GenericClient, table: &TableName, fence: Fence) -> Result<(), PgError> {
    let key = table_owner_key(table);
    let owned: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.pid = $2 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid = ((k.k >> 32) & 4294967295)::oid AND l.objid = (k.k & 4294967295)::oid) \
             AND EXISTS (SELECT 1 FROM lakesync.registry r WHERE r.kind = 'table' AND r.owner_key = $1 \
               AND r.removed_at IS NULL) \
             FROM (SELECT hashtextextended($1, 0) AS k) k",
            &[&key, &fence.owner_pid],
        )
        .await
        .map_err(PgError::query(table, "check that this replica owns the table"))?
        .get(0);
    if owned {
        Ok(())
    } else {
        Err(PgError::NotOwner { table: table.to_string() })
    }
}

/// Every live registry entry with who holds it (read on any session: operators and the
/// fleet benchmark use it too).
pub async fn items(client: &impl GenericClient) -> Result<Vec<Item>, PgError> {
    let rows = client
        .query(
            "WITH items AS (SELECT kind, name, spec, owner_key, origin, hashtextextended(owner_key, 0) AS k \
               FROM lakesync.registry WHERE removed_at IS NULL), \
             held AS (SELECT l.pid, l.classid, l.objid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
               AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())) \
             SELECT i.kind, i.name, i.spec, i.owner_key, h.pid IS NOT NULL, r.replica_id, i.origin FROM items i \
             LEFT JOIN held h ON h.classid = ((i.k >> 32) & 4294967295)::oid AND h.objid = (i.k & 4294967295)::oid \
             LEFT JOIN lakesync.replicas r ON r.pid = h.pid \
             ORDER BY i.kind, i.name",
            &[],
        )
        .await
        .map_err(q("read the registry"))?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let kind = Kind::parse(r.get(0))?;
            let holder = match (r.get::<_, bool>(4), r.get::<_, Option<String>>(5)) {
                (false, _) => Holder::Free,
                (true, Some(id)) => Holder::Replica(id),
                (true, None) => Holder::Unknown,
            };
            Some(Item {
                entry: Entry { kind, name: r.get(1), spec: r.get(2), owner_key: r.get(3) },
                holder,
                origin: Origin::parse(r.get(6)),
            })
        })
        .collect())
}

/// One replica's coordinating session: it renews the replica's heartbeat, holds the
/// ownership locks of everything the replica owns and listens on [`CHANNEL`].
pub struct Coordinator {
    client: Client,
    replica: String,
    pid: i32,
    notifications: tokio::sync::mpsc::UnboundedReceiver<Notification>,
}

impl Coordinator {
    /// Connects as `replica` (with `config` made by [`PgConfig::for_replica`]), creating the
    /// state schema if needed, and listens on [`CHANNEL`].
    pub async fn connect(config: &PgConfig, replica: &str) -> Result<Self, PgError> {
        let (mut client, notifications) = config.connect_listening().await?;
        state::ensure_schema(&mut client).await?;
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(q("listen for the fleet"))?;
        let pid = client.query_one("SELECT pg_backend_pid()", &[]).await.map_err(q("read the session id"))?.get(0);
        Ok(Self { client, replica: replica.to_string(), pid, notifications })
    }

    /// The session's backend pid (what runs are fenced by).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the session is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Notifications received on [`CHANNEL`].
    pub fn notifications(&mut self) -> &mut tokio::sync::mpsc::UnboundedReceiver<Notification> {
        &mut self.notifications
    }

    /// Registers or renews this replica (`address`: where its API listens, for operators).
    /// Fails with [`PgError::ReplicaIdInUse`] while another live session has this id.
    pub async fn heartbeat(&self, address: Option<&str>) -> Result<(), PgError> {
        let renewed = self
            .client
            .query_opt(
                "INSERT INTO lakesync.replicas AS r (replica_id, pid, address, build, started_at, heartbeat_at, session_name) \
                 VALUES ($1, pg_backend_pid(), $2, $3, clock_timestamp(), clock_timestamp(), $4) \
                 ON CONFLICT (replica_id) DO UPDATE SET pid = EXCLUDED.pid, address = EXCLUDED.address, \
                 build = EXCLUDED.build, heartbeat_at = clock_timestamp(), session_name = EXCLUDED.session_name, \
                 started_at = CASE WHEN r.pid = EXCLUDED.pid THEN r.started_at ELSE EXCLUDED.started_at END \
                 WHERE r.pid = EXCLUDED.pid OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid) \
                 RETURNING 1",
                &[&self.replica, &address, &env!("CARGO_PKG_VERSION"), &session_name(&self.replica)],
            )
            .await
            .map_err(q("renew the replica's heartbeat"))?;
        match renewed {
            Some(_) => Ok(()),
            None => Err(PgError::ReplicaIdInUse { replica: self.replica.clone() }),
        }
    }

    /// Ends every session of the other replicas whose heartbeat is older than `lease` (they
    /// are hung or cut off), found by their [`session_name`], which releases their locks;
    /// forgets replicas gone for an hour.
    /// Only sessions opened before that last heartbeat are ended: a replica restarting under
    /// the same id is not mistaken for its hung predecessor. Only sessions this role may end
    /// (its own role's, or any non-superuser's with `pg_signal_backend`), so a replica running
    /// as another role never fails the tick; its locks then go when its sessions end.
    /// Returns the replicas whose sessions were ended.
    pub async fn end_expired(&self, lease: Duration) -> Result<Vec<String>, PgError> {
        let rows = self
            .client
            .query(
                "SELECT DISTINCT r.replica_id, pg_terminate_backend(a.pid) FROM lakesync.replicas r \
                 JOIN pg_stat_activity a ON a.application_name = coalesce(r.session_name, 'lakesync/' || r.replica_id) \
                   AND a.datname = current_database() AND a.backend_start < r.heartbeat_at \
                   AND (pg_has_role(a.usesysid, 'MEMBER') OR (pg_has_role('pg_signal_backend', 'MEMBER') \
                     AND NOT coalesce((SELECT rolsuper FROM pg_roles WHERE oid = a.usesysid), true))) \
                 WHERE r.replica_id <> $1 AND r.heartbeat_at < clock_timestamp() - make_interval(secs => $2)",
                &[&self.replica, &lease.as_secs_f64()],
            )
            .await
            .map_err(q("end the sessions of replicas whose lease expired"))?;
        self.client
            .execute(
                "DELETE FROM lakesync.replicas r WHERE r.heartbeat_at < clock_timestamp() - interval '1 hour' \
                 AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid)",
                &[],
            )
            .await
            .map_err(q("forget replicas gone for an hour"))?;
        Ok(rows.into_iter().map(|r| r.get::<_, String>(0)).collect())
    }

    /// The live replicas: heartbeat within `lease` and coordinating session open.
    pub async fn live(&self, lease: Duration) -> Result<Vec<String>, PgError> {
        let rows = self
            .client
            .query(
                "SELECT replica_id FROM lakesync.replicas r \
                 WHERE r.heartbeat_at >= clock_timestamp() - make_interval(secs => $1) \
                 AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid) ORDER BY replica_id",
                &[&lease.as_secs_f64()],
            )
            .await
            .map_err(q("list the live replicas"))?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Every live registry entry with who holds it.
    pub async fn items(&self) -> Result<Vec<Item>, PgError> {
        items(&self.client).await
    }

    /// The synced version of every synced table (for replicas that do not own them).
    pub async fn synced_versions(&self) -> Result<Vec<(TableName, Option<Version>)>, PgError> {
        let rows = self
            .client
            .query("SELECT target_schema, target_table, synced_version FROM lakesync.synced_tables", &[])
            .await
            .map_err(q("read the synced versions"))?;
        Ok(rows
            .into_iter()
            .map(|r| (TableName { schema: r.get(0), name: r.get(1) }, r.get::<_, Option<i64>>(2).map(|v| v as Version)))
            .collect())
    }

    /// Tries to take the ownership lock `key`; `true` when this session now holds it.
    pub async fn claim(&self, key: &str) -> Result<bool, PgError> {
        Ok(self
            .client
            .query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key])
            .await
            .map_err(q("claim an item"))?
            .get(0))
    }

    /// Releases the ownership lock `key`.
    pub async fn release(&self, key: &str) -> Result<(), PgError> {
        self.client
            .execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", &[&key])
            .await
            .map_err(q("release an item"))?;
        Ok(())
    }

    /// Leaves the fleet at once: releases every lock, removes the replica's row and tells the
    /// others, so they take over without waiting for a lease.
    pub async fn leave(self) -> Result<(), PgError> {
        self.client.batch_execute("SELECT pg_advisory_unlock_all()").await.map_err(q("release every item"))?;
        self.client
            .execute("DELETE FROM lakesync.replicas WHERE replica_id = $1 AND pid = pg_backend_pid()", &[&self.replica])
            .await
            .map_err(q("deregister the replica"))?;
        notify(&self.client, &format!("left:{}", self.replica)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_ids_are_names_a_session_and_a_pod_can_carry() {
        for ok in ["lakesync-0", "lakesync-7d9f8b-x2x9q", "host.example_1"] {
            assert!(valid_replica_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "x'y", "é", &"a".repeat(64)] {
            assert!(valid_replica_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn session_names_fit_what_postgres_keeps_and_tell_long_ids_apart() {
        assert_eq!(session_name("lakesync-0"), "lakesync/lakesync-0");
        let fits = "a".repeat(54);
        assert_eq!(session_name(&fits), format!("lakesync/{fits}"));
        let (a, b) = (format!("{}-x", "p".repeat(61)), format!("{}-y", "p".repeat(61)));
        let (na, nb) = (session_name(&a), session_name(&b));
        assert!(na.len() <= 63 && nb.len() <= 63, "{na} {nb}");
        assert_ne!(na, nb);
        assert!(na.starts_with("lakesync/ppp"), "{na}");
        assert_eq!(na, session_name(&a), "stable");
        // The same in every build: the hash computed independently (Python).
        assert_eq!(
            session_name(&format!("{}abc", "z".repeat(60))),
            "lakesync/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz~235fcad482ed3b6b"
        );
    }
}
