//! A fleet of `lakesync serve` replicas, run as operators would: real processes on one
//! Postgres, killed, restarted and cut off from Postgres while writers keep committing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use serde_json::Value;

use crate::serve::{http, served_address};
use crate::support::TestDb;

const TABLES: usize = 12;
const TOKEN: &str = "fleet-token-5e1d";

/// One `lakesync serve` replica.
struct Replica {
    id: String,
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Replica {
    fn start(id: &str, conn: &str, config: &Path, dir: &Path) -> Self {
        Self::start_with_env(id, conn, config, dir, &[])
    }

    /// [`Replica::start`] with these environment variables besides the test's own.
    fn start_with_env(id: &str, conn: &str, config: &Path, dir: &Path, env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("{id}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_lakesync"))
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("LAKESYNC_POSTGRES", conn)
            .env("LAKESYNC_REPLICA_ID", id)
            .env("LAKESYNC_TEST_TOKEN", TOKEN)
            .env("LAKESYNC_LOG", "warn,lakesync_engine=info")
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let addr = served_address(&mut child, &log);
        Self { id: id.into(), child, addr, log }
    }

    fn tables(&self) -> Vec<Value> {
        let r = http(&self.addr, "GET", "/api/v1/synced-tables", None, None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["synced_tables"].as_array().unwrap().clone()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        self.child.wait().unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy to Postgres that can be frozen: it stops forwarding but keeps every
/// connection open, as a network partition does (Postgres sees the sessions alive).
struct Proxy {
    port: u16,
    frozen: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let frozen = f.clone();
                    std::thread::spawn(move || pipe(from, to, &frozen));
                }
            }
        });
        Self { port, frozen }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = [0u8; 16384];
    loop {
        if frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// The Delta tables and a writer committing to them.
struct Lake {
    tables: Vec<(PathBuf, DeltaWriter)>,
    /// Per table: newest version and the data files still in it, oldest first.
    state: Mutex<Vec<(u64, Vec<String>, u64)>>,
}

impl Lake {
    fn create(dir: &Path) -> Self {
        let mut tables = Vec::new();
        let mut state = Vec::new();
        for i in 0..TABLES {
            let path = dir.join(format!("t{i:02}"));
            let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
            let (v, files) = w.append_files([customers(0..50, 0)]).unwrap();
            tables.push((path, w));
            state.push((v, files, 50));
        }
        Self { tables, state: Mutex::new(state) }
    }

    /// One commit to table `i`: mostly inserts, every fourth a delete of its oldest file.
    fn commit(&self, i: usize, n: u64) {
        let mut state = self.state.lock().unwrap();
        let (version, files, next) = &mut state[i];
        let w = &self.tables[i].1;
        if n % 4 == 3 && files.len() > 1 {
            let gone = files.remove(0);
            *version = w.remove_files(|p| p == gone).unwrap();
        } else {
            let (v, added) = w.append_files([customers(*next..*next + 20, 0)]).unwrap();
            *next += 20;
            *version = v;
            files.extend(added);
        }
    }

    fn heads(&self) -> Vec<u64> {
        self.state.lock().unwrap().iter().map(|s| s.0).collect()
    }
}

/// Writers commit to random tables until paused.
struct Writers {
    run: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Writers {
    fn start(lake: Arc<Lake>) -> Self {
        let run = Arc::new(AtomicBool::new(true));
        let paused = Arc::new(AtomicBool::new(false));
        let (r, p) = (run.clone(), paused.clone());
        let handle = std::thread::spawn(move || {
            let (_, mut next) = crate::support::seeded_rng("fleet writers");
            let mut n = 0;
            while r.load(Ordering::SeqCst) {
                if !p.load(Ordering::SeqCst) {
                    lake.commit(next(TABLES as u64) as usize, n);
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            n
        });
        Self { run, paused, handle: Some(handle) }
    }

    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100)); // a commit in progress lands
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    fn stop(mut self) -> u64 {
        self.run.store(false, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn wait_for(what: &str, timeout: Duration, logs: &[&Replica], mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > timeout {
            let logs: Vec<String> = logs
                .iter()
                .map(|r| format!("--- {} ---\n{}", r.id, std::fs::read_to_string(&r.log).unwrap_or_default()))
                .collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Owner of every table as `observer` sees it.
fn owners(observer: &Replica) -> BTreeMap<String, Option<String>> {
    observer
        .tables()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_string(), t["owner"].as_str().map(str::to_string)))
        .collect()
}

fn synced_versions(db: &TestDb) -> Vec<u64> {
    (0..TABLES)
        .map(|i| {
            db.value(&format!(
                "SELECT coalesce(max(synced_version), -1) FROM lakesync.synced_tables \
                 WHERE target_schema = 'fleet' AND target_table = 't{i:02}'"
            ))
            .parse::<i64>()
            .unwrap() as u64
        })
        .collect()
}

/// Pauses the writers, waits until every table caught up and checks each against its Delta
/// table at its synced version.
fn check_in_sync(step: &str, db: &TestDb, lake: &Lake, writers: &Writers, logs: &[&Replica]) {
    writers.pause();
    let heads = lake.heads();
    wait_for(&format!("{step}: every table to catch up"), Duration::from_secs(60), logs, || {
        synced_versions(db) == heads
    });
    for (i, (path, _)) in lake.tables.iter().enumerate() {
        db.assert_matches_snapshot(path, &format!("fleet.t{i:02}"), "customer_id", heads[i]);
    }
    writers.resume();
}

fn counts(owners: &BTreeMap<String, Option<String>>) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for o in owners.values().flatten() {
        *c.entry(o.clone()).or_insert(0) += 1;
    }
    c
}

/// Every table is owned by one of `ids`, and each of them owns its fair share (±1).
fn balanced(owners: &BTreeMap<String, Option<String>>, ids: &[&str]) -> bool {
    let c = counts(owners);
    owners.values().all(|o| o.as_deref().is_some_and(|o| ids.contains(&o)))
        && ids.iter().all(|id| c.get(*id).copied().unwrap_or(0) >= TABLES / ids.len())
}

/// The fleet's contract under faults: 3 replicas, 12 continuous tables, writers committing
/// throughout. Two replicas are SIGKILLed one after the other and restarted, then a third is
/// cut off from Postgres by a frozen proxy (its sessions stay open). After every step each
/// table equals its Delta table at its synced version; synced versions never go back; no two
/// replicas ever apply to one table at once (from the run history each replica records);
/// takeover after a kill is within 10 s; and the cut-off replica stopped applying before
/// another took its tables over.
#[test]
fn a_fleet_of_three_keeps_every_table_in_sync_through_kills_restarts_and_a_cut_connection() {
    let db = TestDb::new("cli_fleet");
    db.execute("CREATE SCHEMA fleet");
    let dir = tempfile::tempdir().unwrap();
    let lake = Arc::new(Lake::create(dir.path()));
    let mut config = String::from(
        "[api]\nlisten = \"127.0.0.1:0\"\n\n[fleet]\nlease = \"3s\"\nheartbeat = \"250ms\"\nmax_concurrent_runs = 4\n",
    );
    for (i, (path, _)) in lake.tables.iter().enumerate() {
        config += &format!(
            "\n[[tables]]\nname = \"t{i:02}\"\nsource = \"{}\"\ntarget = \"fleet.t{i:02}\"\nprimary_key = [\"customer_id\"]\n\
             mode = \"continuous\"\npoll_interval = \"100ms\"\n",
            path.display()
        );
    }
    let config_path = dir.path().join("lakesync.toml");
    std::fs::write(&config_path, config).unwrap();
    let pg_port: u16 =
        db.conn.split_whitespace().find_map(|kv| kv.strip_prefix("port=")).and_then(|p| p.parse().ok()).unwrap();
    let proxy = Proxy::start(pg_port);
    let through_proxy = db.conn.replace(&format!("port={pg_port}"), &format!("port={}", proxy.port));

    let mut r1 = Replica::start("r1", &db.conn, &config_path, dir.path());
    let mut r2 = Replica::start("r2", &db.conn, &config_path, dir.path());
    let r3 = Replica::start("r3", &through_proxy, &config_path, dir.path());
    let writers = Writers::start(lake.clone());
    wait_for("the three replicas to share the tables 4/4/4", Duration::from_secs(60), &[&r1, &r2, &r3], || {
        balanced(&owners(&r1), &["r1", "r2", "r3"])
    });
    check_in_sync("three replicas", &db, &lake, &writers, &[&r1, &r2, &r3]);

    // Synced versions sampled from now on: they never go back.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (db, sampling) = (TestDb { conn: db.conn.clone(), name: db.name.clone() }, sampling.clone());
        std::thread::spawn(move || {
            let mut last = [0u64; TABLES];
            let mut samples = 0;
            while sampling.load(Ordering::SeqCst) {
                for (i, v) in synced_versions(&db).into_iter().enumerate() {
                    if v != u64::MAX {
                        assert!(
                            v >= last[i] || last[i] == 0,
                            "t{i:02}'s synced version went back from {} to {v}",
                            last[i]
                        );
                        last[i] = last[i].max(v);
                    }
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };

    // SIGKILL r1: r2 and r3 take its tables over.
    let mut takeovers = Vec::new();
    r1.kill();
    takeovers.push(wait_for("r2 and r3 to take r1's tables", Duration::from_secs(30), &[&r2, &r3], || {
        balanced(&owners(&r2), &["r2", "r3"])
    }));
    check_in_sync("r1 killed", &db, &lake, &writers, &[&r2, &r3]);

    // SIGKILL r2: r3 runs everything.
    r2.kill();
    takeovers
        .push(wait_for("r3 to take every table", Duration::from_secs(30), &[&r3], || balanced(&owners(&r3), &["r3"])));
    check_in_sync("r1 and r2 killed", &db, &lake, &writers, &[&r3]);

    // Both come back and take their share without stopping r3.
    let r1 = Replica::start("r1", &db.conn, &config_path, dir.path());
    let r2 = Replica::start("r2", &db.conn, &config_path, dir.path());
    wait_for("the restarted replicas to take their share", Duration::from_secs(60), &[&r1, &r2, &r3], || {
        balanced(&owners(&r1), &["r1", "r2", "r3"])
    });
    check_in_sync("r1 and r2 restarted", &db, &lake, &writers, &[&r1, &r2, &r3]);

    // Cut r3 off: its sessions stay open in Postgres, it can no longer renew its lease.
    let cut_at: String = db.value("SELECT clock_timestamp()::text");
    let r3_tables: Vec<String> =
        owners(&r1).into_iter().filter(|(_, o)| o.as_deref() == Some("r3")).map(|(t, _)| t).collect();
    assert!(!r3_tables.is_empty());
    proxy.frozen.store(true, Ordering::SeqCst);
    let cut_takeover =
        wait_for("r1 and r2 to take the cut-off replica's tables", Duration::from_secs(30), &[&r1, &r2], || {
            balanced(&owners(&r1), &["r1", "r2"])
        });
    check_in_sync("r3 cut off", &db, &lake, &writers, &[&r1, &r2, &r3]);
    proxy.frozen.store(false, Ordering::SeqCst);
    wait_for("r3 to rejoin and take its share", Duration::from_secs(60), &[&r1, &r2, &r3], || {
        balanced(&owners(&r1), &["r1", "r2", "r3"])
    });
    check_in_sync("r3 back", &db, &lake, &writers, &[&r1, &r2, &r3]);
    let commits = writers.stop();
    sampling.store(false, Ordering::SeqCst);
    let samples = sampler.join().unwrap();

    // No two replicas ever applied to one table at once: the succeeded runs of a table (their
    // interval ends in the committing transaction) never overlap.
    let overlaps = db.rows(
        "SELECT a.target_table, a.replica, a.run_id, b.replica, b.run_id FROM lakesync.runs a JOIN lakesync.runs b \
         ON a.target_schema = b.target_schema AND a.target_table = b.target_table AND a.run_id < b.run_id \
         AND a.outcome = 'succeeded' AND b.outcome = 'succeeded' \
         AND tstzrange(a.started_at, a.ended_at) && tstzrange(b.started_at, b.ended_at) \
         WHERE a.target_schema = 'fleet'",
    );
    assert!(overlaps.is_empty(), "runs of one table overlapped: {overlaps:?}");
    let replicas = db.value(
        "SELECT string_agg(DISTINCT replica, ',') FROM lakesync.runs WHERE target_schema = 'fleet' AND outcome = 'succeeded'",
    );
    assert_eq!(replicas, "r1,r2,r3", "every replica ran tables and is named in the history");
    // The cut-off replica stopped applying before the others took its tables: none of its
    // runs that began before the cut succeeded after another replica's first run there.
    for t in &r3_tables {
        let late = db.value(&format!(
            "SELECT count(*) FROM lakesync.runs a WHERE a.target_schema = 'fleet' AND a.target_table = '{t}' \
             AND a.replica = 'r3' AND a.outcome = 'succeeded' AND a.started_at < '{cut_at}' \
             AND a.ended_at > (SELECT min(b.started_at) FROM lakesync.runs b WHERE b.target_schema = 'fleet' \
               AND b.target_table = '{t}' AND b.replica <> 'r3' AND b.started_at > '{cut_at}')"
        ));
        assert_eq!(late, "0", "{t}: r3 applied after another replica took over");
    }
    for (i, t) in takeovers.iter().enumerate() {
        assert!(*t < Duration::from_secs(10), "takeover {i} took {t:?}");
    }
    // Cut off, the replica is found out by its lease (3 s) and its sessions ended.
    assert!(cut_takeover < Duration::from_secs(15), "takeover of a cut-off replica took {cut_takeover:?}");
    let log = std::fs::read_to_string(&r1.log).unwrap() + &std::fs::read_to_string(&r2.log).unwrap();
    assert!(log.contains("ended the sessions of a replica whose lease expired"), "{log}");
    let cut_log = std::fs::read_to_string(&r3.log).unwrap();
    assert!(cut_log.contains("lost the coordinating session"), "r3 did not fence itself:\n{cut_log}");
    eprintln!(
        "fleet: {commits} commits; takeovers after SIGKILL {takeovers:?}, after the cut {cut_takeover:?}; {samples} version samples"
    );
    drop(r3);
}

/// The config of a fleet syncing every table of `lake` continuously, with a short lease.
fn continuous_config(lake: &Lake, extra: &str) -> String {
    let mut config = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"LAKESYNC_TEST_TOKEN\"\n{extra}\n\
         [fleet]\nlease = \"3s\"\nheartbeat = \"250ms\"\nmax_concurrent_runs = 4\n"
    );
    for (i, (path, _)) in lake.tables.iter().enumerate() {
        config += &format!(
            "\n[[tables]]\nname = \"t{i:02}\"\nsource = \"{}\"\ntarget = \"fleet.t{i:02}\"\nprimary_key = [\"customer_id\"]\n\
             mode = \"continuous\"\npoll_interval = \"100ms\"\n",
            path.display()
        );
    }
    config
}

fn signal(replica: &Replica, sig: &str) {
    let status = Command::new("kill").args([sig, &replica.child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Kubernetes pod names run to 63 characters, beyond what Postgres keeps of an
/// `application_name` after `lakesync/` (it truncates silently). A replica with such an id
/// frozen by SIGSTOP (its sessions stay open in Postgres, its heartbeat stops) is still found
/// once its lease expires: its sessions are ended and its tables taken over; two ids that
/// differ only at their end are told apart.
#[test]
fn a_frozen_replica_with_a_pod_length_id_loses_its_tables_when_its_lease_expires() {
    let db = TestDb::new("cli_fleet_frozen");
    db.execute("CREATE SCHEMA fleet");
    let dir = tempfile::tempdir().unwrap();
    let lake = Arc::new(Lake::create(dir.path()));
    let config_path = dir.path().join("lakesync.toml");
    std::fs::write(&config_path, continuous_config(&lake, "")).unwrap();
    let id = |suffix: &str| format!("lakesync-sync-deployment-7d9f8b6c5d-{}-{suffix}", "x".repeat(21));
    let (ida, idb) = (id("a2x9q"), id("b2x9q"));
    assert_eq!((ida.len(), idb.len()), (63, 63));
    let a = Replica::start(&ida, &db.conn, &config_path, dir.path());
    let b = Replica::start(&idb, &db.conn, &config_path, dir.path());
    wait_for("the two replicas to share the tables", Duration::from_secs(60), &[&a, &b], || {
        balanced(&owners(&a), &[ida.as_str(), idb.as_str()])
    });
    let writers = Writers::start(lake.clone());
    check_in_sync("two replicas", &db, &lake, &writers, &[&a, &b]);

    signal(&b, "-STOP");
    let took = wait_for("a to take the frozen replica's tables", Duration::from_secs(30), &[&a], || {
        balanced(&owners(&a), &[ida.as_str()])
    });
    check_in_sync("b frozen", &db, &lake, &writers, &[&a]);
    writers.stop();
    // Found by its lease (3 s) plus a heartbeat or two, not by luck.
    assert!(took < Duration::from_secs(15), "takeover of a frozen replica took {took:?}");
    let frozen_sessions = db.value(&format!(
        "SELECT count(*) FROM pg_stat_activity a JOIN lakesync.replicas r ON a.application_name = r.session_name \
         WHERE r.replica_id = '{idb}'"
    ));
    assert_eq!(frozen_sessions, "0", "the frozen replica's sessions were ended");
    signal(&b, "-CONT");
    let log = std::fs::read_to_string(&a.log).unwrap();
    assert!(log.contains("ended the sessions of a replica whose lease expired"), "{log}");
}

/// A purge through a replica that does not own the table, while its owner syncs it
/// continuously, commits keep arriving and the owner stalls for a moment: once the DELETE
/// answers, the table, its state row, its run history and its staging tables are gone, and
/// no run of the owner brings any of them back. Six rounds, as the report measured.
#[test]
fn a_purge_through_any_replica_leaves_nothing_behind_while_the_owner_syncs() {
    let db = TestDb::new("cli_fleet_purge");
    db.execute("CREATE SCHEMA fleet");
    let dir = tempfile::tempdir().unwrap();
    let lake = Arc::new(Lake::create(dir.path()));
    let config_path = dir.path().join("lakesync.toml");
    std::fs::write(
        &config_path,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"LAKESYNC_TEST_TOKEN\"\n\n[api.policy]\nlocal_roots = [\"{}\"]\n\n\
             [fleet]\nlease = \"3s\"\nheartbeat = \"250ms\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let a = Replica::start("a", &db.conn, &config_path, dir.path());
    let b = Replica::start("b", &db.conn, &config_path, dir.path());
    let writers = Writers::start(lake.clone());
    for round in 0..6 {
        let name = format!("p{round}");
        let body = serde_json::json!({
            "name": name, "source": lake.tables[round].0.display().to_string(), "target": format!("fleet.{name}"),
            "primary_key": ["customer_id"], "mode": "continuous", "poll_interval": "50ms"
        });
        let r = http(&a.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&body));
        assert_eq!(r.status, 201, "{}", r.body);
        let state = |sql: &str| db.value(&format!("{sql} WHERE target_schema = 'fleet' AND target_table = '{name}'"));
        let mut owner = None;
        wait_for(
            &format!("{name} to sync with an owner both replicas agree on"),
            Duration::from_secs(30),
            &[&a, &b],
            || {
                let (x, y) = (owners(&a).get(&name).cloned().flatten(), owners(&b).get(&name).cloned().flatten());
                owner = x.clone();
                x.is_some()
                    && x == y
                    && state("SELECT count(*) FROM lakesync.synced_tables") == "1"
                    && state("SELECT coalesce(max(synced_version), -1) FROM lakesync.synced_tables") != "-1"
            },
        );
        let (owner, via) = if owner.as_deref() == Some("a") { (&a, &b) } else { (&b, &a) };
        // The owner stalls (a GC pause, a slow node: well within half its lease) while the
        // purge goes through the other replica; when it resumes, its continuous worker and
        // its coordinator (with the registry's notification) wake together.
        signal(owner, "-STOP");
        let purge = {
            let (addr, name) = (via.addr.clone(), name.clone());
            std::thread::spawn(move || {
                http(&addr, "DELETE", &format!("/api/v1/synced-tables/{name}?purge_data=true"), Some(TOKEN), None)
            })
        };
        std::thread::sleep(Duration::from_millis(700));
        signal(owner, "-CONT");
        let r = purge.join().unwrap();
        assert_eq!(r.status, 200, "{name} purged through {}: {}", via.id, r.body);
        wait_for(&format!("{name} to be gone from both replicas"), Duration::from_secs(30), &[&a, &b], || {
            [&a, &b]
                .iter()
                .all(|r| http(&r.addr, "GET", &format!("/api/v1/synced-tables/{name}"), None, None).status == 404)
        });
        // The owner polled every 50 ms meanwhile: whatever a late run could bring back, it
        // would have by now.
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            db.value(&format!("SELECT to_regclass('fleet.{name}') IS NULL")),
            "true",
            "{name}: table re-created"
        );
        assert_eq!(state("SELECT count(*) FROM lakesync.synced_tables"), "0", "{name}: state row left behind");
        assert_eq!(state("SELECT count(*) FROM lakesync.runs"), "0", "{name}: run history left behind");
        let staging = db.value(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'fleet' AND c.relname LIKE '\\_lakesync\\_stage\\_%'",
        );
        assert_eq!(staging, "0", "{name}: staging tables left behind");
    }
    writers.stop();
}

/// An ingest that fails on one replica (its SASL password differs there: a refused login
/// needs a human) is released there and run by another, which ingests every event once. An
/// ingest that failed everywhere (its topic did not exist yet) runs again once the cause is
/// fixed and a restart is requested, through any replica.
#[test]
fn an_ingest_that_fails_on_one_replica_is_handed_over_and_runs_again_when_restarted() {
    use crate::support::kafka::{event, table_seqs, KafkaServer, EVENTS_SCHEMA};
    use lakesync_ingest::kafka::{Sasl, SaslMechanism};

    const PASSWORD: &str = "s3cret-Pa55";
    let db = TestDb::new("cli_fleet_ingest_failover");
    let dir = tempfile::tempdir().unwrap();
    // tansu takes users only from unauthenticated clients and keeps them in SQLite: make the
    // user on an open broker, then require SASL on one over the same file.
    let open = KafkaServer::start_on("sqlite://tansu.db", dir.path(), None, false);
    open.create_user("scram256", "lakesync", PASSWORD);
    drop(open);
    let mut kafka = KafkaServer::start_on("sqlite://tansu.db", dir.path(), None, true);
    kafka.security.sasl =
        Some(Sasl { mechanism: SaslMechanism::ScramSha256, username: "lakesync".into(), password: PASSWORD.into() });
    let produce = |topic: &str, seqs: std::ops::Range<i64>| {
        crate::support::block_on(async {
            let producer = kafka.producer(topic).await;
            for seq in seqs {
                producer.send((seq % 2) as i32, None, Some(event(seq))).await.unwrap();
            }
        })
    };
    crate::support::block_on(kafka.create_topic("logins", 2));
    produce("logins", 0..100);
    let schema = dir.path().join("events.schema.json");
    std::fs::write(&schema, EVENTS_SCHEMA).unwrap();
    let (logins, late) = (dir.path().join("lake/logins"), dir.path().join("lake/late"));
    let mut config = String::from(
        "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"LAKESYNC_TEST_TOKEN\"\n\n[fleet]\nlease = \"3s\"\nheartbeat = \"250ms\"\n",
    );
    for (topic, table) in [("logins", &logins), ("late", &late)] {
        config += &format!(
            "\n[[ingest]]\nname = \"{topic}\"\nbrokers = [\"{}\"]\ntopic = \"{topic}\"\ntable = \"{}\"\nschema = \"{}\"\n\
             flush_interval = \"200ms\"\nsecurity_protocol = \"SASL_PLAINTEXT\"\nsasl_mechanism = \"SCRAM-SHA-256\"\n\
             sasl_username = \"lakesync\"\nsasl_password_env = \"KAFKA_PASSWORD\"\n",
            kafka.address(),
            table.display(),
            schema.display()
        );
    }
    let config_path = dir.path().join("lakesync.toml");
    std::fs::write(&config_path, config).unwrap();

    // Alone with the wrong password, w takes both ingests; both fail and are released.
    let w = Replica::start_with_env("w", &db.conn, &config_path, dir.path(), &[("KAFKA_PASSWORD", "not-the-Pa55")]);
    wait_for("w to hand over both failed ingests", Duration::from_secs(60), &[&w], || {
        std::fs::read_to_string(&w.log).unwrap_or_default().matches("the ingest failed here").count() >= 2
    });
    // r has the right password: it takes `logins` over and ingests every event once.
    let r = Replica::start_with_env("r", &db.conn, &config_path, dir.path(), &[("KAFKA_PASSWORD", PASSWORD)]);
    wait_for("r to ingest every event of logins", Duration::from_secs(60), &[&w, &r], || {
        logins.join("_delta_log").exists() && table_seqs(&logins).0.len() >= 100
    });
    assert_eq!(table_seqs(&logins).0, (0..100).collect::<Vec<_>>(), "each event once");
    let ingest =
        |via: &Replica, name: &str| http(&via.addr, "GET", &format!("/api/v1/ingests/{name}"), None, None).json();
    assert_eq!(ingest(&w, "logins")["owner"], "r");
    assert_eq!(ingest(&r, "logins")["state"], "running", "{}", ingest(&r, "logins"));
    // `late`'s topic does not exist: it fails on r too, and then nobody runs it.
    wait_for("r to hand over late", Duration::from_secs(60), &[&w, &r], || {
        std::fs::read_to_string(&r.log).unwrap_or_default().contains("the ingest failed here")
    });
    let log = std::fs::read_to_string(&w.log).unwrap();
    assert!(!log.contains("not-the-Pa55"), "the password was logged");

    // Fixed (the topic exists now) and restarted through w: the replica that can, runs it.
    crate::support::block_on(kafka.create_topic("late", 2));
    produce("late", 0..10);
    let unknown = http(&w.addr, "POST", "/api/v1/ingests/nope/restart", Some(TOKEN), None);
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert_eq!(http(&w.addr, "POST", "/api/v1/ingests/late/restart", None, None).status, 401);
    let restarted = http(&w.addr, "POST", "/api/v1/ingests/late/restart", Some(TOKEN), None);
    assert_eq!(restarted.status, 202, "{}", restarted.body);
    wait_for("late to be ingested after the restart", Duration::from_secs(60), &[&w, &r], || {
        late.join("_delta_log").exists() && table_seqs(&late).0.len() >= 10
    });
    assert_eq!(table_seqs(&late).0, (0..10).collect::<Vec<_>>(), "each event once");
    assert_eq!(ingest(&w, "late")["owner"], "r");
}

fn runs_of(db: &TestDb, table: &str) -> i64 {
    db.value(&format!(
        "SELECT count(*) FROM lakesync.runs WHERE target_schema = 'fleet' AND target_table = '{table}' AND replica IS NOT NULL"
    ))
    .parse()
    .unwrap()
}

/// The registry lives in Postgres: every replica sees a table added through any of them, a
/// sync request reaches the owner wherever it lands, API changes survive restarts, and the
/// config file either wins (`on_conflict = "file"`, the default) or only seeds (`"registry"`).
#[test]
fn the_registry_in_postgres_is_shared_survives_restarts_and_the_file_wins_or_seeds_as_configured() {
    let db = TestDb::new("cli_fleet_registry");
    db.execute("CREATE SCHEMA fleet");
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::create(dir.path());
    let (t0, t1) = (&lake.tables[0].0, &lake.tables[1].0);
    let config = |policy: &str| {
        let path = dir.path().join(format!("{policy}.toml"));
        std::fs::write(
            &path,
            format!(
                "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"LAKESYNC_TEST_TOKEN\"\n\n[api.policy]\nlocal_roots = [\"{}\"]\n\n\
                 [fleet]\nheartbeat = \"200ms\"\n\
                 on_conflict = \"{policy}\"\n\n[[tables]]\nname = \"from_file\"\nsource = \"{}\"\ntarget = \"fleet.t00\"\n\
                 primary_key = [\"customer_id\"]\nmode = \"triggered\"\n",
                dir.path().display(),
                t0.display()
            ),
        )
        .unwrap();
        path
    };
    let (file_wins, registry_wins) = (config("file"), config("registry"));
    let a = Replica::start("a", &db.conn, &file_wins, dir.path());
    wait_for("a to be ready", Duration::from_secs(30), &[&a], || {
        http(&a.addr, "GET", "/readyz", None, None).status == 200
    });
    let added = serde_json::json!({
        "name": "from_api", "source": t1.display().to_string(), "target": "fleet.t01",
        "primary_key": ["customer_id"], "mode": "triggered"
    });
    let r = http(&a.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&added));
    assert_eq!(r.status, 201, "{}", r.body);

    // Adding and removing through the API races this replica's own coordinator (which acts
    // on the registry as it read it a moment before): the API's answer must hold.
    for i in 0..10 {
        let name = format!("churn{i}");
        let body = serde_json::json!({
            "name": name, "source": t1.display().to_string(), "target": format!("fleet.churn{i}"),
            "primary_key": ["customer_id"], "mode": "triggered"
        });
        let r = http(&a.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&body));
        assert_eq!(r.status, 201, "{}", r.body);
        for _ in 0..3 {
            let r = http(&a.addr, "GET", &format!("/api/v1/synced-tables/{name}"), None, None);
            assert_eq!(r.status, 200, "{name} vanished after it was added: {}", r.body);
            std::thread::sleep(Duration::from_millis(70));
        }
        let r = http(&a.addr, "DELETE", &format!("/api/v1/synced-tables/{name}?purge_data=true"), Some(TOKEN), None);
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        for _ in 0..3 {
            let r = http(&a.addr, "GET", &format!("/api/v1/synced-tables/{name}"), None, None);
            assert_eq!(r.status, 404, "{name} came back after it was removed: {}", r.body);
            std::thread::sleep(Duration::from_millis(70));
        }
    }

    // A second replica sees both at once and takes one of them.
    let b = Replica::start("b", &db.conn, &file_wins, dir.path());
    let names =
        |r: &Replica| -> Vec<String> { r.tables().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect() };
    wait_for("the tables to be spread over a and b", Duration::from_secs(30), &[&a, &b], || {
        let o = owners(&b);
        o.len() == 2 && counts(&o).len() == 2
    });
    assert_eq!(names(&b), ["from_api", "from_file"]);
    wait_for("both tables to sync", Duration::from_secs(30), &[&a, &b], || {
        runs_of(&db, "t00") >= 1 && runs_of(&db, "t01") >= 1
    });
    // A sync request for each table on each replica reaches the table's owner.
    for (table, target) in [("from_file", "t00"), ("from_api", "t01")] {
        let mut owner = String::new();
        wait_for("a and b to agree on the owner", Duration::from_secs(30), &[&a, &b], || {
            let (x, y) = (owners(&a)[table].clone(), owners(&b)[table].clone());
            owner = x.clone().unwrap_or_default();
            x.is_some() && x == y
        });
        for via in [&a, &b] {
            let before = runs_of(&db, target);
            let r = http(&via.addr, "POST", &format!("/api/v1/synced-tables/{table}/sync"), Some(TOKEN), None);
            assert_eq!(r.status, 202, "{}", r.body);
            wait_for("the owner to run the requested sync", Duration::from_secs(30), &[&a, &b], || {
                runs_of(&db, target) > before
            });
            let last = db.value(&format!(
                "SELECT replica FROM lakesync.runs WHERE target_schema = 'fleet' AND target_table = '{target}' ORDER BY run_id DESC LIMIT 1"
            ));
            assert_eq!(last, owner, "{table}: the run requested through {} ran on {last}", via.id);
        }
    }
    // Each replica reports the live gauges of the table it runs only.
    let owner_of_file = owners(&a)["from_file"].clone().unwrap();
    for r in [&a, &b] {
        let metrics = http(&r.addr, "GET", "/metrics", None, None).body;
        let runs_it = r.id == owner_of_file;
        assert!(
            metrics.contains(&format!("lakesync_table_owned{{table=\"from_file\"}} {}", u8::from(runs_it))),
            "{metrics}"
        );
        assert_eq!(metrics.contains("lakesync_lag_seconds{table=\"from_file\"}"), runs_it, "{metrics}");
        let t = r.tables().into_iter().find(|t| t["name"] == "from_file").unwrap();
        assert_eq!(t["state"], "ONLINE_NO_PENDING_UPDATE", "{t}");
        assert_eq!(t["lag_seconds"].is_null(), !runs_it, "{t}");
    }

    // SIGTERM: b finishes what it runs and hands its table over at once (no lease to wait).
    let status = Command::new("kill").args(["-TERM", &b.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let handover = wait_for("a to own both tables after b left", Duration::from_secs(30), &[&a, &b], || {
        owners(&a).values().all(|o| o.as_deref() == Some("a"))
    });
    assert!(handover < Duration::from_secs(3), "graceful handover took {handover:?}");
    let mut b = b;
    b.child.wait().unwrap();
    assert!(std::fs::read_to_string(&b.log).unwrap().contains("left the fleet"));
    b.kill();
    drop((a, b));

    // The API's table survives a restart; a file table removed through the API comes back
    // when the file wins ...
    let a = Replica::start("a", &db.conn, &file_wins, dir.path());
    wait_for("a to be ready", Duration::from_secs(30), &[&a], || {
        http(&a.addr, "GET", "/readyz", None, None).status == 200
    });
    assert_eq!(names(&a), ["from_api", "from_file"]);
    let r = http(&a.addr, "DELETE", "/api/v1/synced-tables/from_file", Some(TOKEN), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(names(&a), ["from_api"]);
    drop(a);
    let a = Replica::start("a", &db.conn, &file_wins, dir.path());
    wait_for("a to be ready", Duration::from_secs(30), &[&a], || {
        http(&a.addr, "GET", "/readyz", None, None).status == 200
    });
    assert_eq!(names(&a), ["from_api", "from_file"], "the file wins: its table is back");
    let r = http(&a.addr, "DELETE", "/api/v1/synced-tables/from_file", Some(TOKEN), None);
    assert_eq!(r.status, 200, "{}", r.body);
    drop(a);
    // ... and stays removed when the registry wins (the file only seeds).
    let a = Replica::start("a", &db.conn, &registry_wins, dir.path());
    wait_for("a to be ready", Duration::from_secs(30), &[&a], || {
        http(&a.addr, "GET", "/readyz", None, None).status == 200
    });
    assert_eq!(names(&a), ["from_api"], "the registry wins: the removed table stays removed");
    let registry = db.value("SELECT string_agg(name || ':' || origin || ':' || (removed_at IS NULL), ',' ORDER BY name) FROM lakesync.registry WHERE name NOT LIKE 'churn%'");
    assert_eq!(registry, "from_api:api:true,from_file:file:false");
}

/// The config shipped in `deploy/kubernetes/configmap.yaml` is one `lakesync check-config`
/// accepts, with the environment the Deployment gives each pod.
#[test]
fn the_kubernetes_config_map_holds_a_valid_config() {
    let root = crate::support::workspace_root();
    let yaml = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml")).unwrap();
    let block: Vec<&str> = yaml
        .lines()
        .skip_while(|l| l.trim() != "lakesync.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    assert!(block.len() > 10, "no lakesync.toml block in the ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lakesync.toml");
    std::fs::write(&path, block.join("\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lakesync"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env("LAKESYNC_REPLICA_ID", "lakesync-7d9f8b-x2x9q")
        .env("LAKESYNC_POSTGRES_PASSWORD", "pw")
        .env("LAKESYNC_API_TOKEN", "token")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("fleet: replica lakesync-7d9f8b-x2x9q, lease 10s"), "{stdout}");
    assert!(stdout.contains("table customers: s3://lake/gold/customers -> app.customers (continuous"), "{stdout}");
}
