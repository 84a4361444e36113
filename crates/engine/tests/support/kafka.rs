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

use lakesync_ingest::kafka::Security;

use super::stores::{free_port, wait_for_port};

pub struct KafkaServer {
    child: Child,
    pub port: u16,
    /// The address clients are given (`advertised`), when not the broker's own.
    advertised: Option<String>,
    /// How the test's own clients (topic creation, producers) reach it.
    pub security: Security,
}

fn tansu() -> PathBuf {
    if let Ok(path) = std::env::var("LAKESYNC_TEST_TANSU") {
        return path.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    [
        "/opt/lakesync-test-tansu-0.6.0-sql/bin/tansu".to_string(),
        format!("{home}/.cache/lakesync-test-tansu-0.6.0-sql/bin/tansu"),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("the tansu broker is not installed; run `bash scripts/test` (it installs it once)"))
}

impl KafkaServer {
    pub fn start() -> Self {
        Self::start_with(None, false)
    }

    /// A broker that tells clients to connect to `advertised` (`host:port`, e.g. a TLS front)
    /// and, with `authentication`, requires SASL of every client.
    pub fn start_with(advertised: Option<String>, authentication: bool) -> Self {
        Self::start_on("memory://tansu/", &std::env::temp_dir(), advertised, authentication)
    }

    /// A broker keeping its topics and users in `storage`, run in `dir` (tansu's
    /// `sqlite://NAME` is a file there), so a later broker on the same storage finds them.
    pub fn start_on(storage: &str, dir: &Path, advertised: Option<String>, authentication: bool) -> Self {
        Self::start_at(free_port(), storage, dir, advertised, authentication)
    }

    /// [`Self::start_on`] listening on `port` (a proxy in front of it was given that port).
    pub fn start_at(port: u16, storage: &str, dir: &Path, advertised: Option<String>, authentication: bool) -> Self {
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised_url = advertised.as_ref().map_or(url.clone(), |a| format!("tcp://{a}"));
        let mut child = Command::new(tansu())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised_url])
            .args(["--storage-engine", storage, "--silent"])
            .args(authentication.then_some("--authentication"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        wait_for_port(port, &mut child, "tansu");
        Self { child, port, advertised, security: Security::default() }
    }

    /// Creates a SASL/SCRAM user with tansu's own CLI.
    pub fn create_user(&self, mechanism: &str, name: &str, password: &str) {
        let out = Command::new(tansu())
            .args(["user", "create", "--broker", &format!("tcp://127.0.0.1:{}", self.port), "--mechanism", mechanism])
            .args([name, password])
            .output()
            .expect("tansu user create");
        assert!(out.status.success(), "tansu user create: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The bootstrap addresses clients use: the advertised one when set.
    pub fn brokers(&self) -> Vec<String> {
        vec![self.advertised.clone().unwrap_or_else(|| format!("127.0.0.1:{}", self.port))]
    }

    /// `host:port`, as the CLI takes it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        lakesync_ingest::kafka::create_topic(&self.brokers(), &self.security, topic, partitions).await.unwrap();
    }

    pub async fn delete_topic(&self, topic: &str) {
        lakesync_ingest::kafka::delete_topic(&self.brokers(), &self.security, topic).await.unwrap();
    }

    pub async fn producer(&self, topic: &str) -> lakesync_ingest::kafka::Producer {
        lakesync_ingest::kafka::Producer::connect(&self.brokers(), &self.security, topic).await.unwrap()
    }
}

impl Drop for KafkaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS front for a broker (tansu 0.6 serves plain TCP only, as a broker behind a TLS-terminating
/// load balancer does): rustls with `cert`/`key` on `port`, forwarding to `broker_port`. It runs
/// on its own thread until the test process ends.
pub fn tls_front(port: u16, broker_port: u16, cert: &Path, key: &Path) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that refuses our certificate ends here, as at a real front.
                    let Ok(mut tls) = acceptor.accept(client).await else { return };
                    let Ok(mut broker) = tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                });
            }
        });
    });
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
