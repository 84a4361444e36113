//! `lakesync bench --scenario continuous`: commit → visible latency of continuous mode.
//!
//! A writer commits about `--changes` changed rows every second for `--seconds` (each tick a
//! DELETE of one data file's rows and an append of the same customers revised: two Delta
//! commits, like a MERGE written without change files), checkpointing every 10 commits as
//! Spark does. The daemon follows the table in continuous mode in this process, exactly as
//! `lakesync serve` runs it. A watcher polls `lakesync.synced_tables` every 5 ms on its own
//! connection: a version is visible when its synced version commits (it commits with the
//! rows). Latency = first time the watcher sees the version − the moment its Delta commit
//! returned. The final table is verified against the Delta snapshot.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lakesync_core::TableName;
use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use lakesync_engine::config::TableConfig;
use lakesync_engine::Daemon;
use lakesync_postgres::cluster::LocalCluster;
use lakesync_postgres::PgConfig;

use super::{pg_cpu_seconds, postmaster_pid, proc_status_kb, verify, BenchArgs};

pub async fn measure(args: &BenchArgs, dir: &Path, cluster: &LocalCluster) -> anyhow::Result<()> {
    let admin = PgConfig::parse(&cluster.connection_string("postgres"))?.connect().await?;
    admin.batch_execute("DROP DATABASE IF EXISTS bench_lag WITH (FORCE)").await?;
    admin.batch_execute("CREATE DATABASE bench_lag").await?;
    let config = PgConfig::parse(&cluster.connection_string("bench_lag"))?;
    let postmaster = postmaster_pid(&dir.join("postgres/data"))?;
    let (ticks, per_tick) = (args.seconds, args.changes);

    let delta = dir.join("lag_customers");
    let writer = {
        let delta = delta.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let _ = std::fs::remove_dir_all(&delta);
            let w = DeltaWriter::create(&delta, &customer_schema(), &[("delta.enableChangeDataFeed", "true")])?;
            let files = (0..ticks + 5).map(|f| customers(f * per_tick..(f + 1) * per_tick, 0));
            let (_, paths) = w.append_files(files)?;
            w.checkpoint()?;
            Ok((w, paths))
        })
        .await??
    };
    let (writer, base_files) = writer;
    let table = TableName::new("public", "customer_profiles");
    let spec = TableConfig {
        poll_interval: Some(args.poll.clone()),
        ..TableConfig::new(delta.display().to_string(), table.to_string(), &["customer_id"], "continuous")
    }
    .validate()?;
    let daemon = Daemon::new(config.clone());
    let worker = daemon.add(spec)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while worker.status().synced_version != Some(1) {
        anyhow::ensure!(Instant::now() < deadline, "the initial snapshot did not finish: {:?}", worker.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("bench: {} rows synced; committing ~{per_tick} changed rows/s for {ticks}s", (ticks + 5) * per_tick);

    // The watcher: (when seen, synced version) at every change.
    let seen: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let watcher = {
        let (seen, config) = (seen.clone(), config.clone());
        tokio::spawn(async move {
            let client = config.connect().await?;
            let query = client
                .prepare("SELECT synced_version FROM lakesync.synced_tables WHERE target_table = 'customer_profiles'")
                .await?;
            let mut last = 0;
            loop {
                let v: i64 = client.query_one(&query, &[]).await?.get(0);
                if v as u64 > last {
                    last = v as u64;
                    seen.lock().unwrap().push((Instant::now(), last));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        })
    };

    // Memory over time (current RSS every 5 s): it must stay flat however long this runs.
    let rss_samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let sampler = {
        let samples = rss_samples.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kb) = proc_status_kb(std::process::id(), "VmRSS") {
                    samples.lock().unwrap().push(kb as f64 / 1024.0);
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    let cpu0 = pg_cpu_seconds(postmaster)?;
    let started = Instant::now();
    let committed = {
        let base_files = base_files.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(Instant, u64)>> {
            let mut committed = Vec::new();
            for tick in 0..ticks {
                let due = started + Duration::from_secs(tick);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let file = &base_files[tick as usize];
                let v = writer.remove_files(|p| p == file)?;
                committed.push((Instant::now(), v));
                let v = writer.append(&[customers(tick * per_tick..(tick + 1) * per_tick, 1)])?;
                committed.push((Instant::now(), v));
                // Every 10 commits (5 ticks), as Spark does.
                if tick % 5 == 4 {
                    writer.checkpoint()?;
                }
            }
            Ok(committed)
        })
        .await??
    };
    let last = committed.last().map(|c| c.1).unwrap_or(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().last().map(|s| s.1) < Some(last) {
        anyhow::ensure!(Instant::now() < deadline, "the daemon did not catch up with version {last}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pg_cpu = pg_cpu_seconds(postmaster)? - cpu0;
    watcher.abort();
    sampler.abort();
    let rss_samples = rss_samples.lock().unwrap().clone();
    let runs = worker.metrics.runs_applied.load(Ordering::Relaxed);
    let run_micros = worker.metrics.duration_sum_micros.load(Ordering::Relaxed);
    let run_count = worker.metrics.duration_count.load(Ordering::Relaxed).max(1);
    daemon.shutdown(Duration::from_secs(10)).await;
    verify(&config, &table, &delta, last).await.context("verifying the continuously synced table")?;

    let seen = seen.lock().unwrap().clone();
    let mut lags: Vec<f64> = committed
        .iter()
        .map(|(at, v)| {
            let visible = seen.iter().find(|(_, s)| s >= v).map(|(t, _)| *t).expect("caught up");
            visible.saturating_duration_since(*at).as_secs_f64() * 1000.0
        })
        .collect();
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags[((lags.len() as f64 - 1.0) * p).round() as usize];
    let rss = proc_status_kb(std::process::id(), "VmHWM").map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN);
    println!(
        "\nlakesync bench continuous: {ticks}s, {} commits, ~{per_tick} changed rows/s, poll {}",
        committed.len(),
        args.poll
    );
    println!("verified: the table equals Delta version {last} (count + checksum)\n");
    println!("| commit → visible | ms |");
    println!("|---|---:|");
    for (name, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        println!("| {name} | {:.0} |", pct(p));
    }
    println!("| max | {:.0} |", lags.last().copied().unwrap_or(0.0));
    if let (Some(first), Some(last)) = (rss_samples.get(1).or(rss_samples.first()), rss_samples.last()) {
        let max = rss_samples.iter().copied().fold(0.0, f64::max);
        println!("\nRSS (sampled every 5 s): {first:.0} MB after 5 s, {last:.0} MB at the end, {max:.0} MB at most");
    }
    println!(
        "\nsync runs: {runs} (mean {:.0} ms); peak RSS of this process (writer + daemon): {rss:.0} MB; Postgres CPU: {pg_cpu:.1} s",
        run_micros as f64 / run_count as f64 / 1000.0
    );
    Ok(())
}
