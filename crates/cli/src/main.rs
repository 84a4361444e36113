//! The `lakesync` command: thin wiring of the engine to a CLI.

mod bench;
mod demo;
mod events;
mod logs;
mod progress;
mod serve;
mod status;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use lakesync_core::SyncMode;
use lakesync_engine::config::{IngestConfig, OptionValue, TableConfig};
use lakesync_engine::{sync, SyncRequest};
use lakesync_postgres::PgConfig;

/// Keep PostgreSQL tables in sync with Delta Lake tables.
#[derive(Parser)]
#[command(name = "lakesync", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sync one Delta table into one Postgres table (snapshot or change data feed).
    Sync(SyncArgs),
    /// Show every synced table: synced version, state, last run.
    Status {
        /// Postgres connection string.
        #[arg(long, env = "LAKESYNC_POSTGRES", hide_env_values = true)]
        postgres: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a sample Delta table, sync it into a private Postgres, change it, sync again.
    Demo(demo::DemoArgs),
    /// Measure snapshot and incremental sync against reference paths, verifying every result.
    Bench(bench::BenchArgs),
    /// Run every synced table of a config file and serve the management and data API.
    Serve {
        /// The TOML config file.
        #[arg(long, short)]
        config: std::path::PathBuf,
        /// Seconds to let in-flight runs finish on SIGTERM/SIGINT before rolling them back.
        #[arg(long, default_value_t = 30)]
        grace: u64,
    },
    /// Rewrite a Delta table's small files into large ones (one OPTIMIZE commit that changes no
    /// data: change-feed readers see nothing), then checkpoint when due.
    Compact(CompactArgs),
    /// Ingest a Kafka topic into a Delta table, exactly once (each flush is one commit that
    /// records every partition's next offset; restarts resume from the table), until stopped.
    Ingest(Box<IngestArgs>),
    /// Validate a config file without running anything.
    CheckConfig {
        /// The TOML config file.
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Snapshot,
    Triggered,
}

#[derive(Clone, Copy, ValueEnum)]
enum NulBytes {
    Error,
    Strip,
}

#[derive(clap::Args)]
struct SyncArgs {
    /// Delta table: a local path, file://, s3:// (or s3a://), abfss:// (or az://) or gs:// URI.
    /// Credentials come from the store's standard environment variables and files
    /// (AWS_*, ~/.aws, AZURE_*, GOOGLE_APPLICATION_CREDENTIALS).
    #[arg(long)]
    source: String,
    /// An object-store setting, KEY=VALUE (aws_region, aws_endpoint, aws_allow_http,
    /// azure_storage_account_name, ...); KEY_env=VAR reads the value from the environment
    /// variable VAR, the only way secrets are accepted; repeatable.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = parse_storage_option)]
    storage_options: Vec<(String, String)>,
    /// Postgres connection string (libpq key=value or postgresql:// URI).
    #[arg(long, env = "LAKESYNC_POSTGRES", hide_env_values = true)]
    postgres: String,
    /// Target table, schema.table.
    #[arg(long)]
    table: String,
    /// Primary-key columns, comma-separated.
    #[arg(long)]
    primary_key: String,
    /// auto: snapshot first, then the change data feed (snapshot again when the feed cannot
    /// serve the range); snapshot: always a full snapshot; triggered: change data feed only.
    #[arg(long, value_enum, default_value = "auto")]
    mode: Mode,
    /// Stop at this Delta version instead of the latest.
    #[arg(long)]
    to_version: Option<u64>,
    /// Parallel COPY connections for snapshots.
    #[arg(long, default_value_t = 4)]
    parallelism: usize,
    /// A secondary index to build after a snapshot load (comma-separated columns); repeatable.
    #[arg(long = "index")]
    indexes: Vec<String>,
    /// What to do with strings holding NUL bytes: error (default) or strip them.
    #[arg(long, value_enum, default_value = "error")]
    nul_bytes: NulBytes,
    /// When a snapshot has several rows per key, keep the one with the greatest value of this
    /// column (default: duplicate keys are an error).
    #[arg(long)]
    dedup_by: Option<String>,
    /// At most this many Delta versions per incremental transaction (bounds memory).
    #[arg(long, default_value_t = 100)]
    versions_per_transaction: u64,
    /// A source column not to sync (e.g. one whose type Postgres cannot hold); repeatable.
    #[arg(long = "exclude", conflicts_with = "columns")]
    exclude: Vec<String>,
    /// Sync only the source rows this SQL predicate is true for, e.g.
    /// "region = 'eu' AND created_at >= '2024-01-01'" (comparisons, AND/OR/NOT, IN, IS NULL,
    /// LIKE, BETWEEN over source columns). Files whose statistics rule the filter out are
    /// not read.
    #[arg(long)]
    filter: Option<String>,
    /// Sync only this source column, "C" or "C AS NEW" to rename it; repeatable. The primary
    /// key (named as in Postgres) must be among them.
    #[arg(long = "column", value_name = "C [AS NEW]")]
    columns: Vec<String>,
    /// What a delete in the source does: hard (the row goes), soft (the row stays with
    /// _lakesync_deleted_at set) or ignore (the row stays as it was).
    #[arg(long, default_value = "hard", value_parser = ["hard", "soft", "ignore"])]
    delete_mode: String,
    /// Add _lakesync_version and _lakesync_commit_timestamp: the Delta version in which each
    /// row last changed and that commit's timestamp.
    #[arg(long)]
    lineage: bool,
    /// Seconds to wait for another run of the same table (or a crashed run's session) to let
    /// go of the table before giving up.
    #[arg(long, default_value_t = 30)]
    lock_wait: u64,
    /// Take over an existing Postgres table lakesync did not create (refused without it): its
    /// primary key must be the sync key and its columns the source's types.
    #[arg(long)]
    adopt: bool,
    /// With --adopt: drop the table's columns the Delta table lacks (refused without it).
    #[arg(long, requires = "adopt")]
    allow_drop_columns: bool,
    /// Runs kept in the table's history (lakesync.runs).
    #[arg(long, default_value_t = 10_000)]
    keep_runs: u64,
    /// Days of run history kept (0: any age).
    #[arg(long, default_value_t = 30)]
    keep_runs_days: u64,
    /// Say what the run would do (mode and reason, versions, rows inserted, updated and
    /// deleted, every DDL statement) without writing anything: no rows, no state, no run.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: answer as JSON.
    #[arg(long, requires = "dry_run")]
    json: bool,
    /// Also print where the run's time went, phase by phase (connection setup, log replay,
    /// reads, COPY, index, commit, ...).
    #[arg(long)]
    timings: bool,
}

#[derive(clap::Args)]
struct CompactArgs {
    /// Delta table: a local path, file://, s3:// (or s3a://), abfss:// (or az://) or gs:// URI.
    #[arg(long)]
    table: String,
    /// An object-store setting, KEY=VALUE, as for `sync`; repeatable.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = parse_storage_option)]
    storage_options: Vec<(String, String)>,
    /// Files smaller than this are rewritten into files of about this size (e.g. 128MB, 64MiB,
    /// or bytes). Memory use is about one output file's decoded rows.
    #[arg(long, default_value = "128MB", value_parser = parse_size)]
    target_file_size: u64,
    /// Compact a partition only when it has at least this many small files.
    #[arg(long, default_value_t = 2)]
    min_files: usize,
    /// Write a checkpoint when this many commits or more follow the last one (0: never).
    #[arg(long, default_value_t = 10)]
    checkpoint_every: u64,
    /// Upgrade a table on a legacy Delta protocol (writer version 3-6: Spark's and delta-rs's
    /// change-feed tables) to table features, listing only what it uses, before compacting.
    /// Without it such a table is refused and nothing is changed.
    #[arg(long)]
    upgrade_protocol: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    lakesync_core::parse_size(s)
}

#[derive(clap::Args)]
struct IngestArgs {
    /// Kafka bootstrap brokers, host:port, comma-separated.
    #[arg(long)]
    brokers: String,
    /// The topic (it must exist).
    #[arg(long)]
    topic: String,
    /// Delta table: a local path or an object-store URI, as for `sync --source`; created with
    /// the change data feed on when missing.
    #[arg(long)]
    table: String,
    /// Names the ingest; the table records its positions under this name (default: the topic).
    #[arg(long)]
    name: Option<String>,
    /// A file with the message fields' schema as Delta schema JSON; needed to create the table.
    #[arg(long)]
    schema: Option<String>,
    /// Partition columns for a table the ingest creates, comma-separated.
    #[arg(long)]
    partition_by: Option<String>,
    /// Kafka metadata columns to store, comma-separated: topic, partition, offset, timestamp, key
    /// (as _kafka_<name>).
    #[arg(long)]
    kafka_columns: Option<String>,
    /// Commit after this many messages...
    #[arg(long, default_value_t = 100_000)]
    flush_rows: usize,
    /// ...or when the oldest held message has waited this long.
    #[arg(long, default_value = "1s")]
    flush_interval: String,
    /// fail (stop, naming topic/partition/offset/field) or dead_letter (set the message aside
    /// in --dead-letter-table and go on).
    #[arg(long, default_value = "fail")]
    on_bad_record: String,
    /// The Delta table for messages that do not fit (with --on-bad-record dead_letter).
    #[arg(long)]
    dead_letter_table: Option<String>,
    /// Where partitions the table has no position for start: earliest or latest.
    #[arg(long, default_value = "earliest")]
    start_from: String,
    /// Write a checkpoint when this many commits follow the last one (0: never).
    #[arg(long, default_value_t = 10)]
    checkpoint_every: u64,
    /// Compact small files every this many ingest commits (0: never).
    #[arg(long, default_value_t = 100)]
    compact_every: u64,
    /// Compaction's target file size.
    #[arg(long, default_value = "128MB")]
    target_file_size: String,
    /// An object-store setting, KEY=VALUE, as for `sync`; repeatable.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = parse_storage_option)]
    storage_options: Vec<(String, String)>,
    /// Stop (after a last commit) once every partition's messages up to its end when the
    /// ingest started are in the table: for backfills, batch jobs and benchmarks.
    #[arg(long)]
    exit_when_caught_up: bool,
    /// How to reach the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    #[arg(long, default_value = "PLAINTEXT")]
    security_protocol: String,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL_* protocol; default SCRAM-SHA-512).
    #[arg(long)]
    sasl_mechanism: Option<String>,
    #[arg(long)]
    sasl_username: Option<String>,
    /// The environment variable holding the SASL password.
    #[arg(long)]
    sasl_password_env: Option<String>,
    /// A PEM file of the CA certificates to trust for the brokers' TLS (default: the system's).
    #[arg(long)]
    ssl_ca_location: Option<String>,
    /// Upgrade an existing table on a legacy Delta protocol (writer version 3-6: Spark's and
    /// delta-rs's change-feed tables) to table features, listing only what it uses, before
    /// writing. Without it such a table is refused and nothing is changed.
    #[arg(long)]
    upgrade_protocol: bool,
    /// For partitions whose recorded position is outside what they hold (the topic was
    /// deleted and recreated, its log truncated, or retention deleted messages first): go on
    /// from their earliest or latest offset, recorded in the table's commit. Without it such
    /// a partition stops the ingest, naming topic, partition and offsets.
    #[arg(long, value_name = "earliest|latest", value_parser = lakesync_ingest::StartFrom::parse)]
    reset_positions: Option<lakesync_ingest::StartFrom>,
    /// How long one request to the brokers may go unanswered before the ingest reconnects.
    #[arg(long, default_value = "30s")]
    request_timeout: String,
}

impl IngestArgs {
    /// The ingest, through the same validated spec as a config file's `[[ingest]]` entry.
    fn spec(&self) -> anyhow::Result<lakesync_ingest::IngestSpec> {
        let list = |s: &Option<String>| -> Vec<String> {
            s.iter().flat_map(|s| s.split(',')).map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect()
        };
        let mut entry = IngestConfig::new(
            self.brokers.split(',').map(|b| b.trim().to_string()).collect(),
            self.topic.clone(),
            self.table.clone(),
        );
        entry.name = self.name.clone();
        entry.schema = self.schema.clone();
        entry.partition_by = list(&self.partition_by);
        entry.kafka_columns = list(&self.kafka_columns);
        entry.flush_rows = Some(self.flush_rows);
        entry.flush_interval = Some(self.flush_interval.clone());
        entry.on_bad_record = Some(self.on_bad_record.clone());
        entry.dead_letter_table = self.dead_letter_table.clone();
        entry.start_from = Some(self.start_from.clone());
        entry.checkpoint_every = Some(self.checkpoint_every);
        entry.compact_every = Some(self.compact_every);
        entry.target_file_size = Some(self.target_file_size.clone());
        entry.storage_options =
            self.storage_options.iter().map(|(k, v)| (k.clone(), OptionValue::Text(v.clone()))).collect();
        entry.security_protocol = Some(self.security_protocol.clone());
        entry.sasl_mechanism = self.sasl_mechanism.clone();
        entry.sasl_username = self.sasl_username.clone();
        entry.sasl_password_env = self.sasl_password_env.clone();
        entry.ssl_ca_location = self.ssl_ca_location.clone();
        entry.upgrade_protocol = self.upgrade_protocol;
        entry.request_timeout = Some(self.request_timeout.clone());
        let mut spec = entry.validate_with(&|name| std::env::var(name).ok())?;
        spec.reset_positions = self.reset_positions;
        Ok(spec)
    }
}

/// Runs one ingest until SIGINT/SIGTERM (then flushes what it holds) or a failure retrying
/// cannot fix.
async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let spec = args.spec()?;
    let status = std::sync::Arc::new(lakesync_ingest::IngestStatus::new());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    let stop_tx_for_catch_up = stop_tx.clone();
    // Registered before the "ingesting" line: a signal after it always reaches the handler.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    if args.exit_when_caught_up {
        let ends = lakesync_ingest::kafka::end_offsets(&spec.brokers, &spec.security, &spec.topic)
            .await
            .map_err(anyhow::Error::msg)?;
        let (status, stop) = (status.clone(), stop_tx_for_catch_up.clone());
        tokio::spawn(async move {
            loop {
                let s = status.get();
                let done = ends.iter().all(|(p, end)| {
                    *end == 0 || s.partitions.get(p).and_then(|p| p.committed).is_some_and(|c| c >= *end)
                });
                if done || s.state == "failed" {
                    let _ = stop.send(true);
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
    }
    eprintln!("ingesting topic {} into {} as {} (SIGINT or SIGTERM to stop)", spec.topic, spec.table, spec.name);
    let result = lakesync_ingest::run(spec.clone(), status.clone(), stop).await;
    let s = status.get();
    let lag: i64 = s.partitions.values().map(|p| p.lag()).sum();
    println!(
        "ingest {}: {} rows ({} bytes) in {} commits, {} files, {} dead letters, {} compactions; lag {} messages",
        spec.name, s.rows, s.bytes, s.commits, s.files, s.dead_letters, s.compactions, lag
    );
    Ok(result?)
}

/// `KEY=VALUE` of `--storage-option`.
fn parse_storage_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err("expected KEY=VALUE".into()),
    }
}

impl SyncArgs {
    /// The run, through the same validated spec as a config file's `[[tables]]` entry.
    fn request(&self) -> anyhow::Result<SyncRequest> {
        let mut entry = TableConfig::new(
            self.source.clone(),
            self.table.clone(),
            &self.primary_key.split(',').map(str::trim).collect::<Vec<_>>(),
            "triggered",
        );
        entry.indexes = self.indexes.iter().map(|i| i.split(',').map(|c| c.trim().to_string()).collect()).collect();
        entry.parallelism = Some(self.parallelism);
        entry.nul_bytes = Some(match self.nul_bytes {
            NulBytes::Error => "error".into(),
            NulBytes::Strip => "strip".into(),
        });
        entry.dedup_by = self.dedup_by.clone();
        entry.exclude = self.exclude.clone();
        entry.filter = self.filter.clone();
        entry.columns = self.columns.clone();
        entry.delete_mode = Some(self.delete_mode.clone()).filter(|m| m != "hard");
        entry.lineage = self.lineage;
        entry.versions_per_transaction = Some(self.versions_per_transaction);
        entry.adopt = self.adopt;
        entry.allow_drop_columns = self.allow_drop_columns;
        entry.keep_runs = Some(self.keep_runs);
        entry.keep_runs_days = Some(self.keep_runs_days);
        entry.storage_options =
            self.storage_options.iter().map(|(k, v)| (k.clone(), OptionValue::Text(v.clone()))).collect();
        let spec = entry.validate()?;
        let mode = match self.mode {
            Mode::Auto => SyncMode::Auto,
            Mode::Snapshot => SyncMode::Snapshot,
            Mode::Triggered => SyncMode::Triggered,
        };
        let lock_wait = std::time::Duration::from_secs(self.lock_wait);
        let mut req = spec.request(&PgConfig::parse(&self.postgres)?, mode, self.to_version, lock_wait);
        req.dry_run = self.dry_run;
        Ok(req)
    }
}

fn main() -> ExitCode {
    if let Err(e) = logs::init() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(run(cli));
    // Stop background tasks (connection I/O, readers) first, so the error is the last line
    // written, as scripts expect.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our errors already embed their causes; add only the causes not yet shown.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sync(args) => {
            let req = args.request()?;
            // A transaction pooler would share the table's lock and the run's session with
            // other clients: refused before anything is written.
            let checked = std::time::Instant::now();
            req.postgres.refuse_transaction_pooler().await?;
            let pooler_check = checked.elapsed();
            let display = std::io::stderr().is_terminal().then(|| tokio::spawn(progress::show(req.progress.clone())));
            let result = sync(&req).await;
            if let Some(d) = display {
                d.abort();
                eprint!("\r\x1b[2K");
            }
            let out = result?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&out.plan_json(&req.table))?);
                return Ok(());
            }
            if args.dry_run {
                println!(
                    "dry run: would sync {} from Delta version {} to {} ({}, {}): {} inserted, {} updated, {} deleted; nothing was written",
                    req.table,
                    out.from_version.map_or("none".to_string(), |v| v.to_string()),
                    out.to_version,
                    out.mode.as_str(),
                    out.reason,
                    out.counts.inserted,
                    out.counts.updated,
                    out.counts.deleted,
                );
                if out.ddl.is_empty() {
                    println!("no DDL");
                }
                for statement in &out.ddl {
                    println!("{statement};");
                }
                return Ok(());
            }
            println!(
                "synced {} to Delta version {} ({}, {}): {} inserted, {} updated, {} deleted in {:.2}s",
                req.table,
                out.to_version,
                out.mode.as_str(),
                out.reason,
                out.counts.inserted,
                out.counts.updated,
                out.counts.deleted,
                out.duration.as_secs_f64()
            );
            if args.timings {
                // The pooler check runs before the run (so outside its total): shown last.
                let mut timings = out.timings.clone();
                timings.add("pooler check (before the run)", pooler_check);
                println!("timings: total {:.3}s; {}", out.duration.as_secs_f64(), timings.display());
            }
            Ok(())
        }
        Command::Status { postgres, json } => {
            let config = PgConfig::parse(&postgres)?;
            status::print(&config, json).await.context("reading status")
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Serve { config, grace } => serve::run(&config, std::time::Duration::from_secs(grace)).await,
        Command::CheckConfig { config } => serve::check(&config),
        Command::Compact(args) => {
            let written = args.storage_options.into_iter().collect();
            let storage = lakesync_delta::StorageOptions::resolve(&args.table, &written, &|k| std::env::var(k).ok())
                .map_err(|e| anyhow::anyhow!("--storage-option: {e}"))?;
            let options = lakesync_delta::compact::CompactOptions {
                target_file_size: args.target_file_size,
                min_files: args.min_files,
                checkpoint_every: args.checkpoint_every,
                upgrade_protocol: args.upgrade_protocol,
            };
            let table = args.table.clone();
            let r = tokio::task::spawn_blocking(move || lakesync_delta::compact::compact(&table, &storage, &options))
                .await??;
            if let Some((v, upgrade)) = &r.upgraded {
                println!("upgraded the {upgrade} of {} at version {v}", args.table);
            }
            match r.version {
                Some(v) => println!(
                    "compacted {} at version {} into version {v}: {} files ({} bytes) rewritten as {} ({} bytes), {} rows",
                    args.table, r.read_version, r.files_removed, r.bytes_removed, r.files_added, r.bytes_added, r.rows
                ),
                None => println!("{} at version {}: nothing to compact", args.table, r.read_version),
            }
            if let Some(v) = r.checkpoint {
                println!("checkpointed version {v}");
            }
            Ok(())
        }
        Command::Bench(args) => bench::run(args).await,
        Command::Ingest(args) => ingest(*args).await,
    }
}
