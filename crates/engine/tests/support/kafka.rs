//! A real Kafka-protocol broker for the tests: `tansu` (installed once per machine by
//! `scripts/test`, found through `LAKESYNC_TEST_TANSU`), started per test on a free port with
//! in-memory storage and stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use std::collections::BTreeMap;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use lakesync_delta::DeltaTable;

use super::stores::{free_port, wait_for_port};

pub struct KafkaServer {
    child: Child,
    pub port: u16,
}

fn tansu() -> PathBuf {
    if let Ok(path) = std::env::var("LAKESYNC_TEST_TANSU") {
        return path.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    ["/opt/lakesync-test-tansu/bin/tansu".to_string(), format!("{home}/.cache/lakesync-test-tansu/bin/tansu")]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("the tansu broker is not installed; run `bash scripts/test` (it installs it once)"))
}

impl KafkaServer {
    pub fn start() -> Self {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut child = Command::new(tansu())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        wait_for_port(port, &mut child, "tansu");
        Self { child, port }
    }

    pub fn brokers(&self) -> Vec<String> {
        vec![format!("127.0.0.1:{}", self.port)]
    }

    /// `host:port`, as the CLI takes it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        lakesync_ingest::kafka::create_topic(&self.brokers(), topic, partitions).await.unwrap();
    }

    pub async fn producer(&self, topic: &str) -> lakesync_ingest::kafka::Producer {
        lakesync_ingest::kafka::Producer::connect(&self.brokers(), topic).await.unwrap()
    }
}

impl Drop for KafkaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The seed use case's transaction events, as Delta schema JSON.
pub const EVENTS_SCHEMA: &str = r#"{"type":"struct","fields":[
    {"name":"transaction_id","type":"string","nullable":false,"metadata":{}},
    {"name":"user_id","type":"string","nullable":true,"metadata":{}},
    {"name":"amount","type":"decimal(12,2)","nullable":true,"metadata":{}},
    {"name":"status","type":"string","nullable":true,"metadata":{}},
    {"name":"event_time","type":"timestamp","nullable":true,"metadata":{}},
    {"name":"seq","type":"long","nullable":false,"metadata":{}}]}"#;

/// Event number `seq` as JSON: transaction `seq / 2`, created then (odd seq) settled.
pub fn event(seq: i64) -> Vec<u8> {
    let status = if seq % 2 == 0 { "pending" } else { "settled" };
    format!(
        r#"{{"transaction_id":"t{}","user_id":"u{}","amount":"{}.{:02}","status":"{status}","event_time":"2026-12-03T10:{:02}:{:02}.{:06}Z","seq":{seq}}}"#,
        seq / 2,
        (seq / 2) % 7,
        seq % 1000,
        seq % 100,
        (seq / 60) % 60,
        seq % 60,
        seq % 1_000_000
    )
    .into_bytes()
}

/// `seq` of every row of the table's latest version, sorted, with the Kafka offsets per
/// partition.
pub fn table_seqs(table: &Path) -> (Vec<i64>, BTreeMap<i32, Vec<i64>>) {
    let t = DeltaTable::open(&table.display().to_string()).unwrap();
    let (mut seqs, mut offsets) = (Vec::new(), BTreeMap::<i32, Vec<i64>>::new());
    for batch in t.snapshot(None).unwrap().batches().unwrap() {
        let batch = batch.unwrap();
        let seq = batch.column_by_name("seq").unwrap().as_primitive::<Int64Type>();
        seqs.extend(seq.values().iter().copied());
        if let (Some(p), Some(o)) = (batch.column_by_name("_kafka_partition"), batch.column_by_name("_kafka_offset")) {
            for (p, o) in p.as_primitive::<Int32Type>().values().iter().zip(o.as_primitive::<Int64Type>().values()) {
                offsets.entry(*p).or_default().push(*o);
            }
        }
    }
    seqs.sort_unstable();
    offsets.values_mut().for_each(|o| o.sort_unstable());
    (seqs, offsets)
}
