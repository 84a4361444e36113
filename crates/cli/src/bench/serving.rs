//! `lakesync bench --scenario api`: data API key lookups, lakesync (its own `/api/v1` and the
//! PostgREST-dialect `/rest/v1`) vs the blog's FastAPI + psycopg_pool service, on the same
//! synced table in the same run.
//!
//! Both servers run on this machine with the load generator (a Rust HTTP/1.1 keep-alive
//! client, no library in between): (1) open loop at a fixed 2,000 req/s for `--seconds`/2,
//! latency measured from each request's scheduled send time when its connection was still
//! busy then (so queueing counts), else from when it was sent (so the timer's 1 ms
//! granularity does not); (2) closed
//! loop with 32 connections for `--seconds`/2: the throughput ceiling. Keys are random
//! existing customers. Every response is checked for status 200.
//!
//! The FastAPI service is the blog's: `GET /customers/{id}` running
//! `SELECT * FROM customer_profiles WHERE customer_id = %s` through a psycopg_pool, uvicorn
//! with one worker per core. Its Python packages are installed into `.venv` if missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use lakesync_engine::config::{ApiSettings, TableConfig};
use lakesync_engine::Daemon;
use lakesync_postgres::cluster::LocalCluster;
use lakesync_postgres::PgConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{proc_status_kb, BenchArgs};

const RATE: u64 = 2000;
const OPEN_LOOP_CONNECTIONS: u64 = 16;
const CLOSED_LOOP_CONNECTIONS: u64 = 32;

const FASTAPI_APP: &str = r#"
import os
from fastapi import FastAPI, HTTPException
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

pool = ConnectionPool(os.environ["BENCH_DSN"], min_size=8, max_size=8, kwargs={"row_factory": dict_row})
app = FastAPI()

@app.get("/customers/{customer_id}")
def get_customer(customer_id: str):
    with pool.connection() as conn:
        row = conn.execute("SELECT * FROM public.customer_profiles WHERE customer_id = %s", (customer_id,)).fetchone()
    if row is None:
        raise HTTPException(status_code=404)
    return row
"#;

struct Load {
    requests: u64,
    seconds: f64,
    latencies_ms: Vec<f64>,
}

impl Load {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn pct(&self, p: f64) -> f64 {
        let mut l = self.latencies_ms.clone();
        l.sort_by(f64::total_cmp);
        l.get(((l.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN)
    }
}

pub async fn measure(args: &BenchArgs, dir: &Path, cluster: &LocalCluster) -> anyhow::Result<()> {
    let rows = args.rows();
    let admin = PgConfig::parse(&cluster.connection_string("postgres"))?.connect().await?;
    admin.batch_execute("DROP DATABASE IF EXISTS bench_api WITH (FORCE)").await?;
    admin.batch_execute("CREATE DATABASE bench_api").await?;
    let conn = cluster.connection_string("bench_api");
    let config = PgConfig::parse(&conn)?;

    let delta = dir.join("api_customers");
    {
        let (delta, file_rows) = (delta.clone(), args.file_rows);
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let _ = std::fs::remove_dir_all(&delta);
            let w = DeltaWriter::create(&delta, &customer_schema(), &[("delta.enableChangeDataFeed", "true")])?;
            let files = rows.div_ceil(file_rows);
            w.append_files((0..files).map(|f| customers(f * file_rows..((f + 1) * file_rows).min(rows), 0)))?;
            Ok(())
        })
        .await??;
    }
    let spec = TableConfig {
        parallelism: Some(args.parallelism),
        ..TableConfig::new(delta.display().to_string(), "public.customer_profiles", &["customer_id"], "triggered")
    }
    .validate()?;
    let daemon = Daemon::new(config.clone());
    let worker = daemon.add(spec)?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while worker.status().synced_version.is_none() {
        anyhow::ensure!(
            Instant::now() < deadline && worker.status().parked.is_none(),
            "snapshot failed: {:?}",
            worker.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("bench: {rows} rows synced; starting the servers");

    let settings = ApiSettings {
        listen: "127.0.0.1:0".parse()?,
        token: None,
        max_page_size: 1000,
        statement_timeout: Duration::from_secs(5),
        pool_size: 8,
        read_auth: lakesync_engine::config::ReadAuth::Open,
        postgres: None,
        tls: None,
        policy: Default::default(),
        jwt: None,
    };
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    let ours = listener.local_addr()?;
    let state = lakesync_api::AppState::new(daemon.clone(), &settings);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lakesync_api::serve(listener, state, async {
        let _ = stop_rx.await;
    }));
    let fastapi_port = args.port + 1;
    let mut fastapi = FastApi::start(dir, &conn, fastapi_port)?;
    let theirs: SocketAddr = format!("127.0.0.1:{fastapi_port}").parse()?;
    fastapi.wait_ready(theirs).await?;

    let ours_path = |id: u64| format!("/api/v1/tables/public.customer_profiles/rows/C{id:09}");
    let rest_path = |id: u64| format!("/rest/v1/customer_profiles?customer_id=eq.C{id:09}");
    let theirs_path = |id: u64| format!("/customers/C{id:09}");
    let half = Duration::from_secs((args.seconds / 2).max(2));
    // Warm all three (connections, prepared statements, caches).
    closed_loop(ours, &ours_path, rows, 8, Duration::from_secs(2)).await?;
    closed_loop(ours, &rest_path, rows, 8, Duration::from_secs(2)).await?;
    closed_loop(theirs, &theirs_path, rows, 8, Duration::from_secs(2)).await?;

    let our_open = open_loop(ours, &ours_path, rows, half).await?;
    let rest_open = open_loop(ours, &rest_path, rows, half).await?;
    let their_open = open_loop(theirs, &theirs_path, rows, half).await?;
    let our_closed = closed_loop(ours, &ours_path, rows, CLOSED_LOOP_CONNECTIONS, half).await?;
    let rest_closed = closed_loop(ours, &rest_path, rows, CLOSED_LOOP_CONNECTIONS, half).await?;
    let their_closed = closed_loop(theirs, &theirs_path, rows, CLOSED_LOOP_CONNECTIONS, half).await?;
    // (3) /rest/v1 lookups at the fixed rate while two connections run a filter on an
    // unindexed column back to back (a sequential scan of every row that matches nothing):
    // the scans are bounded by statement_timeout and must not starve the lookups.
    let scan_path =
        |_: u64| "/rest/v1/customer_profiles?email=eq.nobody@example.invalid&select=customer_id".to_string();
    let (rest_beside_scans, scans) =
        tokio::join!(open_loop(ours, &rest_path, rows, half), closed_loop(ours, &scan_path, rows, 2, half));
    let (rest_beside_scans, scans) = (rest_beside_scans?, scans?);
    let _ = stop_tx.send(());
    let _ = server.await;
    daemon.shutdown(Duration::from_secs(10)).await;
    fastapi.stop();

    let rss = proc_status_kb(std::process::id(), "VmHWM").map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN);
    println!("\nlakesync bench api: {rows} rows, key lookups of random existing customers, all responses 200\n");
    println!("| server | open loop {RATE} req/s: achieved | p50 ms | p99 ms | max ms | closed loop {CLOSED_LOOP_CONNECTIONS} conns: req/s | p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, open, closed) in [
        ("lakesync `/api/v1/tables/…/rows/<key>`", &our_open, &our_closed),
        ("lakesync `/rest/v1/…?customer_id=eq.<key>` (PostgREST dialect)", &rest_open, &rest_closed),
        ("FastAPI + psycopg_pool", &their_open, &their_closed),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0} | {:.1} |",
            open.rate(),
            open.pct(0.5),
            open.pct(0.99),
            open.pct(1.0),
            closed.rate(),
            closed.pct(0.99)
        );
    }
    println!(
        "\n/rest/v1 lookups at {RATE} req/s beside 2 connections scanning {rows} rows for an unindexed filter: \
         achieved {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; the scans: {:.1} req/s, p50 {:.0} ms, max {:.0} ms \
         (statement_timeout {} s)",
        rest_beside_scans.rate(),
        rest_beside_scans.pct(0.5),
        rest_beside_scans.pct(0.99),
        rest_beside_scans.pct(1.0),
        scans.rate(),
        scans.pct(0.5),
        scans.pct(1.0),
        settings.statement_timeout.as_secs()
    );
    println!(
        "\nthroughput ratio lakesync / FastAPI: {:.1}x (/api/v1), {:.1}x (/rest/v1); peak RSS of this process (load generator + lakesync): {rss:.0} MB",
        our_closed.rate() / their_closed.rate(),
        rest_closed.rate() / their_closed.rate()
    );
    Ok(())
}

/// Fixed-rate load: each connection sends at its share of `RATE`; latency counts from the
/// scheduled send time, so a slow server cannot hide queueing (no coordinated omission).
async fn open_loop(
    addr: SocketAddr,
    path: &(dyn Fn(u64) -> String + Sync),
    rows: u64,
    span: Duration,
) -> anyhow::Result<Load> {
    let interval = Duration::from_secs_f64(OPEN_LOOP_CONNECTIONS as f64 / RATE as f64);
    let start = Instant::now() + Duration::from_millis(50);
    let per_conn = (span.as_secs_f64() / interval.as_secs_f64()) as u64;
    let mut tasks = Vec::new();
    for c in 0..OPEN_LOOP_CONNECTIONS {
        let paths: Vec<String> = (0..per_conn).map(|i| path(key(c, i, rows))).collect();
        let offset = interval.mul_f64(c as f64 / OPEN_LOOP_CONNECTIONS as f64);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let mut lat = Vec::with_capacity(paths.len());
            let mut previous_done = Instant::now();
            for (i, p) in paths.iter().enumerate() {
                let scheduled = start + offset + interval * i as u32;
                tokio::time::sleep_until(scheduled.into()).await;
                // Still busy with the previous request at the scheduled time: the wait is
                // queueing and counts. Idle: count from now, so the timer's millisecond
                // granularity is not charged to the server.
                let from = if previous_done > scheduled { scheduled } else { Instant::now() };
                conn.get(p).await?;
                previous_done = Instant::now();
                lat.push(previous_done.duration_since(from).as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    gather(tasks, start).await
}

/// As fast as `connections` keep-alive connections can go, each waiting for its response.
async fn closed_loop(
    addr: SocketAddr,
    path: &(dyn Fn(u64) -> String + Sync),
    rows: u64,
    connections: u64,
    span: Duration,
) -> anyhow::Result<Load> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let paths: Vec<String> = (0..4096).map(|i| path(key(c, i, rows))).collect();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let mut lat = Vec::new();
            let mut i = 0;
            while start.elapsed() < span {
                let t = Instant::now();
                conn.get(&paths[i % paths.len()]).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                i += 1;
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    gather(tasks, start).await
}

type Latencies = tokio::task::JoinHandle<anyhow::Result<Vec<f64>>>;

/// Joins the connections' latencies into one load figure over the time since `start`.
async fn gather(tasks: Vec<Latencies>, start: Instant) -> anyhow::Result<Load> {
    let mut load = Load { requests: 0, seconds: 0.0, latencies_ms: Vec::new() };
    for t in tasks {
        let lat = t.await??;
        load.requests += lat.len() as u64;
        load.latencies_ms.extend(lat);
    }
    load.seconds = start.elapsed().as_secs_f64();
    Ok(load)
}

/// A deterministic, well-spread existing key.
fn key(conn: u64, i: u64, rows: u64) -> u64 {
    (conn.wrapping_mul(0x9E37_79B9).wrapping_add(i.wrapping_mul(0x85EB_CA6B)) >> 3) % rows
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    host: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self { stream, buf: Vec::with_capacity(4096), host: addr.to_string() })
    }

    /// Sends a GET and reads the whole response; fails unless the status is 200.
    async fn get(&mut self, path: &str) -> anyhow::Result<()> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.stream.write_all(request.as_bytes()).await?;
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])?;
                if !head.starts_with("HTTP/1.1 200") {
                    bail!("{path}: {}", head.lines().next().unwrap_or_default());
                }
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok()).flatten()
                    })
                    .context("response without content-length")?;
                while self.buf.len() < end + 4 + length {
                    let n = self.stream.read(&mut chunk).await?;
                    anyhow::ensure!(n > 0, "connection closed mid-response");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                return Ok(());
            }
            let n = self.stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

struct FastApi {
    child: Child,
}

impl FastApi {
    fn start(dir: &Path, conn: &str, port: u16) -> anyhow::Result<Self> {
        let python = python();
        let ready = |py: &PathBuf| {
            Command::new(py)
                .args(["-c", "import fastapi, uvicorn, psycopg, psycopg_pool"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ready(&python) {
            eprintln!("bench: installing fastapi, uvicorn, psycopg and psycopg_pool into {}", python.display());
            let ok = Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .args(["fastapi==0.121.*", "uvicorn==0.38.*", "psycopg[binary]==3.2.*", "psycopg-pool==3.2.*"])
                .status()?
                .success();
            anyhow::ensure!(ok && ready(&python), "could not install the FastAPI reference service's packages");
        }
        std::fs::write(dir.join("fastapi_ref.py"), FASTAPI_APP)?;
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).to_string();
        let child = Command::new(&python)
            .args(["-m", "uvicorn", "fastapi_ref:app", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--workers", &workers, "--log-level", "warning", "--no-access-log"])
            .current_dir(dir)
            .env("BENCH_DSN", conn)
            .stdout(Stdio::null())
            .spawn()
            .context("starting uvicorn")?;
        Ok(Self { child })
    }

    async fn wait_ready(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = Conn::open(addr).await {
                if c.get("/customers/C000000000").await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the FastAPI service exited: {status}");
            }
            anyhow::ensure!(Instant::now() < deadline, "the FastAPI service did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn stop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for FastApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("LAKESYNC_PYTHON") {
        return p.into();
    }
    let venv = Path::new(".venv/bin/python");
    if venv.exists() {
        std::path::absolute(venv).unwrap_or_else(|_| venv.into())
    } else {
        "python3".into()
    }
}
