//! The command-line contract, run as a user would: the built `lakesync` binary against a real
//! Postgres and real Delta tables.

#[path = "../../engine/tests/support/mod.rs"]
mod support;

use std::process::{Command, Output, Stdio};

use serde_json::json;
use support::{PyDelta, TestDb};

mod console;
mod fleet;
mod pooler;
mod rest;
mod serve;
mod shape;

fn lakesync(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lakesync"))
        .args(args)
        .env("LAKESYNC_POSTGRES", &db.conn)
        .env("LAKESYNC_LOG", "debug")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn sync_then_status_json_reports_the_synced_version_and_last_run() {
    let db = TestDb::new("cli_status");
    let t = PyDelta::new();
    let schema = json!([["id", "pa.int64()"], ["name", "pa.string()"]]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [[1, "a"], [2, "b"]]}]));
    let source = t.path().display().to_string();
    let args = ["sync", "--source", &source, "--table", "public.people", "--primary-key", "id"];
    let out = lakesync(&db, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("synced public.people to Delta version 0 (snapshot"), "{}", text(&out.stdout));
    t.run(json!([{"op": "delete", "predicate": "id = 2"}]));
    assert!(lakesync(&db, &args).status.success());

    let out = lakesync(&db, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t0 = &status[0];
    assert_eq!(t0["table"], "public.people");
    assert_eq!(t0["source"], source.as_str());
    assert_eq!(t0["synced_version"], 1);
    assert_eq!(t0["state"], "ONLINE_NO_PENDING_UPDATE");
    assert!(t0["synced_commit_timestamp"].as_str().unwrap().ends_with('Z'));
    let run = &t0["last_run"];
    assert_eq!(
        (run["mode"].as_str(), run["rows_inserted"].as_u64(), run["rows_deleted"].as_u64()),
        (Some("triggered"), Some(0), Some(1))
    );
    assert!(run["duration_seconds"].as_f64().unwrap() >= 0.0 && run["error"].is_null());

    let out = lakesync(&db, &["status"]);
    assert!(text(&out.stdout).contains("public.people"), "{}", text(&out.stdout));
}

#[test]
fn json_logs_are_one_object_a_line_with_the_table_and_the_run() {
    let db = TestDb::new("cli_json_logs");
    let t = PyDelta::new();
    t.run(json!([{"op": "create", "schema": [["id", "pa.int64()"]], "rows": [[1], [2]]}]));
    let source = t.path().display().to_string();
    let args = ["sync", "--source", &source, "--table", "public.ids", "--primary-key", "id"];
    let sync = || {
        let out = Command::new(env!("CARGO_BIN_EXE_lakesync"))
            .args(args)
            .env("LAKESYNC_POSTGRES", &db.conn)
            .env("LAKESYNC_LOG", "info")
            .env("LAKESYNC_LOG_FORMAT", "json")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stderr)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}")))
            .collect::<Vec<serde_json::Value>>()
    };
    let lines = sync();
    let snapshot = lines.iter().find(|l| l["message"] == "snapshot").unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!((snapshot["table"].as_str(), snapshot["level"].as_str()), (Some("public.ids"), Some("INFO")));
    assert!(snapshot["timestamp"].as_str().unwrap().ends_with('Z'));
    t.run(json!([{"op": "delete", "predicate": "id = 2"}]));
    let lines = sync();
    let applied = lines.iter().find(|l| l["message"] == "applied changes").unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!((applied["table"].as_str(), applied["deleted"].as_u64()), (Some("public.ids"), Some(1)));
    assert!(applied["run"].as_i64().is_some(), "{applied}");
    let bad = Command::new(env!("CARGO_BIN_EXE_lakesync"))
        .args(["status"])
        .env("LAKESYNC_POSTGRES", &db.conn)
        .env("LAKESYNC_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("LAKESYNC_LOG_FORMAT"), "{}", text(&bad.stderr));
}

/// deploy/grafana/lakesync.json and deploy/prometheus/alerts.yml, checked by deploy/check.py
/// (promql-parser, prometheus_client's text parser, Grafana's foundation SDK) against what a
/// running `serve` exports at /metrics.
#[test]
fn the_grafana_dashboard_and_the_alert_rules_use_only_metrics_lakesync_exports() {
    let db = TestDb::new("cli_dashboards");
    let dir = tempfile::tempdir().unwrap();
    let t = PyDelta::new();
    t.run(json!([{"op": "create", "schema": [["id", "pa.int64()"]], "rows": [[1]]}]));
    let config = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\n\n[[tables]]\nname = \"ids\"\nsource = {:?}\ntarget = \"public.ids\"\n\
         primary_key = [\"id\"]\nmode = \"triggered\"\n",
        t.path().display().to_string()
    );
    let server = serve::Server::start(&db, &config, dir.path());
    server
        .wait_for("the first run", std::time::Duration::from_secs(30), || server.table("ids")["last_run"].is_object());
    let scrape = serve::http(&server.addr, "GET", "/metrics", None, None);
    assert_eq!(scrape.status, 200);
    let file = dir.path().join("scrape.txt");
    std::fs::write(&file, &scrape.body).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(support::python()).arg(root.join("deploy/check.py")).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).starts_with("ok: 7 alerts and 18 dashboard panels"), "{}", text(&out.stdout));
}

#[test]
fn a_failed_sync_exits_non_zero_with_one_paragraph_and_no_password() {
    let db = TestDb::new("cli_failure");
    let conn = format!("{} password=Sup3r-Secret", db.conn);
    let out = Command::new(env!("CARGO_BIN_EXE_lakesync"))
        .args(["sync", "--source", "/nonexistent/table", "--table", "public.t", "--primary-key", "id"])
        .env("LAKESYNC_POSTGRES", &conn)
        .env("LAKESYNC_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("error: ") && last.contains("/nonexistent/table"), "{stderr}");
    assert!(!stderr.contains("Sup3r-Secret") && !text(&out.stdout).contains("Sup3r-Secret"));
}

/// The contract for the Delta tables users already have: `lakesync ingest` into a change-feed
/// table delta-rs made (protocol writer 4) is refused, naming `--upgrade-protocol` and writing
/// nothing; the same command with it ingests every message; `compact` is the same.
#[test]
fn ingest_into_a_delta_rs_change_feed_table_needs_upgrade_protocol_and_then_ingests() {
    let db = TestDb::new("cli_upgrade");
    let kafka = support::kafka::KafkaServer::start();
    let t = PyDelta::new();
    let schema = json!([["id", "pa.int64()"], ["name", "pa.string()"]]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [[1, "a"]]}]));
    let table = t.path().display().to_string();
    support::block_on(async {
        kafka.create_topic("names", 1).await;
        let producer = kafka.producer("names").await;
        for i in 0..30 {
            producer.send(0, None, Some(format!(r#"{{"id":{},"name":"n"}}"#, 100 + i).into_bytes())).await.unwrap();
        }
    });
    let brokers = kafka.address();
    let args = ["ingest", "--brokers", &brokers, "--topic", "names", "--table", &table, "--name", "names-in"];
    let log = || std::fs::read_dir(t.path().join("_delta_log")).unwrap().count();
    let out = lakesync(&db, &[&args[..], &["--exit-when-caught-up"]].concat());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.lines().last().unwrap().contains("--upgrade-protocol"), "{stderr}");
    assert_eq!(log(), 1, "refused, yet the log changed");
    let compact = lakesync(&db, &["compact", "--table", &table]);
    assert!(text(&compact.stderr).contains("--upgrade-protocol"), "{}", text(&compact.stderr));

    let out = lakesync(&db, &[&args[..], &["--exit-when-caught-up", "--upgrade-protocol"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let req = db.request(&t.path(), "public.names", "id");
    db.sync(&req).unwrap();
    assert_eq!(db.value("SELECT count(*) FROM public.names"), "31");
    // Writable now: compaction needs no flag.
    let compact = lakesync(&db, &["compact", "--table", &table]);
    assert!(compact.status.success(), "{}", text(&compact.stderr));
}

#[test]
fn the_demo_snapshots_changes_and_syncs_incrementally() {
    let db = TestDb::new("cli_demo");
    let dir = tempfile::tempdir().unwrap();
    let out = lakesync(&db, &["demo", "--dir", dir.path().to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("snapshot to version 2 (initial snapshot: nothing synced yet): 10000 inserted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("triggered to version 4 (change data feed): 500 inserted, 990 updated, 10 deleted"),
        "{stdout}"
    );
    assert_eq!(db.value("SELECT count(*) FROM public.customer_profiles"), "10490");
}

#[test]
fn demo_serve_keeps_syncing_with_the_console_open_until_interrupted() {
    use std::io::BufRead;
    let db = TestDb::new("cli_demo_serve");
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_lakesync"))
        .args(["demo", "--serve", "--listen", "127.0.0.1:0", "--rows", "2000", "--dir", dir.path().to_str().unwrap()])
        .env("LAKESYNC_POSTGRES", &db.conn)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let url = loop {
        let line = lines.next().unwrap_or_else(|| panic!("the demo ended: {seen:?}")).unwrap();
        seen.push(line.clone());
        if let Some(url) = line.trim().strip_prefix("console: ") {
            break url.to_string();
        }
    };
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let page = serve::http(&addr, "GET", "/", None, None);
    assert!(page.status == 200 && page.body.contains("/console/app.js"), "{}", page.body);
    // The demo commits every few seconds and serve follows in continuous mode.
    let table = || serve::http(&addr, "GET", "/api/v1/synced-tables/customer_profiles", None, None).json();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let first = loop {
        if let Some(v) = table()["synced_version"].as_u64() {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "never synced: {}", table());
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    while table()["synced_version"].as_u64().is_none_or(|v| v <= first) {
        assert!(std::time::Instant::now() < deadline, "no new version synced: {}", table());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(table()["mode"], "continuous");
    // Ctrl-C stops the demo and its serve.
    Command::new("kill").args(["-INT", &demo.id().to_string()]).status().unwrap();
    let status = demo.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "serve still listens after the demo stopped");
}

#[test]
fn the_pipeline_demo_carries_events_from_kafka_to_the_data_api() {
    let db = TestDb::new("cli_demo_pipeline");
    let kafka = support::kafka::KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let args =
        ["demo", "--pipeline", "--rows", "200", "--brokers", &kafka.address(), "--dir", dir.path().to_str().unwrap()];
    let out = lakesync(&db, &args);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("every transaction settled in Postgres"), "{stdout}");
    assert!(stdout.contains("the ingest: 400 rows in"), "{stdout}");
    assert!(stdout.contains("\"user_id\": \"user-00000003\""), "{stdout}");
    assert!(stdout.contains("one more event: readable through the API"), "{stdout}");
    assert_eq!(db.value("SELECT count(*) FROM app.transactions WHERE status = 'settled'"), "200");
}

#[test]
fn a_table_in_s3_syncs_with_one_command_given_storage_options_and_a_secret_variable() {
    let s3 = support::stores::S3Server::start();
    s3.create_bucket("lake");
    let db = TestDb::new("cli_s3");
    let t = PyDelta::at("s3://lake/crm/people").with_env(&s3.env());
    let schema = json!([["id", "pa.int64()"], ["name", "pa.string()"]]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [[1, "a"], [2, "b"]]}]));
    let endpoint = format!("aws_endpoint={}", s3.endpoint());
    let key = format!("aws_access_key_id={}", s3.key_id);
    let args = [
        "sync",
        "--source",
        "s3://lake/crm/people",
        "--table",
        "public.people",
        "--primary-key",
        "id",
        "--storage-option",
        &endpoint,
        "--storage-option",
        "aws_region=eu-west-1",
        "--storage-option",
        "aws_allow_http=true",
        "--storage-option",
        &key,
        "--storage-option",
        "aws_secret_access_key_env=LAKE_SECRET",
    ];
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lakesync"))
            .args(args)
            .env("LAKESYNC_POSTGRES", &db.conn)
            .env("LAKE_SECRET", &s3.secret)
            .output()
            .unwrap()
    };
    let out = run(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("synced public.people to Delta version 0 (snapshot"), "{}", text(&out.stdout));
    assert_eq!(db.value("SELECT count(*) FROM public.people"), "2");

    // The secret written on the command line is refused, and not echoed back.
    let inline = format!("aws_secret_access_key={}", s3.secret);
    let mut refused: Vec<&str> = args.to_vec();
    refused.extend(["--storage-option", inline.as_str()]);
    let out = run(&refused);
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("aws_secret_access_key_env"), "{stderr}");
    assert!(!stderr.contains(&s3.secret), "{stderr}");
}

#[test]
fn compact_rewrites_small_files_and_the_next_sync_changes_nothing() {
    let db = TestDb::new("cli_compact");
    // Six commits of one small file each, by the kernel's writer (as an ingest writes).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers");
    let schema = lakesync_delta::sample::customer_schema();
    let w =
        lakesync_delta::write::DeltaWriter::create(&path, &schema, &[("delta.enableChangeDataFeed", "true")]).unwrap();
    for i in 0..6u64 {
        w.append(&[lakesync_delta::sample::customers(i * 10..(i + 1) * 10, 0)]).unwrap();
    }
    drop(w);
    let source = path.display().to_string();
    let sync = ["sync", "--source", &source, "--table", "public.customers", "--primary-key", "customer_id"];
    assert!(lakesync(&db, &sync).status.success());

    let out = lakesync(&db, &["compact", "--table", &source, "--target-file-size", "64MiB"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains(&format!("compacted {source} at version 6 into version 7: 6 files")), "{stdout}");
    assert!(stdout.contains("rewritten as 1 (") && stdout.contains(", 60 rows"), "{stdout}");
    let out = lakesync(&db, &sync);
    assert!(
        text(&out.stdout)
            .contains("to Delta version 7 (triggered, change data feed): 0 inserted, 0 updated, 0 deleted"),
        "{}",
        text(&out.stdout)
    );
    let out = lakesync(&db, &["compact", "--table", &source]);
    assert!(text(&out.stdout).contains("nothing to compact"), "{}", text(&out.stdout));

    let out = lakesync(&db, &["compact", "--table", &source, "--target-file-size", "12XB"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown size unit \"xb\""), "{}", text(&out.stderr));
    let out = lakesync(&db, &["compact", "--table", "/nonexistent/table"]);
    assert!(!out.status.success() && text(&out.stderr).contains("/nonexistent/table"), "{}", text(&out.stderr));
}

/// The phases every sync and seed bench prints: references, lakesync, the blog pattern and
/// Postgres's floor.
const BENCH_PHASES: [&str; 5] =
    ["a. reference", "b. lakesync snapshot", "c. lakesync incremental", "d. blog pattern", "e. Postgres's floor"];

#[test]
fn the_bench_generates_changes_and_verifies_every_result_on_a_small_table() {
    // Both shapes of the change: one MERGE commit with cdc files (Python deltalake), and a
    // deletion-vector commit plus an append (kernel writer); the first measured twice, and
    // also from a local S3-protocol server (moto).
    for (change, final_version, rounds, store) in [("merge", 2, 2, "s3"), ("deletion-vectors", 3, 1, "local")] {
        let dir = tempfile::tempdir().unwrap();
        let port = support::test_port(1).to_string();
        let out = Command::new(env!("CARGO_BIN_EXE_lakesync"))
            .args(["bench", "--rows", "20000", "--file-rows", "5000", "--port", &port, "--change", change])
            .args(["--rounds", &rounds.to_string(), "--source-store", store])
            .arg("--python")
            .arg(support::python())
            .arg("--dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{change}: {stdout}\n{stderr}");
        // 0.8% updated + 0.1% deleted + 0.2% inserted of 20,000 rows.
        assert!(stderr.contains("20000 rows, 220 changes"), "{stderr}");
        for round in 1..=rounds {
            let ours = if round == 1 {
                "bench.customer_profiles".to_string()
            } else {
                format!("bench.customer_profiles_r{round}")
            };
            for (table, version, rows) in [
                ("bench_ref.customer_profiles", 1, 20000),
                (ours.as_str(), 1, 20000),
                (ours.as_str(), final_version, 20020),
                ("bench_ref.customer_profiles", final_version, 20020),
            ] {
                // The reference table is reloaded every round; ours is a new table each round.
                let times = if table.starts_with("bench_ref") { rounds } else { 1 };
                let line = format!("verified {table} = Delta version {version} ({rows} rows)");
                assert_eq!(stderr.matches(&line).count(), times, "{change}: {line:?} in\n{stderr}");
            }
        }
        // The floor (e) starts from a copy of the base version and ends at the final one.
        for round in 1..=rounds {
            let line =
                format!("verified bench.customer_profiles_floor_r{round} = Delta version {final_version} (20020 rows)");
            assert_eq!(stderr.matches(&line).count(), 1, "{change}: {line:?} in\n{stderr}");
        }
        assert!(stdout.contains("Postgres's floor for the change (e): c/e "), "{stdout}");
        if rounds > 1 {
            assert!(stdout.contains(&format!("median of {rounds} rounds")), "{stdout}");
            assert!(stdout.contains(&format!("- round {rounds}: a ")), "{stdout}");
        }
        for phase in BENCH_PHASES {
            assert!(stdout.contains(phase), "{stdout}");
        }
        // Where each lakesync run's time went, from `sync --timings`.
        let breakdown = stdout.split("Where the time went").nth(1).unwrap_or_default();
        for phase in [
            "load (read Delta + COPY) ",
            "primary key ",
            "analyze ",
            "upsert and commit ",
            "pooler check (before the run) ",
        ] {
            assert!(breakdown.contains(phase), "{phase:?} in {stdout}");
        }
        if store == "s3" {
            for round in 1..=rounds {
                for (version, rows) in [(1, 20000), (final_version, 20020)] {
                    let line =
                        format!("verified bench.customer_profiles_s3_r{round} = Delta version {version} ({rows} rows)");
                    assert_eq!(stderr.matches(&line).count(), 1, "{line:?} in\n{stderr}");
                }
            }
            assert!(stdout.contains("b3. lakesync snapshot, table in S3") && stdout.contains("x b |"), "{stdout}");
            assert!(stdout.contains("c3. lakesync incremental, table in S3") && stdout.contains("x c |"), "{stdout}");
        }
        assert!(!dir.path().join("postgres/data/postmaster.pid").exists(), "the bench must stop its Postgres");
    }
}

#[test]
fn the_seed_bench_builds_its_table_once_and_verifies_every_result() {
    // The seed scenario at 20k rows (its updates: half the rows, at most 40k): the first run
    // builds and checksums the Delta table, the second reuses it; both verify every phase.
    let dir = tempfile::tempdir().unwrap();
    let port = support::test_port(2).to_string();
    for run in 1..=2 {
        let out = Command::new(env!("CARGO_BIN_EXE_lakesync"))
            .args(["bench", "--scenario", "seed", "--rows", "20000", "--file-rows", "5000", "--port", &port])
            .args(["--change", "deletion-vectors", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "run {run}: {stdout}\n{stderr}");
        assert!(stderr.contains("bench: the seed needs about") && stderr.contains("GB are free"), "{stderr}");
        let (built, reused) = (
            stderr.contains("Delta version 1 has 20000 rows in 4 files")
                && stderr.contains("wrote the seed's Delta versions 1 to 3"),
            stderr.contains("reusing the seed table"),
        );
        assert_eq!((built, reused), (run == 1, run == 2), "run {run}: {stderr}");
        for table in ["bench_ref.customer_profiles", "bench.customer_profiles"] {
            for version in [1, 3] {
                let line = format!("verified {table} = Delta version {version} (20000 rows)");
                assert!(stderr.contains(&line), "run {run}: {line:?} in\n{stderr}");
            }
        }
        // The floor (e) runs on lakesync's table and is rolled back: the base version again.
        let base = "verified bench.customer_profiles = Delta version 1 (20000 rows)";
        assert_eq!(stderr.matches(base).count(), 2, "run {run}: {stderr}");
        assert!(stdout.contains("Postgres's floor for them "), "{stdout}");
        assert!(stdout.contains("deletion-vectors change of 10000 updates"), "{stdout}");
        assert!(stdout.contains("faster than the seed's staging load (40 minutes)"), "{stdout}");
        // 10k upserts are staged in parts by a second session, whose tables go after the commit.
        assert!(stdout.contains("upsert and commit ") && stdout.contains("drop the staged parts "), "{stdout}");
        for phase in BENCH_PHASES {
            assert!(stdout.contains(phase), "{stdout}");
        }
        assert!(!dir.path().join("postgres/data/postmaster.pid").exists(), "the bench must stop its Postgres");
    }
}

/// Exactly-once under crashes: `lakesync sync` is killed with SIGKILL at random points of
/// snapshots (COPY, index build, swap) and incremental applies, again and again. At every
/// moment the table must equal the Delta snapshot at the version recorded as synced, and after
/// each recovery run no staging table or unfinished run may remain.
#[test]
fn killing_lakesync_at_random_points_never_loses_or_duplicates_rows() {
    use lakesync_delta::sample::{customer_schema, customers};
    use lakesync_delta::write::DeltaWriter;

    let db = TestDb::new("crash");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers");
    let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
    let (_, files) = w.append_files((0..4).map(|f| customers(f * 10_000..(f + 1) * 10_000, 0))).unwrap();
    w.remove_files(|p| p == files[0]).unwrap(); // v2: delete 10k
    w.append(&[customers(0..10_000, 1)]).unwrap(); // v3: re-insert them changed
    w.append(&[customers(40_000..50_000, 0)]).unwrap(); // v4: new rows
    w.remove_files(|p| p == files[2]).unwrap(); // v5: delete 10k
    let last = w.append(&[customers(20_000..25_000, 2)]).unwrap(); // v6: half come back
    let source = path.display().to_string();

    let (seed, mut next) = support::seeded_rng("crash test");
    let sync_cmd = |to: u64, snapshot: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lakesync"));
        let to = to.to_string();
        c.args(["sync", "--source", &source, "--table", "public.customers", "--primary-key", "customer_id"])
            .args(["--to-version", &to, "--versions-per-transaction", "1"])
            .env("LAKESYNC_POSTGRES", &db.conn);
        if snapshot {
            c.args(["--mode", "snapshot"]);
        }
        c
    };
    // How long a full snapshot takes here, to spread the kill points over a run.
    let t = std::time::Instant::now();
    assert!(sync_cmd(last, true).output().unwrap().status.success());
    let span_ms = (t.elapsed().as_millis() as u64).max(50) * 3 / 2;
    db.execute("DROP TABLE public.customers; DELETE FROM lakesync.synced_tables; DELETE FROM lakesync.runs");

    let synced = |db: &TestDb| {
        db.value(
            "SELECT coalesce(max(synced_version)::text, 'none') FROM lakesync.synced_tables \
             WHERE target_schema = 'public' AND target_table = 'customers'",
        )
    };
    let mut kills = 0;
    let mut round = 0;
    while kills < 50 {
        round += 1;
        assert!(round <= 200, "only {kills} runs were killed mid-flight in 200 rounds (seed {seed})");
        if round % 12 == 0 {
            // Start over now and then, so first snapshots (create + rename) get killed too.
            db.execute(
                "DROP TABLE IF EXISTS public.customers; DELETE FROM lakesync.synced_tables; DELETE FROM lakesync.runs",
            );
        }
        let current = synced(&db).parse::<u64>().ok();
        let snapshot = next(3) == 0;
        let to = match current {
            Some(v) if !snapshot => v + next(last - v + 1),
            _ => 1 + next(last),
        };
        let mut child = sync_cmd(to, snapshot).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // Incremental runs are shorter than snapshots: aim the kill inside them too.
        let window = if snapshot || current.is_none() { span_ms } else { span_ms / 3 };
        std::thread::sleep(std::time::Duration::from_millis(next(window.max(10))));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        // A killed run's backend still finishes what it had received (a COMMIT sent just
        // before the kill commits) before it notices its client is gone. The check below reads
        // the synced version and then the rows, in separate statements, so it must look at the
        // database after that backend is done, not in between.
        for waited in 0.. {
            let others = db.value(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            );
            if others == "0" {
                break;
            }
            assert!(waited < 300, "a killed run's backend was still there after 30 s (seed {seed})");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // Crash-consistent: whatever happened, the table holds the recorded version.
        if let Ok(v) = synced(&db).parse::<u64>() {
            db.assert_matches_snapshot(&path, "public.customers", "customer_id", v);
        }
        // Recovery: the same run again, to the end.
        let out = sync_cmd(to, snapshot).output().unwrap();
        assert!(out.status.success(), "recovery run failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(synced(&db), to.to_string());
        db.assert_matches_snapshot(&path, "public.customers", "customer_id", to);
        assert_eq!(db.value("SELECT count(*) FROM pg_tables WHERE tablename LIKE '\\_lakesync%'"), "0");
        assert_eq!(db.value("SELECT count(*) FROM lakesync.runs WHERE outcome = 'running'"), "0");
    }
    eprintln!("crash test: {kills} kills in {round} rounds");
}

/// Runs `lakesync` as a user other than root when we are root (root reads any file, so a
/// permission error cannot happen to it), or as ourselves otherwise.
fn lakesync_unprivileged(conn: &str, args: &[&str]) -> Output {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false);
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(env!("CARGO_BIN_EXE_lakesync"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_lakesync"))
    };
    cmd.args(args).args(["--postgres", conn]).output().unwrap()
}

#[test]
fn an_unreadable_source_file_fails_naming_the_table_and_changes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDb::new("cli_permissions");
    let t = PyDelta::new();
    let schema = json!([["id", "pa.int64()"], ["name", "pa.string()"]]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [[1, "a"], [2, "b"]]}]));
    let parquet = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .collect();
        files.sort();
        files
    };
    // Everything readable by everyone, so that the unprivileged user can read the table at all.
    let chmod = Command::new("chmod").arg("-R").arg("a+rX").arg(t.dir.path()).status().unwrap();
    assert!(chmod.success());
    let source = t.path().display().to_string();
    let args = ["sync", "--source", source.as_str(), "--table", "public.people", "--primary-key", "id"];
    let out = lakesync_unprivileged(&db.conn, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let before = parquet(&t.path());
    t.run(json!([{"op": "append", "schema": schema, "rows": [[3, "c"]]}]));
    let new_file = parquet(&t.path()).into_iter().find(|p| !before.contains(p)).expect("the appended file");
    Command::new("chmod").arg("-R").arg("a+rX").arg(t.dir.path()).status().unwrap();
    std::fs::set_permissions(&new_file, std::fs::Permissions::from_mode(0o000)).unwrap();

    let out = lakesync_unprivileged(&db.conn, &args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: ") && last.contains(&source) && last.contains("ermission denied"), "{stderr}");
    assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables"), "0");
    assert_eq!(db.rows("SELECT id FROM public.people ORDER BY id"), ["(1)", "(2)"]);

    // Readable again: the next run applies the change.
    std::fs::set_permissions(&new_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = lakesync_unprivileged(&db.conn, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(db.rows("SELECT id FROM public.people ORDER BY id"), ["(1)", "(2)", "(3)"]);
}

/// Exactly-once ingest under crashes: `lakesync ingest` is killed with SIGKILL at random
/// points (fetching, writing files, committing, checkpointing, compacting) while a producer
/// writes numbered messages to three partitions. After every kill each partition's offsets in
/// the table are exactly 0..(the position the table records): nothing lost, nothing twice.
/// Finally an ingest that is allowed to finish holds every message exactly once.
#[test]
fn killing_an_ingest_at_random_points_never_loses_or_duplicates_a_message() {
    use support::kafka::{event, table_seqs, KafkaServer, EVENTS_SCHEMA};

    const MESSAGES: i64 = 3000;
    let kafka = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("orders");
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, EVENTS_SCHEMA).unwrap();
    support::block_on(kafka.create_topic("orders", 3));
    let brokers = kafka.address();
    let producer = {
        let kafka_brokers = kafka.brokers();
        std::thread::spawn(move || {
            support::block_on(async {
                let p = lakesync_ingest::kafka::Producer::connect(
                    &kafka_brokers,
                    &lakesync_ingest::kafka::Security::default(),
                    "orders",
                )
                .await
                .unwrap();
                for seq in 0..MESSAGES {
                    p.send((seq % 3) as i32, None, Some(event(seq))).await.unwrap();
                    if seq % 5 == 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
            })
        })
    };
    let ingest = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lakesync"));
        c.args(["ingest", "--brokers", &brokers, "--topic", "orders", "--table"])
            .arg(&table)
            .arg("--schema")
            .arg(&schema)
            .args(["--kafka-columns", "partition,offset", "--flush-interval", "30ms", "--flush-rows", "150"])
            .args(["--checkpoint-every", "4", "--compact-every", "6"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let recorded = |partitions: i32| -> Vec<i64> {
        if !table.join("_delta_log").exists() {
            return vec![0; partitions as usize];
        }
        let w = lakesync_delta::DeltaWriter::open(&table).unwrap();
        let ids: Vec<String> = (0..partitions).map(|p| format!("lakesync-ingest/orders/orders/{p}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        w.app_versions(&ids).unwrap().into_iter().map(|v| v.unwrap_or(0)).collect()
    };
    let (seed, mut next) = support::seeded_rng("ingest crash test");
    let mut kills = 0;
    while kills < 35 {
        let mut child = ingest().spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(60 + next(700)));
        assert!(child.try_wait().unwrap().is_none(), "the ingest exited on its own (seed {seed})");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        if table.join("_delta_log").exists() {
            let at = recorded(3);
            let (_, offsets) = table_seqs(&table);
            for p in 0..3 {
                let expected: Vec<i64> = (0..at[p as usize]).collect();
                let found = offsets.get(&p).cloned().unwrap_or_default();
                assert_eq!(found, expected, "partition {p} after kill {kills} (seed {seed})");
            }
        }
    }
    producer.join().unwrap();
    // The killed runs made progress between kills (commits, a checkpoint, compactions).
    let before = recorded(3).iter().sum::<i64>();
    let log: Vec<String> = std::fs::read_dir(table.join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let commits = log.iter().filter(|n| n.ends_with(".json")).count();
    eprintln!("{before} messages, {commits} commits before the last run; log: {} files", log.len());
    assert!(before > 0 && commits > 15, "{before} messages in {commits} commits (seed {seed})");
    assert!(log.iter().any(|n| n.ends_with(".checkpoint.parquet")), "no checkpoint was written (seed {seed})");
    // One last ingest, stopped with SIGTERM once every message is in: each exactly once.
    let mut child = ingest().stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut started = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut started).unwrap();
    assert!(started.starts_with("ingesting topic orders"), "{started}");
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while recorded(3).iter().sum::<i64>() < MESSAGES {
        assert!(std::time::Instant::now() < deadline, "the ingest did not catch up (seed {seed})");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert!(child.wait().unwrap().success(), "SIGTERM stops the ingest cleanly (seed {seed})");
    assert_eq!(table_seqs(&table).0, (0..MESSAGES).collect::<Vec<_>>(), "seed {seed}");
    assert_eq!(recorded(3), [1000, 1000, 1000]);
}
