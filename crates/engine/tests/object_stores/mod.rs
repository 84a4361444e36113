//! Tables in object stores, against real servers started per test: `moto` (S3 protocol, with
//! signature checks) and Azurite (Azure Blob). The Delta tables are written to the stores by
//! the real `deltalake` writer, or are the Spark fixtures uploaded as `aws s3 cp` would.

use std::time::{Duration, Instant};

use lakesync_core::{Classify, ErrorClass};
use lakesync_engine::config::{OptionValue, TableConfig};
use serde_json::json;

use crate::support::stores::{AzureServer, S3Server, TcpProxy};
use crate::support::{block_on, spark_fixture, PyDelta, TestDb};
use crate::{people, people_schema};

#[test]
fn a_table_in_s3_syncs_with_the_standard_aws_variables_by_snapshot_and_change_feed() {
    let s3 = S3Server::start();
    // What a user with an S3-compatible store exports; nothing else is configured.
    s3.export_env();
    s3.create_bucket("lake");
    let db = TestDb::new("s3_env");
    let t = PyDelta::at("s3://lake/crm/people");
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0], [3, "c", 3.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "snapshot");
    db.assert_matches_snapshot(&t.path(), "public.people", "id", 0);
    let v = t.run(json!([
        {"op": "update", "predicate": "id = 2", "set": {"name": "'z'"}},
        {"op": "delete", "predicate": "id = 3"},
        {"op": "merge", "schema": people_schema(), "on": "t.id = s.id", "rows": [[1, "y", 9.0], [4, "d", 4.0]]},
        {"op": "checkpoint"},
        {"op": "append", "schema": people_schema(), "rows": [[5, "e", 5.0]]}
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v));
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
    // Spark's spelling of the same table gives the same rows.
    let spark = db.request(std::path::Path::new("s3a://lake/crm/people/"), "public.people_s3a", "id");
    assert_eq!(db.sync(&spark).unwrap().to_version, v);
    db.assert_same_rows("public.people", "public.people_s3a");
}

#[test]
fn spark_fixtures_uploaded_to_s3_sync_exactly_as_from_a_local_path() {
    let s3 = S3Server::start();
    s3.export_env();
    s3.create_bucket("lake");
    let db = TestDb::new("s3_spark");
    for (name, key, first, last) in [
        ("cdf-table-with-cdc-and-dvs", "id", 0, 25),
        ("checkpoint-cdf-table", "id", 3, 5),
        ("cdf-column-mapping-name-mode", "id", 0, 4),
        ("cdf-table-partitioned", "part,id", 0, 2),
        ("cdc_ict_table", "name", 0, 3),
    ] {
        let Some(local) = spark_fixture(name) else { return };
        s3.upload(&local, "lake", &format!("spark/{name}"));
        let uri = std::path::PathBuf::from(format!("s3://lake/spark/{name}"));
        let table = name.replace('-', "_");
        let mut from_s3 = db.request(&uri, &format!("s3.{table}"), key);
        let mut from_disk = db.request(&local, &format!("disk.{table}"), key);
        for v in first..=last {
            from_s3.to_version = Some(v);
            from_disk.to_version = Some(v);
            let remote = db.sync(&from_s3).unwrap_or_else(|e| panic!("{name} v{v} from S3: {e}"));
            let disk = db.sync(&from_disk).unwrap();
            assert_eq!((remote.mode, remote.to_version), (disk.mode, disk.to_version), "{name} v{v}");
            db.assert_same_rows(&format!("s3.{table}"), &format!("disk.{table}"));
        }
    }
}

#[test]
fn continuous_sync_follows_an_s3_table_configured_by_storage_options_alone() {
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let db = TestDb::new("s3_continuous");
    // The writer has the standard variables; lakesync only its table's options (the secret
    // through an _env indirection), as a TOML entry would give them.
    let t = PyDelta::at("s3://lake/events").with_env(&s3.env());
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    std::env::set_var("LAKE_TEST_SECRET", &s3.secret);
    let mut entry = TableConfig::new("s3://lake/events", "public.events", &["id"], "continuous");
    entry.poll_interval = Some("100ms".into());
    for (k, v) in [
        ("aws_endpoint", s3.endpoint()),
        ("aws_region", "eu-west-1".to_string()),
        ("aws_allow_http", "true".to_string()),
        ("aws_access_key_id", s3.key_id.clone()),
        ("aws_secret_access_key_env", "LAKE_TEST_SECRET".to_string()),
    ] {
        entry.storage_options.insert(k.into(), OptionValue::Text(v));
    }
    let spec = entry.validate().unwrap();
    assert!(!format!("{spec:?}").contains(&s3.secret), "the secret must never print");
    block_on(async {
        let daemon = lakesync_engine::Daemon::new(db.config());
        let worker = daemon.add(spec).unwrap();
        let wait_for = |version: u64| {
            let worker = worker.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while worker.status().synced_version != Some(version) {
                    assert!(Instant::now() < deadline, "{:?}", worker.status());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        wait_for(0).await;
        let v = tokio::task::spawn_blocking({
            let ops = json!([
                {"op": "append", "schema": people_schema(), "rows": [[2, "b", 2.0], [3, "c", 3.0]]},
                {"op": "update", "predicate": "id = 1", "set": {"name": "'x'"}},
                {"op": "delete", "predicate": "id = 2"}
            ]);
            let writer = PyDelta::at("s3://lake/events").with_env(&s3.env());
            move || writer.run(ops)
        })
        .await
        .unwrap();
        wait_for(v).await;
        assert_eq!(worker.metrics.runs_failed.load(std::sync::atomic::Ordering::Relaxed), 0);
        daemon.shutdown(Duration::from_secs(5)).await;
    });
    assert_eq!(db.rows("SELECT id, name FROM public.events ORDER BY id"), ["(1,x)", "(3,c)"]);
    assert_eq!(db.value("SELECT count(*) FROM lakesync.runs WHERE mode = 'snapshot'"), "1");
}

#[test]
fn wrong_credentials_a_missing_bucket_and_a_missing_table_fail_clearly_without_the_secret() {
    let s3 = S3Server::start();
    s3.export_env();
    s3.create_bucket("lake");
    let db = TestDb::new("s3_errors");
    let t = PyDelta::at("s3://lake/people");
    t.run(json!([people(json!([[1, "a", 1.0]]))]));

    let missing_table = db.sync(&db.request(std::path::Path::new("s3://lake/nothing"), "public.a", "id")).unwrap_err();
    assert!(missing_table.to_string().contains("no Delta table at s3://lake/nothing"), "{missing_table}");
    assert_eq!(missing_table.class(), ErrorClass::Config);

    let missing_bucket =
        db.sync(&db.request(std::path::Path::new("s3://no-such-bucket/t"), "public.b", "id")).unwrap_err();
    let message = missing_bucket.to_string();
    assert!(message.contains("s3://no-such-bucket/t") && message.contains("NoSuchBucket"), "{message}");
    assert_eq!(missing_bucket.class(), ErrorClass::Config, "a missing bucket is not retried forever: {message}");

    // Nothing was created for them.
    assert_eq!(db.value("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"), "0");

    // A synced table whose credentials are then revoked (here: the secret is wrong).
    let synced = db.request(&t.path(), "public.c", "id");
    db.sync(&synced).unwrap();
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "not-the-secret-4f9a");
    let denied = db.sync(&synced).unwrap_err();
    let message = denied.to_string();
    assert!(message.contains("access to Delta table s3://lake/people was denied"), "{message}");
    assert!(!message.contains("not-the-secret-4f9a") && !message.contains(&s3.secret), "{message}");
    assert_eq!(denied.class(), ErrorClass::Config, "refused credentials park the table");
    // The failure is on the table's state row, the data stays as synced.
    let row = db.rows("SELECT state, runs_failed, last_error LIKE '%was denied%' FROM lakesync.synced_tables WHERE target_table = 'c'");
    assert_eq!(row, ["(ONLINE_PIPELINE_FAILED,1,t)"]);
    assert_eq!(db.rows("SELECT id, name FROM public.c"), ["(1,a)"]);
}

#[test]
fn a_store_that_drops_connections_mid_read_is_retried_and_never_reloaded() {
    let s3 = S3Server::start();
    s3.export_env();
    s3.create_bucket("lake");
    let db = TestDb::new("s3_drops");
    let t = PyDelta::at("s3://lake/big");
    let rows = |from: i64, n: i64| {
        json!((from..from + n)
            .map(|i| json!([i, format!("name-{i:08}-{}", "x".repeat(40)), i as f64]))
            .collect::<Vec<_>>())
    };
    t.run(json!([people(rows(0, 20_000)), {"op": "append", "schema": people_schema(), "rows": rows(20_000, 20_000)}]));
    // lakesync reaches the store through a proxy that resets every connection once 200 kB
    // have passed and refuses new ones for 1.5 s: a server restarting mid-read.
    let proxy = TcpProxy::start(s3.port, Duration::from_millis(1500));
    std::env::set_var("AWS_ENDPOINT_URL", proxy.endpoint());
    let req = db.request(&t.path(), "public.big", "id");
    let sync_through_cuts = |expected_mode: &str| {
        proxy.cut_after(200_000);
        let cuts = proxy.cuts();
        let mut failures = 0;
        let out = loop {
            match db.sync(&req) {
                Ok(out) => break out,
                Err(e) => {
                    assert_eq!(e.class(), ErrorClass::Transient, "a dropped connection is transient: {e}");
                    failures += 1;
                    assert!(failures < 5, "still failing: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        assert!(proxy.cuts() > cuts, "the proxy never cut a connection: the test tested nothing");
        assert_eq!(out.mode.as_str(), expected_mode, "{}", out.reason);
        out
    };
    let first = sync_through_cuts("snapshot");
    db.assert_matches_snapshot(&t.path(), "public.big", "id", first.to_version);
    let v = t.run(json!([
        {"op": "update", "predicate": "id % 3 = 0", "set": {"name": "'updated'"}},
        {"op": "delete", "predicate": "id % 7 = 0"}
    ]));
    // The change feed is read through the cuts too, and a failure never turns into a snapshot.
    let second = sync_through_cuts("triggered");
    assert_eq!(second.to_version, v);
    db.assert_matches_snapshot(&t.path(), "public.big", "id", v);
}

#[test]
fn a_table_in_azure_blob_storage_syncs_by_abfss_and_az_uris() {
    let Some(azure) = AzureServer::start() else { return };
    azure.export_env();
    azure.create_container("lake");
    let db = TestDb::new("azure");
    let t = PyDelta::at("abfss://lake@devstoreaccount1.dfs.core.windows.net/crm/people");
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "snapshot");
    let v = t.run(json!([
        {"op": "update", "predicate": "id = 2", "set": {"name": "'z'"}},
        {"op": "append", "schema": people_schema(), "rows": [[3, "c", 3.0]]}
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v));
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
    let short = db.request(std::path::Path::new("az://lake/crm/people"), "public.people_az", "id");
    db.sync(&short).unwrap();
    db.assert_same_rows("public.people", "public.people_az");
}

#[test]
fn an_idle_continuous_table_costs_one_head_of_its_next_commit_per_poll() {
    let s3 = S3Server::start();
    s3.export_env();
    s3.create_bucket("lake");
    let db = TestDb::new("s3_poll_cost");
    let t = PyDelta::at("s3://lake/idle");
    // A log of 13 commits and a checkpoint.
    let mut ops = vec![people(json!([[1, "a", 1.0]]))];
    ops.extend((2..=12).map(|i| json!({"op": "append", "schema": people_schema(), "rows": [[i, "x", 1.0]]})));
    ops.push(json!({"op": "checkpoint"}));
    ops.push(json!({"op": "append", "schema": people_schema(), "rows": [[13, "y", 1.0]]}));
    let v = t.run(json!(ops));
    // lakesync reaches the store through a proxy that logs the requests.
    let proxy = TcpProxy::start(s3.port, Duration::from_secs(1));
    let mut entry = TableConfig::new("s3://lake/idle", "public.idle", &["id"], "continuous");
    entry.poll_interval = Some("200ms".into());
    entry.storage_options.insert("aws_endpoint".into(), OptionValue::Text(proxy.endpoint()));
    let spec = entry.validate().unwrap();
    // Synced before the daemon starts: it finds nothing pending, so the table is idle from
    // the start (after syncing commits it would look every 50 ms for 30 s).
    db.sync(&spec.request(&db.config(), lakesync_core::SyncMode::Auto, None, Duration::from_secs(10))).unwrap();
    let requests = block_on(async {
        let daemon = lakesync_engine::Daemon::new(db.config());
        let worker = daemon.add(spec).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while worker.status().synced_version != Some(v) {
            assert!(Instant::now() < deadline, "{:?}", worker.status());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.take_requests();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let requests = proxy.take_requests();
        daemon.shutdown(Duration::from_secs(5)).await;
        requests
    });
    // About one poll per 200 ms, each a single HEAD of the next commit's file: no listing, no
    // log replay, no object read, whatever the log's length. A LIST starting after the synced
    // version's commit comes at most every 10 s (in case that commit left the log).
    assert!((5..=20).contains(&requests.len()), "{} requests in 3 s: {requests:#?}", requests.len());
    let next = format!("{:020}", v + 1);
    let (heads, lists): (Vec<&String>, Vec<&String>) = requests.iter().partition(|r| r.starts_with("HEAD "));
    assert!(lists.len() <= 1, "{lists:#?}");
    for r in heads {
        assert!(r.starts_with(&format!("HEAD /lake/idle/_delta_log/{next}.json ")), "{r}");
    }
    for r in lists {
        assert!(r.starts_with("GET /lake?list-type=2") || r.starts_with("GET /lake/?list-type=2"), "{r}");
        assert!(r.contains(&format!("start-after=idle%2F_delta_log%2F{next}")), "{r} does not start at {next}");
    }
}

#[test]
fn a_table_in_s3_is_compacted_in_place_and_the_sync_sees_no_change() {
    use lakesync_delta::compact::{compact, CompactOptions};
    use lakesync_delta::write::DeltaWriter;
    use lakesync_delta::StorageOptions;

    let s3 = S3Server::start();
    s3.export_env();
    s3.create_bucket("lake");
    let db = TestDb::new("s3_compact");
    let uri = "s3://lake/stream/events";
    // Twelve small commits by the kernel's writer, as an ingest leaves them.
    let schema = lakesync_delta::sample::customer_schema();
    let options = StorageOptions::default();
    let w = DeltaWriter::create_at(uri, &options, &schema, &[], &[("delta.enableChangeDataFeed", "true")]).unwrap();
    for i in 0..12u64 {
        w.append(&[lakesync_delta::sample::customers(i * 50..(i + 1) * 50, 0)]).unwrap();
    }
    let req = db.request(std::path::Path::new(uri), "public.events", "customer_id");
    assert_eq!(db.sync(&req).unwrap().to_version, 12);

    let report = compact(uri, &options, &CompactOptions::default()).unwrap();
    assert_eq!((report.files_removed, report.files_added, report.rows), (12, 1, 600), "{report:?}");
    assert_eq!((report.version, report.checkpoint), (Some(13), Some(13)), "{report:?}");
    assert_eq!(w.files().unwrap().len(), 1);
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", 13), "{}", out.reason);
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (0, 0, 0));
    db.assert_matches_snapshot(std::path::Path::new(uri), "public.events", "customer_id", 13);
}

#[test]
fn an_https_store_signed_by_a_private_ca_is_trusted_through_ssl_cert_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::support::test_certificates(dir.path());
    let s3 = S3Server::start_tls(&certs);
    s3.export_env();
    s3.create_bucket("lake");
    let db = TestDb::new("s3_tls");
    let ca = certs.ca.display().to_string();
    let t = PyDelta::at("s3://lake/people").with_env(&[("SSL_CERT_FILE", ca.clone())]);
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(std::path::Path::new("s3://lake/people"), "public.people", "id");
    // The machine does not trust the store's CA: the error says so, not just "error sending request".
    let err = db.sync(&req).unwrap_err().to_string();
    assert!(err.contains("https://localhost") && err.contains("invalid peer certificate: UnknownIssuer"), "{err}");
    // The CA given as for the rest of the machine's TLS (curl, Python): SSL_CERT_FILE.
    std::env::set_var("SSL_CERT_FILE", &ca);
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "snapshot");
    db.assert_matches_snapshot(std::path::Path::new("s3://lake/people"), "public.people", "id", 0);
}

/// Before its first commit to an S3 bucket a writer probes that the store honours
/// create-if-absent writes (a store that ignores `If-None-Match` would let two writers commit
/// one version; that refusal is tested in the delta crate, as no server here ignores it): on
/// moto, which honours it, the table is written and the probe leaves nothing behind.
#[test]
fn the_conditional_write_probe_passes_on_a_store_that_honours_it_and_leaves_nothing() {
    use lakesync_delta::write::DeltaWriter;
    use lakesync_delta::StorageOptions;

    let s3 = S3Server::start();
    s3.export_env();
    s3.create_bucket("lake");
    let schema = lakesync_delta::sample::customer_schema();
    let w = DeltaWriter::create_at("s3://lake/t", &StorageOptions::default(), &schema, &[], &[]).unwrap();
    w.append(&[lakesync_delta::sample::customers(0..10, 0)]).unwrap();
    let keys = s3.list("lake");
    assert!(keys.iter().any(|k| k.starts_with("t/_delta_log/")), "{keys:?}");
    assert!(keys.iter().all(|k| !k.contains("_lakesync_put_probe")), "{keys:?}");
}
