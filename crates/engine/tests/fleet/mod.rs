//! The fleet's Postgres side, on every Postgres major CI runs: ownership locks, the fence in
//! the committing transaction, and two daemons sharing tables through the registry.

use std::time::{Duration, Instant};

use lakesync_core::{Classify, ErrorClass};
use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use lakesync_engine::config::{FleetConfig, TableConfig};
use lakesync_engine::{Daemon, EngineError};
use lakesync_postgres::fleet::{self as registry, table_owner_key, Fence, FilePolicy, Kind, Origin};
use lakesync_postgres::state::{self, Checkpoint};
use lakesync_postgres::PgError;

use crate::support::{block_on, TestDb};

/// A fenced run writes only while its coordinating session holds the table's ownership lock
/// and the registry has the table: when it takes the table's lock (before it writes anything)
/// and in the committing transaction. The fence is carried by the run, not by the session.
#[test]
fn a_fenced_run_writes_and_commits_only_while_its_replica_owns_the_registered_table() {
    let db = TestDb::new("fleet_fence");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers");
    let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
    w.append(&[customers(0..100, 0)]).unwrap();
    let mut req = db.request(&path, "crm.customers", "customer_id");
    db.sync(&req).unwrap();
    let target = req.table.clone();
    let spec = TableConfig::new(path.display().to_string(), "crm.customers", &["customer_id"], "triggered");
    let entry = lakesync_engine::fleet::table_entry(&spec.validate().unwrap());

    block_on(async {
        // The coordinating session of a replica, holding the table's ownership lock.
        let mut owner = db.config().connect().await.unwrap();
        let pid: i32 = owner.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        let key = table_owner_key(&target);
        let took: bool =
            owner.query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key]).await.unwrap().get(0);
        assert!(took);
        req.fence = Some(Fence { owner_pid: pid });
        let w = std::sync::Arc::new(w);
        let append = |ids: std::ops::Range<u64>| {
            let w = w.clone();
            tokio::task::spawn_blocking(move || w.append(&[customers(ids, 0)]).unwrap())
        };
        append(100..150).await.unwrap();
        // Owned but not registered (removed, or never added): refused before any write.
        let err = lakesync_engine::sync(&req).await.unwrap_err();
        assert!(matches!(err, EngineError::Postgres(PgError::NotOwner { .. })), "{err}");
        assert!(registry::put(&mut owner, &entry, Origin::File).await.unwrap());
        let out = lakesync_engine::sync(&req).await.unwrap();
        assert_eq!(out.to_version, 2);

        // The checkpoint itself is fenced: a transaction that lost the lock commits nothing.
        let mut run = db.config().connect().await.unwrap();
        owner.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", &[&key]).await.unwrap();
        let tx = run.transaction().await.unwrap();
        let checkpoint = Checkpoint { version: 3, commit_timestamp_ms: None };
        let fenced = Some(Fence { owner_pid: pid });
        let err =
            state::commit_checkpoint(&tx, &target, fenced, 0, Some(2), checkpoint, Default::default(), None, true)
                .await
                .unwrap_err();
        assert!(matches!(err, PgError::NotOwner { .. }), "{err}");
        drop(tx);

        // Handed over: the next run of the old owner writes nothing, not even a run row.
        append(150..200).await.unwrap();
        let err = lakesync_engine::sync(&req).await.unwrap_err();
        assert!(matches!(err, EngineError::Postgres(PgError::NotOwner { .. })), "{err}");
        assert_eq!(err.class(), ErrorClass::Busy);
        assert!(err.to_string().contains("crm.customers") && err.to_string().contains("no longer owns"), "{err}");

        // Owned again, but the table was removed from the registry (through any replica):
        // refused too, so a purge is never undone by a run that started before it.
        let took: bool =
            owner.query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key]).await.unwrap().get(0);
        assert!(took);
        assert!(registry::remove(&owner, Kind::Table, &entry.name).await.unwrap());
        let err = lakesync_engine::sync(&req).await.unwrap_err();
        assert!(matches!(err, EngineError::Postgres(PgError::NotOwner { .. })), "{err}");
    });
    assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables"), "2");
    assert_eq!(db.value("SELECT count(*) FROM crm.customers"), "150");
    // The runs were refused; the table did not fail (its owner runs it).
    assert_eq!(db.value("SELECT coalesce(last_error, 'none') FROM lakesync.synced_tables"), "none");
    assert_eq!(db.value("SELECT string_agg(outcome, ',' ORDER BY run_id) FROM lakesync.runs"), "succeeded,succeeded");
}

#[test]
fn two_daemons_split_the_registered_tables_and_one_takes_them_all_when_the_other_leaves() {
    let db = TestDb::new("fleet_daemons");
    let dir = tempfile::tempdir().unwrap();
    let mut writers = Vec::new();
    let specs: Vec<_> = (0..4)
        .map(|i| {
            let path = dir.path().join(format!("t{i}"));
            let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
            w.append(&[customers(0..100, 0)]).unwrap();
            writers.push(w);
            let mut config =
                TableConfig::new(path.display().to_string(), format!("fleet.t{i}"), &["customer_id"], "continuous");
            config.poll_interval = Some("100ms".into());
            config.validate().unwrap()
        })
        .collect();
    let fleet = |id: &str| FleetConfig {
        replica_id: id.into(),
        lease: Duration::from_secs(3),
        heartbeat: Duration::from_millis(200),
        file_policy: FilePolicy::FileWins,
        max_concurrent_runs: 2,
    };
    block_on(async {
        let a = Daemon::with_max_runs(db.config(), 2);
        let b = Daemon::with_max_runs(db.config(), 2);
        for (d, id) in [(&a, "a"), (&b, "b")] {
            lakesync_engine::fleet::join(d, &fleet(id), &specs, &[], Default::default()).await.unwrap();
        }
        let owned = |d: &Daemon| d.tables().iter().filter(|w| w.owned()).count();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(owned(&a) == 2 && owned(&b) == 2 && a.ready() && b.ready()) {
            assert!(Instant::now() < deadline, "not split: a {} b {}", owned(&a), owned(&b));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Both see all four, and the owner of each as the other sees it.
        assert_eq!(a.tables().len(), 4);
        assert_eq!(b.tables().len(), 4);
        let client = db.config().connect().await.unwrap();
        let synced = |v: i64| {
            let client = &client;
            async move {
                client
                    .query_one("SELECT count(*) FROM lakesync.synced_tables WHERE synced_version = $1", &[&v])
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
            }
        };
        // A commit to every table: each owner applies its two.
        let writers = std::sync::Arc::new(writers);
        let w = writers.clone();
        tokio::task::spawn_blocking(move || {
            for w in w.iter() {
                w.append(&[customers(100..120, 0)]).unwrap();
            }
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while synced(2).await != 4 {
            assert!(Instant::now() < deadline, "not every table synced");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b.shutdown(Duration::from_secs(10)).await;
        let left = Instant::now();
        while owned(&a) != 4 {
            assert!(left.elapsed() < Duration::from_secs(5), "a took only {} tables", owned(&a));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.shutdown(Duration::from_secs(10)).await;
    });
    assert_eq!(db.value("SELECT string_agg(DISTINCT replica, ',' ORDER BY replica) FROM lakesync.runs"), "a,b");
    assert_eq!(db.value("SELECT count(*) FROM lakesync.replicas"), "0", "both left the fleet");
}
