//! The Kafka side: a topic's partitions read from given offsets with `rskafka` (pure Rust,
//! partition-level fetches; the offsets live in the Delta table, so no consumer group).
//!
//! Every fetch is checked: records below the requested offset are dropped (a broker returns
//! whole record batches) and offsets must strictly increase, so a broker that repeats
//! records can never make a message appear twice.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{
    AbortedTransaction, ControlMarker, FetchedBatch, OffsetAt, PartitionClient, UnknownTopicHandling,
};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::BackoffConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use crate::decode::Message;

/// Where to start a partition the table has no position for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
}

impl StartFrom {
    /// `earliest` or `latest`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "earliest" => Ok(Self::Earliest),
            "latest" => Ok(Self::Latest),
            other => Err(format!("{other:?}: expected \"earliest\" or \"latest\"")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Earliest => "earliest",
            Self::Latest => "latest",
        }
    }
}

/// How lakesync reaches the brokers, as a Kafka client's `security.protocol` says:
/// `PLAINTEXT` (the default), `SSL` (TLS), `SASL_PLAINTEXT` or `SASL_SSL`.
#[derive(Clone, Default)]
pub struct Security {
    /// TLS to every broker, verified against [`tls_config`]'s roots; `None`: plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// SASL authentication on every connection.
    pub sasl: Option<Sasl>,
}

/// SASL credentials. The password never appears in `Debug` output, logs or errors.
#[derive(Clone)]
pub struct Sasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: String,
}

/// The SASL mechanisms lakesync speaks (`sasl.mechanism`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    /// Parses a mechanism as Kafka clients spell it.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "PLAIN" => Ok(Self::Plain),
            "SCRAM-SHA-256" => Ok(Self::ScramSha256),
            "SCRAM-SHA-512" => Ok(Self::ScramSha512),
            other => Err(format!("{other:?}: expected \"PLAIN\", \"SCRAM-SHA-256\" or \"SCRAM-SHA-512\"")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls.is_some())
            .field("sasl", &self.sasl.as_ref().map(|s| (s.mechanism.as_str(), &s.username)))
            .finish()
    }
}

impl Security {
    /// `security.protocol` as Kafka clients name it.
    pub fn protocol(&self) -> &'static str {
        match (self.tls.is_some(), self.sasl.is_some()) {
            (false, false) => "PLAINTEXT",
            (true, false) => "SSL",
            (false, true) => "SASL_PLAINTEXT",
            (true, true) => "SASL_SSL",
        }
    }

    /// A client builder for `brokers` with these settings, whose requests give up after
    /// [`REQUEST_DEADLINE`] (so a wrong address, a refused login or a broker that is down is
    /// reported, and the caller retries as a whole).
    fn builder(&self, brokers: &[String]) -> ClientBuilder {
        let backoff = BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
            deadline: Some(REQUEST_DEADLINE),
        };
        let mut builder = ClientBuilder::new(brokers.to_vec())
            .client_id(concat!("lakesync/", env!("CARGO_PKG_VERSION")))
            .backoff_config(backoff);
        if let Some(tls) = &self.tls {
            builder = builder.tls_config(tls.clone());
        }
        if let Some(sasl) = &self.sasl {
            let credentials = Credentials::new(sasl.username.clone(), sasl.password.clone());
            builder = builder.sasl_config(match sasl.mechanism {
                SaslMechanism::Plain => SaslConfig::Plain(credentials),
                SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(credentials),
                SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(credentials),
            });
        }
        builder
    }
}

/// The TLS settings for the brokers: the certificates in `ca` (PEM; `ssl.ca.location`) as the
/// only trusted roots, or else the system's. The broker's name is always verified.
pub fn tls_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
            for c in certs {
                roots.add(c).map_err(|e| format!("the CA file {}: {e}", path.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err("no trusted root certificates: set ssl_ca_location to a PEM file".into());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A failure talking to the brokers.
#[derive(Debug, Clone)]
pub(crate) enum FetchError {
    /// The requested offset is outside what the partition holds: below its earliest kept
    /// offset (retention deleted messages first) or above its end (the topic was deleted and
    /// recreated, or its log truncated).
    OutOfRange { partition: i32, wanted: i64, earliest: i64, latest: i64 },
    /// Anything else; `transient` when retrying later can work.
    Kafka { message: String, transient: bool },
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::OutOfRange { partition, wanted, earliest, latest } => {
                write!(f, "partition {partition}: offset {wanted} is outside {earliest}..{latest}")
            }
            FetchError::Kafka { message, .. } => f.write_str(message),
        }
    }
}

pub(crate) fn kafka_error(context: &str, e: KafkaError) -> FetchError {
    // rskafka retries a failed handshake until its deadline and then reports the last error
    // as text: a refused login or certificate is not going to pass on the next try.
    let text = e.to_string();
    let refused =
        ["Sasl handshake failed", "SaslAuthenticationFailed", "invalid peer certificate", "CertificateRequired"];
    let transient = !refused.iter().any(|r| text.contains(r))
        && match &e {
            KafkaError::ServerError { protocol_error, .. } => !matches!(
                protocol_error,
                ProtocolError::TopicAuthorizationFailed
                    | ProtocolError::ClusterAuthorizationFailed
                    | ProtocolError::SaslAuthenticationFailed
                    | ProtocolError::InvalidTopicException
            ),
            KafkaError::InvalidResponse(_) => false,
            _ => true,
        };
    FetchError::Kafka { message: format!("{context}: {text}"), transient }
}

/// A connection to the brokers and one topic's partitions.
pub(crate) struct Topic {
    pub client: Arc<Client>,
    pub name: String,
    pub partitions: Vec<i32>,
}

/// How long a request may be retried before it fails.
const REQUEST_DEADLINE: Duration = Duration::from_secs(20);

/// How long one request to the brokers may go unanswered by default (Kafka clients'
/// `request.timeout.ms`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `f`, or a transient error when it does not finish within `timeout`: a broker lost without
/// closing the connection (a half-open connection) never answers, and nothing may wait for it
/// for ever while the ingest reports "running".
pub(crate) async fn within<T>(
    timeout: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, FetchError>>,
) -> Result<T, FetchError> {
    tokio::time::timeout(timeout, f).await.unwrap_or_else(|_| {
        Err(FetchError::Kafka {
            message: format!(
                "{what}: no answer within {:?} (request_timeout; a broker lost without closing the connection?)",
                timeout
            ),
            transient: true,
        })
    })
}

impl Topic {
    pub async fn connect(brokers: &[String], security: &Security, topic: &str) -> Result<Self, FetchError> {
        Self::connect_within(brokers, security, topic, DEFAULT_REQUEST_TIMEOUT).await
    }

    /// [`Self::connect`], each request given up after `timeout`.
    pub async fn connect_within(
        brokers: &[String],
        security: &Security,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, FetchError> {
        let build = security.builder(brokers).build();
        // Past the client's own deadline, so that a refused login or certificate is reported
        // as what it is (not retried for ever as a broker that did not answer).
        let client = tokio::time::timeout(REQUEST_DEADLINE + Duration::from_secs(5), build)
            .await
            .map_err(|_| FetchError::Kafka {
                message: format!("no broker answered within {} s", REQUEST_DEADLINE.as_secs()),
                transient: true,
            })?
            .map_err(|e| kafka_error("connecting", e))?;
        let topics = within(timeout, "listing topics", async {
            client.list_topics().await.map_err(|e| kafka_error("listing topics", e))
        })
        .await?;
        let Some(found) = topics.into_iter().find(|t| t.name == topic) else {
            return Err(FetchError::Kafka {
                message: format!("topic {topic} does not exist (create it first; lakesync never creates topics)"),
                transient: false,
            });
        };
        Ok(Self {
            client: Arc::new(client),
            name: topic.to_string(),
            partitions: found.partitions.into_iter().collect(),
        })
    }

    /// The topic's partitions as the brokers list them now.
    pub async fn list_partitions(&self) -> Result<Vec<i32>, FetchError> {
        let topics = self.client.list_topics().await.map_err(|e| kafka_error("listing topics", e))?;
        match topics.into_iter().find(|t| t.name == self.name) {
            Some(found) => Ok(found.partitions.into_iter().collect()),
            None => Err(FetchError::Kafka {
                message: format!("topic {} no longer exists (deleted?)", self.name),
                transient: true,
            }),
        }
    }

    pub async fn partition(&self, partition: i32) -> Result<PartitionClient, FetchError> {
        self.client
            .partition_client(self.name.clone(), partition, UnknownTopicHandling::Retry)
            .await
            .map_err(|e| kafka_error(&format!("partition {partition}"), e))
    }
}

/// How often the ingest asks the brokers whether partitions were added to its topic (Kafka
/// clients' `metadata.max.age.ms` is 5 minutes; an ingest that starts a new partition late
/// only delays it, never skips it: new partitions are read from their first message).
pub(crate) const METADATA_REFRESH: Duration = Duration::from_secs(30);

/// The partitions an ingest reads, and what a fresh listing changes.
#[derive(Debug, Default)]
pub(crate) struct PartitionWatch {
    known: std::collections::BTreeSet<i32>,
}

impl PartitionWatch {
    pub fn new(partitions: impl IntoIterator<Item = i32>) -> Self {
        Self { known: partitions.into_iter().collect() }
    }

    /// The partitions in `listed` that are new (now known), in order; an error when a known
    /// one is missing (Kafka never removes partitions: the topic was deleted and recreated
    /// with fewer).
    pub fn added(&mut self, listed: &[i32]) -> Result<Vec<i32>, FetchError> {
        if let Some(gone) = self.known.iter().find(|p| !listed.contains(p)) {
            return Err(FetchError::Kafka {
                message: format!(
                    "partition {gone} is no longer listed: the topic was deleted and recreated with fewer partitions"
                ),
                transient: false,
            });
        }
        let mut added: Vec<i32> = listed.iter().copied().filter(|p| self.known.insert(*p)).collect();
        added.sort_unstable();
        Ok(added)
    }
}

/// A batch of a partition's messages, in offset order, and its high watermark.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub partition: i32,
    pub messages: Vec<Message>,
    pub high_watermark: i64,
    /// Where the next fetch starts: past the last message, and past transaction markers and
    /// aborted records after it.
    pub next: i64,
    /// The fetched bytes' share of the ingest's fetch budget, returned when dropped (once
    /// the messages are in the flush buffer, which is bounded on its own).
    pub _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Bytes of fetched messages an ingest holds between its fetchers and its flush buffer, over
/// all partitions (librdkafka's `queued.max.messages.kbytes` is 64 MiB too): with 128
/// partitions, 4 MiB fetches would otherwise hold 2 GiB.
pub(crate) const FETCH_BUDGET_BYTES: usize = 64 * 1024 * 1024;

/// The fetch budget, in KiB permits.
pub(crate) fn fetch_budget() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(FETCH_BUDGET_BYTES / 1024))
}

/// Bytes one fetch asks for when `partitions` share the budget: every partition can fetch
/// at once, between 256 KiB and 4 MiB (Kafka's `max.partition.fetch.bytes` is 1 MiB).
pub fn fetch_bytes(partitions: usize) -> i32 {
    (FETCH_BUDGET_BYTES / partitions.max(1)).clamp(256 * 1024, 4 * 1024 * 1024) as i32
}

/// What a read-committed consumer reads of one fetch: the records of `batches` (in offset
/// order) at or after `from`, without control batches (transaction markers) and without the
/// records of aborted transactions, as Kafka's own consumer filters them (the broker sends an
/// aborted transaction's records with the list of aborted transactions, and leaves the
/// filtering to the client). Returns the records and the offset after the last batch (where
/// the next fetch starts, past markers and aborted records too).
pub(crate) fn read_committed(
    batches: Vec<FetchedBatch>,
    aborted: &[AbortedTransaction],
    from: i64,
) -> (Vec<rskafka::record::RecordAndOffset>, i64) {
    let mut aborted: Vec<AbortedTransaction> = aborted.to_vec();
    aborted.sort_by_key(|a| std::cmp::Reverse(a.first_offset));
    let mut aborting: std::collections::HashSet<i64> = std::collections::HashSet::new();
    let mut records = Vec::new();
    let mut next = from;
    for batch in batches {
        next = next.max(batch.last_offset + 1);
        // Transactions that began at or before this batch's end are aborted from here on.
        while aborted.last().is_some_and(|a| a.first_offset <= batch.last_offset) {
            aborting.insert(aborted.pop().expect("checked").producer_id);
        }
        match batch.control {
            Some(marker) => {
                if marker == ControlMarker::Abort {
                    aborting.remove(&batch.producer_id);
                }
            }
            None if batch.is_transactional && aborting.contains(&batch.producer_id) => {}
            None => records.extend(batch.records.into_iter().filter(|r| r.offset >= from)),
        }
    }
    (records, next)
}

/// Resolves where a partition with no recorded position starts.
pub(crate) async fn start_offset(client: &PartitionClient, start: StartFrom) -> Result<i64, FetchError> {
    let at = match start {
        StartFrom::Earliest => OffsetAt::Earliest,
        StartFrom::Latest => OffsetAt::Latest,
    };
    let err = |e| kafka_error(&format!("partition {} offsets", client.partition()), e);
    let listed = client.get_offset(at).await.map_err(err)?;
    if start == StartFrom::Earliest {
        return Ok(listed);
    }
    // The end is also the high watermark a fetch reports: a broker may list a wrong end
    // (tansu lists the last record batch's base offset + 1), never a watermark below the
    // records it holds. Take the larger.
    match client.fetch_records(listed, 1..1024, 0).await {
        Ok((_, high_watermark)) => Ok(listed.max(high_watermark)),
        Err(KafkaError::ServerError { protocol_error: ProtocolError::OffsetOutOfRange, .. }) => Ok(listed),
        Err(e) => Err(err(e)),
    }
}

/// The offsets a partition holds now: its earliest kept offset and its end (the offset the
/// next message will get).
pub(crate) async fn offset_range(client: &PartitionClient) -> Result<(i64, i64), FetchError> {
    let earliest = start_offset(client, StartFrom::Earliest).await?;
    let latest = start_offset(client, StartFrom::Latest).await?;
    Ok((earliest, latest.max(earliest)))
}

/// How long a fetch waits on the broker for new messages.
const FETCH_WAIT_MS: i32 = 500;

/// Fetches `client`'s partition from `next` onwards into `out` until `out` closes or a fetch
/// fails (the error is sent, then the task ends). A fetch that does not answer within
/// `timeout` (plus the time it may wait on the broker) fails as a transient error, and the
/// ingest reconnects.
pub(crate) async fn fetch_loop(
    client: PartitionClient,
    mut next: i64,
    max_bytes: i32,
    budget: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
    out: mpsc::Sender<Result<Fetched, FetchError>>,
) {
    let partition = client.partition();
    // Out-of-range answers tolerated in a row: a new leader may briefly be behind.
    let mut out_of_range = 0;
    let asked_kib = (max_bytes as u32).div_ceil(1024);
    loop {
        // A fetch may bring up to `max_bytes`: it waits for that much of the budget.
        let Ok(mut permit) = budget.clone().acquire_many_owned(asked_kib).await else { return };
        let wait = timeout + Duration::from_millis(FETCH_WAIT_MS as u64);
        let fetched = match tokio::time::timeout(wait, client.fetch_batches(next, 1..max_bytes, FETCH_WAIT_MS)).await {
            Ok(fetched) => fetched,
            Err(_) => {
                let message = format!(
                    "fetching partition {partition} at offset {next}: no answer within {timeout:?} (request_timeout; a \
                     broker lost without closing the connection?); reconnecting"
                );
                let _ = out.send(Err(FetchError::Kafka { message, transient: true })).await;
                return;
            }
        };
        let item = match fetched {
            Ok((batches, _, high_watermark)) if batches.is_empty() && high_watermark < next => {
                // The partition ends before the position: a broker may answer so instead of
                // OFFSET_OUT_OF_RANGE when the topic was recreated or its log truncated. A
                // new leader may lag for a moment: look again for a while, then at the range.
                out_of_range += 1;
                if out_of_range < 10 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                match offset_range(&client).await {
                    Ok((earliest, latest)) if next > latest => {
                        Err(FetchError::OutOfRange { partition, wanted: next, earliest, latest })
                    }
                    Ok(_) => {
                        out_of_range = 0;
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            Ok((batches, aborted, high_watermark)) => {
                out_of_range = 0;
                let (records, read_to) = read_committed(batches, &aborted, next);
                let mut messages = Vec::with_capacity(records.len());
                for r in records {
                    // Only strictly increasing offsets from the requested one: whole record
                    // batches come back, and a broker may repeat records.
                    if r.offset < next {
                        continue;
                    }
                    next = r.offset + 1;
                    messages.push(Message {
                        partition,
                        offset: r.offset,
                        timestamp_ms: r.record.timestamp.timestamp_millis(),
                        key: r.record.key,
                        value: r.record.value,
                    });
                }
                // Keep the share the messages take; give the rest back now.
                let held = (messages.iter().map(Message::size).sum::<usize>().div_ceil(1024) as u32).min(asked_kib);
                let budget = if held == 0 {
                    None
                } else {
                    let kept = permit.split(held as usize);
                    drop(permit);
                    kept
                };
                next = next.max(read_to);
                Ok(Fetched { partition, messages, high_watermark, next, _budget: budget })
            }
            Err(KafkaError::ServerError { protocol_error: ProtocolError::OffsetOutOfRange, .. }) => {
                let range = offset_range(&client).await;
                out_of_range += 1;
                match range {
                    // A leader that has not caught up yet: ask again for a while.
                    Ok(_) if out_of_range < 10 => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Ok((earliest, latest)) if (earliest..=latest).contains(&next) => Err(FetchError::Kafka {
                        message: format!(
                            "partition {partition}: the broker keeps refusing offset {next} as out of range, though it \
                             lists {earliest}..{latest}"
                        ),
                        transient: true,
                    }),
                    Ok((earliest, latest)) => Err(FetchError::OutOfRange { partition, wanted: next, earliest, latest }),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(kafka_error(&format!("fetching partition {partition} at offset {next}"), e)),
        };
        let failed = item.is_err();
        if out.send(item).await.is_err() || failed {
            return;
        }
    }
}

/// Creates `topic` with `partitions` partitions (replication 1), for the demo, benchmarks and
/// tests: the ingest itself never creates topics.
pub async fn create_topic(brokers: &[String], security: &Security, topic: &str, partitions: i32) -> Result<(), String> {
    let client = security.builder(brokers).build().await.map_err(|e| format!("connecting: {e}"))?;
    let controller = client.controller_client().map_err(|e| e.to_string())?;
    controller.create_topic(topic, partitions, 1, 5_000).await.map_err(|e| format!("creating topic {topic}: {e}"))
}

/// Deletes `topic`, for tests of what a recreated topic does to an ingest: the ingest itself
/// never deletes topics.
pub async fn delete_topic(brokers: &[String], security: &Security, topic: &str) -> Result<(), String> {
    let client = security.builder(brokers).build().await.map_err(|e| format!("connecting: {e}"))?;
    let controller = client.controller_client().map_err(|e| e.to_string())?;
    controller.delete_topic(topic, 5_000).await.map_err(|e| format!("deleting topic {topic}: {e}"))
}

/// Writes messages to a topic's partitions, for the demo, benchmarks and tests: one record per
/// request ([`Producer::send`]), or one record batch ([`Producer::send_batch`]).
pub struct Producer {
    partitions: Vec<PartitionClient>,
}

impl Producer {
    pub async fn connect(brokers: &[String], security: &Security, topic: &str) -> Result<Self, String> {
        let topic = Topic::connect(brokers, security, topic).await.map_err(|e| e.to_string())?;
        let mut partitions = Vec::new();
        for p in &topic.partitions {
            partitions.push(topic.partition(*p).await.map_err(|e| e.to_string())?);
        }
        Ok(Self { partitions })
    }

    /// The number of partitions.
    pub fn partitions(&self) -> i32 {
        self.partitions.len() as i32
    }

    /// Appends one message to `partition`; returns its offset.
    pub async fn send(&self, partition: i32, key: Option<Vec<u8>>, value: Option<Vec<u8>>) -> Result<i64, String> {
        let client = self
            .partitions
            .iter()
            .find(|c| c.partition() == partition)
            .ok_or_else(|| format!("no partition {partition}"))?;
        let record = rskafka::record::Record { key, value, headers: Default::default(), timestamp: chrono::Utc::now() };
        let offsets = client
            .produce(vec![record], rskafka::client::partition::Compression::NoCompression)
            .await
            .map_err(|e| format!("producing to partition {partition}: {e}"))?;
        offsets.first().copied().ok_or_else(|| "the broker returned no offset".into())
    }

    /// Appends `values` to `partition` as one record batch (one request); returns their
    /// offsets.
    pub async fn send_batch(&self, partition: i32, values: Vec<Vec<u8>>) -> Result<Vec<i64>, String> {
        let client = self
            .partitions
            .iter()
            .find(|c| c.partition() == partition)
            .ok_or_else(|| format!("no partition {partition}"))?;
        let now = chrono::Utc::now();
        let records = values
            .into_iter()
            .map(|v| rskafka::record::Record { key: None, value: Some(v), headers: Default::default(), timestamp: now })
            .collect();
        client
            .produce(records, rskafka::client::partition::Compression::NoCompression)
            .await
            .map_err(|e| format!("producing to partition {partition}: {e}"))
    }
}

/// Each partition's end offset (the offset the next message will get) right now.
pub async fn end_offsets(brokers: &[String], security: &Security, topic: &str) -> Result<Vec<(i32, i64)>, String> {
    let topic = Topic::connect(brokers, security, topic).await.map_err(|e| e.to_string())?;
    let mut ends = Vec::new();
    for p in &topic.partitions {
        let client = topic.partition(*p).await.map_err(|e| e.to_string())?;
        ends.push((*p, start_offset(&client, StartFrom::Latest).await.map_err(|e| e.to_string())?));
    }
    Ok(ends)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fetch responses as a Kafka broker answers READ_COMMITTED fetches of a partition that
    /// transactional producers (Kafka Streams, Flink, Debezium) write: record batches with
    /// their producer, control batches (markers) and the aborted transactions list. Written by
    /// hand from the protocol: tansu 0.6 refuses transactions, so none could be recorded here.
    fn batch(producer: i64, transactional: bool, offsets: std::ops::RangeInclusive<i64>) -> FetchedBatch {
        let records = offsets
            .clone()
            .map(|offset| rskafka::record::RecordAndOffset {
                record: rskafka::record::Record {
                    key: None,
                    value: Some(offset.to_string().into_bytes()),
                    headers: Default::default(),
                    timestamp: chrono::DateTime::from_timestamp_millis(0).unwrap(),
                },
                offset,
            })
            .collect();
        FetchedBatch {
            base_offset: *offsets.start(),
            last_offset: *offsets.end(),
            producer_id: producer,
            is_transactional: transactional,
            control: None,
            records,
        }
    }

    fn marker(producer: i64, offset: i64, marker: ControlMarker) -> FetchedBatch {
        FetchedBatch {
            base_offset: offset,
            last_offset: offset,
            producer_id: producer,
            is_transactional: true,
            control: Some(marker),
            records: Vec::new(),
        }
    }

    fn offsets(records: &[rskafka::record::RecordAndOffset]) -> Vec<i64> {
        records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn records_of_aborted_transactions_and_markers_are_never_read() {
        use ControlMarker::{Abort, Commit};
        let aborted = |producer_id, first_offset| AbortedTransaction { producer_id, first_offset };
        // Producer 7 aborts, a plain producer writes, producer 8 commits.
        let batches = vec![
            batch(7, true, 0..=1),
            marker(7, 2, Abort),
            batch(-1, false, 3..=4),
            batch(8, true, 5..=6),
            marker(8, 7, Commit),
        ];
        let (records, next) = read_committed(batches, &[aborted(7, 0)], 0);
        assert_eq!((offsets(&records), next), (vec![3, 4, 5, 6], 8));

        // Interleaved transactions; producer 1 aborts one and commits its next one.
        let batches = vec![
            batch(1, true, 0..=0),
            batch(2, true, 1..=1),
            marker(1, 2, Abort),
            marker(2, 3, Commit),
            batch(1, true, 4..=4),
            marker(1, 5, Commit),
        ];
        let (records, next) = read_committed(batches, &[aborted(1, 0)], 0);
        assert_eq!((offsets(&records), next), (vec![1, 4], 6));

        // A fetch from inside a batch keeps only what follows.
        let (records, next) = read_committed(vec![batch(-1, false, 0..=4)], &[], 2);
        assert_eq!((offsets(&records), next), (vec![2, 3, 4], 5));
    }

    #[test]
    fn a_partition_ending_in_a_commit_marker_moves_past_it() {
        // Upstream rskafka returned nothing and no way past the marker: the same offset was
        // fetched again in a tight loop, and the lag stayed 1.
        let (records, next) = read_committed(vec![marker(3, 10, ControlMarker::Commit)], &[], 10);
        assert!(records.is_empty());
        assert_eq!(next, 11);
        // An empty answer (nothing new) leaves the position.
        assert_eq!(read_committed(Vec::new(), &[], 11).1, 11);
    }

    #[test]
    fn every_partition_can_fetch_at_once_within_the_budget() {
        assert_eq!(fetch_bytes(4), 4 * 1024 * 1024);
        assert_eq!(fetch_bytes(128), 512 * 1024);
        assert_eq!(fetch_bytes(128) as usize * 128, FETCH_BUDGET_BYTES);
        // Past 256 partitions fetches stay at 256 KiB; they take turns for the budget.
        assert_eq!(fetch_bytes(10_000), 256 * 1024);
    }

    #[test]
    fn partitions_added_to_a_topic_are_found_once_each_and_a_vanished_one_is_an_error() {
        let mut watch = PartitionWatch::new([0, 1]);
        assert_eq!(watch.added(&[0, 1]).unwrap(), Vec::<i32>::new());
        // CreatePartitions from 2 to 5: three new ones, in any listing order.
        assert_eq!(watch.added(&[4, 0, 2, 1, 3]).unwrap(), [2, 3, 4]);
        assert_eq!(watch.added(&[0, 1, 2, 3, 4]).unwrap(), Vec::<i32>::new());
        let err = watch.added(&[0, 1, 2]).unwrap_err().to_string();
        assert!(err.contains("partition 3 is no longer listed"), "{err}");
    }
}
