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
    /// The seed pipeline instead: transaction events → Kafka → `lakesync serve` ingesting them
    /// into Delta and syncing that table to Postgres continuously → the data API.
    #[arg(long)]
    pipeline: bool,
    /// --pipeline: a Kafka broker (host:port) to use instead of a local tansu.
    #[arg(long)]
    brokers: Option<String>,
    /// Keep running afterwards: `lakesync serve` syncs the table continuously while the demo
    /// commits a small change every few seconds; open the printed URL for the console.
    /// Ctrl-C stops both.
    #[arg(long)]
    serve: bool,
    /// With --serve: where the API and the console listen.
    #[arg(long, default_value = "127.0.0.1:8080", requires = "serve")]
    listen: String,
}

/// With --serve, how often the demo commits a change.
const SERVE_COMMIT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

const FILE_ROWS: u64 = 1000;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::path::absolute(&args.dir)?;
    let (conn, cluster) = postgres(&args, &dir).await?;
    if args.pipeline {
        pipeline(&args, &dir, &conn).await?;
        if let Some(cluster) = cluster {
            println!("stop the private Postgres with:\n  {}", cluster.stop_command());
        }
        return Ok(());
    }
    demo(&args, &dir, conn, cluster).await
}

async fn postgres(args: &DemoArgs, dir: &std::path::Path) -> anyhow::Result<(String, Option<LocalCluster>)> {
    Ok(match &args.postgres {
        Some(c) => (c.clone(), None),
        None => {
            let pg_dir = dir.join("postgres");
            let port = args.port;
            println!("starting a private Postgres in {} on port {port} ...", pg_dir.display());
            let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(&pg_dir, port)).await??;
            (cluster.connection_string("postgres"), Some(cluster))
        }
    })
}

async fn demo(
    args: &DemoArgs,
    dir: &std::path::Path,
    conn: String,
    cluster: Option<LocalCluster>,
) -> anyhow::Result<()> {
    let config = PgConfig::parse(&conn)?;
    let table = TableName::new("public", "customer_profiles");
    reset(&config.connect().await?, "public", "customer_profiles").await?;

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
    let (committed, writer) = tokio::task::spawn_blocking(move || -> anyhow::Result<(String, DeltaWriter)> {
        // A copy-on-write update in two commits (the kernel cannot write cdc files yet):
        // remove the file of the first 1000 customers, then write them back changed.
        let v1 = writer.remove_files(|p| p == first_file)?;
        let kept: Vec<u64> = (0..FILE_ROWS).filter(|i| i % 100 != 0).collect();
        let new_ids = rows + 1..=rows + FILE_ROWS / 2;
        let v2 = writer.append(&[customers(kept, 1), customers(new_ids, 0)])?;
        Ok((format!("versions {v1} (remove) and {v2} (append)"), writer))
    })
    .await??;
    println!("   committed {committed}");

    println!("\n4. lakesync sync (incremental, from the change data feed) ...");
    report(&sync(&req).await?);

    println!("\n5. lakesync status");
    crate::status::print(&config, false).await?;
    if args.serve {
        let served = keep_serving(args, dir, &conn, &delta_path, &table, writer, rows).await;
        if let Some(cluster) = cluster {
            println!("stop the private Postgres with:\n  {}", cluster.stop_command());
        }
        return served;
    }
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

/// `demo --serve`: `lakesync serve` runs the demo's table in continuous mode (and the console)
/// while the demo appends a few customers every [`SERVE_COMMIT_EVERY`], until Ctrl-C.
async fn keep_serving(
    args: &DemoArgs,
    dir: &std::path::Path,
    conn: &str,
    delta_path: &std::path::Path,
    table: &TableName,
    writer: DeltaWriter,
    rows: u64,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    // A fresh token for this demo: the console asks for it before "Sync now".
    let token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let config = dir.join("demo-serve.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = {listen:?}\ntoken_env = \"LAKESYNC_DEMO_TOKEN\"\n\n[[tables]]\nname = \"customer_profiles\"\n\
             source = {source:?}\ntarget = {target:?}\nprimary_key = [\"customer_id\"]\nmode = \"continuous\"\n\
             poll_interval = \"250ms\"\nindexes = [[\"email\"]]\n",
            listen = args.listen,
            source = delta_path.display().to_string(),
            target = table.to_string(),
        ),
    )?;
    let log = dir.join("demo-serve.log");
    let mut serve = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(&config)
        .env("LAKESYNC_POSTGRES", conn)
        .env("LAKESYNC_DEMO_TOKEN", &token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let mut first = String::new();
    std::io::BufReader::new(serve.stdout.take().context("serve stdout")?).read_line(&mut first)?;
    let Some(addr) = first.split("://").nth(1).and_then(|s| s.split_whitespace().next()).map(str::to_string) else {
        let _ = serve.kill();
        anyhow::bail!("lakesync serve did not start (is {} free?); see {}", args.listen, log.display());
    };
    println!("\n6. lakesync serve --config {} (the table in continuous mode)", config.display());
    println!("\n   console: http://{addr}/");
    println!("   token for its actions (\"Sync now\"): {token}");
    println!("   the demo appends 10 customers every {}s; Ctrl-C stops it.", SERVE_COMMIT_EVERY.as_secs());
    let writer = std::sync::Arc::new(writer);
    let mut next = rows + FILE_ROWS;
    let mut tick = tokio::time::interval(SERVE_COMMIT_EVERY);
    tick.tick().await;
    let stopped = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = tick.tick() => {
                if let Ok(Some(status)) = serve.try_wait() {
                    break Err(anyhow::anyhow!("lakesync serve exited ({status}); see {}", log.display()));
                }
                let w = writer.clone();
                let ids = next..next + 10;
                next += 10;
                let v = tokio::task::spawn_blocking(move || w.append(&[customers(ids, 0)])).await??;
                println!("   committed Delta version {v}");
            }
        }
    };
    let _ = std::process::Command::new("kill").args(["-TERM", &serve.id().to_string()]).status();
    let _ = serve.wait();
    println!("\nstopped lakesync serve (its log: {}).", log.display());
    stopped
}

/// A fresh demo each run: its Delta table is rewritten, so drop the synced table and forget
/// its sync (the demo's own names, fixed strings).
async fn reset(client: &tokio_postgres::Client, schema: &str, table: &str) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {schema}.{table}; \
             DO $$ BEGIN IF to_regclass('lakesync.synced_tables') IS NOT NULL THEN \
               DELETE FROM lakesync.synced_tables WHERE target_schema = '{schema}' AND target_table = '{table}'; \
               DELETE FROM lakesync.runs WHERE target_schema = '{schema}' AND target_table = '{table}'; END IF; END $$"
        ))
        .await
        .context("resetting the demo table")
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

/// A GET against the local API; returns the body.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The seed pipeline: app events → Kafka → Delta → Postgres → the data API.
async fn pipeline(args: &DemoArgs, dir: &std::path::Path, conn: &str) -> anyhow::Result<()> {
    use std::io::BufRead;
    use std::time::{Duration, Instant};

    let broker = crate::bench::ingest::start_broker(args.brokers.as_deref(), args.port + 1)?;
    let brokers = vec![broker.address.clone()];
    let topic = "transactions";
    println!("\n1. Kafka broker at {} (local tansu unless --brokers); topic {topic}, 4 partitions", broker.address);
    if let Err(e) =
        lakesync_ingest::kafka::create_topic(&brokers, &lakesync_ingest::kafka::Security::default(), topic, 4).await
    {
        anyhow::ensure!(e.contains("TopicAlreadyExists"), "{e}");
    }
    let client = PgConfig::parse(conn)?.connect().await?;
    reset(&client, "app", "transactions").await?;
    let table = dir.join("lake/transactions");
    let _ = std::fs::remove_dir_all(dir.join("lake"));
    let schema = dir.join("transactions.schema.json");
    std::fs::write(&schema, crate::events::SCHEMA)?;
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\n\n[[ingest]]\nname = \"transactions-ingest\"\nbrokers = [{b:?}]\ntopic = {topic:?}\n\
             table = {t:?}\nschema = {s:?}\nkafka_columns = [\"partition\", \"offset\", \"timestamp\"]\nflush_interval = \"500ms\"\n\n\
             [[tables]]\nname = \"transactions\"\nsource = {t:?}\ntarget = \"app.transactions\"\nprimary_key = [\"transaction_id\"]\n\
             mode = \"continuous\"\npoll_interval = \"100ms\"\ndedup_by = \"seq\"\nindexes = [[\"user_id\", \"event_time\"]]\n",
            b = broker.address,
            t = table.display().to_string(),
            s = schema.display().to_string(),
        ),
    )?;
    println!("\n2. lakesync serve --config {}:", config.display());
    println!("{}", std::fs::read_to_string(&config)?.lines().map(|l| format!("   {l}")).collect::<Vec<_>>().join("\n"));
    let log = dir.join("pipeline-serve.log");
    let mut serve = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(&config)
        .env("LAKESYNC_POSTGRES", conn)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let mut first = String::new();
    std::io::BufReader::new(serve.stdout.take().context("serve stdout")?).read_line(&mut first)?;
    let addr = first.split("://").nth(1).and_then(|s| s.split_whitespace().next()).map(str::to_string);
    let Some(addr) = addr else {
        let _ = serve.kill();
        anyhow::bail!("lakesync serve did not start; see {}", log.display());
    };
    println!("   serving http://{addr}");

    let events = 2 * args.rows.clamp(100, 100_000);
    println!("\n3. producing {} transactions: each created (pending), then settled: {events} events ...", events / 2);
    let producer =
        lakesync_ingest::kafka::Producer::connect(&brokers, &lakesync_ingest::kafka::Security::default(), topic)
            .await
            .map_err(anyhow::Error::msg)?;
    let produced = Instant::now();
    for seq in 0..events {
        let t = seq / 2;
        // A transaction's events share a partition (keyed by transaction), so they stay in order.
        producer
            .send((t % 4) as i32, Some(format!("txn-{t:012}").into_bytes()), Some(crate::events::event(seq)))
            .await
            .map_err(anyhow::Error::msg)?;
    }
    println!("   produced in {:.1}s", produced.elapsed().as_secs_f64());
    let path = "/api/v1/tables/app.transactions/rows?user_id=user-00000003&order_by=event_time.desc&limit=3";
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let settled: i64 = client
            .query_opt("SELECT count(*) FROM app.transactions WHERE status = 'settled'", &[])
            .await
            .ok()
            .flatten()
            .map_or(0, |r| r.get(0));
        if settled as u64 == events / 2 {
            break;
        }
        if Instant::now() > deadline {
            let _ = serve.kill();
            anyhow::bail!("the pipeline did not catch up in 120 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("   every transaction settled in Postgres {:.1}s after the first event", produced.elapsed().as_secs_f64());
    let ingest = http_get(&addr, "/api/v1/ingests/transactions-ingest")?;
    let ingest: serde_json::Value = serde_json::from_str(&ingest)?;
    println!(
        "\n4. the ingest: {} rows in {} commits, {} files, lag {} messages (GET /api/v1/ingests/transactions-ingest)",
        ingest["rows"], ingest["commits"], ingest["files"], ingest["lag_messages"]
    );
    println!("\n5. a support agent reads a user's transactions, newest first:\n   curl 'http://{addr}{path}'");
    let rows: serde_json::Value = serde_json::from_str(&http_get(&addr, path)?)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&rows["rows"])?.lines().map(|l| format!("   {l}")).collect::<Vec<_>>().join("\n")
    );
    let fresh = Instant::now();
    producer.send(0, None, Some(crate::events::event(events))).await.map_err(anyhow::Error::msg)?;
    let key = format!("txn-{:012}", events / 2);
    while !http_get(&addr, &format!("/api/v1/tables/app.transactions/rows/{key}"))?.contains(&key) {
        anyhow::ensure!(fresh.elapsed() < Duration::from_secs(30), "a new event did not show up in 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "\n6. one more event: readable through the API {:.2}s after it was produced",
        fresh.elapsed().as_secs_f64()
    );
    // SIGTERM: the daemon flushes and stops cleanly.
    let _ = std::process::Command::new("kill").args(["-TERM", &serve.id().to_string()]).status();
    let _ = serve.wait();
    println!("\nstopped lakesync serve (its log: {}); the broker stops with the demo.", log.display());
    Ok(())
}
