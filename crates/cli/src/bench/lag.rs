//! `lakesync bench --scenario continuous`: commit → visible latency of continuous mode.
//!
//! A writer commits about `--changes` changed rows every second for `--seconds` (each tick a
//! DELETE of one data file's rows and an append of the same customers revised: two Delta
//! commits, like a MERGE written without change files), checkpointing every 10 commits as
//! Spark does. The daemon is a separate `lakesync serve` process following the table in
//! continuous mode, so its memory is measured apart from the writer's. A watcher polls
//! `lakesync.synced_tables` every 5 ms on its own connection: a version is visible when its
//! synced version commits (it commits with the rows). Latency = first time the watcher sees
//! the version − the moment its Delta commit returned. The final table is verified against
//! the Delta snapshot.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lakesync_core::TableName;
use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use lakesync_postgres::cluster::LocalCluster;
use lakesync_postgres::PgConfig;

use super::{pg_cpu_seconds, postmaster_pid, proc_status_kb, verify_against_delta, BenchArgs};

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
    let config_path = dir.join("lag.toml");
    std::fs::write(
        &config_path,
        format!(
            "[postgres]\nurl = {conn:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n[[tables]]\nsource = {source:?}\n\
             target = \"{table}\"\nprimary_key = [\"customer_id\"]\nmode = \"continuous\"\npoll_interval = {poll:?}\n",
            conn = cluster.connection_string("bench_lag"),
            source = delta.display().to_string(),
            poll = args.poll,
        ),
    )?;
    let mut daemon = Serve::start(&config_path, &dir.join("lag-serve.log"))?;
    let daemon_pid = daemon.0.id();
    let watch = config.connect().await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v: Option<i64> = watch
            .query_opt(
                "SELECT synced_version FROM lakesync.synced_tables WHERE target_table = 'customer_profiles'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get(0));
        if v == Some(1) {
            break;
        }
        if let Some(status) = daemon.0.try_wait()? {
            anyhow::bail!("lakesync serve exited ({status}); see {}", dir.join("lag-serve.log").display());
        }
        anyhow::ensure!(Instant::now() < deadline, "the initial snapshot did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(watch);
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

    // Memory over time (current RSS of the daemon and of this writer every 5 s): the daemon's
    // must stay flat however long this runs.
    let rss_samples: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let sampler = {
        let samples = rss_samples.clone();
        tokio::spawn(async move {
            loop {
                let mb = |pid| proc_status_kb(pid, "VmRSS").map(|kb| kb as f64 / 1024.0).unwrap_or(f64::NAN);
                samples.lock().unwrap().push((mb(daemon_pid), mb(std::process::id())));
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
    let daemon_peak = proc_status_kb(daemon_pid, "VmHWM").map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN);
    daemon.stop()?;
    let (runs, mean_run_ms): (i64, f64) = {
        let row = config
            .connect()
            .await?
            .query_one(
                "SELECT count(*), coalesce(avg(extract(epoch FROM ended_at - started_at)) * 1000, 0)::float8 \
                 FROM lakesync.runs WHERE target_table = 'customer_profiles' AND mode = 'triggered' \
                 AND outcome = 'succeeded'",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    verify_against_delta(&config, &table, &delta, last).await.context("verifying the continuously synced table")?;

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
    let writer_peak = proc_status_kb(std::process::id(), "VmHWM").map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN);
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
    let daemon_rss: Vec<f64> = rss_samples.iter().map(|s| s.0).collect();
    let writer_rss: Vec<f64> = rss_samples.iter().map(|s| s.1).collect();
    println!("\nRSS in MB, sampled every 5 s: after 5 s, at the end, at most (peak)");
    for (name, samples, peak) in
        [("daemon (lakesync serve)", &daemon_rss, daemon_peak), ("writer (this process)", &writer_rss, writer_peak)]
    {
        if let (Some(first), Some(last)) = (samples.get(1).or(samples.first()), samples.last()) {
            let max = samples.iter().copied().fold(0.0, f64::max);
            println!("- {name}: {first:.0}, {last:.0}, {max:.0} ({peak:.0})");
        }
    }
    if daemon_rss.len() >= 8 {
        // Growth after warm-up: the last quarter's mean against the second quarter's.
        let q = daemon_rss.len() / 4;
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        println!(
            "- daemon growth after warm-up: {:+.1} MB (mean of the last quarter of samples minus the second quarter's)",
            mean(&daemon_rss[3 * q..]) - mean(&daemon_rss[q..2 * q])
        );
    }
    println!("\nsync runs: {runs} (mean {mean_run_ms:.0} ms); Postgres CPU: {pg_cpu:.1} s");
    let log = std::fs::read_to_string(dir.join("lag-serve.log")).unwrap_or_default();
    println!("\n{}", run_breakdown(&log));
    Ok(())
}

/// The mean of each phase over the change-feed runs the daemon logged ("run timings").
pub(super) fn run_breakdown(log: &str) -> String {
    let mut sums: Vec<(String, f64)> = Vec::new();
    let mut runs = 0;
    for line in log.lines().filter(|l| l.contains("run timings") && l.contains("mode=\"triggered\"")) {
        let Some(text) = line.split("timings=").nth(1) else { continue };
        runs += 1;
        for (phase, secs) in lakesync_core::Timings::parse(text.trim()) {
            match sums.iter_mut().find(|(p, _)| *p == phase) {
                Some((_, s)) => *s += secs,
                None => sums.push((phase, secs)),
            }
        }
    }
    if runs == 0 {
        return "no run timings in the daemon's log".into();
    }
    let phases: Vec<String> = sums.iter().map(|(p, s)| format!("{p} {:.1}", s * 1000.0 / runs as f64)).collect();
    format!("mean of {runs} change-feed runs, ms per phase: {}", phases.join(", "))
}

/// The `lakesync serve` child; killed if the bench fails before stopping it.
pub(super) struct Serve(pub(super) Child);

impl Serve {
    /// `lakesync serve --config <config>`, its output in `log`.
    pub(super) fn start(config: &Path, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        Ok(Self(
            Command::new(std::env::current_exe()?)
                .args(["serve", "--config"])
                .arg(config)
                // Each run's phases, for the breakdown (see `run_breakdown`).
                .env("LAKESYNC_LOG", "warn,lakesync_engine=info,lakesync_engine::daemon=debug,lakesync_ingest=info")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting lakesync serve")?,
        ))
    }

    /// SIGTERM, then wait for the clean exit.
    fn stop(&mut self) -> anyhow::Result<()> {
        Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status()?;
        let status = self.0.wait()?;
        anyhow::ensure!(status.success(), "lakesync serve exited with {status} after SIGTERM");
        Ok(())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
