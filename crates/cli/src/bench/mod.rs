//! `lakesync bench`: measures lakesync against reference paths in one run, on one private
//! Postgres with the same settings for every measurement, and verifies every result.
//!
//! Phases: (a) the reference ceiling — the same rows, pre-encoded, pushed with one binary
//! `COPY` into an unindexed table, then the primary key built; (b) `lakesync sync` snapshot,
//! Delta files → indexed live table; (c) `lakesync sync` of one MERGE-like change (updates
//! 0.8%, inserts 0.2%, deletes 0.1% of the rows); (d) the blog pattern for the same changes
//! (`MERGE .. USING (VALUES ..)` 1000 rows a statement plus `DELETE .. = ANY($1)`, one
//! transaction) applied to the reference table. (b) and (c) run `lakesync` as a child process
//! so its peak RSS can be read.
//!
//! The change is one `MERGE` commit written by a real MERGE writer (Python `deltalake`, i.e.
//! delta-rs): like Spark's MERGE, it rewrites the touched files and records the change in
//! `_change_data` (cdc) files. `--change deletion-vectors` commits it instead as the kernel
//! can write it: one commit deleting the old rows with deletion vectors (the shape of Spark's
//! DELETE, for which the change feed must be computed from the data files), one appending
//! the new ones. Either way it is one set of 55k net changes at 5M rows, synced in one range.
//!
//! Both Delta versions are written before anything is measured. `--rounds N` then measures a
//! to d N times, each round on fresh tables, and reports medians and every round's ratios
//! (each taken against the reference measured in the same round). Before each phase the OS
//! writes out its dirty pages, so no phase is charged for the previous one's writeback.
//!
//! `--source-store s3` adds (b3) and (c3): the same snapshot and incremental sync with the
//! table read from a local S3-protocol server (see [`s3`]), each against its local-path run.

mod fleet;
pub(crate) mod ingest;
mod lag;
mod s3;
mod seed;
mod serving;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, Float64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use lakesync_core::{NulBytePolicy, TableName};
use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use lakesync_delta::DeltaTable;
use lakesync_postgres::cluster::LocalCluster;
use lakesync_postgres::copy::{encode_batch, HEADER, TRAILER};
use lakesync_postgres::ddl::{column_definitions, qualified};
use lakesync_postgres::PgConfig;
use md5::{Digest, Md5};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rows in the customer_profiles table (default 5,000,000; 50,000,000 for the seed).
    #[arg(long)]
    rows: Option<u64>,
    /// Rows per Parquet file.
    #[arg(long, default_value_t = 250_000)]
    file_rows: u64,
    /// Working directory (Delta table and private Postgres).
    #[arg(long, default_value = ".lakesync-bench")]
    dir: PathBuf,
    /// Port of the private Postgres.
    #[arg(long, default_value_t = 54331)]
    port: u16,
    /// COPY connections for lakesync's snapshot.
    #[arg(long, default_value_t = 2)]
    parallelism: usize,
    /// sync: how many times to measure a to e (each round from fresh tables); the table
    /// then shows each phase's median and every round's ratios.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Leave the private Postgres running afterwards (to look at the tables).
    #[arg(long)]
    keep_postgres: bool,
    /// sync: snapshot and incremental vs references and Postgres's floor; continuous: commit →
    /// visible latency of continuous mode; api: data API latency and throughput vs FastAPI.
    #[arg(long, value_enum, default_value = "sync")]
    scenario: Scenario,
    /// continuous/api: how long to run, seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// continuous: changed rows per second.
    #[arg(long, default_value_t = 1000)]
    changes: u64,
    /// continuous: the table's poll interval.
    #[arg(long, default_value = "100ms")]
    poll: String,
    /// sync: how the change is committed to Delta.
    #[arg(long, value_enum, default_value = "merge")]
    change: ChangeShape,
    /// sync, --change merge: the Python interpreter with `deltalake` installed (default:
    /// `.venv/bin/python` if it exists, else `python3`).
    #[arg(long)]
    python: Option<PathBuf>,
    /// sync: `s3` also measures the snapshot and the incremental sync with the table in a
    /// local S3-protocol server (moto, from --python's environment), against the local path.
    #[arg(long, value_enum, default_value = "local")]
    source_store: SourceStore,
    /// ingest: a Kafka broker (host:port) to use instead of starting a local tansu.
    #[arg(long)]
    brokers: Option<String>,
    /// ingest: events per produce request (record batch); 1 sends one record per request.
    #[arg(long, default_value_t = 500)]
    produce_batch: usize,
    /// ingest: partitions of the topic the backlog is produced to.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// fleet: continuous tables the replicas share.
    #[arg(long, default_value_t = 100)]
    tables: usize,
}

impl BenchArgs {
    /// `--rows`, or the scenario's default.
    fn rows(&self) -> u64 {
        self.rows.unwrap_or(if self.scenario == Scenario::Seed { seed::SEED_ROWS } else { 5_000_000 })
    }
}

/// Where the sync scenario reads the table from, besides the local path.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceStore {
    Local,
    S3,
}

/// How the bench's change reaches Delta.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChangeShape {
    /// One MERGE commit with cdc files, written by Python `deltalake` (as Spark and delta-rs
    /// write MERGE with the change data feed on).
    Merge,
    /// A deletion-vector commit of the old rows plus an append of the new ones (kernel writer);
    /// the change feed of the first must be computed by reading every touched data file.
    DeletionVectors,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Sync,
    Continuous,
    Api,
    /// Kafka → Delta throughput against the broker's read ceiling, then event → Postgres
    /// freshness (`--rows` events; a local tansu broker unless `--brokers`).
    Ingest,
    /// One replica, then three sharing `--tables` continuous tables, then ten SIGKILLs:
    /// commit → visible, takeover time, Postgres sessions per replica.
    Fleet,
    /// The seed's table: 50M rows (built once and kept under --dir), snapshot and reference,
    /// then its 40k updates, lakesync against the blog pattern and Postgres's floor.
    Seed,
}

/// Ids changed by the benchmark's MERGE at `rows` rows.
pub struct ChangeSpec {
    pub updated: Vec<u64>,
    pub deleted: Vec<u64>,
    pub inserted: Vec<u64>,
}

impl ChangeSpec {
    /// Updates 0.8%, deletes 0.1%, inserts 0.2% of `rows`, spread over the whole key range.
    pub fn new(rows: u64) -> Self {
        Self {
            updated: (0..rows).filter(|i| i % 125 == 3).collect(),
            deleted: (0..rows).filter(|i| i % 1000 == 7).collect(),
            inserted: (rows..rows + rows / 500).collect(),
        }
    }

    fn len(&self) -> usize {
        self.updated.len() + self.deleted.len() + self.inserted.len()
    }
}

struct Measurement {
    name: &'static str,
    seconds: f64,
    rows: u64,
    peak_rss_mb: Option<f64>,
    pg_cpu_seconds: f64,
    /// A lakesync run's phases (`sync --timings`): (phase, seconds); the run's own total
    /// first, as "run".
    timings: Vec<(String, f64)>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::path::absolute(&args.dir)?;
    let rows = args.rows();
    let spec = ChangeSpec::new(rows);
    if args.scenario == Scenario::Sync {
        eprintln!("bench: {rows} rows, {} changes; working in {}", spec.len(), dir.display());
    }

    let cluster = {
        let pg_dir = dir.join("postgres");
        let port = args.port;
        // Room for the three tables (the reference, lakesync's and the floor's copy of it) and
        // their keys (about 190 bytes a row each), as a server tuned for its working set has
        // (the usual advice is a quarter of RAM): 4 GB at 5M rows.
        // Small runs (the test suite's) keep the default and do not reserve gigabytes.
        let buffers_mb = (rows * 800 / 1_000_000).clamp(512, 4096);
        let settings = match args.scenario {
            Scenario::Sync | Scenario::Seed => vec![("shared_buffers".to_string(), format!("{buffers_mb}MB"))],
            // Three replicas, each up to 8 runs with their sessions, and the bench's own.
            Scenario::Fleet => vec![("max_connections".to_string(), "300".to_string())],
            _ => Vec::new(),
        };
        tokio::task::spawn_blocking(move || {
            let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            LocalCluster::start_with(&pg_dir, port, &settings)
        })
        .await??
    };
    let result = match args.scenario {
        Scenario::Sync => {
            let memory = shared_memory(&dir.join("postgres/data"));
            measure(&args, &dir, &cluster, &spec).await.map(|rounds| print_table(&rounds, rows, &memory))
        }
        Scenario::Continuous => lag::measure(&args, &dir, &cluster).await,
        Scenario::Api => serving::measure(&args, &dir, &cluster).await,
        Scenario::Ingest => ingest::measure(&args, &dir, &cluster).await,
        Scenario::Fleet => fleet::measure(&args, &dir, &cluster).await,
        Scenario::Seed => seed::measure(&args, &dir, &cluster).await,
    };
    if !args.keep_postgres {
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.stop()).await??;
    }
    result
}

async fn measure(
    args: &BenchArgs,
    dir: &Path,
    cluster: &LocalCluster,
    spec: &ChangeSpec,
) -> anyhow::Result<Vec<Vec<Measurement>>> {
    let rows = args.rows();
    let admin = PgConfig::parse(&cluster.connection_string("postgres"))?;
    let admin_client = admin.connect().await?;
    admin_client.batch_execute("DROP DATABASE IF EXISTS bench WITH (FORCE)").await?;
    admin_client.batch_execute("CREATE DATABASE bench").await?;
    let conn = cluster.connection_string("bench");
    let config = PgConfig::parse(&conn)?;
    let postmaster = postmaster_pid(&dir.join("postgres/data"))?;

    // The Delta table: base version, then the change. Both are committed before anything is
    // measured, so every round syncs the same two versions (the snapshot stops at the base).
    let delta = dir.join("customer_profiles");
    let t = Instant::now();
    let _ = std::fs::remove_dir_all(&delta);
    let (base_version, final_version) = write_customer_table(args, dir, &delta, spec).await?;
    eprintln!("bench: wrote Delta versions {base_version} to {final_version} in {:.1}s", t.elapsed().as_secs_f64());
    eprintln!("bench: the change is Delta version {final_version}");

    // What every result must match, computed from Delta by the kernel.
    let (expected_base, expected_final) = {
        let delta = delta.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            Ok((delta_checksum(&delta, base_version)?, delta_checksum(&delta, final_version)?))
        })
        .await??
    };
    // The same table in a local S3-protocol server, uploaded as `aws s3 cp --recursive` would.
    let store = match args.source_store {
        SourceStore::Local => None,
        SourceStore::S3 => {
            let python = python(args);
            let server = s3::LocalS3::start(&python)?;
            let t = Instant::now();
            let uri = server.upload(&python, &delta, "customer_profiles")?;
            eprintln!(
                "bench: uploaded the table to {uri} ({}) in {:.1}s",
                server.endpoint(),
                t.elapsed().as_secs_f64()
            );
            Some((server.env(), uri, server))
        }
    };
    // The reference's rows, encoded once, before any clock runs.
    let schema = DeltaTable::open(&delta.display().to_string())?.snapshot(Some(base_version))?.schema()?;
    let encoded = encode_reference(rows, &schema)?;

    let client = config.connect().await?;
    let exe = std::env::current_exe()?;
    let source = delta.display().to_string();
    let parallelism = args.parallelism.to_string();
    let base = base_version.to_string();
    let reference = TableName::new("bench_ref", "customer_profiles");
    // lakesync's table in each round: one it has never seen, so there is no state to reset.
    let target_of = |round: u32| {
        TableName::new(
            "bench",
            if round == 1 { "customer_profiles".into() } else { format!("customer_profiles_r{round}") },
        )
    };
    let s3_target_of = |round: u32| TableName::new("bench", format!("customer_profiles_s3_r{round}"));
    let filtered_of = |round: u32| TableName::new("bench", format!("customer_profiles_filtered_r{round}"));
    let floor_of = |round: u32| TableName::new("bench", format!("customer_profiles_floor_r{round}"));
    let mut rounds = Vec::new();
    for round in 1..=args.rounds.max(1) {
        if args.rounds > 1 {
            eprintln!("bench: round {round} of {}", args.rounds);
        }
        // Each round starts from the same server state: the previous round's tables go.
        let target = target_of(round);
        if round > 1 {
            client.batch_execute(&format!("DROP TABLE {}", qualified(&target_of(round - 1)))).await?;
            client.batch_execute(&format!("DROP TABLE IF EXISTS {}", qualified(&s3_target_of(round - 1)))).await?;
            client.batch_execute(&format!("DROP TABLE IF EXISTS {}", qualified(&filtered_of(round - 1)))).await?;
        }
        let mut results = Vec::new();

        // (a2) The reference with lakesync's index settings (maintenance_work_mem 512MB, two
        // parallel maintenance workers), then (a) with the server's defaults: the ceiling
        // lakesync is measured against, and how much of a gap its settings alone explain.
        for tuned in [true, false] {
            results.push(reference_load(&client, &schema, &reference, &encoded, rows, tuned, postmaster).await?);
        }
        client.batch_execute("RESET maintenance_work_mem; RESET max_parallel_maintenance_workers").await?;
        verify(&config, &reference, base_version, expected_base).await.context("verifying the reference load")?;

        // (b) lakesync snapshot.
        let table = target.to_string();
        let sync_args = [
            "sync",
            "--source",
            source.as_str(),
            "--table",
            table.as_str(),
            "--primary-key",
            "customer_id",
            "--parallelism",
            parallelism.as_str(),
        ];
        let snapshot_args: Vec<&str> = sync_args.iter().copied().chain(["--to-version", base.as_str()]).collect();
        let phase = |name, rows, args: &[&str], env: &[(&str, String)]| {
            child_phase(name, rows, &exe, args, env, &conn, postmaster)
        };
        results.push(phase("b. lakesync snapshot (Delta -> indexed table)", rows, &snapshot_args, &[])?);
        verify(&config, &target, base_version, expected_base).await.context("verifying the snapshot")?;

        // (b2) The same snapshot with a filter keeping the first 10% of keys: the files are
        // written in key order, so the kernel skips the others by their statistics.
        let filtered = filtered_of(round);
        let filtered_table = filtered.to_string();
        let bound = format!("customer_id < '{}'", customer_key(rows / 10));
        let filtered_args: Vec<&str> = snapshot_args
            .iter()
            .map(|a| if *a == table.as_str() { filtered_table.as_str() } else { a })
            .chain(["--filter", bound.as_str()])
            .collect();
        results.push(phase("b2. lakesync snapshot, --filter keeping 10%", rows / 10, &filtered_args, &[])?);
        verify_filtered(&client, &filtered, &reference, &bound).await.context("verifying the filtered snapshot")?;

        // (b3) The same snapshot, the table read from the S3 server.
        let s3_target = s3_target_of(round);
        let s3_table = s3_target.to_string();
        let s3_args = |local: &[&str]| -> Option<Vec<String>> {
            let (_, uri, _) = store.as_ref()?;
            Some(
                local
                    .iter()
                    .map(|a| {
                        if *a == source.as_str() {
                            uri.clone()
                        } else if *a == table.as_str() {
                            s3_table.clone()
                        } else {
                            a.to_string()
                        }
                    })
                    .collect(),
            )
        };
        let store_env = store.as_ref().map(|(env, _, _)| env.clone()).unwrap_or_default();
        if let Some(remote) = s3_args(&snapshot_args) {
            let remote: Vec<&str> = remote.iter().map(String::as_str).collect();
            results.push(phase("b3. lakesync snapshot, table in S3 (moto)", rows, &remote, &store_env)?);
            verify(&config, &s3_target, base_version, expected_base).await.context("verifying the snapshot from S3")?;
        }

        // (e)'s table: a copy of lakesync's at the base version, made now and brought to the
        // same steady state, so that the floor is measured on the same layout as (c).
        let floor = floor_of(round);
        copy_table(&client, &target, &floor).await.context("copying the table for the floor (e)")?;

        // Steady state for (c), (d) and (e), the same for every table (see `steady_state`).
        let mut loaded = vec![reference.clone(), target.clone(), floor.clone()];
        if store.is_some() {
            loaded.push(s3_target.clone());
        }
        steady_state(&client, &loaded).await?;

        // (c) lakesync incremental.
        let changes = spec.len() as u64;
        results.push(phase("c. lakesync incremental (CDF -> one transaction)", changes, &sync_args, &[])?);
        verify(&config, &target, final_version, expected_final).await.context("verifying the incremental sync")?;

        // (c3) The same incremental sync, the change feed read from the S3 server.
        if let Some(remote) = s3_args(&sync_args) {
            let remote: Vec<&str> = remote.iter().map(String::as_str).collect();
            results.push(phase("c3. lakesync incremental, table in S3 (moto)", changes, &remote, &store_env)?);
            verify(&config, &s3_target, final_version, expected_final)
                .await
                .context("verifying the incremental sync from S3")?;
        }

        // (d) The blog pattern on the reference table.
        results.push(blog_phase(&config, &reference, spec, postmaster).await?);
        verify(&config, &reference, final_version, expected_final).await.context("verifying the blog pattern")?;

        // (e) Postgres's floor for this change: what no client can go below.
        stage_floor(&client, &target, spec).await?;
        results.push(floor_phase(&client, &config, &floor, spec, true, postmaster).await?);
        verify(&config, &floor, final_version, expected_final).await.context("verifying the floor")?;
        client.batch_execute(&format!("DROP TABLE {}", qualified(&floor))).await?;
        rounds.push(results);
    }
    Ok(rounds)
}

/// Writes the customer_profiles table of `--rows` rows at `delta` (change data feed and
/// deletion vectors on, files of `--file-rows`), then commits `spec` in the `--change` shape
/// (`dir` holds the MERGE's source tables). Returns the base and the final version.
async fn write_customer_table(
    args: &BenchArgs,
    dir: &Path,
    delta: &Path,
    spec: &ChangeSpec,
) -> anyhow::Result<(u64, u64)> {
    let (rows, file_rows) = (args.rows(), args.file_rows);
    let (writer, base_version, paths) = {
        let delta = delta.to_path_buf();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let w = DeltaWriter::create(
                &delta,
                &customer_schema(),
                &[("delta.enableChangeDataFeed", "true"), ("delta.enableDeletionVectors", "true")],
            )?;
            let files = rows.div_ceil(file_rows);
            let (v, paths) =
                w.append_files((0..files).map(|f| customers(f * file_rows..((f + 1) * file_rows).min(rows), 0)))?;
            Ok((w, v, paths))
        })
        .await??
    };
    eprintln!("bench: Delta version {base_version} has {rows} rows in {} files", paths.len());
    let final_version = match args.change {
        ChangeShape::Merge => {
            drop(writer);
            merge_change(args, dir, delta, spec).await?
        }
        ChangeShape::DeletionVectors => {
            let (updated, deleted, inserted) = (spec.updated.clone(), spec.deleted.clone(), spec.inserted.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let mut by_file: std::collections::HashMap<String, Vec<u64>> = std::collections::HashMap::new();
                for id in updated.iter().chain(&deleted) {
                    by_file.entry(paths[(id / file_rows) as usize].clone()).or_default().push(id % file_rows);
                }
                writer.delete_rows(&by_file)?;
                let appended: Vec<RecordBatch> =
                    [customers(updated, 1), customers(inserted, 0)].into_iter().filter(|b| b.num_rows() > 0).collect();
                Ok(writer.append(&appended)?)
            })
            .await??
        }
    };
    Ok((base_version, final_version))
}

/// The reference ceiling: `encoded` (rows encoded before the clock) pushed with one binary
/// `COPY` into a new unindexed `reference`, then its primary key built; `tuned` with
/// lakesync's index settings (a2), else with the server's defaults (a).
async fn reference_load(
    client: &tokio_postgres::Client,
    schema: &lakesync_core::TableSchema,
    reference: &TableName,
    encoded: &[Bytes],
    rows: u64,
    tuned: bool,
    postmaster: u32,
) -> anyhow::Result<Measurement> {
    settle();
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema_name} CASCADE; CREATE SCHEMA {schema_name}; CREATE TABLE {} ({})",
            qualified(reference),
            column_definitions(schema, &[]),
            schema_name = lakesync_postgres::ddl::ident(&reference.schema),
        ))
        .await?;
    let settings = if tuned {
        "SET maintenance_work_mem = '512MB'; SET max_parallel_maintenance_workers = 2"
    } else {
        "RESET maintenance_work_mem; RESET max_parallel_maintenance_workers"
    };
    client.batch_execute(settings).await?;
    let cpu0 = pg_cpu_seconds(postmaster)?;
    let t = Instant::now();
    {
        let sink = client.copy_in(&format!("COPY {} FROM STDIN (FORMAT binary)", qualified(reference))).await?;
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from_static(HEADER)).await?;
        for chunk in encoded {
            sink.send(chunk.clone()).await?;
        }
        sink.send(Bytes::from_static(TRAILER)).await?;
        sink.finish().await?;
    }
    let copy_s = t.elapsed().as_secs_f64();
    client.batch_execute(&format!("ALTER TABLE {} ADD PRIMARY KEY (customer_id)", qualified(reference))).await?;
    let total_s = t.elapsed().as_secs_f64();
    client.batch_execute("RESET maintenance_work_mem; RESET max_parallel_maintenance_workers").await?;
    eprintln!("bench: reference (tuned: {tuned}) COPY {copy_s:.2}s + primary key {:.2}s", total_s - copy_s);
    Ok(Measurement {
        name: if tuned {
            "a2. reference with lakesync's index settings"
        } else {
            "a. reference: 1 binary COPY + primary key"
        },
        seconds: total_s,
        rows,
        peak_rss_mb: None,
        pg_cpu_seconds: pg_cpu_seconds(postmaster)? - cpu0,
        timings: vec![
            ("run".into(), total_s),
            ("COPY (rows encoded before the clock)".into(), copy_s),
            ("primary key".into(), total_s - copy_s),
        ],
    })
}

/// The reference's `rows` customer rows in binary COPY format (chunks of 65,536 rows),
/// encoded before any clock runs.
fn encode_reference(rows: u64, schema: &lakesync_core::TableSchema) -> anyhow::Result<Vec<Bytes>> {
    let types: Vec<_> = schema.columns.iter().map(|c| c.ty).collect();
    let mut encoded = Vec::new();
    for start in (0..rows).step_by(65_536) {
        let mut buf = BytesMut::new();
        encode_batch(&customers(start..(start + 65_536).min(rows), 0), &types, NulBytePolicy::Error, &mut buf)
            .map_err(|e| anyhow::anyhow!("encoding: {}", e.problem))?;
        encoded.push(buf.freeze());
    }
    Ok(encoded)
}

/// Brings freshly loaded `tables` to the steady state (c) and (d) are measured in. A fresh
/// load starts with every page dirty and unhinted and (bulk loads go through a small ring of
/// buffers) outside shared_buffers, so the first statements to touch it would pay for the
/// load: writing it out and reading it back from the OS. A table that receives changes all
/// day has been vacuumed and checkpointed and has its pages cached; every table gets the
/// same treatment. (Separate statements: a multi-statement string runs as one transaction,
/// which VACUUM refuses.) Indexes are warmed last, so that a table larger than
/// shared_buffers does not push its key's pages out.
async fn steady_state(client: &tokio_postgres::Client, tables: &[TableName]) -> anyhow::Result<()> {
    let names: Vec<String> = tables.iter().map(qualified).collect();
    for t in &names {
        client.batch_execute(&format!("VACUUM (ANALYZE) {t}")).await?;
    }
    client.batch_execute("CHECKPOINT").await?;
    if let Err(e) = client.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm").await {
        eprintln!("bench: pg_prewarm is not available ({e}); measuring (c) and (d) with cold caches");
        return Ok(());
    }
    let list = names.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
    client
        .batch_execute(&format!(
            "SELECT pg_prewarm(oid) FROM unnest(ARRAY[{list}]::regclass[]) AS t(oid); \
             SELECT pg_prewarm(indexrelid) FROM pg_index WHERE indrelid = ANY(ARRAY[{list}]::regclass[])"
        ))
        .await?;
    Ok(())
}

/// The MERGE the Python `deltalake` package runs: a source of new images and deleted keys,
/// one commit that updates, inserts and deletes, with cdc files for the change data feed.
const MERGE_PY: &str = r#"
import sys
import pyarrow as pa
from deltalake import DeltaTable
target, upserts, deletes = sys.argv[1:4]
u = DeltaTable(upserts).to_pyarrow_table()
d = DeltaTable(deletes).to_pyarrow_table()
source = pa.concat_tables([
    u.append_column("_op", pa.array(["upsert"] * u.num_rows, pa.string())),
    d.append_column("_op", pa.array(["delete"] * d.num_rows, pa.string())),
])
m = (DeltaTable(target)
     .merge(source, "t.customer_id = s.customer_id", source_alias="s", target_alias="t")
     .when_matched_delete("s._op = 'delete'")
     .when_matched_update_all(predicate="s._op = 'upsert'", except_cols=["_op"])
     .when_not_matched_insert_all(predicate="s._op = 'upsert'", except_cols=["_op"])
     .execute())
print(DeltaTable(target).version(), m["num_target_rows_updated"], m["num_target_rows_inserted"],
      m["num_target_rows_deleted"])
"#;

/// The Python with `deltalake` (and, for --source-store s3, `moto[server]`).
fn python(args: &BenchArgs) -> PathBuf {
    args.python.clone().unwrap_or_else(|| {
        let venv = PathBuf::from(".venv/bin/python");
        if venv.exists() {
            venv
        } else {
            "python3".into()
        }
    })
}

/// Commits the change as one MERGE through Python `deltalake` and returns its version. The
/// source rows come from the same generator as every other phase, staged as small Delta tables.
async fn merge_change(args: &BenchArgs, dir: &Path, delta: &Path, spec: &ChangeSpec) -> anyhow::Result<u64> {
    let (upserts, deletes) = (dir.join("merge-upserts"), dir.join("merge-deletes"));
    {
        let (upserts, deletes) = (upserts.clone(), deletes.clone());
        let (updated, deleted, inserted) = (spec.updated.clone(), spec.deleted.clone(), spec.inserted.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for (path, batches) in [
                (&upserts, vec![customers(updated, 1), customers(inserted, 0)]),
                (&deletes, vec![customers(deleted, 0)]),
            ] {
                let _ = std::fs::remove_dir_all(path);
                DeltaWriter::create(path, &customer_schema(), &[])?.append(&batches)?;
            }
            Ok(())
        })
        .await??;
    }
    let python = python(args);
    let t = Instant::now();
    let out = Command::new(&python)
        .arg("-c")
        .arg(MERGE_PY)
        .args([delta, &upserts, &deletes])
        .output()
        .with_context(|| format!("running {} for the MERGE change", python.display()))?;
    if !out.status.success() {
        bail!(
            "the MERGE change through {} failed (it needs the `deltalake` package: `bash scripts/test` \
             creates .venv with it; or use --change deletion-vectors):\n{}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<u64> = stdout.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    let [version, updated, inserted, deleted] = fields[..] else { bail!("unexpected output of the MERGE: {stdout}") };
    if (updated, inserted, deleted)
        != (spec.updated.len() as u64, spec.inserted.len() as u64, spec.deleted.len() as u64)
    {
        bail!("the MERGE changed {updated} updated / {inserted} inserted / {deleted} deleted rows, not the spec's");
    }
    eprintln!(
        "bench: MERGE commit (Python deltalake, cdc files): {updated} updated, {inserted} inserted, {deleted} deleted in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(version)
}

fn print_table(rounds: &[Vec<Measurement>], rows: u64, memory: &str) {
    let n = rounds.len();
    let what = if n > 1 { format!("median of {n} rounds") } else { "one round".into() };
    println!(
        "\nlakesync bench: {rows} rows, {what}, all results verified against the Delta snapshot (count + checksum)"
    );
    println!("Postgres shared memory: {memory}\n");
    println!("| phase | seconds | rows/s | ratio | peak RSS (MB) | Postgres CPU s |");
    println!("|---|---:|---:|---:|---:|---:|");
    // Ratios are taken within each round (its reference measured next to it), then the median.
    // (b3) and (c3), the table in S3, are each against the same run from the local path.
    let reference_of = |name: &str| match name {
        n if n.starts_with("b3.") || n.starts_with("b2.") => "b.",
        n if n.starts_with("c3.") => "c.",
        n if n.starts_with("c.") || n.starts_with("d.") || n.starts_with("e.") => "d.",
        _ => "a.",
    };
    let ratio_in = |round: &[Measurement], i: usize| {
        let m = &round[i];
        round.iter().find(|r| r.name.starts_with(reference_of(m.name))).map(|r| m.seconds / r.seconds)
    };
    for (i, m) in rounds[0].iter().enumerate() {
        let seconds = median(rounds.iter().map(|r| r[i].seconds));
        let ratios: Vec<f64> = rounds.iter().filter_map(|r| ratio_in(r, i)).collect();
        let ratio = if ratios.is_empty() {
            String::new()
        } else {
            format!("{:.2}x {}", median(ratios.iter().copied()), &reference_of(m.name)[..1])
        };
        let rss = rounds.iter().filter_map(|r| r[i].peak_rss_mb).reduce(f64::max);
        println!(
            "| {} | {:.2} | {:.0} | {} | {} | {:.1} |",
            m.name,
            seconds,
            m.rows as f64 / seconds,
            ratio,
            rss.map(|r| format!("{r:.0}")).unwrap_or_else(|| "-".into()),
            median(rounds.iter().map(|r| r[i].pg_cpu_seconds))
        );
    }
    let ratio = |num: &str, den: &str| {
        median(rounds.iter().filter_map(|r| {
            let s = |p: &str| r.iter().find(|m| m.name.starts_with(p)).map(|m| m.seconds);
            Some(s(num)? / s(den)?)
        }))
    };
    if rounds[0].iter().any(|m| m.name.starts_with("a2.")) {
        println!(
            "\nb against the reference with lakesync's own index settings (a2): {:.2}x; a2/a {:.2}x",
            ratio("b.", "a2."),
            ratio("a2.", "a.")
        );
    }
    if rounds[0].iter().any(|m| m.name.starts_with("e.")) {
        println!(
            "Postgres's floor for the change (e): c/e {:.2}x; d/e {:.1}x is the most any client could beat the \
             blog pattern by on this server (d/c {:.1}x)",
            ratio("c.", "e."),
            ratio("d.", "e."),
            ratio("d.", "c.")
        );
    }
    print_breakdown(rounds);
    if n > 1 {
        println!("\nEach round (peak RSS is the largest of the rounds):\n");
        for (k, round) in rounds.iter().enumerate() {
            let s = |p: &str| round.iter().find(|m| m.name.starts_with(p)).map_or(f64::NAN, |m| m.seconds);
            let store = if round.iter().any(|m| m.name.starts_with("b3.")) {
                format!(
                    "; S3: b3 {:.2} s (b3/b {:.2}x), c3 {:.2} s (c3/c {:.2}x)",
                    s("b3."),
                    s("b3.") / s("b."),
                    s("c3."),
                    s("c3.") / s("c.")
                )
            } else {
                String::new()
            };
            println!(
                "- round {}: a {:.2} s, a2 {:.2} s, b {:.2} s (b/a {:.2}x, b/a2 {:.2}x); c {:.2} s, d {:.2} s (d/c {:.1}x), e {:.2} s (d/e {:.1}x){store}",
                k + 1,
                s("a."),
                s("a2."),
                s("b."),
                s("b.") / s("a."),
                s("b.") / s("a2."),
                s("c."),
                s("d."),
                s("d.") / s("c."),
                s("e."),
                s("d.") / s("e.")
            );
        }
    }
}

/// Waits until the OS has written out its dirty pages. The server runs with `fsync=off`, so
/// what one phase writes (a 5M-row load is gigabytes of heap and WAL) would otherwise be
/// flushed by the kernel during the next phase, on the same two cores, and charged to it.
fn settle() {
    if let Err(e) = Command::new("sync").status() {
        eprintln!("bench: could not run sync ({e}); a phase may pay for the previous one's writeback");
    }
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Whether the server's shared memory is on huge pages: they make each buffer access cheaper
/// (fewer TLB misses, and a new backend maps its buffers with far fewer page faults), which
/// shows in every per-row phase. Postgres' default `huge_pages = try` uses them when the OS
/// has them reserved (`vm.nr_hugepages`); see BENCHMARKS.md.
fn shared_memory(data: &Path) -> String {
    match postmaster_pid(data).ok().and_then(|pid| proc_status_kb(pid, "HugetlbPages")) {
        Some(kb) if kb > 0 => "on huge pages".into(),
        _ => "on 4 kB pages (no huge pages available to it: see vm.nr_hugepages)".into(),
    }
}

/// One measured phase: once the OS has settled, `lakesync <args>` as a child process.
fn child_phase(
    name: &'static str,
    rows: u64,
    exe: &Path,
    args: &[&str],
    env: &[(&str, String)],
    conn: &str,
    postmaster: u32,
) -> anyhow::Result<Measurement> {
    settle();
    let mut timed: Vec<&str> = args.to_vec();
    if timed.first() == Some(&"sync") {
        timed.push("--timings");
    }
    let (seconds, rss, cpu, out) = run_child(exe, &timed, env, conn, postmaster)?;
    let timings = out
        .lines()
        .find_map(|l| l.strip_prefix("timings: total "))
        .and_then(|rest| {
            let (total, phases) = rest.split_once("; ")?;
            let mut all = vec![("run".to_string(), total.strip_suffix('s')?.parse().ok()?)];
            all.extend(lakesync_core::Timings::parse(phases));
            Some(all)
        })
        .unwrap_or_default();
    Ok(Measurement { name, seconds, rows, peak_rss_mb: Some(rss), pg_cpu_seconds: cpu, timings })
}

/// Where each phase's time went (medians over the rounds): lakesync's own phases from
/// `sync --timings` (with the pooler check the CLI runs first), and what the process spends
/// outside them (start, runtime, exit).
/// Phases may overlap (the Delta read feeds the COPY), so they need not add up.
fn print_breakdown(rounds: &[Vec<Measurement>]) {
    println!("\nWhere the time went (seconds; median of the rounds; phases may overlap):\n");
    for (i, m) in rounds[0].iter().enumerate() {
        if m.timings.is_empty() {
            continue;
        }
        let of = |phase: &str| {
            median(rounds.iter().filter_map(|r| r[i].timings.iter().find(|(p, _)| p == phase).map(|(_, s)| *s)))
        };
        let wall = median(rounds.iter().map(|r| r[i].seconds));
        let run = of("run");
        let mut parts: Vec<String> =
            m.timings.iter().filter(|(p, _)| p != "run").map(|(p, _)| format!("{p} {:.3}", of(p))).collect();
        if m.name.starts_with("a") {
            println!("- {}: {:.3}: {}", m.name, wall, parts.join(", "));
            continue;
        }
        let before = of("pooler check (before the run)");
        let before = if before.is_nan() { 0.0 } else { before };
        parts.push(format!(
            "the rest outside the run (process start, runtime, exit) {:.3}",
            (wall - run - before).max(0.0)
        ));
        println!("- {}: {wall:.3} (the run {run:.3}): {}", m.name, parts.join(", "));
    }
}

/// Runs `lakesync <args>` and returns (seconds, peak RSS MB, Postgres CPU seconds, stdout).
fn run_child(
    exe: &Path,
    args: &[&str],
    env: &[(&str, String)],
    conn: &str,
    postmaster: u32,
) -> anyhow::Result<(f64, f64, f64, String)> {
    let cpu0 = pg_cpu_seconds(postmaster)?;
    let t = Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("LAKESYNC_POSTGRES", conn)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let mut peak_kb = 0u64;
    let status = loop {
        if let Some(kb) = proc_status_kb(pid, "VmHWM") {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let seconds = t.elapsed().as_secs_f64();
    // Let the postmaster reap the child's backend so its CPU time is accounted.
    std::thread::sleep(Duration::from_millis(300));
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("piped"), &mut out)?;
    if !status.success() {
        bail!("lakesync {} failed", args.join(" "));
    }
    eprintln!("bench: {}", out.trim());
    Ok((seconds, peak_kb as f64 / 1024.0, pg_cpu_seconds(postmaster)? - cpu0, out))
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`: peak RSS, `VmRSS`: current RSS).
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
}

fn postmaster_pid(data: &Path) -> anyhow::Result<u32> {
    let pidfile = std::fs::read_to_string(data.join("postmaster.pid")).context("reading postmaster.pid")?;
    Ok(pidfile.lines().next().unwrap_or_default().trim().parse()?)
}

/// CPU seconds used by the whole Postgres server so far: the postmaster, its exited children
/// (accounted to it when reaped) and its live children.
fn pg_cpu_seconds(postmaster: u32) -> anyhow::Result<f64> {
    const TICKS: f64 = 100.0; // USER_HZ on Linux
    let fields = |pid: u32| -> Option<(u32, Vec<u64>)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        Some((ppid, f[11..15].iter().map(|v| v.parse().unwrap_or(0)).collect()))
    };
    let (_, pm) = fields(postmaster).context("reading the postmaster's CPU time")?;
    let mut ticks: u64 = pm.iter().sum();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Some((ppid, f)) = fields(pid) {
            if ppid == postmaster {
                ticks += f[0] + f[1];
            }
        }
    }
    Ok(ticks as f64 / TICKS)
}

/// (d): the blog pattern on `table`, once the OS has settled.
async fn blog_phase(
    config: &PgConfig,
    table: &TableName,
    spec: &ChangeSpec,
    postmaster: u32,
) -> anyhow::Result<Measurement> {
    settle();
    let cpu0 = pg_cpu_seconds(postmaster)?;
    let t = Instant::now();
    blog_merge(config, table, spec).await?;
    Ok(Measurement {
        name: "d. blog pattern: MERGE .. VALUES x1000 + DELETE ANY",
        seconds: t.elapsed().as_secs_f64(),
        rows: spec.len() as u64,
        peak_rss_mb: None,
        pg_cpu_seconds: pg_cpu_seconds(postmaster)? - cpu0,
        timings: Vec::new(),
    })
}

/// The customer_profiles table's columns, key first, as Postgres names them.
const CUSTOMER_COLUMNS: [&str; 10] = [
    "customer_id",
    "full_name",
    "email",
    "segment",
    "last_purchase_date",
    "total_spend",
    "propensity_score",
    "is_active",
    "created_at",
    "updated_at",
];

/// Copies `from` (its columns, storage parameters and rows, then its primary key) into a new
/// table `to`, outside any clock.
async fn copy_table(client: &tokio_postgres::Client, from: &TableName, to: &TableName) -> anyhow::Result<()> {
    let (f, t) = (qualified(from), qualified(to));
    let options: Option<Vec<String>> =
        client.query_one("SELECT reloptions FROM pg_class WHERE oid = $1::text::regclass", &[&f]).await?.get(0);
    let with = options.filter(|o| !o.is_empty()).map(|o| format!(" WITH ({})", o.join(", "))).unwrap_or_default();
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {t}; \
             CREATE TABLE {t} (LIKE {f} INCLUDING ALL EXCLUDING INDEXES){with}; \
             INSERT INTO {t} SELECT * FROM {f}; \
             ALTER TABLE {t} ADD PRIMARY KEY (customer_id)"
        ))
        .await?;
    Ok(())
}

/// Stages the change's rows for (e) in unlogged tables, outside any clock: the final images
/// of its updated and inserted keys, copied from `applied` (a table that has the change), and
/// its deleted keys.
async fn stage_floor(client: &tokio_postgres::Client, applied: &TableName, spec: &ChangeSpec) -> anyhow::Result<()> {
    let a = qualified(applied);
    let keys = |ids: &[u64]| ids.iter().map(|&i| customer_key(i)).collect::<Vec<String>>();
    client.batch_execute("CREATE SCHEMA IF NOT EXISTS bench_floor").await?;
    for (table, keys, whole_rows) in [
        ("bench_floor.existing", keys(&spec.updated), true),
        ("bench_floor.new", keys(&spec.inserted), true),
        ("bench_floor.deletes", keys(&spec.deleted), false),
    ] {
        client.batch_execute(&format!("DROP TABLE IF EXISTS {table}")).await?;
        let sql = if whole_rows {
            format!("CREATE UNLOGGED TABLE {table} AS SELECT a.* FROM {a} a WHERE a.customer_id = ANY($1)")
        } else {
            // Deleted keys are gone from `applied`: they are staged as keys alone.
            format!("CREATE UNLOGGED TABLE {table} AS SELECT k AS customer_id FROM unnest($1::text[]) AS k")
        };
        let staged = client.execute(&sql, &[&keys]).await?;
        if staged != keys.len() as u64 {
            bail!("staging the floor's {table}: {staged} rows in {applied}, the change has {}", keys.len());
        }
    }
    Ok(())
}

/// (e) Postgres's floor for the change: the rows [`stage_floor`] staged, applied to `floor`
/// (the base version, laid out as lakesync's table) by one `DELETE .. USING`, one
/// `INSERT .. SELECT` and one `MERGE`, in one transaction of a new session (as (c) and (d)
/// have) with the plan lakesync asks for. Committed, or rolled back (`commit` false) where the
/// table must stay at the base version. No client encodes, sends or plans anything, so
/// (d)/(e) is the most any client could beat the blog pattern by on this server: the cap on
/// (d)/(c).
async fn floor_phase(
    client: &tokio_postgres::Client,
    config: &PgConfig,
    floor: &TableName,
    spec: &ChangeSpec,
    commit: bool,
    postmaster: u32,
) -> anyhow::Result<Measurement> {
    let f = qualified(floor);
    let set = CUSTOMER_COLUMNS[1..].iter().map(|c| format!("{c} = u.{c}")).collect::<Vec<_>>();
    let sql = format!(
        "BEGIN; SET LOCAL jit = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; \
         DELETE FROM {f} t USING bench_floor.deletes d WHERE t.customer_id = d.customer_id; \
         INSERT INTO {f} SELECT * FROM bench_floor.new; \
         MERGE INTO {f} AS t USING bench_floor.existing AS u ON t.customer_id = u.customer_id \
         WHEN MATCHED THEN UPDATE SET {set}; \
         {end}",
        set = set.join(", "),
        end = if commit { "COMMIT" } else { "ROLLBACK" }
    );
    settle();
    let cpu0 = pg_cpu_seconds(postmaster)?;
    let t = Instant::now();
    // A new session, as (c) and (d) have: a backend that has touched every shared buffer
    // (this one prewarmed them) maps them already, where a new one takes a page fault for
    // each buffer it first touches, a cost that grows with the table.
    let session = config.connect().await?;
    session.batch_execute(&sql).await?;
    drop(session);
    let seconds = t.elapsed().as_secs_f64();
    let pg_cpu = pg_cpu_seconds(postmaster)? - cpu0;
    client.batch_execute("DROP SCHEMA bench_floor CASCADE").await?;
    Ok(Measurement {
        name: "e. Postgres's floor: the change staged in the server, 1 DELETE + INSERT + MERGE",
        seconds,
        rows: spec.len() as u64,
        peak_rss_mb: None,
        pg_cpu_seconds: pg_cpu,
        timings: Vec::new(),
    })
}

/// The blog's statement pattern: latest change per key, `MERGE .. USING (VALUES ..)` with
/// 1000 rows a statement, `DELETE .. = ANY($1)`, all in one transaction.
async fn blog_merge(config: &PgConfig, table: &TableName, spec: &ChangeSpec) -> anyhow::Result<()> {
    let mut client = config.connect().await?;
    let tx = client.transaction().await?;
    let upserts: Vec<RecordBatch> = vec![customers(spec.updated.clone(), 1), customers(spec.inserted.clone(), 0)];
    let cols = CUSTOMER_COLUMNS;
    let casts =
        ["text", "text", "text", "text", "timestamptz", "numeric", "float8", "boolean", "timestamptz", "timestamptz"];
    for batch in &upserts {
        let texts = row_texts(batch);
        for chunk in texts.chunks(1000) {
            let mut values = Vec::new();
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
            for (r, row) in chunk.iter().enumerate() {
                let placeholders: Vec<String> =
                    (0..cols.len()).map(|c| format!("${}::text::{}", r * cols.len() + c + 1, casts[c])).collect();
                values.push(format!("({})", placeholders.join(", ")));
                for v in row {
                    params.push(v);
                }
            }
            let sql = format!(
                "MERGE INTO {t} AS t USING (VALUES {values}) AS s({cols}) ON t.customer_id = s.customer_id \
                 WHEN MATCHED THEN UPDATE SET {set} WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({svals})",
                t = qualified(table),
                values = values.join(", "),
                cols = cols.join(", "),
                set = cols[1..].iter().map(|c| format!("{c} = s.{c}")).collect::<Vec<_>>().join(", "),
                svals = cols.iter().map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", "),
            );
            tx.execute(&sql, &params).await?;
        }
    }
    let deleted: Vec<String> = spec.deleted.iter().map(|i| format!("C{i:09}")).collect();
    tx.execute(&format!("DELETE FROM {} WHERE customer_id = ANY($1)", qualified(table)), &[&deleted]).await?;
    tx.commit().await?;
    Ok(())
}

/// Every value of `batch` as the text a driver would send.
fn row_texts(batch: &RecordBatch) -> Vec<Vec<String>> {
    let canon = canonical_columns(batch);
    (0..batch.num_rows())
        .map(|r| {
            canon
                .iter()
                .enumerate()
                .map(|(c, col)| match c {
                    4 | 8 | 9 => {
                        let us: i64 = col[r].parse().unwrap();
                        chrono_like(us)
                    }
                    5 => {
                        let unscaled: i128 = col[r].parse().unwrap();
                        format!("{}.{:02}", unscaled / 100, (unscaled % 100).abs())
                    }
                    7 => if col[r] == "t" { "true" } else { "false" }.to_string(),
                    _ => col[r].clone(),
                })
                .collect()
        })
        .collect()
}

/// Microseconds since the epoch as `YYYY-MM-DD HH:MM:SS.ffffff+00` via Postgres-free math.
fn chrono_like(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{frac:06}+00", sod / 3600, sod / 60 % 60, sod % 60)
}

/// Each column of the customer batch in canonical text: strings as is, timestamps as epoch
/// microseconds, the decimal as its unscaled integer, the double in shortest form, booleans
/// as t/f, NULL as \N.
fn canonical_columns(batch: &RecordBatch) -> Vec<Vec<String>> {
    batch
        .columns()
        .iter()
        .map(|col| {
            (0..col.len())
                .map(|r| {
                    if col.is_null(r) {
                        return "\\N".to_string();
                    }
                    match col.data_type() {
                        arrow_schema::DataType::Utf8 => col.as_string::<i32>().value(r).to_string(),
                        arrow_schema::DataType::Timestamp(..) => {
                            col.as_primitive::<TimestampMicrosecondType>().value(r).to_string()
                        }
                        arrow_schema::DataType::Decimal128(..) => {
                            col.as_primitive::<Decimal128Type>().value(r).to_string()
                        }
                        arrow_schema::DataType::Float64 => format!("{}", col.as_primitive::<Float64Type>().value(r)),
                        arrow_schema::DataType::Boolean => {
                            if col.as_boolean().value(r) { "t" } else { "f" }.to_string()
                        }
                        other => panic!("bench verifier: unexpected type {other}"),
                    }
                })
                .collect()
        })
        .collect()
}

/// A row checksum: the first 60 bits of the MD5 of the canonical row text.
fn row_hash(text: &str) -> u128 {
    let digest = Md5::digest(text.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    u128::from_str_radix(&hex[..15], 16).expect("hex")
}

/// (row count, checksum) of the Delta snapshot at `version`.
pub fn delta_checksum(delta: &Path, version: u64) -> anyhow::Result<(u64, u128)> {
    let snapshot = DeltaTable::open(&delta.display().to_string())?.snapshot(Some(version))?;
    let (mut n, mut sum) = (0u64, 0u128);
    for batch in snapshot.batches()? {
        let batch = batch?;
        let names: Vec<String> = customer_schema().fields().iter().map(|f| f.name().clone()).collect();
        let projected =
            batch.project(&names.iter().map(|n| batch.schema().index_of(n)).collect::<Result<Vec<_>, _>>()?)?;
        let cols = canonical_columns(&projected);
        for r in 0..projected.num_rows() {
            let row: Vec<&str> = cols.iter().map(|c| c[r].as_str()).collect();
            sum += row_hash(&row.join("|"));
            n += 1;
        }
    }
    Ok((n, sum))
}

/// The same (row count, checksum) computed by Postgres over `table`.
pub async fn pg_checksum(config: &PgConfig, table: &TableName) -> anyhow::Result<(u64, u128)> {
    let client = config.connect().await?;
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(('x' || substr(md5(concat_ws('|', customer_id, coalesce(full_name, '\\N'), \
                 coalesce(email, '\\N'), coalesce(segment, '\\N'), \
                 (extract(epoch FROM last_purchase_date) * 1000000)::bigint, (total_spend * 100)::bigint, \
                 propensity_score, CASE WHEN is_active THEN 't' ELSE 'f' END, \
                 (extract(epoch FROM created_at) * 1000000)::bigint, (extract(epoch FROM updated_at) * 1000000)::bigint)), 1, 15))::bit(60)::bigint), 0)::text \
                 FROM {}",
                qualified(table)
            ),
            &[],
        )
        .await?;
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, String>(1).parse()?))
}

/// Checks `table` against Delta `version`, computing the expected checksum.
async fn verify_against_delta(config: &PgConfig, table: &TableName, delta: &Path, version: u64) -> anyhow::Result<()> {
    let delta = delta.to_path_buf();
    let expected = tokio::task::spawn_blocking(move || delta_checksum(&delta, version)).await??;
    verify(config, table, version, expected).await
}

/// The sample table's key of row `i` (as `customers` writes it).
fn customer_key(i: u64) -> String {
    let batch = customers(i..i + 1, 0);
    let keys = batch.column_by_name("customer_id").expect("customer_id");
    keys.as_any().downcast_ref::<arrow_array::StringArray>().expect("string keys").value(0).to_string()
}

/// Checks that `table` holds exactly the rows of the reference load for which `filter` (the
/// same SQL) is true.
async fn verify_filtered(
    client: &tokio_postgres::Client,
    table: &TableName,
    reference: &TableName,
    filter: &str,
) -> anyhow::Result<()> {
    let (t, r) = (qualified(table), qualified(reference));
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {t}), (SELECT count(*) FROM {r} WHERE {filter}), \
                 (SELECT count(*) FROM ((TABLE {t} EXCEPT ALL SELECT * FROM {r} WHERE {filter}) \
                  UNION ALL (SELECT * FROM {r} WHERE {filter} EXCEPT ALL TABLE {t})) d)"
            ),
            &[],
        )
        .await?;
    let (actual, expected, differing): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    if actual != expected || differing != 0 {
        bail!("{table} does not hold the filtered rows: {actual} rows, {expected} expected, {differing} differ");
    }
    eprintln!("bench: verified {table} = the reference where {filter} ({actual} rows)");
    Ok(())
}

/// Checks `table` against `expected`, the (row count, checksum) of Delta `version`.
async fn verify(config: &PgConfig, table: &TableName, version: u64, expected: (u64, u128)) -> anyhow::Result<()> {
    let actual = pg_checksum(config, table).await?;
    if expected != actual {
        bail!(
            "{table} does not match Delta version {version}: Postgres has {} rows (checksum {}), Delta {} rows (checksum {})",
            actual.0,
            actual.1,
            expected.0,
            expected.1
        );
    }
    eprintln!("bench: verified {table} = Delta version {version} ({} rows)", actual.0);
    Ok(())
}
