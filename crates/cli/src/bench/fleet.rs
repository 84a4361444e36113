//! `lakesync bench --scenario fleet`: `--tables` continuous tables (default 100) kept in sync
//! by one replica (the reference), then by three, then through ten SIGKILLs.
//!
//! A writer commits a 20-row append to a random table every 100 ms throughout. A watcher
//! reads every table's synced version from `lakesync.synced_tables` every 10 ms on its own
//! connection: a commit is visible when its table's synced version reaches it. Phases:
//! (1) one replica runs every table for `--seconds`; (2) three replicas share them for
//! `--seconds`; (3) ten times: SIGKILL one replica, time until another replica's session holds
//! the ownership lock of every table the killed one held (takeover), restart it and wait
//! until the tables are spread 34/33/33 again. Reported: commit → visible p50/p99 per phase
//! (phase 2 as a ratio to phase 1), takeover p50/max (against the heartbeat, the rebalancing
//! interval), the Postgres sessions each replica held at most (by `application_name`) and the
//! replicas' peak RSS. Every table is verified against its Delta table at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lakesync_core::TableName;
use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use lakesync_postgres::cluster::LocalCluster;
use lakesync_postgres::PgConfig;

use super::{proc_status_kb, verify_against_delta, BenchArgs};

const REPLICAS: [&str; 3] = ["fleet-a", "fleet-b", "fleet-c"];
const KILLS: usize = 10;

/// A replica process; killed if the bench fails.
struct Replica {
    id: &'static str,
    child: Child,
    peak_rss_mb: f64,
}

impl Replica {
    fn start(id: &'static str, config: &Path, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(config)
            .env("LAKESYNC_REPLICA_ID", id)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lakesync serve")?;
        Ok(Self { id, child, peak_rss_mb: 0.0 })
    }

    fn sample_rss(&mut self) {
        if let Some(kb) = proc_status_kb(self.child.id(), "VmHWM") {
            self.peak_rss_mb = self.peak_rss_mb.max(kb as f64 / 1024.0);
        }
    }

    fn kill(&mut self) {
        self.sample_rss();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which replica holds each table's ownership lock (tables nobody holds are absent).
async fn holders(client: &tokio_postgres::Client) -> anyhow::Result<BTreeMap<String, String>> {
    use lakesync_postgres::fleet::{Holder, Kind};
    Ok(lakesync_postgres::fleet::items(client)
        .await?
        .into_iter()
        .filter(|i| i.entry.kind == Kind::Table)
        .filter_map(|i| match i.holder {
            Holder::Replica(id) => Some((i.entry.name, id)),
            _ => None,
        })
        .collect())
}

/// Every table held, by `ids` only, each holding its share (±1).
fn spread(h: &BTreeMap<String, String>, tables: usize, ids: &[&str]) -> bool {
    let per = |id: &str| h.values().filter(|r| r.as_str() == id).count();
    h.len() == tables
        && ids.iter().all(|id| per(id) >= tables / ids.len())
        && h.values().all(|r| ids.contains(&r.as_str()))
}

async fn wait_until<F: std::future::Future<Output = anyhow::Result<bool>>>(
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut() -> F,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !ok().await? {
        anyhow::ensure!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(start.elapsed())
}

type Seen = Arc<Mutex<BTreeMap<(usize, u64), Instant>>>;

pub async fn measure(args: &BenchArgs, dir: &Path, cluster: &LocalCluster) -> anyhow::Result<()> {
    let n = args.tables;
    anyhow::ensure!(n >= REPLICAS.len(), "--tables must be at least {}", REPLICAS.len());
    let admin = PgConfig::parse(&cluster.connection_string("postgres"))?.connect().await?;
    admin.batch_execute("DROP DATABASE IF EXISTS bench_fleet WITH (FORCE)").await?;
    admin.batch_execute("CREATE DATABASE bench_fleet").await?;
    let config = PgConfig::parse(&cluster.connection_string("bench_fleet"))?;
    let db = config.connect().await?;
    db.batch_execute("CREATE SCHEMA fleet").await?;

    let lake = dir.join("fleet");
    let _ = std::fs::remove_dir_all(&lake);
    let writers: Vec<(PathBuf, DeltaWriter)> = {
        let lake = lake.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            (0..n)
                .map(|i| {
                    let path = lake.join(format!("t{i:03}"));
                    let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")])?;
                    w.append(&[customers(0..1000, 0)])?;
                    Ok((path, w))
                })
                .collect()
        })
        .await??
    };
    let mut toml = format!(
        "[postgres]\nurl = {conn:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n[fleet]\nheartbeat = \"1s\"\nlease = \"10s\"\n",
        conn = cluster.connection_string("bench_fleet")
    );
    for (i, (path, _)) in writers.iter().enumerate() {
        toml += &format!(
            "\n[[tables]]\nname = \"t{i:03}\"\nsource = {source:?}\ntarget = \"fleet.t{i:03}\"\nprimary_key = [\"customer_id\"]\n\
             mode = \"continuous\"\npoll_interval = {poll:?}\nparallelism = 1\n",
            source = path.display().to_string(),
            poll = args.poll,
        );
    }
    let config_path = dir.join("fleet.toml");
    std::fs::write(&config_path, toml)?;
    let log = dir.join("fleet-serve.log");
    let _ = std::fs::remove_file(&log);

    // The watcher: when each (table, version) first became visible.
    let seen: Seen = Arc::default();
    let watcher = {
        let (seen, config) = (seen.clone(), config.clone());
        tokio::spawn(async move {
            let client = config.connect().await?;
            loop {
                if let Ok(rows) = client
                    .query(
                        "SELECT substr(target_table, 2)::int, synced_version FROM lakesync.synced_tables \
                         WHERE target_schema = 'fleet' AND synced_version IS NOT NULL",
                        &[],
                    )
                    .await
                {
                    let now = Instant::now();
                    let mut seen = seen.lock().unwrap();
                    for r in rows {
                        seen.entry((r.get::<_, i32>(0) as usize, r.get::<_, i64>(1) as u64)).or_insert(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        })
    };
    // Sessions per replica, sampled every 250 ms: the most each held at once.
    let sessions: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let session_sampler = {
        let (sessions, config) = (sessions.clone(), config.clone());
        tokio::spawn(async move {
            let client = config.connect().await?;
            loop {
                let rows = client
                    .query(
                        "SELECT application_name, count(*) FROM pg_stat_activity \
                         WHERE datname = 'bench_fleet' AND application_name LIKE 'lakesync/%' GROUP BY 1",
                        &[],
                    )
                    .await?;
                {
                    let mut max = sessions.lock().unwrap();
                    for r in rows {
                        let e = max.entry(r.get(0)).or_insert(0);
                        *e = (*e).max(r.get(1));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        })
    };

    // Phase 1: one replica (the reference).
    let mut replicas = vec![Replica::start(REPLICAS[0], &config_path, &log)?];
    let started = Instant::now();
    wait_until("the first replica to snapshot every table", Duration::from_secs(600), || {
        let db = &db;
        async move {
            let synced: i64 = db
                .query_one("SELECT count(*) FROM lakesync.synced_tables WHERE synced_version IS NOT NULL", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            Ok(synced as usize == n)
        }
    })
    .await?;
    eprintln!("bench: {n} tables snapshotted by one replica in {:.1}s", started.elapsed().as_secs_f64());

    // The writer, until told to stop: (table, version, when its commit returned).
    let committed: Arc<Mutex<Vec<(usize, u64, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (committed, stop) = (committed.clone(), stop.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(PathBuf, DeltaWriter, u64)>> {
            let (_, mut next) = {
                let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
                let mut rng = seed | 1;
                (seed, move |m: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % m
                })
            };
            let mut heads = vec![1u64; writers.len()];
            let mut ids = vec![1000u64; writers.len()];
            let start = Instant::now();
            let mut tick = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let due = start + Duration::from_millis(100) * tick;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                tick += 1;
                let i = next(writers.len() as u64) as usize;
                let v = writers[i].1.append(&[customers(ids[i]..ids[i] + 20, 0)])?;
                ids[i] += 20;
                heads[i] = v;
                committed.lock().unwrap().push((i, v, Instant::now()));
            }
            Ok(writers.into_iter().zip(heads).map(|((p, w), h)| (p, w, h)).collect())
        })
    };
    let p1 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;

    // Phase 2: three replicas share the tables.
    for id in &REPLICAS[1..] {
        replicas.push(Replica::start(id, &config_path, &log)?);
    }
    wait_until("three replicas to share the tables", Duration::from_secs(120), || {
        let db = &db;
        async move { Ok(spread(&holders(db).await?, n, &REPLICAS)) }
    })
    .await?;
    let p2 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;

    // Phase 3: ten SIGKILLs.
    let p3 = Instant::now();
    let mut takeovers = Vec::new();
    for k in 0..KILLS {
        let victim = k % REPLICAS.len();
        let id = REPLICAS[victim];
        let held: Vec<String> = holders(&db).await?.into_iter().filter(|(_, r)| r == id).map(|(t, _)| t).collect();
        replicas[victim].kill();
        let took = wait_until("the others to take the killed replica's tables", Duration::from_secs(60), || {
            let (db, held) = (&db, &held);
            async move {
                let h = holders(db).await?;
                Ok(held.iter().all(|t| h.get(t).is_some_and(|r| r != id)))
            }
        })
        .await?;
        takeovers.push(took.as_secs_f64());
        for r in &mut replicas {
            r.sample_rss();
        }
        let peak = replicas[victim].peak_rss_mb;
        replicas[victim] = Replica::start(id, &config_path, &log)?;
        replicas[victim].peak_rss_mb = peak;
        wait_until("the restarted replica to take its share", Duration::from_secs(120), || {
            let db = &db;
            async move { Ok(spread(&holders(db).await?, n, &REPLICAS)) }
        })
        .await?;
    }
    let end = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let tables = writer.await??;
    let last_commit = committed.lock().unwrap().last().map(|c| c.2).unwrap_or(end);
    wait_until("every table to catch up", Duration::from_secs(120), || {
        let (db, tables) = (&db, &tables);
        async move {
            let rows = db
                .query(
                    "SELECT substr(target_table, 2)::int, synced_version FROM lakesync.synced_tables WHERE target_schema = 'fleet'",
                    &[],
                )
                .await?;
            let synced: BTreeMap<usize, u64> =
                rows.into_iter().map(|r| (r.get::<_, i32>(0) as usize, r.get::<_, i64>(1) as u64)).collect();
            Ok(tables.iter().enumerate().all(|(i, t)| synced.get(&i) == Some(&t.2)))
        }
    })
    .await?;
    watcher.abort();
    session_sampler.abort();
    for r in &mut replicas {
        r.sample_rss();
    }
    for (i, (path, _, head)) in tables.iter().enumerate() {
        verify_against_delta(&config, &TableName::new("fleet", format!("t{i:03}")), path, *head)
            .await
            .with_context(|| format!("verifying fleet.t{i:03}"))?;
    }

    let seen = seen.lock().unwrap().clone();
    let committed = committed.lock().unwrap().clone();
    let lags = |from: Instant, to: Instant| -> Vec<f64> {
        let mut l: Vec<f64> = committed
            .iter()
            .filter(|c| c.2 >= from && c.2 < to)
            .filter_map(|(t, v, at)| {
                // Visible when the table's synced version reached v (a later version counts).
                let visible = seen.range((*t, *v)..(*t, u64::MAX)).map(|(_, when)| *when).min()?;
                Some(visible.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect();
        l.sort_by(f64::total_cmp);
        l
    };
    let pct =
        |l: &[f64], p: f64| if l.is_empty() { f64::NAN } else { l[((l.len() as f64 - 1.0) * p).round() as usize] };
    let (one, three, kills) = (lags(p1, p2), lags(p2, p3), lags(p3, last_commit + Duration::from_millis(1)));
    takeovers.sort_by(f64::total_cmp);
    println!(
        "\nlakesync bench fleet: {n} continuous tables, poll {}, a 20-row commit to a random table every 100 ms",
        args.poll
    );
    println!("verified: every table equals its Delta table at its last version (count + checksum)\n");
    println!("| commit → visible | commits | p50 ms | p99 ms | max ms | p50 vs one replica |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, l) in [
        ("(1) one replica (reference)", &one),
        ("(2) three replicas", &three),
        ("(3) three replicas, 10 SIGKILLs", &kills),
    ] {
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.2}x |",
            l.len(),
            pct(l, 0.5),
            pct(l, 0.99),
            l.last().copied().unwrap_or(f64::NAN),
            pct(l, 0.5) / pct(&one, 0.5)
        );
    }
    println!(
        "\ntakeover after SIGKILL (until another replica holds every table the killed one held): \
         p50 {:.2} s, max {:.2} s over {KILLS} kills (heartbeat 1 s)",
        pct(&takeovers, 0.5),
        takeovers.last().copied().unwrap_or(f64::NAN)
    );
    let sessions = sessions.lock().unwrap().clone();
    let most = sessions.values().copied().max().unwrap_or(0);
    println!(
        "Postgres sessions per replica, at most: {most} (max_concurrent_runs 8; {} tables each)",
        n / REPLICAS.len()
    );
    for r in &replicas {
        println!(
            "- {}: at most {} sessions, peak RSS {:.0} MB",
            r.id,
            sessions.get(&format!("lakesync/{}", r.id)).unwrap_or(&0),
            r.peak_rss_mb
        );
    }
    Ok(())
}
