//! `lakesync bench --scenario ingest`: Kafka → Delta throughput against the broker's read
//! ceiling, then end-to-end freshness (event produced → row in Postgres).
//!
//! A local `tansu` broker (or `--brokers`) gets a 4-partition topic of `--rows` JSON events
//! of about 200 bytes (the seed's transaction events), produced before anything is measured
//! in record batches of `--produce-batch` events (as batching producers send; 1 sends one
//! record per request).
//! (r) The read ceiling: every partition fetched from offset 0 to its end concurrently with
//! the same client and fetch size the ingest uses, decoding nothing: what the broker can hand
//! out. (i) `lakesync ingest --exit-when-caught-up` as a child process (its peak RSS read from
//! /proc), into a fresh Delta table; the table is then verified: exactly `--rows` rows, each
//! `seq` once. (w) The same events decoded and committed from memory in flushes of 100k, no
//! broker: lakesync's own ceiling. (f) Freshness: `lakesync serve` with an ingest of a fresh
//! topic (flushing every second) into that table and a continuous table on it (snapshot of
//! the `--rows` first); for `--seconds` an event is produced every 20 ms and a watcher
//! polls `max(seq)` in Postgres every 5 ms: latency = first time the watcher sees the event's
//! seq − the moment its produce returned.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lakesync_ingest::kafka::{create_topic, end_offsets, Producer, Security};
use lakesync_postgres::cluster::LocalCluster;
use lakesync_postgres::PgConfig;

use super::{proc_status_kb, run_child, settle, BenchArgs};
use crate::events::{event, SCHEMA};

/// Partitions of the freshness phase's topic.
const PARTITIONS: i32 = 4;

/// A broker: the one given, or a local tansu started for the run (stopped when dropped).
pub(crate) struct Broker {
    child: Option<std::process::Child>,
    pub(crate) address: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `brokers`, or a local tansu (installed by `scripts/test`) listening on `port`.
pub(crate) fn start_broker(brokers: Option<&str>, port: u16) -> anyhow::Result<Broker> {
    if let Some(address) = brokers {
        return Ok(Broker { child: None, address: address.to_string() });
    }
    let bin: PathBuf = match std::env::var("LAKESYNC_TEST_TANSU") {
        Ok(p) => p.into(),
        Err(_) => [
            "/opt/lakesync-test-tansu-0.6.0-sql/bin/tansu".to_string(),
            format!("{}/.cache/lakesync-test-tansu-0.6.0-sql/bin/tansu", std::env::var("HOME").unwrap_or_default()),
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("no tansu broker: run `bash scripts/test` once (it installs it) or pass --brokers")?,
    };
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(bin)
        .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/", "--silent"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tansu")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "tansu did not listen on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Broker { child: Some(child), address: format!("127.0.0.1:{port}") })
}

/// Produces events `from..to` over the partitions, one producer task per partition, in
/// record batches of up to `batch` events.
async fn produce(
    brokers: &[String],
    topic: &str,
    from: u64,
    to: u64,
    batch: usize,
    partitions: u64,
) -> anyhow::Result<()> {
    let producer = Arc::new(Producer::connect(brokers, &Security::default(), topic).await.map_err(anyhow::Error::msg)?);
    let mut tasks = Vec::new();
    for p in 0..partitions {
        let producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            let first = from + (p + partitions - from % partitions) % partitions;
            let seqs: Vec<u64> = (first..to).step_by(partitions as usize).collect();
            for chunk in seqs.chunks(batch) {
                if batch == 1 {
                    producer.send(p as i32, None, Some(event(chunk[0]))).await.map_err(anyhow::Error::msg)?;
                } else {
                    let values = chunk.iter().map(|s| event(*s)).collect();
                    producer.send_batch(p as i32, values).await.map_err(anyhow::Error::msg)?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// (r): every message fetched once, concurrently per partition, as the ingest fetches.
async fn read_ceiling(brokers: &[String], topic: &str) -> anyhow::Result<(f64, u64, u64)> {
    let client = rskafka_client(brokers).await?;
    let ends = end_offsets(brokers, &Security::default(), topic).await.map_err(anyhow::Error::msg)?;
    let fetch = lakesync_ingest::kafka::fetch_bytes(ends.len());
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (p, end) in ends {
        let pc = client
            .partition_client(topic.to_string(), p, rskafka::client::partition::UnknownTopicHandling::Retry)
            .await?;
        tasks.push(tokio::spawn(async move {
            let (mut next, mut messages, mut bytes) = (0i64, 0u64, 0u64);
            while next < end {
                let (records, _) = pc.fetch_records(next, 1..fetch, 500).await?;
                for r in records {
                    if r.offset < next {
                        continue;
                    }
                    next = r.offset + 1;
                    messages += 1;
                    bytes += r.record.value.as_ref().map_or(0, Vec::len) as u64;
                }
            }
            anyhow::Ok((messages, bytes))
        }));
    }
    let (mut messages, mut bytes) = (0, 0);
    for task in tasks {
        let (m, b) = task.await??;
        messages += m;
        bytes += b;
    }
    Ok((t.elapsed().as_secs_f64(), messages, bytes))
}

async fn rskafka_client(brokers: &[String]) -> anyhow::Result<rskafka::client::Client> {
    Ok(rskafka::client::ClientBuilder::new(brokers.to_vec()).build().await?)
}

/// Checks the table holds each `seq` of `0..rows` exactly once; returns its data files and
/// commit files.
fn verify(table: &Path, rows: u64) -> anyhow::Result<(usize, usize)> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;
    let t = lakesync_delta::DeltaTable::open(&table.display().to_string())?;
    let snapshot = t.snapshot(None)?;
    let mut seen = vec![false; rows as usize];
    let mut count = 0u64;
    for batch in snapshot.batches()? {
        let batch = batch?;
        let seq = batch.column_by_name("seq").context("no seq column")?.as_primitive::<Int64Type>();
        for s in seq.values() {
            let s = *s as usize;
            anyhow::ensure!(s < seen.len() && !seen[s], "seq {s} is missing from the topic or in the table twice");
            seen[s] = true;
            count += 1;
        }
    }
    anyhow::ensure!(count == rows, "the table holds {count} rows, not {rows}");
    let w = lakesync_delta::DeltaWriter::open(table)?;
    let files = w.files()?.len();
    let commits = std::fs::read_dir(table.join("_delta_log"))?
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json")))
        .count();
    Ok((files, commits))
}

pub async fn measure(args: &BenchArgs, dir: &Path, cluster: &LocalCluster) -> anyhow::Result<()> {
    let broker = start_broker(args.brokers.as_deref(), args.port + 1)?;
    let brokers = vec![broker.address.clone()];
    let topic = format!("bench-events-{}", std::process::id());
    let partitions = args.partitions.max(1);
    create_topic(&brokers, &Security::default(), &topic, partitions).await.map_err(anyhow::Error::msg)?;
    let rows = args.rows();
    let batch = args.produce_batch.max(1);
    eprintln!(
        "bench: producing {rows} events of ~{} bytes to {partitions} partitions, {batch} a request",
        event(rows / 2).len()
    );
    let t = Instant::now();
    produce(&brokers, &topic, 0, rows, batch, partitions as u64).await?;
    let produce_s = t.elapsed().as_secs_f64();

    settle();
    let (read_s, read_messages, read_bytes) = read_ceiling(&brokers, &topic).await?;
    anyhow::ensure!(read_messages == rows, "the broker handed out {read_messages} of {rows} messages");

    let table = dir.join("ingest_events");
    let _ = std::fs::remove_dir_all(&table);
    let schema = dir.join("ingest_events.schema.json");
    std::fs::write(&schema, SCHEMA)?;
    settle();
    let exe = std::env::current_exe()?;
    let table_arg = table.display().to_string();
    let schema_arg = schema.display().to_string();
    let ingest_args = [
        "ingest",
        "--brokers",
        &broker.address,
        "--topic",
        &topic,
        "--table",
        &table_arg,
        "--schema",
        &schema_arg,
        "--flush-rows",
        "100000",
        "--exit-when-caught-up",
    ];
    let postmaster = super::postmaster_pid(&dir.join("postgres/data"))?;
    let conn = cluster.connection_string("postgres");
    let (ingest_s, ingest_rss, _, _) =
        tokio::task::block_in_place(|| run_child(&exe, &ingest_args, &[], &conn, postmaster))?;
    let (files, commits) = tokio::task::block_in_place(|| verify(&table, rows))?;

    // (w): the same events decoded and committed without a broker: lakesync's own ceiling.
    settle();
    let write_s = {
        let (table, schema) = (dir.join("ingest_events_w"), schema.clone());
        let _ = std::fs::remove_dir_all(&table);
        tokio::task::spawn_blocking(move || write_ceiling(&table, &schema, rows, partitions as u64)).await??
    };

    let mb = read_bytes as f64 / 1e6;
    println!(
        "\n## Ingest: {rows} JSON events (~{:.0} bytes), {partitions} partitions, local tansu broker, record batches of {batch}\n",
        mb * 1e6 / rows as f64
    );
    println!("| phase | seconds | events/s | MB/s | peak RSS | ratio to (r) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| (r) read ceiling: fetch every message, decode nothing | {read_s:.2} | {:.0} | {:.1} | — | 1.00x |",
        rows as f64 / read_s,
        mb / read_s
    );
    println!(
        "| (i) `lakesync ingest` → Delta, verified | {ingest_s:.2} | {:.0} | {:.1} | {ingest_rss:.0} MB | {:.2}x |",
        rows as f64 / ingest_s,
        mb / ingest_s,
        read_s / ingest_s
    );
    println!(
        "| (w) decode + commit the same events from memory, no broker (lakesync's own ceiling) | {write_s:.2} | {:.0} | {:.1} | — | {:.2}x |",
        rows as f64 / write_s,
        mb / write_s,
        read_s / write_s
    );
    println!("\n(i) wrote {files} files in {commits} commits (incl. the create); producing took {produce_s:.1}s ({batch} records a request).");

    freshness(args, dir, &broker.address, &topic, cluster, rows).await
}

/// (w): `rows` events decoded and appended in flushes of 100k (as the ingest does), with
/// positions, from memory.
fn write_ceiling(table: &Path, schema: &Path, rows: u64, partitions: u64) -> anyhow::Result<f64> {
    let arrow = lakesync_delta::schema::arrow_schema_from_json("schema", &std::fs::read_to_string(schema)?)
        .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(table)?;
    let writer = lakesync_delta::DeltaWriter::create(table, &arrow, &[("delta.enableChangeDataFeed", "true")])?;
    let decoder = lakesync_ingest::Decoder::new("bench", Arc::new(arrow));
    let messages: Vec<lakesync_ingest::Message> = (0..rows)
        .map(|seq| lakesync_ingest::Message {
            partition: (seq % partitions) as i32,
            offset: (seq / partitions) as i64,
            timestamp_ms: 0,
            key: None,
            value: Some(event(seq)),
        })
        .collect();
    let t = Instant::now();
    let mut from = None;
    for (i, chunk) in messages.chunks(100_000).enumerate() {
        let decoded = decoder.decode(chunk)?;
        anyhow::ensure!(decoded.bad.is_empty(), "bench events do not decode");
        let to = ((i + 1) * 100_000) as i64;
        let at = [lakesync_delta::AppPosition { app_id: "bench".into(), from, to }];
        writer.append_once(&[decoded.rows], &at)?;
        from = Some(to);
    }
    Ok(t.elapsed().as_secs_f64())
}

/// (f): event produced → row in Postgres, with the ingest flushing every second and the
/// table in continuous mode.
async fn freshness(
    args: &BenchArgs,
    dir: &Path,
    brokers: &str,
    topic: &str,
    cluster: &LocalCluster,
    from: u64,
) -> anyhow::Result<()> {
    let admin = PgConfig::parse(&cluster.connection_string("postgres"))?.connect().await?;
    admin.batch_execute("DROP DATABASE IF EXISTS bench_ingest WITH (FORCE)").await?;
    admin.batch_execute("CREATE DATABASE bench_ingest").await?;
    let config = PgConfig::parse(&cluster.connection_string("bench_ingest"))?;
    let table = dir.join("ingest_events");
    // A fresh topic into the same (1M-row) table: the local broker serves a topic holding
    // a million single-record batches slowly, which a real broker does not.
    let topic = &format!("{topic}-live");
    create_topic(&[brokers.to_string()], &Security::default(), topic, PARTITIONS).await.map_err(anyhow::Error::msg)?;
    let config_path = dir.join("ingest.toml");
    std::fs::write(
        &config_path,
        format!(
            "[postgres]\nurl = {conn:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n[[ingest]]\nbrokers = [{brokers:?}]\n\
             topic = {topic:?}\ntable = {table:?}\nflush_interval = \"1s\"\n\n[[tables]]\nsource = {table:?}\n\
             target = \"app.events\"\nprimary_key = [\"transaction_id\"]\nmode = \"continuous\"\n\
             poll_interval = {poll:?}\ndedup_by = \"seq\"\n",
            conn = cluster.connection_string("bench_ingest"),
            table = table.display().to_string(),
            poll = args.poll,
        ),
    )?;
    let mut daemon = super::lag::Serve::start(&config_path, &dir.join("ingest-serve.log"))?;
    let daemon_pid = daemon.0.id();
    let client = config.connect().await?;
    let max_seq = "SELECT coalesce(max(seq), -1) FROM app.events";
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let v: Option<i64> = client.query_opt(max_seq, &[]).await.ok().flatten().map(|r| r.get(0));
        if v == Some(from as i64 - 1) {
            break;
        }
        if let Some(status) = daemon.0.try_wait()? {
            anyhow::bail!("lakesync serve exited ({status}); see {}", dir.join("ingest-serve.log").display());
        }
        anyhow::ensure!(Instant::now() < deadline, "the initial snapshot did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("bench: {from} events synced; producing one event every 20 ms for {}s", args.seconds);
    let seen: Arc<Mutex<Vec<(Instant, i64)>>> = Arc::default();
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let query = client.prepare(max_seq).await?;
            let mut last = from as i64 - 1;
            loop {
                let v: i64 = client.query_one(&query, &[]).await?.get(0);
                if v > last {
                    last = v;
                    seen.lock().unwrap().push((Instant::now(), v));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        })
    };
    let producer =
        Producer::connect(&[brokers.to_string()], &Security::default(), topic).await.map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let count = args.seconds * 50;
    let mut produced = Vec::new();
    for i in 0..count {
        let due = started + Duration::from_millis(20 * i);
        tokio::time::sleep_until(due.into()).await;
        let seq = from + i;
        producer.send((seq % PARTITIONS as u64) as i32, None, Some(event(seq))).await.map_err(anyhow::Error::msg)?;
        produced.push((Instant::now(), seq as i64));
    }
    let last = from as i64 + count as i64 - 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().last().map(|s| s.1) < Some(last) {
        anyhow::ensure!(Instant::now() < deadline, "the pipeline did not catch up with event {last}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.abort();
    let daemon_rss = proc_status_kb(daemon_pid, "VmHWM").map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN);
    let seen = seen.lock().unwrap().clone();
    let mut latencies: Vec<f64> = produced
        .iter()
        .map(|(at, seq)| {
            let visible = seen.iter().find(|(_, v)| v >= seq).map(|(t, _)| *t).expect("every event seen");
            visible.saturating_duration_since(*at).as_secs_f64()
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "\n## Freshness: event produced → row in Postgres ({count} events, 50/s for {}s; ingest flush 1s, poll {})\n",
        args.seconds, args.poll
    );
    println!("| p50 | p90 | p99 | max | daemon peak RSS |");
    println!("|---|---|---|---|---|");
    println!(
        "| {:.2} s | {:.2} s | {:.2} s | {:.2} s | {daemon_rss:.0} MB |",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    drop(daemon);
    Ok(())
}
