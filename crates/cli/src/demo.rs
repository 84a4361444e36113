//! `lakesync demo`: the whole loop on a sample table, with a private Postgres if none is given.

use std::path::PathBuf;

use anyhow::Context;
use lakesync_core::{SyncMode, TableName};
use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use lakesync_engine::config::TableConfig;
use lakesync_engine::{sync, SyncOutcome};
use lakesync_postgres::cluster::LocalCluster;
use lakesync_postgres::PgConfig;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Working directory for the sample Delta table (and the private Postgres).
    #[arg(long, default_value = ".lakesync-demo")]
    dir: PathBuf,
    /// Use this Postgres instead of starting a private one.
    #[arg(long, env = "LAKESYNC_POSTGRES", hide_env_values = true)]
    postgres: Option<String>,
    /// Port for the private Postgres.
    #[arg(long, default_value_t = 54329)]
    port: u16,
    /// Customers in the initial table.
    #[arg(long, default_value_t = 10_000)]
    rows: u64,
}

const FILE_ROWS: u64 = 1000;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::path::absolute(&args.dir)?;
    let (conn, cluster) = match &args.postgres {
        Some(c) => (c.clone(), None),
        None => {
            let pg_dir = dir.join("postgres");
            let port = args.port;
            println!("starting a private Postgres in {} on port {port} ...", pg_dir.display());
            let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(&pg_dir, port)).await??;
            (cluster.connection_string("postgres"), Some(cluster))
        }
    };
    let config = PgConfig::parse(&conn)?;
    let table = TableName::new("public", "customer_profiles");
    // A fresh demo each run: the Delta table is rewritten, so forget the old sync.
    let client = config.connect().await?;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS public.customer_profiles; \
             DO $$ BEGIN IF to_regclass('lakesync.synced_tables') IS NOT NULL THEN \
               DELETE FROM lakesync.synced_tables WHERE target_schema = 'public' AND target_table = 'customer_profiles'; \
               DELETE FROM lakesync.runs WHERE target_schema = 'public' AND target_table = 'customer_profiles'; END IF; END $$",
        )
        .await
        .context("resetting the demo table")?;

    let delta_path = dir.join("customer_profiles");
    let rows = args.rows.max(FILE_ROWS);
    println!("\n1. writing Delta table {} ({rows} customers, change data feed on) ...", delta_path.display());
    let (writer, first_file) = {
        let path = delta_path.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(DeltaWriter, String)> {
            let _ = std::fs::remove_dir_all(&path);
            let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")])?;
            // The first 1000 customers go in a file of their own, so the demo can rewrite it.
            w.append(&[customers(0..FILE_ROWS, 0)])?;
            let first = w.files()?.pop().context("the first append wrote no file")?;
            let batches: Vec<_> =
                (1..rows / FILE_ROWS).map(|f| customers(f * FILE_ROWS..(f + 1) * FILE_ROWS, 0)).collect();
            w.append(&batches)?;
            Ok((w, first))
        })
        .await??
    };

    let mut entry =
        TableConfig::new(delta_path.display().to_string(), table.to_string(), &["customer_id"], "triggered");
    entry.parallelism = Some(2);
    entry.indexes = vec![vec!["email".into()]];
    let req = entry.validate()?.request(&config, SyncMode::Auto, None, std::time::Duration::from_secs(10));
    println!("\n2. lakesync sync (first run: snapshot) ...");
    report(&sync(&req).await?);

    println!("\n3. committing changes to Delta: customers C000000000..C000000999 are rewritten");
    println!("   (990 updated, 10 deleted) and {} new customers are added ...", FILE_ROWS / 2);
    let committed = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        // A copy-on-write update in two commits (the kernel cannot write cdc files yet):
        // remove the file of the first 1000 customers, then write them back changed.
        let v1 = writer.remove_files(|p| p == first_file)?;
        let kept: Vec<u64> = (0..FILE_ROWS).filter(|i| i % 100 != 0).collect();
        let new_ids = rows + 1..=rows + FILE_ROWS / 2;
        let v2 = writer.append(&[customers(kept, 1), customers(new_ids, 0)])?;
        Ok(format!("versions {v1} (remove) and {v2} (append)"))
    })
    .await??;
    println!("   committed {committed}");

    println!("\n4. lakesync sync (incremental, from the change data feed) ...");
    report(&sync(&req).await?);

    println!("\n5. lakesync status");
    crate::status::print(&config, false).await?;
    let on_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("psql").exists()));
    let psql = match cluster.as_ref().and_then(|c| c.tool("psql")) {
        Some(path) if !on_path => path.display().to_string(),
        _ => "psql".to_string(),
    };
    println!("\nlook at the data:\n  {psql} \"{conn}\" -c 'SELECT * FROM public.customer_profiles ORDER BY customer_id LIMIT 5'");
    println!("  {psql} \"{conn}\" -c 'SELECT * FROM lakesync.runs'");
    if let Some(cluster) = cluster {
        println!("stop the private Postgres with:\n  {}", cluster.stop_command());
    }
    Ok(())
}

fn report(out: &SyncOutcome) {
    println!(
        "   -> {} to version {} ({}): {} inserted, {} updated, {} deleted in {:.2}s",
        out.mode.as_str(),
        out.to_version,
        out.reason,
        out.counts.inserted,
        out.counts.updated,
        out.counts.deleted,
        out.duration.as_secs_f64()
    );
}
