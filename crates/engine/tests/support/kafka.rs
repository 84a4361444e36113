//! A real Kafka-protocol broker for the tests: `tansu` (installed once per machine by
//! `scripts/test`, found through `LAKESYNC_TEST_TANSU`), started per test on a free port with
//! in-memory storage and stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

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
