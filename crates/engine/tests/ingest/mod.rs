//! Ingest (`lakesync_ingest`): a real Kafka-protocol broker (tansu), the real `rskafka`
//! client, Delta tables written through the kernel and read back by lakesync's own reader
//! and sync.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use lakesync_delta::{DeltaTable, DeltaWriter};
use lakesync_engine::config::IngestConfig;
use lakesync_ingest::{IngestError, IngestSpec, IngestStatus};
use serde_json::json;
use tokio::sync::watch;

use crate::support::kafka::{event, table_seqs, tls_front, KafkaServer, EVENTS_SCHEMA};
use crate::support::stores::free_port;
use crate::support::{block_on, test_certificates, TestDb};
use lakesync_core::{Classify, ErrorClass};

/// An ingest spec for `topic` into `table`, through the same config entry the CLI and the
/// daemon build, with the events schema written to `dir`.
pub fn events_spec(kafka: &KafkaServer, dir: &Path, topic: &str, table: &Path) -> IngestSpec {
    events_entry(kafka, dir, topic, table).validate_with(&|_| None).unwrap()
}

/// The config entry behind [`events_spec`], for tests that set more.
fn events_entry(kafka: &KafkaServer, dir: &Path, topic: &str, table: &Path) -> IngestConfig {
    let schema = dir.join(format!("{topic}.schema.json"));
    std::fs::write(&schema, EVENTS_SCHEMA).unwrap();
    let mut entry = IngestConfig::new(kafka.brokers(), topic, table.display().to_string());
    entry.schema = Some(schema.display().to_string());
    entry.kafka_columns = vec!["partition".into(), "offset".into()];
    entry.flush_interval = Some("200ms".into());
    entry
}

/// Produces events `seqs` round-robin over the topic's partitions.
pub async fn produce(kafka: &KafkaServer, topic: &str, seqs: std::ops::Range<i64>) {
    produce_to(kafka, topic, seqs, |seq| (seq, None)).await
}

/// Produces events `seqs` keyed by transaction, as a producer with a key does: every event of
/// a transaction lands in one partition, in order.
async fn produce_by_transaction(kafka: &KafkaServer, topic: &str, seqs: std::ops::Range<i64>) {
    produce_to(kafka, topic, seqs, |seq| (seq / 2, Some(format!("t{}", seq / 2).into_bytes()))).await
}

/// Produces events `seqs`, each to partition `n % partitions` with key `k` for
/// `(n, k) = route(seq)`.
async fn produce_to(
    kafka: &KafkaServer,
    topic: &str,
    seqs: std::ops::Range<i64>,
    route: impl Fn(i64) -> (i64, Option<Vec<u8>>),
) {
    let producer = kafka.producer(topic).await;
    for seq in seqs {
        let (n, key) = route(seq);
        producer.send((n % producer.partitions() as i64) as i32, key, Some(event(seq))).await.unwrap();
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), IngestError>>,
    status: Arc<IngestStatus>,
}

fn start(spec: &IngestSpec) -> Running {
    let status = Arc::new(IngestStatus::new());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(lakesync_ingest::run(spec.clone(), status.clone(), rx));
    Running { stop, task, status }
}

/// Runs `spec` until it stops on an error it does not retry; the error and the final status.
async fn run_to_error(spec: IngestSpec) -> (IngestError, lakesync_ingest::IngestState) {
    let status = Arc::new(IngestStatus::new());
    let (_stop, rx) = watch::channel(false);
    let err = lakesync_ingest::run(spec, status.clone(), rx).await.unwrap_err();
    (err, status.get())
}

impl Running {
    /// Waits until the ingest has written `rows` rows (or fails the test after `secs`).
    async fn wait_rows(&self, rows: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status.get();
            if s.rows >= rows {
                return;
            }
            assert!(s.state != "failed", "ingest failed: {:?}", s.last_error);
            assert!(Instant::now() < deadline, "ingest wrote {} of {rows} rows in {secs} s: {s:?}", s.rows);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) -> Result<(), IngestError> {
        self.stop.send(true).unwrap();
        self.task.await.unwrap()
    }
}

fn app_versions(spec: &IngestSpec, table: &Path, partitions: i32) -> Vec<Option<i64>> {
    let ids: Vec<String> = (0..partitions).map(|p| spec.app_id(p)).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    DeltaWriter::open(table).unwrap().app_versions(&ids).unwrap()
}

#[test]
fn an_ingest_writes_every_message_once_across_partitions_and_resumes_from_the_table() {
    let kafka = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("events");
    let spec = events_spec(&kafka, dir.path(), "events", &table);
    block_on(async {
        kafka.create_topic("events", 3).await;
        produce(&kafka, "events", 0..300).await;
        let running = start(&spec);
        running.wait_rows(300, 60).await;
        let first = running.status.get();
        running.stop().await.unwrap();
        assert!(first.commits >= 1 && first.commits <= 20, "{first:?}");
        assert_eq!(first.partitions.values().map(|p| p.lag()).sum::<i64>(), 0, "{first:?}");

        let (seqs, offsets) = table_seqs(&table);
        assert_eq!(seqs, (0..300).collect::<Vec<_>>());
        for p in 0..3 {
            assert_eq!(offsets[&p], (0..100).collect::<Vec<_>>(), "partition {p}");
        }
        // The positions live in the table: each partition's next offset.
        assert_eq!(app_versions(&spec, &table, 3), [Some(100), Some(100), Some(100)]);
        let layout = DeltaWriter::open(&table).unwrap().layout().unwrap();
        assert!(layout.change_data_feed, "a table the ingest creates has the change data feed on");

        // A restart resumes from the table, not from a consumer group: only new messages.
        produce(&kafka, "events", 300..450).await;
        let running = start(&spec);
        running.wait_rows(150, 60).await;
        running.stop().await.unwrap();
        assert_eq!(table_seqs(&table).0, (0..450).collect::<Vec<_>>());
        assert_eq!(app_versions(&spec, &table, 3), [Some(150), Some(150), Some(150)]);
    });
}

/// Brokers behind TLS (`security_protocol = "SSL"`, as managed Kafka services require): the
/// ingest verifies the brokers' certificate against `ssl_ca_location` and writes every message
/// once; a certificate the CA did not sign is refused as a configuration error, not retried.
#[test]
fn an_ingest_reads_brokers_over_tls_and_refuses_a_certificate_its_ca_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let certs = test_certificates(dir.path());
    let front = free_port();
    let mut kafka = KafkaServer::start_with(Some(format!("localhost:{front}")), false);
    tls_front(front, kafka.port, &certs.cert, &certs.key);
    let ca = lakesync_ingest::kafka::tls_config(Some(&certs.ca)).unwrap();
    kafka.security = lakesync_ingest::kafka::Security { tls: Some(ca), sasl: None };
    let table = dir.path().join("events");
    let mut entry = events_entry(&kafka, dir.path(), "secure", &table);
    entry.security_protocol = Some("SSL".into());
    entry.ssl_ca_location = Some(certs.ca.display().to_string());
    let spec = entry.validate_with(&|_| None).unwrap();
    assert_eq!(spec.security.protocol(), "SSL");
    block_on(async {
        kafka.create_topic("secure", 2).await;
        produce(&kafka, "secure", 0..100).await;
        let running = start(&spec);
        running.wait_rows(100, 60).await;
        running.stop().await.unwrap();
        assert_eq!(table_seqs(&table).0, (0..100).collect::<Vec<_>>());

        entry.ssl_ca_location = Some(certs.other_ca.display().to_string());
        let wrong = entry.validate_with(&|_| None).unwrap();
        let started = Instant::now();
        let err = start(&wrong).task.await.unwrap().unwrap_err();
        assert_eq!(err.class(), ErrorClass::Config, "{err}");
        let text = err.to_string();
        assert!(text.contains("ingest secure") && text.contains("certificate"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(40), "refused after {:?}", started.elapsed());
    });
}

/// SASL/SCRAM (`security_protocol = "SASL_PLAINTEXT"`): with the user's password from the
/// environment variable `sasl_password_env` names, every message is written once; a wrong
/// password is a configuration error that names the ingest and never shows the password.
#[test]
fn an_ingest_logs_in_with_sasl_scram_and_a_wrong_password_is_refused_without_showing_it() {
    // tansu takes users only from unauthenticated clients, and keeps them in a SQL storage:
    // the user is made on a broker without authentication, then a broker on the same SQLite
    // file requires it.
    let dir = tempfile::tempdir().unwrap();
    let open = KafkaServer::start_on("sqlite://tansu.db", dir.path(), None, false);
    open.create_user("scram256", "lakesync", "s3cret-Pa55");
    drop(open);
    let mut kafka = KafkaServer::start_on("sqlite://tansu.db", dir.path(), None, true);
    let login = |password: &str| lakesync_ingest::kafka::Sasl {
        mechanism: lakesync_ingest::kafka::SaslMechanism::ScramSha256,
        username: "lakesync".into(),
        password: password.into(),
    };
    kafka.security.sasl = Some(login("s3cret-Pa55"));
    let table = dir.path().join("events");
    let mut entry = events_entry(&kafka, dir.path(), "logins", &table);
    entry.security_protocol = Some("SASL_PLAINTEXT".into());
    entry.sasl_mechanism = Some("SCRAM-SHA-256".into());
    entry.sasl_username = Some("lakesync".into());
    entry.sasl_password_env = Some("KAFKA_PASSWORD".into());
    let env = |password: &'static str| move |name: &str| (name == "KAFKA_PASSWORD").then(|| password.to_string());
    let spec = entry.validate_with(&env("s3cret-Pa55")).unwrap();
    assert!(!format!("{spec:?}").contains("s3cret"), "Debug shows no password");
    block_on(async {
        kafka.create_topic("logins", 2).await;
        produce(&kafka, "logins", 0..100).await;
        let running = start(&spec);
        running.wait_rows(100, 60).await;
        running.stop().await.unwrap();
        assert_eq!(table_seqs(&table).0, (0..100).collect::<Vec<_>>());

        let wrong = entry.validate_with(&env("not-the-Pa55")).unwrap();
        let err = start(&wrong).task.await.unwrap().unwrap_err();
        assert_eq!(err.class(), ErrorClass::Config, "{err}");
        let text = err.to_string();
        assert!(text.contains("ingest logins") && !text.contains("not-the-Pa55"), "{text}");
    });
    // The settings are checked before anything connects.
    let refused = |f: &dyn Fn(&mut IngestConfig)| {
        let mut e = IngestConfig::new(vec!["localhost:9092".into()], "t", "/tmp/t");
        f(&mut e);
        e.validate_with(&|_| None).unwrap_err().to_string()
    };
    assert!(refused(&|e| e.security_protocol = Some("SASL_PLAINTEXT".into())).contains("needs sasl_username"));
    assert!(refused(&|e| {
        e.security_protocol = Some("SASL_SSL".into());
        e.sasl_username = Some("u".into());
        e.sasl_password_env = Some("NOT_SET_ANYWHERE".into());
    })
    .contains("NOT_SET_ANYWHERE is not set"));
    assert!(refused(&|e| e.sasl_username = Some("u".into())).contains("applies only with"));
    assert!(refused(&|e| e.security_protocol = Some("TLS".into())).contains("expected PLAINTEXT"));
    assert!(refused(&|e| {
        e.security_protocol = Some("SASL_PLAINTEXT".into());
        e.sasl_mechanism = Some("GSSAPI".into());
    })
    .contains("sasl_mechanism"));
}

/// Record batches of many messages (what real producers send) are read whole, each message
/// once, and the end of a partition is the fetch's high watermark even where the broker lists
/// another (tansu lists the last batch's base offset + 1).
#[test]
fn batched_messages_are_ingested_once_each_and_the_end_offset_is_the_high_watermark() {
    let kafka = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("batched");
    let spec = events_spec(&kafka, dir.path(), "batched", &table);
    block_on(async {
        kafka.create_topic("batched", 2).await;
        let producer = kafka.producer("batched").await;
        for b in 0..10i64 {
            for p in 0..2i64 {
                let seqs = (b * 100 + p * 50)..(b * 100 + p * 50 + 50);
                let offsets = producer.send_batch(p as i32, seqs.map(event).collect()).await.unwrap();
                assert_eq!(offsets, (b * 50..b * 50 + 50).collect::<Vec<_>>());
            }
        }
        let ends = lakesync_ingest::kafka::end_offsets(
            &kafka.brokers(),
            &lakesync_ingest::kafka::Security::default(),
            "batched",
        )
        .await
        .unwrap();
        assert_eq!(ends, [(0, 500), (1, 500)]);
        let running = start(&spec);
        running.wait_rows(1000, 60).await;
        running.stop().await.unwrap();
    });
    let (seqs, offsets) = table_seqs(&table);
    assert_eq!(seqs, (0..1000).collect::<Vec<_>>());
    for p in 0..2 {
        assert_eq!(offsets[&p], (0..500).collect::<Vec<_>>(), "partition {p}");
    }
    assert_eq!(app_versions(&spec, &table, 2), [Some(500), Some(500)]);
}

#[test]
fn a_bad_message_fails_the_ingest_naming_partition_offset_and_field_and_its_flush_is_not_written() {
    let kafka = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("events");
    let mut spec = events_spec(&kafka, dir.path(), "strict", &table);
    spec.flush_interval = Duration::from_secs(3);
    block_on(async {
        kafka.create_topic("strict", 1).await;
        produce(&kafka, "strict", 0..5).await;
        let producer = kafka.producer("strict").await;
        let bad = br#"{"transaction_id":"t9","amount":"card-4242-secret","seq":5}"#.to_vec();
        assert_eq!(producer.send(0, None, Some(bad)).await.unwrap(), 5);
        produce(&kafka, "strict", 6..7).await;
        let (err, status) = run_to_error(spec.clone()).await;
        let text = err.to_string();
        assert!(
            text.contains(
                "topic strict partition 0 offset 5: field 'amount': the value is not a valid Decimal128(12, 2)"
            ),
            "{text}"
        );
        assert!(!text.contains("secret"), "no message values in errors: {text}");
        assert_eq!(status.state, "failed");
        assert_eq!(status.error_class, Some("data"));
        // Nothing of the flush holding the bad message was committed.
        assert!(table_seqs(&table).0.iter().all(|s| *s < 5));
        assert!(app_versions(&spec, &table, 1)[0].unwrap_or(0) <= 5);
    });
}

#[test]
fn messages_that_do_not_fit_go_to_the_dead_letter_table_exactly_once_and_the_rest_flows() {
    let kafka = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("events");
    let dead = dir.path().join("events_dead_letters");
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, EVENTS_SCHEMA).unwrap();
    let mut entry = IngestConfig::new(kafka.brokers(), "mixed", table.display().to_string());
    entry.schema = Some(schema.display().to_string());
    entry.on_bad_record = Some("dead_letter".into());
    entry.dead_letter_table = Some(dead.display().to_string());
    entry.partition_by = vec!["status".into()];
    entry.flush_interval = Some("100ms".into());
    let spec = entry.validate_with(&|_| None).unwrap();
    block_on(async {
        kafka.create_topic("mixed", 2).await;
        let producer = kafka.producer("mixed").await;
        let mut bad = 0;
        for seq in 0..40i64 {
            let value = match seq % 10 {
                3 => b"not json".to_vec(),
                7 => br#"{"transaction_id":"x","seq":"seven"}"#.to_vec(),
                // The JSON decoder alone would store 5.7 as 5.
                5 => format!(r#"{{"transaction_id":"t{seq}","seq":{seq}.7}}"#).into_bytes(),
                _ => event(seq),
            };
            bad += i64::from(matches!(seq % 10, 3 | 5 | 7));
            producer.send((seq % 2) as i32, Some(format!("k{seq}").into_bytes()), Some(value)).await.unwrap();
        }
        let running = start(&spec);
        running.wait_rows(28, 60).await;
        // Run the same ingest again over the same messages' positions: nothing new anywhere.
        running.stop().await.unwrap();
        let running = start(&spec);
        tokio::time::sleep(Duration::from_millis(800)).await;
        let again = running.status.get();
        running.stop().await.unwrap();
        assert_eq!((again.rows, again.dead_letters), (0, 0), "{again:?}");

        let good: Vec<i64> = (0..40).filter(|s| !matches!(s % 10, 3 | 5 | 7)).collect();
        assert_eq!(table_seqs(&table).0, good);
        // Partitioned by status, as asked: one directory per value.
        let layout = DeltaWriter::open(&table).unwrap().layout().unwrap();
        assert_eq!(layout.partition_columns, ["status"]);
        assert!(table.join("status=pending").is_dir() && table.join("status=settled").is_dir());
        let t = DeltaTable::open(&dead.display().to_string()).unwrap();
        let mut letters = Vec::new();
        for batch in t.snapshot(None).unwrap().batches().unwrap() {
            let b = batch.unwrap();
            let key = b.column_by_name("key").unwrap().as_binary::<i32>();
            let reason = b.column_by_name("reason").unwrap().as_string::<i32>();
            let value = b.column_by_name("value").unwrap().as_binary::<i32>();
            for i in 0..b.num_rows() {
                letters.push((
                    String::from_utf8(key.value(i).to_vec()).unwrap(),
                    reason.value(i).to_string(),
                    value.value(i).len(),
                ));
            }
        }
        letters.sort();
        assert_eq!(letters.len() as i64, bad, "{letters:?}");
        assert_eq!(letters[0], ("k13".into(), "the value is not valid JSON".into(), 8));
        assert!(
            letters.contains(&("k17".into(), "field 'seq': the value is not a valid Int64".into(), 36)),
            "{letters:?}"
        );
        assert!(
            letters
                .iter()
                .any(|(k, r, _)| k == "k15" && r == "field 'seq': a number with a fraction for an integer column"),
            "{letters:?}"
        );
    });
}

#[test]
fn two_ingests_under_one_name_and_a_compaction_racing_them_still_write_each_message_once() {
    let kafka = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("events");
    let mut spec = events_spec(&kafka, dir.path(), "raced", &table);
    spec.flush_interval = Duration::from_millis(50);
    spec.flush_rows = 40;
    spec.compact_every = 5;
    block_on(async {
        kafka.create_topic("raced", 2).await;
        let a = start(&spec);
        let b = start(&spec);
        let uri = table.display().to_string();
        let compactor = std::thread::spawn(move || {
            let options = lakesync_delta::compact::CompactOptions { min_files: 2, ..Default::default() };
            let mut compacted = 0;
            for _ in 0..40 {
                std::thread::sleep(Duration::from_millis(100));
                if let Ok(r) = lakesync_delta::compact::compact(&uri, &Default::default(), &options) {
                    compacted += usize::from(r.version.is_some());
                }
            }
            compacted
        });
        produce(&kafka, "raced", 0..600).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while table_seqs_or_empty(&table).len() < 600 {
            assert!(Instant::now() < deadline, "not all messages arrived");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (sa, sb) = (a.status.get(), b.status.get());
        a.stop().await.unwrap();
        b.stop().await.unwrap();
        let compacted = compactor.join().unwrap();
        assert_eq!(table_seqs(&table).0, (0..600).collect::<Vec<_>>(), "each message exactly once");
        assert_eq!(app_versions(&spec, &table, 2), [Some(300), Some(300)]);
        assert!(sa.commits + sb.commits >= 2, "{sa:?} {sb:?}");
        assert!(compacted + (sa.compactions + sb.compactions) as usize > 0, "no compaction ran during the ingest");
    });
}

fn table_seqs_or_empty(table: &Path) -> Vec<i64> {
    if table.join("_delta_log").exists() {
        table_seqs(table).0
    } else {
        Vec::new()
    }
}

#[test]
fn an_ingest_refuses_tables_it_cannot_write_exactly_once_and_names_the_problem() {
    let kafka = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    block_on(async {
        kafka.create_topic("events", 1).await;
        // A missing topic.
        let spec = events_spec(&kafka, dir.path(), "nope", &dir.path().join("a"));
        let err = run_to_error(spec).await.0.to_string();
        assert!(err.contains("topic nope does not exist"), "{err}");

        // A table whose txn versions expire.
        let expiring = dir.path().join("expiring");
        let schema = lakesync_delta::schema::arrow_schema_from_json("s", EVENTS_SCHEMA).unwrap();
        DeltaWriter::create(&expiring, &schema, &[("delta.setTransactionRetentionDuration", "interval 7 days")])
            .unwrap();
        let mut spec = events_spec(&kafka, dir.path(), "events", &expiring);
        spec.kafka_columns.clear();
        let err = run_to_error(spec).await.0.to_string();
        assert!(err.contains("delta.setTransactionRetentionDuration"), "{err}");

        // An existing table whose columns differ from the declared schema.
        let other = dir.path().join("other");
        let narrow =
            arrow_schema::Schema::new(vec![arrow_schema::Field::new("seq", arrow_schema::DataType::Int32, false)]);
        DeltaWriter::create(&other, &narrow, &[]).unwrap();
        let spec = events_spec(&kafka, dir.path(), "events", &other);
        let err = run_to_error(spec).await.0.to_string();
        assert!(err.contains(&format!("table {}", other.display())) && err.contains("column"), "{err}");

        // No schema and no table.
        let mut spec = events_spec(&kafka, dir.path(), "events", &dir.path().join("missing"));
        spec.schema = None;
        let err = run_to_error(spec).await.0.to_string();
        assert!(err.contains("the table does not exist; give a schema"), "{err}");
    });
}

/// The table users already have: one delta-rs made with the change data feed on (protocol
/// reader 1 / writer 4, as Spark 3.x makes them too). The ingest refuses it without
/// `upgrade_protocol`, naming the flag and writing nothing; with it, the protocol moves to table
/// features in one commit, every message is written once, delta-rs still writes the table and
/// a sync made before follows the change feed through it all.
#[test]
fn an_ingest_into_a_delta_rs_change_feed_table_upgrades_its_protocol_only_when_asked() {
    let kafka = KafkaServer::start();
    let db = TestDb::new("ingest_upgrade");
    let t = crate::support::PyDelta::new();
    let columns = json!([
        ["transaction_id", "pa.string()"],
        ["user_id", "pa.string()"],
        ["amount", "pa.decimal128(12, 2)"],
        ["status", "pa.string()"],
        ["event_time", "pa.timestamp('us', tz='UTC')"],
        ["seq", "pa.int64()"],
        ["_kafka_partition", "pa.int32()"],
        ["_kafka_offset", "pa.int64()"]
    ]);
    t.run(json!([{"op": "create", "schema": columns, "rows": []}]));
    let table = t.path();
    let log = std::fs::read_to_string(table.join("_delta_log/00000000000000000000.json")).unwrap();
    assert!(log.contains(r#""minWriterVersion":4"#), "delta-rs made a legacy-protocol table: {log}");
    let req = db.request(&table, "public.events", "seq");
    assert_eq!(db.sync(&req).unwrap().to_version, 0);

    let dir = tempfile::tempdir().unwrap();
    let mut entry = events_entry(&kafka, dir.path(), "events", &table);
    entry.schema = None;
    let refused = entry.validate_with(&|_| None).unwrap();
    entry.upgrade_protocol = true;
    let spec = entry.validate_with(&|_| None).unwrap();
    block_on(async {
        kafka.create_topic("events", 2).await;
        produce(&kafka, "events", 0..200).await;
        let (err, _) = run_to_error(refused).await;
        let text = err.to_string();
        assert!(
            text.contains("--upgrade-protocol (upgrade_protocol = true") && text.contains("Nothing was changed"),
            "{text}"
        );
        assert_eq!(err.class(), ErrorClass::Config, "{text}");
        assert_eq!(std::fs::read_dir(table.join("_delta_log")).unwrap().count(), 1, "refused, yet the log changed");

        let running = start(&spec);
        running.wait_rows(200, 60).await;
        running.stop().await.unwrap();
    });
    assert_eq!(table_seqs(&table).0, (0..200).collect::<Vec<_>>());
    let upgrade = std::fs::read_to_string(table.join("_delta_log/00000000000000000001.json")).unwrap();
    assert!(
        upgrade.contains(r#"{"protocol":{"minReaderVersion":1,"minWriterVersion":7,"writerFeatures":["appendOnly","invariants","changeDataFeed"]}}"#),
        "{upgrade}"
    );
    // delta-rs writes the upgraded table, and the sync follows the feed through all of it.
    let v = t.run(json!([{"op": "append", "schema": columns, "rows": [["t", "u", "1.00", "s", "2026-12-07T00:00:00+00:00", 1000, 9, 0]]}]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v), "{}", out.reason);
    assert_eq!(db.value("SELECT count(*) FROM public.events"), "201");
    db.assert_matches_snapshot(&table, "public.events", "seq", v);
}

/// Spark's own change-feed table (`cdf-table`: reader 1 / writer 4, partitioned by a date):
/// an ingest with `upgrade_protocol` appends to it, partition values and all, and a sync made
/// before follows its change feed across the upgrade and the appends.
#[test]
fn an_ingest_appends_to_a_spark_change_feed_table_after_upgrading_its_protocol() {
    let Some(fixture) = crate::support::spark_fixture("cdf-table") else { return };
    let kafka = KafkaServer::start();
    let db = TestDb::new("ingest_spark");
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("cdf-table");
    crate::support::copy_tree(&fixture, &table);
    let req = db.request(&table, "public.people", "id");
    let before = db.sync(&req).unwrap();
    let mut entry = IngestConfig::new(kafka.brokers(), "people", table.display().to_string());
    entry.flush_interval = Some("200ms".into());
    entry.upgrade_protocol = true;
    let spec = entry.validate_with(&|_| None).unwrap();
    block_on(async {
        kafka.create_topic("people", 1).await;
        let producer = kafka.producer("people").await;
        for i in 0..20 {
            let value = format!(r#"{{"id":{},"name":"n{i}","birthday":"2024-01-{:02}"}}"#, 1000 + i, 1 + i % 3);
            producer.send(0, None, Some(value.into_bytes())).await.unwrap();
        }
        let running = start(&spec);
        running.wait_rows(20, 60).await;
        running.stop().await.unwrap();
    });
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "triggered", "{}", out.reason);
    assert!(out.to_version >= before.to_version + 2, "an upgrade and at least one append");
    assert_eq!(out.counts.inserted, 20);
    db.assert_matches_snapshot(&table, "public.people", "id", out.to_version);
    assert_eq!(db.value("SELECT count(*) FROM public.people WHERE id >= 1000 AND birthday = '2024-01-02'"), "7");
}

/// A topic deleted and recreated while the table records offset 50 of the old one: the ingest
/// stops with an error naming topic, partition and both offsets (never "running" with lag 0,
/// and never skipping the new topic's first 50 messages), and writes nothing. The operator's
/// `reset_positions = earliest` goes on from the new topic's first message, once, recorded in
/// the table's commit.
#[test]
fn a_recreated_topic_stops_the_ingest_until_an_operator_resets_its_positions() {
    let kafka = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("events");
    let spec = events_spec(&kafka, dir.path(), "events", &table);
    let latest =
        |table: &Path| DeltaTable::open(&table.display().to_string()).unwrap().snapshot(None).unwrap().version();
    let version = block_on(async {
        kafka.create_topic("events", 1).await;
        produce(&kafka, "events", 0..50).await;
        let running = start(&spec);
        running.wait_rows(50, 60).await;
        running.stop().await.unwrap();

        kafka.delete_topic("events").await;
        kafka.create_topic("events", 1).await;
        produce(&kafka, "events", 50..60).await;
        let version = latest(&table);
        let (err, status) = run_to_error(spec.clone()).await;
        let text = err.to_string();
        assert!(
            text.contains(
                "topic events partition 0: the table records offset 50, but the partition holds offsets 0..10"
            ) && text.contains("deleted and recreated")
                && text.contains("--reset-positions earliest"),
            "{text}"
        );
        assert_eq!(err.class(), ErrorClass::Data);
        assert_eq!(status.state, "failed");
        assert_eq!(latest(&table), version, "nothing is written before the operator chooses");

        let mut reset = spec.clone();
        reset.reset_positions = Some(lakesync_ingest::StartFrom::Earliest);
        let running = start(&reset);
        running.wait_rows(10, 60).await;
        running.stop().await.unwrap();
        version
    });
    assert_eq!(table_seqs(&table).0, (0..60).collect::<Vec<_>>());
    assert_eq!(app_versions(&spec, &table, 1), [Some(10)]);
    let reset_commit = std::fs::read_to_string(table.join(format!("_delta_log/{:020}.json", version + 1))).unwrap();
    assert!(
        reset_commit.contains(r#""lakesync.resetPositions.events.0":"50 -> 0 (earliest; the partition held 0..10)""#),
        "{reset_commit}"
    );
}

/// A broker lost without a reset (a half-open connection: a proxy that stops forwarding and
/// keeps the connection open): the ingest does not report "running" for ever; within its
/// `request_timeout` it reports the lost broker and reconnects, and once the network is back it
/// ingests again, every message once.
#[test]
fn a_broker_that_stops_answering_is_reported_within_the_request_timeout_and_the_ingest_recovers() {
    let broker_port = free_port();
    let proxy = crate::support::stores::TcpProxy::start(broker_port, Duration::ZERO);
    let front = format!("127.0.0.1:{}", proxy.port);
    let kafka = KafkaServer::start_at(broker_port, "memory://tansu/", &std::env::temp_dir(), Some(front), false);
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("events");
    let mut entry = events_entry(&kafka, dir.path(), "events", &table);
    entry.request_timeout = Some("2s".into());
    let spec = entry.validate_with(&|_| None).unwrap();
    block_on(async {
        kafka.create_topic("events", 1).await;
        produce(&kafka, "events", 0..20).await;
        let running = start(&spec);
        running.wait_rows(20, 60).await;

        proxy.freeze(true);
        let frozen_at = Instant::now();
        loop {
            let s = running.status.get();
            if s.last_error.as_deref().is_some_and(|e| e.contains("no answer within 2s")) {
                assert_eq!(s.state, "retrying", "{s:?}");
                break;
            }
            assert!(frozen_at.elapsed() < Duration::from_secs(20), "the lost broker was never reported: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        proxy.freeze(false);
        produce(&kafka, "events", 20..30).await;
        running.wait_rows(30, 90).await;
        running.stop().await.unwrap();
    });
    assert_eq!(table_seqs(&table).0, (0..30).collect::<Vec<_>>());
}

#[test]
fn events_flow_from_kafka_through_delta_into_postgres_within_seconds() {
    let db = TestDb::new("ingest_pipeline");
    let kafka = KafkaServer::start();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("transactions");
    let spec = events_spec(&kafka, dir.path(), "transactions", &table);
    block_on(async {
        kafka.create_topic("transactions", 4).await;
        // Keyed by transaction: a transaction's status updates follow it in one partition
        // (round-robin would let a flush commit the settlement before the creation, and the
        // change feed's rule across commits is that the later commit wins).
        produce_by_transaction(&kafka, "transactions", 0..2).await;
        let running = start(&spec);
        running.wait_rows(2, 60).await;
        // Continuous sync of the ingested table: last event per transaction wins (the greater
        // seq), so status updates replace the pending rows.
        let mut req = db.request(&table, "app.transactions", "transaction_id");
        req.policy.dedup_by = Some("seq".into());
        lakesync_engine::sync(&req).await.unwrap();
        produce_by_transaction(&kafka, "transactions", 2..400).await;
        let produced = Instant::now();
        running.wait_rows(400, 60).await;
        let mut synced_at = None;
        for _ in 0..100 {
            lakesync_engine::sync(&req).await.unwrap();
            if db_count(&db).await == 200 && settled(&db).await == 200 {
                synced_at = Some(produced.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.stop().await.unwrap();
        let elapsed = synced_at.expect("every transaction settled in Postgres");
        assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    });
    let rows = db.rows(
        "SELECT transaction_id || ':' || status || ':' || amount FROM app.transactions \
         WHERE transaction_id IN ('t0', 't199') ORDER BY 1",
    );
    assert_eq!(rows, ["(t0:settled:1.01)", "(t199:settled:399.99)"]);
}

async fn db_count(db: &TestDb) -> i64 {
    let client = db.config().connect().await.unwrap();
    client.query_one("SELECT count(*) FROM app.transactions", &[]).await.unwrap().get(0)
}

async fn settled(db: &TestDb) -> i64 {
    let client = db.config().connect().await.unwrap();
    client.query_one("SELECT count(*) FROM app.transactions WHERE status = 'settled'", &[]).await.unwrap().get(0)
}
