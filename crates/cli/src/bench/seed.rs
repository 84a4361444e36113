//! `lakesync bench --scenario seed`: the seed use case's own table, 50M rows of the
//! customer_profiles shape (its staging approach loaded ~8 GB in 40 minutes), then its 40k
//! updates per run.
//!
//! The Delta table (base version plus the change, in the `--change` shape) and what every
//! result must equal (row count and checksum of both versions, computed by the kernel's read)
//! are built once and kept in `<dir>/seed-<rows>-<shape>`; later runs reuse them. Building
//! one shape's table removes the other's, so only one is on disk.
//!
//! One round, in an order that keeps one 50M-row Postgres table on disk at a time: (a) the
//! reference load (rows encoded before the clock, one binary COPY, primary key), steady state,
//! (d) the blog pattern's 40k updates on it, then the reference is dropped; (b) lakesync's
//! snapshot, steady state, (c) lakesync's incremental sync of the 40k updates. Every result is
//! verified against the Delta version it should equal.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::ValueEnum;
use lakesync_core::TableName;
use lakesync_delta::DeltaTable;
use lakesync_postgres::cluster::LocalCluster;
use lakesync_postgres::ddl::qualified;
use lakesync_postgres::PgConfig;

use super::{
    blog_phase, child_phase, delta_checksum, encode_reference, floor_phase, postmaster_pid, print_table,
    reference_load, shared_memory, stage_floor, steady_state, verify, write_customer_table, BenchArgs, ChangeShape,
    ChangeSpec,
};

/// The seed's table.
pub const SEED_ROWS: u64 = 50_000_000;
/// The seed's updates per run.
const SEED_UPDATES: u64 = 40_000;
/// How long the seed's staging approach took to load its table.
const SEED_LOAD_SECONDS: f64 = 40.0 * 60.0;
/// Disk a row takes, measured at 50M rows: the Delta table's Parquet files (3.6 GB, ~78 bytes
/// a row; a MERGE change rewrites the files it touches, so twice that is allowed for it), and
/// lakesync's Postgres table with its primary key (9.24 GB, ~200 bytes a row: 167 heap at
/// `fillfactor=90`, 32 key).
const DELTA_BYTES_PER_ROW: u64 = 78;
const POSTGRES_BYTES_PER_ROW: u64 = 200;
/// WAL the private server may keep (`max_wal_size`, 4 GB), plus room for VACUUM and
/// checkpoints; a small table's load writes about its own size of WAL.
fn wal_bytes(rows: u64) -> u64 {
    (rows * POSTGRES_BYTES_PER_ROW * 3 / 2 + (256 << 20)).min(5 << 30)
}

/// What a built seed table is, stored beside it: a later run reuses the table only if all
/// of it matches.
#[derive(PartialEq, Debug)]
struct Built {
    rows: u64,
    file_rows: u64,
    change: String,
    updates: u64,
    base_version: u64,
    final_version: u64,
    /// (row count, checksum as decimal text) of the base and the final version.
    base: (u64, String),
    last: (u64, String),
}

impl Built {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rows": self.rows, "file_rows": self.file_rows, "change": self.change, "updates": self.updates,
            "base_version": self.base_version, "final_version": self.final_version,
            "base": [self.base.0, self.base.1], "final": [self.last.0, self.last.1],
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<Self> {
        let n = |k: &str| v.get(k)?.as_u64();
        let pair = |k: &str| Some((v.get(k)?.get(0)?.as_u64()?, v.get(k)?.get(1)?.as_str()?.to_string()));
        Some(Self {
            rows: n("rows")?,
            file_rows: n("file_rows")?,
            change: v.get("change")?.as_str()?.to_string(),
            updates: n("updates")?,
            base_version: n("base_version")?,
            final_version: n("final_version")?,
            base: pair("base")?,
            last: pair("final")?,
        })
    }
}

/// The seed's change: 40k updates spread evenly over the whole key range (every data file is
/// touched, as app events touch customers regardless of when they signed up).
fn seed_spec(rows: u64) -> ChangeSpec {
    let updates = SEED_UPDATES.min(rows / 2);
    let step = rows / updates;
    ChangeSpec {
        updated: (0..updates).map(|k| k * step + step / 2).collect(),
        deleted: Vec::new(),
        inserted: Vec::new(),
    }
}

pub async fn measure(args: &BenchArgs, dir: &Path, cluster: &LocalCluster) -> anyhow::Result<()> {
    let rows = args.rows();
    let spec = seed_spec(rows);
    let change = args.change.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
    let home = dir.join(format!("seed-{rows}-{change}"));
    let delta = home.join("customer_profiles");
    let wanted = |b: &Built| {
        b.rows == rows && b.file_rows == args.file_rows && b.change == change && b.updates == spec.updated.len() as u64
    };
    let built: Option<Built> = std::fs::read(home.join("built.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .and_then(|v| Built::from_json(&v))
        .filter(|b| wanted(b));

    // A previous run's tables go first: their disk counts as free.
    let admin = PgConfig::parse(&cluster.connection_string("postgres"))?;
    let admin_client = admin.connect().await?;
    admin_client.batch_execute("DROP DATABASE IF EXISTS bench WITH (FORCE)").await?;

    // The disk it needs, stated before anything is written. Building removes any other seed
    // table first, so its disk counts as free too.
    let delta_bytes = match &built {
        Some(_) => du(&home),
        None => rows * DELTA_BYTES_PER_ROW * if args.change == ChangeShape::Merge { 2 } else { 1 },
    };
    let postgres_bytes = rows * POSTGRES_BYTES_PER_ROW + wal_bytes(rows);
    let others: u64 = if built.is_some() {
        0
    } else {
        std::fs::read_dir(dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
            .map(|e| du(&e.path()))
            .sum()
    };
    let free = free_bytes(dir)? + others;
    let gb = |b: u64| b as f64 / (1u64 << 30) as f64;
    eprintln!(
        "bench: the seed needs about {:.1} GB on {}: the Delta table {:.1} GB ({}), one Postgres table with its \
         key {:.1} GB, WAL and vacuum room {:.1} GB; {:.1} GB are free",
        gb(delta_bytes + postgres_bytes),
        dir.display(),
        gb(delta_bytes),
        if built.is_some() { "built, reused" } else { "to build" },
        gb(rows * POSTGRES_BYTES_PER_ROW),
        gb(wal_bytes(rows)),
        gb(free + if built.is_some() { delta_bytes } else { 0 }),
    );
    let needed = postgres_bytes + if built.is_some() { 0 } else { delta_bytes };
    if free < needed {
        bail!(
            "not enough disk for the seed at {rows} rows: {:.1} GB needed on {}, {:.1} GB free (use --dir elsewhere, or \
             fewer --rows)",
            gb(needed),
            dir.display(),
            gb(free)
        );
    }

    let built = match built {
        Some(b) => {
            eprintln!(
                "bench: reusing the seed table in {} (versions {} and {})",
                home.display(),
                b.base_version,
                b.final_version
            );
            b
        }
        None => build(args, dir, &home, &delta, &spec, &change).await?,
    };
    let parse = |(n, sum): &(u64, String)| -> anyhow::Result<(u64, u128)> { Ok((*n, sum.parse()?)) };
    let (expected_base, expected_final) = (parse(&built.base)?, parse(&built.last)?);

    admin_client.batch_execute("CREATE DATABASE bench").await?;
    let conn = cluster.connection_string("bench");
    let config = PgConfig::parse(&conn)?;
    let client = config.connect().await?;
    let data_dir = dir.join("postgres/data");
    let postmaster = postmaster_pid(&data_dir)?;
    let memory = shared_memory(&data_dir);
    let reference = TableName::new("bench_ref", "customer_profiles");
    let target = TableName::new("bench", "customer_profiles");
    let schema = DeltaTable::open(&delta.display().to_string())?.snapshot(Some(built.base_version))?.schema()?;

    // (a) The reference, from rows encoded before the clock (about 150 bytes a row in memory).
    let t = Instant::now();
    let encoded = {
        let schema = schema.clone();
        tokio::task::spawn_blocking(move || encode_reference(rows, &schema)).await??
    };
    eprintln!(
        "bench: encoded the reference's rows ({:.1} GB) in {:.1}s",
        gb(encoded.iter().map(|b| b.len() as u64).sum()),
        t.elapsed().as_secs_f64()
    );
    let a = reference_load(&client, &schema, &reference, &encoded, rows, false, postmaster).await?;
    drop(encoded);
    verify(&config, &reference, built.base_version, expected_base).await.context("verifying the reference load")?;
    let reference_size = sizes(&client, &reference).await?;
    steady_state(&client, std::slice::from_ref(&reference)).await?;
    let d = blog_phase(&config, &reference, &spec, postmaster).await?;
    verify(&config, &reference, built.final_version, expected_final).await.context("verifying the blog pattern")?;
    // The change's rows for (e), from the reference that now has it.
    stage_floor(&client, &reference, &spec).await?;
    client.batch_execute("DROP SCHEMA bench_ref CASCADE").await?;
    client.batch_execute("CHECKPOINT").await?;

    // (b) and (c): lakesync.
    let exe = std::env::current_exe()?;
    let source = delta.display().to_string();
    let table = target.to_string();
    let parallelism = args.parallelism.to_string();
    let base = built.base_version.to_string();
    let sync_args =
        ["sync", "--source", &source, "--table", &table, "--primary-key", "customer_id", "--parallelism", &parallelism];
    let snapshot_args: Vec<&str> = sync_args.iter().copied().chain(["--to-version", base.as_str()]).collect();
    let b = child_phase(
        "b. lakesync snapshot (Delta -> indexed table)",
        rows,
        &exe,
        &snapshot_args,
        &[],
        &conn,
        postmaster,
    )?;
    verify(&config, &target, built.base_version, expected_base).await.context("verifying the snapshot")?;
    let target_size = sizes(&client, &target).await?;
    // (e) Postgres's floor, on lakesync's table itself (there is no disk for a copy of it):
    // applied and rolled back, then vacuumed and brought to the steady state again, so that
    // (c) finds the table as it would have without (e).
    steady_state(&client, std::slice::from_ref(&target)).await?;
    let e = floor_phase(&client, &config, &target, &spec, false, postmaster).await?;
    verify(&config, &target, built.base_version, expected_base).await.context("verifying the floor's rollback")?;
    steady_state(&client, std::slice::from_ref(&target)).await?;
    let changes = spec.len() as u64;
    let c = child_phase(
        "c. lakesync incremental (CDF -> one transaction)",
        changes,
        &exe,
        &sync_args,
        &[],
        &conn,
        postmaster,
    )?;
    verify(&config, &target, built.final_version, expected_final).await.context("verifying the incremental sync")?;

    let (b_s, c_s, d_s, e_s) = (b.seconds, c.seconds, d.seconds, e.seconds);
    let b_rss = b.peak_rss_mb.unwrap_or_default().max(c.peak_rss_mb.unwrap_or_default());
    print_table(&[vec![a, b, c, d, e]], rows, &memory);
    println!(
        "\nThe seed ({rows} rows, {change} change of {changes} updates; Delta table {:.1} GB in {}):\n\n\
         - snapshot: {b_s:.1} s, {:.0} rows/s, {:.1}x faster than the seed's staging load (40 minutes); \
         peak RSS {b_rss:.0} MB\n\
         - Postgres: lakesync's table {}, the reference's {}\n\
         - incremental: {changes} updates in {c_s:.2} s against the blog pattern's {d_s:.2} s ({:.1}x); \
         Postgres's floor for them {e_s:.2} s (c/e {:.2}x, d/e {:.1}x)",
        gb(du(&home)),
        home.display(),
        rows as f64 / b_s,
        SEED_LOAD_SECONDS / b_s,
        target_size,
        reference_size,
        d_s / c_s,
        c_s / e_s,
        d_s / e_s,
    );
    Ok(())
}

/// Writes the seed's Delta table (base version, then the change) into `home`, computes what
/// each version must sync to, and records it in `built.json`. Any other seed table in `dir`
/// goes first, so only one is on disk.
async fn build(
    args: &BenchArgs,
    dir: &Path,
    home: &Path,
    delta: &Path,
    spec: &ChangeSpec,
    change: &str,
) -> anyhow::Result<Built> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("seed-") {
            eprintln!("bench: removing the other seed table {}", entry.path().display());
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    std::fs::create_dir_all(home)?;
    let (rows, file_rows) = (args.rows(), args.file_rows);
    let t = Instant::now();
    let (base_version, final_version) = write_customer_table(args, home, delta, spec).await?;
    eprintln!(
        "bench: wrote the seed's Delta versions {base_version} to {final_version} in {:.0}s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let (base, last) = {
        let (one, two) = (delta.to_path_buf(), delta.to_path_buf());
        let base = tokio::task::spawn_blocking(move || delta_checksum(&one, base_version));
        let last = tokio::task::spawn_blocking(move || delta_checksum(&two, final_version));
        (base.await??, last.await??)
    };
    eprintln!("bench: checksummed both versions from Delta in {:.0}s", t.elapsed().as_secs_f64());
    let built = Built {
        rows,
        file_rows,
        change: change.to_string(),
        updates: spec.updated.len() as u64,
        base_version,
        final_version,
        base: (base.0, base.1.to_string()),
        last: (last.0, last.1.to_string()),
    };
    std::fs::write(home.join("built.json"), serde_json::to_vec_pretty(&built.to_json())?)?;
    Ok(built)
}

/// "<total> (heap <h>, key <k>)" of `table`, in GB.
async fn sizes(client: &tokio_postgres::Client, table: &TableName) -> anyhow::Result<String> {
    let row = client
        .query_one(
            "SELECT pg_total_relation_size(r), pg_relation_size(r), pg_indexes_size(r) FROM (SELECT $1::text::regclass AS r) t",
            &[&qualified(table)],
        )
        .await?;
    let gb = |i: usize| row.get::<_, i64>(i) as f64 / (1u64 << 30) as f64;
    Ok(format!("{:.2} GB (heap {:.2}, key {:.2})", gb(0), gb(1), gb(2)))
}

/// Bytes under `path` (what `du` counts: allocated blocks).
fn du(path: &Path) -> u64 {
    let out = std::process::Command::new("du").args(["-sk"]).arg(path).output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().and_then(|k| k.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Bytes free on the file system holding `path`.
fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("df").args(["-Pk"]).arg(path).output().context("running df")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kb = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|k| k.parse::<u64>().ok())
        .with_context(|| format!("reading the free space of {} from df", path.display()))?;
    Ok(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_updates_are_distinct_in_range_and_touch_every_file() {
        let spec = seed_spec(SEED_ROWS);
        assert_eq!(spec.updated.len(), 40_000);
        assert!(spec.updated.windows(2).all(|w| w[0] < w[1]) && *spec.updated.last().unwrap() < SEED_ROWS);
        let files: std::collections::HashSet<u64> = spec.updated.iter().map(|id| id / 250_000).collect();
        assert_eq!(files.len(), 200);
        assert!(spec.deleted.is_empty() && spec.inserted.is_empty());
        // A small table gets half its rows updated.
        assert_eq!(seed_spec(20_000).updated.len(), 10_000);
    }

    #[test]
    fn a_built_seed_table_is_recognised_from_its_record() {
        let built = Built {
            rows: 50_000_000,
            file_rows: 250_000,
            change: "merge".into(),
            updates: 40_000,
            base_version: 1,
            final_version: 2,
            base: (50_000_000, "123456789012345678901234567890".into()),
            last: (50_000_000, "42".into()),
        };
        assert_eq!(Built::from_json(&built.to_json()), Some(built));
        assert_eq!(Built::from_json(&serde_json::json!({"rows": 1})), None);
    }
}
