//! The ingest loop: fetch every partition, buffer, and flush each buffer as ONE Delta commit
//! that records every partition's next offset, so that a crash anywhere loses and duplicates
//! nothing; positions always come back from the table.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arrow_array::{ArrayRef, BinaryArray, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use lakesync_core::{Classify, Version};
use lakesync_delta::compact::{compact, CompactOptions};
use lakesync_delta::protocol::ensure_writable;
use lakesync_delta::{AppPosition, Appended, DeltaError, DeltaTable, DeltaWriter, TableLayout};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::decode::{BadRecord, Decoder, Message};
use crate::kafka::{
    fetch_budget, fetch_bytes, fetch_loop, offset_range, start_offset, within, FetchError, Fetched, PartitionWatch,
    StartFrom, Topic, METADATA_REFRESH,
};
use crate::spec::{BadRecords, IngestSpec};
use crate::status::IngestStatus;
use crate::IngestError;

/// A flush also happens when this many bytes of messages are buffered.
const FLUSH_BYTES: usize = 64 * 1024 * 1024;

/// Runs the ingest until `stop` turns true (then flushes what it holds and returns `Ok`) or a
/// failure retrying cannot fix. Transient failures (brokers down, store hiccups, another
/// writer moved the positions) restart it from the table's positions, with backoff.
pub async fn run(
    mut spec: IngestSpec,
    status: Arc<IngestStatus>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let mut backoff = Duration::from_millis(500);
    // An operator's reset applies once: to the positions out of range when it starts.
    let mut reset = spec.reset_positions.take();
    loop {
        let started = Instant::now();
        let result = run_once(&spec, &mut reset, &status, &mut stop).await;
        let err = match result {
            Ok(()) => {
                status.update(|s| s.state = "stopped");
                return Ok(());
            }
            Err(e) => e,
        };
        let class = err.class();
        status.update(|s| {
            s.state = if class.is_retryable() { "retrying" } else { "failed" };
            s.last_error = Some(err.to_string());
            s.error_class = Some(class.as_str());
        });
        if !class.is_retryable() {
            tracing::error!(ingest = spec.name, error = %err, "ingest failed");
            return Err(err);
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        tracing::warn!(ingest = spec.name, error = %err, retry_in = ?backoff, "ingest interrupted; restarting from the table's positions");
        if *stop.borrow() {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Opens the ingest's tables, creating them when missing, and checks they can take its rows,
/// without touching Kafka: the daemon does this before it starts the tables synced from them,
/// so a fresh pipeline's sync finds its source.
pub async fn prepare(spec: &IngestSpec) -> Result<(), IngestError> {
    let spec = spec.clone();
    blocking(&spec.clone(), move || {
        open_target(&spec)?;
        if let BadRecords::DeadLetter(uri) = &spec.bad_records {
            open_dead_letters(&spec, uri)?;
        }
        Ok(())
    })
    .await
}

/// The table being written and how to decode into it.
struct Target {
    writer: DeltaWriter,
    decoder: Decoder,
}

/// The dead-letter table.
struct DeadLetters {
    uri: String,
    writer: DeltaWriter,
}

/// Messages held for the next flush.
#[derive(Default)]
struct Buffer {
    messages: Vec<Message>,
    /// Per partition, the offset after its last buffered message.
    next: BTreeMap<i32, i64>,
    bytes: usize,
    since: Option<Instant>,
}

impl Buffer {
    /// Adds a fetch of `partition`, whose buffered messages start at `floor`.
    fn push(&mut self, partition: i32, messages: Vec<Message>, floor: i64) {
        let mut next = self.next.get(&partition).copied().unwrap_or(floor);
        let before = self.messages.len();
        for m in messages {
            // Fetches only hand out increasing offsets; this keeps it true across fetches.
            if m.offset < next {
                continue;
            }
            next = m.offset + 1;
            self.bytes += m.size();
            self.messages.push(m);
        }
        if self.messages.len() > before {
            self.next.insert(partition, next);
            self.since.get_or_insert_with(Instant::now);
        }
    }
}

fn delta(spec: &IngestSpec) -> impl Fn(DeltaError) -> IngestError + '_ {
    |source| IngestError::Delta { name: spec.name.clone(), source: Box::new(source) }
}

fn fetch_error(spec: &IngestSpec, e: FetchError) -> IngestError {
    match e {
        FetchError::OutOfRange { partition, wanted, earliest, latest } => IngestError::PositionOutOfRange {
            name: spec.name.clone(),
            topic: spec.topic.clone(),
            partition,
            recorded: wanted,
            earliest,
            latest,
        },
        FetchError::Kafka { message, transient } => {
            IngestError::Kafka { name: spec.name.clone(), brokers: spec.brokers.join(","), message, transient }
        }
    }
}

fn internal(spec: &IngestSpec, message: impl ToString) -> IngestError {
    IngestError::Internal { name: spec.name.clone(), message: message.to_string() }
}

async fn blocking<T: Send + 'static>(
    spec: &IngestSpec,
    f: impl FnOnce() -> Result<T, IngestError> + Send + 'static,
) -> Result<T, IngestError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| internal(spec, e))?
}

async fn run_once(
    spec: &IngestSpec,
    reset: &mut Option<StartFrom>,
    status: &IngestStatus,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let target = Arc::new(
        blocking(spec, {
            let spec = spec.clone();
            move || open_target(&spec)
        })
        .await?,
    );
    let dead = match &spec.bad_records {
        BadRecords::Fail => None,
        BadRecords::DeadLetter(uri) => Some(Arc::new(
            blocking(spec, {
                let (spec, uri) = (spec.clone(), uri.clone());
                move || open_dead_letters(&spec, &uri)
            })
            .await?,
        )),
    };
    let timeout = spec.request_timeout;
    let topic = Topic::connect_within(&spec.brokers, &spec.security, &spec.topic, timeout)
        .await
        .map_err(|e| fetch_error(spec, e))?;
    let (recorded, dead_recorded) = recorded_positions(spec, &target, &dead, &topic.partitions).await?;
    let mut positions: BTreeMap<i32, Option<i64>> = topic.partitions.iter().copied().zip(recorded).collect();
    let mut dead_positions: BTreeMap<i32, Option<i64>> = topic.partitions.iter().copied().zip(dead_recorded).collect();

    // Every recorded position must be inside what its partition holds now; one that is not
    // (a recreated topic, a truncated log, retention) stops the ingest until an operator
    // resets it.
    let mut clients = BTreeMap::new();
    let mut resets = Vec::new();
    for (&partition, &at) in &positions {
        let what = format!("partition {partition}");
        let client = within(timeout, &what, topic.partition(partition)).await.map_err(|e| fetch_error(spec, e))?;
        if let Some(recorded) = at {
            let (earliest, latest) =
                within(timeout, &what, offset_range(&client)).await.map_err(|e| fetch_error(spec, e))?;
            if !(earliest..=latest).contains(&recorded) {
                let Some(to) = *reset else {
                    return Err(fetch_error(
                        spec,
                        FetchError::OutOfRange { partition, wanted: recorded, earliest, latest },
                    ));
                };
                let new = if to == StartFrom::Earliest { earliest } else { latest };
                resets.push(Reset { partition, recorded, new, earliest, latest, to });
            }
        }
        clients.insert(partition, client);
    }
    if reset.is_some() && resets.is_empty() {
        tracing::info!(
            ingest = spec.name,
            "reset requested, but every recorded position is inside its partition: nothing reset"
        );
    }
    if !resets.is_empty() {
        reset_positions(spec, &target, &dead, &resets, &dead_positions).await?;
        for r in &resets {
            positions.insert(r.partition, Some(r.new));
            if let Some(at) = dead_positions.get_mut(&r.partition).and_then(Option::as_mut) {
                *at = r.new;
            }
        }
    }

    *reset = None;

    let (tx, mut rx) = mpsc::channel(4 * topic.partitions.len().max(1));
    let budget = fetch_budget();
    let fetch_size = fetch_bytes(positions.len());
    let mut fetchers = JoinSet::new();
    let mut floors = BTreeMap::new();
    for (&partition, &at) in &positions {
        let client = clients.remove(&partition).expect("a client per partition");
        let from = match at {
            Some(offset) => offset,
            None => within(timeout, &format!("partition {partition}"), start_offset(&client, spec.start))
                .await
                .map_err(|e| fetch_error(spec, e))?,
        };
        floors.insert(partition, from);
        fetchers.spawn(fetch_loop(client, from, fetch_size, budget.clone(), timeout, tx.clone()));
    }
    let mut watch = PartitionWatch::new(topic.partitions.iter().copied());
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + METADATA_REFRESH, METADATA_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status.update(|s| {
        s.state = "running";
        s.last_error = None;
        s.error_class = None;
        for (p, at) in &positions {
            s.partitions.entry(*p).or_default().committed = *at;
        }
    });
    tracing::info!(
        ingest = spec.name,
        topic = spec.topic,
        table = spec.table,
        partitions = positions.len(),
        "ingest running"
    );

    let mut buffer = Buffer::default();
    let mut commits_since_compaction = 0u64;
    loop {
        let deadline = buffer.since.map(|t| tokio::time::Instant::from_std(t + spec.flush_interval));
        let flush_now = tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    if !buffer.messages.is_empty() {
                        let held = std::mem::take(&mut buffer);
                        flush(spec, status, &target, &dead, held, &mut positions, &mut dead_positions, false).await?;
                    }
                    return Ok(());
                }
                false
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => true,
            _ = refresh.tick() => {
                let listed = within(timeout, "listing the topic's partitions", topic.list_partitions())
                    .await
                    .map_err(|e| fetch_error(spec, e))?;
                let added = watch.added(&listed).map_err(|e| fetch_error(spec, e))?;
                if !added.is_empty() {
                    start_partitions(spec, &topic, &target, &dead, &added, &mut positions, &mut dead_positions, &mut floors, (&tx, &budget, fetch_size), &mut fetchers).await?;
                    tracing::info!(ingest = spec.name, topic = spec.topic, partitions = ?added, "partitions added to the topic; reading them from their first message");
                }
                false
            }
            item = rx.recv() => match item {
                Some(Ok(fetched)) => {
                    let p = fetched.partition;
                    buffer.push(p, fetched.messages, floors[&p]);
                    // Nothing of it held: everything before `next` is in the table or was not a
                    // message (a transaction marker, an aborted record).
                    let idle = !buffer.next.contains_key(&p);
                    status.update(|s| {
                        let progress = s.partitions.entry(p).or_default();
                        progress.high_watermark = fetched.high_watermark;
                        if idle {
                            progress.read_to = Some(fetched.next);
                        }
                    });
                    buffer.messages.len() >= spec.flush_rows || buffer.bytes >= FLUSH_BYTES
                }
                Some(Err(e)) => return Err(fetch_error(spec, e)),
                None => return Err(internal(spec, "every partition's fetcher ended")),
            },
        };
        if flush_now && !buffer.messages.is_empty() {
            // Offsets after the flush: where the next buffer's partitions continue.
            floors.extend(buffer.next.iter().map(|(p, n)| (*p, *n)));
            let held = std::mem::take(&mut buffer);
            commits_since_compaction += 1;
            let compact_now = spec.compact_every > 0 && commits_since_compaction >= spec.compact_every;
            if compact_now {
                commits_since_compaction = 0;
            }
            flush(spec, status, &target, &dead, held, &mut positions, &mut dead_positions, compact_now).await?;
        }
    }
}

/// The positions the table, and the dead-letter table if any, record for `partitions`, in
/// their order (`None` where none).
async fn recorded_positions(
    spec: &IngestSpec,
    target: &Arc<Target>,
    dead: &Option<Arc<DeadLetters>>,
    partitions: &[i32],
) -> Result<(Vec<Option<i64>>, Vec<Option<i64>>), IngestError> {
    let ids: Vec<String> = partitions.iter().map(|p| spec.app_id(*p)).collect();
    blocking(spec, {
        let (spec, target, dead) = (spec.clone(), target.clone(), dead.clone());
        move || {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let main = target.writer.app_versions(&ids).map_err(delta(&spec))?;
            let dead = match &dead {
                Some(d) => d.writer.app_versions(&ids).map_err(delta(&spec))?,
                None => vec![None; ids.len()],
            };
            Ok((main, dead))
        }
    })
    .await
}

/// Starts reading partitions added to the topic while the ingest runs: from the positions the
/// table records for them (another ingest under this name may have seen them first), else
/// from their first message (everything in them is newer than the ingest).
#[allow(clippy::too_many_arguments)]
async fn start_partitions(
    spec: &IngestSpec,
    topic: &Topic,
    target: &Arc<Target>,
    dead: &Option<Arc<DeadLetters>>,
    added: &[i32],
    positions: &mut BTreeMap<i32, Option<i64>>,
    dead_positions: &mut BTreeMap<i32, Option<i64>>,
    floors: &mut BTreeMap<i32, i64>,
    (tx, budget, fetch_size): (&mpsc::Sender<Result<Fetched, FetchError>>, &Arc<tokio::sync::Semaphore>, i32),
    fetchers: &mut JoinSet<()>,
) -> Result<(), IngestError> {
    let (recorded, dead_recorded) = recorded_positions(spec, target, dead, added).await?;
    for ((&partition, at), dead_at) in added.iter().zip(recorded).zip(dead_recorded) {
        let what = format!("partition {partition}");
        let client =
            within(spec.request_timeout, &what, topic.partition(partition)).await.map_err(|e| fetch_error(spec, e))?;
        let from = match at {
            Some(offset) => offset,
            None => within(spec.request_timeout, &what, start_offset(&client, StartFrom::Earliest))
                .await
                .map_err(|e| fetch_error(spec, e))?,
        };
        positions.insert(partition, at);
        dead_positions.insert(partition, dead_at);
        floors.insert(partition, from);
        fetchers.spawn(fetch_loop(client, from, fetch_size, budget.clone(), spec.request_timeout, tx.clone()));
    }
    Ok(())
}

/// A partition's position moved by an operator's `--reset-positions`.
struct Reset {
    partition: i32,
    recorded: i64,
    new: i64,
    earliest: i64,
    latest: i64,
    to: StartFrom,
}

/// Commits the resets: to the dead-letter table first (its positions say which dead letters it
/// holds; they must not hide the re-read ones), then to the table, each one commit without
/// rows whose `operationMetrics` record what moved and why.
async fn reset_positions(
    spec: &IngestSpec,
    target: &Arc<Target>,
    dead: &Option<Arc<DeadLetters>>,
    resets: &[Reset],
    dead_positions: &BTreeMap<i32, Option<i64>>,
) -> Result<(), IngestError> {
    let why: Vec<(String, String)> = resets
        .iter()
        .map(|r| {
            let to = r.to.as_str();
            (
                format!("lakesync.resetPositions.{}.{}", spec.topic, r.partition),
                format!("{} -> {} ({to}; the partition held {}..{})", r.recorded, r.new, r.earliest, r.latest),
            )
        })
        .collect();
    for r in resets {
        tracing::warn!(
            ingest = spec.name,
            topic = spec.topic,
            partition = r.partition,
            recorded = r.recorded,
            new = r.new,
            earliest = r.earliest,
            latest = r.latest,
            "resetting the partition's position, as the operator asked"
        );
    }
    let (spec, target, dead) = (spec.clone(), target.clone(), dead.clone());
    let main: Vec<AppPosition> = resets
        .iter()
        .map(|r| AppPosition { app_id: spec.app_id(r.partition), from: Some(r.recorded), to: r.new })
        .collect();
    let side: Vec<AppPosition> = resets
        .iter()
        .filter_map(|r| {
            let at = dead_positions.get(&r.partition).copied().flatten()?;
            (at != r.new).then(|| AppPosition { app_id: spec.app_id(r.partition), from: Some(at), to: r.new })
        })
        .collect();
    blocking(&spec.clone(), move || {
        if let (Some(dead), false) = (&dead, side.is_empty()) {
            if let Appended::Moved(_) = dead.writer.reset_positions(&side, &why).map_err(delta(&spec))? {
                return Err(IngestError::Moved { name: spec.name.clone(), table: dead.uri.clone() });
            }
        }
        if let Appended::Moved(_) = target.writer.reset_positions(&main, &why).map_err(delta(&spec))? {
            return Err(IngestError::Moved { name: spec.name.clone(), table: spec.table.clone() });
        }
        Ok(())
    })
    .await
}

/// Writes `held` as one commit (after its dead letters, if any, as one commit to the
/// dead-letter table), then checkpoints and compacts when due.
#[allow(clippy::too_many_arguments)]
async fn flush(
    spec: &IngestSpec,
    status: &IngestStatus,
    target: &Arc<Target>,
    dead: &Option<Arc<DeadLetters>>,
    held: Buffer,
    positions: &mut BTreeMap<i32, Option<i64>>,
    dead_positions: &mut BTreeMap<i32, Option<i64>>,
    compact_now: bool,
) -> Result<(), IngestError> {
    let work = {
        let (spec, target, dead) = (spec.clone(), target.clone(), dead.clone());
        let (positions, dead_positions) = (positions.clone(), dead_positions.clone());
        move || write_flush(&spec, &target, dead.as_deref(), &held, &positions, &dead_positions, compact_now)
    };
    let t = Instant::now();
    let out = blocking(spec, work).await?;
    tracing::debug!(
        ingest = spec.name,
        version = out.version,
        rows = out.rows,
        dead_letters = out.dead_letters,
        ms = t.elapsed().as_millis() as u64,
        "committed"
    );
    for (p, next) in &out.committed {
        positions.insert(*p, Some(*next));
    }
    for (p, next) in &out.dead_committed {
        dead_positions.insert(*p, Some(*next));
    }
    status.update(|s| {
        s.rows += out.rows;
        s.bytes += out.bytes;
        s.dead_letters += out.dead_letters;
        s.commits += 1;
        s.files += out.files as u64;
        s.compactions += u64::from(out.compacted);
        s.table_version = out.version.or(s.table_version);
        s.last_commit_at = Some(SystemTime::now());
        for (p, next) in &out.committed {
            s.partitions.entry(*p).or_default().committed = Some(*next);
        }
    });
    Ok(())
}

struct Flushed {
    version: Option<Version>,
    committed: Vec<(i32, i64)>,
    dead_committed: Vec<(i32, i64)>,
    rows: u64,
    bytes: u64,
    dead_letters: u64,
    files: usize,
    compacted: bool,
}

fn write_flush(
    spec: &IngestSpec,
    target: &Target,
    dead: Option<&DeadLetters>,
    held: &Buffer,
    positions: &BTreeMap<i32, Option<i64>>,
    dead_positions: &BTreeMap<i32, Option<i64>>,
    compact_now: bool,
) -> Result<Flushed, IngestError> {
    let decoded = target.decoder.decode(&held.messages).map_err(|e| internal(spec, e))?;
    let mut dead_committed = Vec::new();
    let mut dead_letters = 0;
    if let Some(first) = decoded.bad.first() {
        let Some(dead) = dead else {
            let m = &held.messages[first.index];
            return Err(IngestError::BadRecord {
                name: spec.name.clone(),
                topic: spec.topic.clone(),
                partition: m.partition,
                offset: m.offset,
                reason: first.reason.clone(),
            });
        };
        // Dead letters the table already holds (committed before a crash that came before
        // the main commit) are not written again.
        let fresh: Vec<&BadRecord> = decoded
            .bad
            .iter()
            .filter(|b| {
                let m = &held.messages[b.index];
                dead_positions.get(&m.partition).copied().flatten().is_none_or(|at| m.offset >= at)
            })
            .collect();
        let partitions: std::collections::BTreeSet<i32> =
            fresh.iter().map(|b| held.messages[b.index].partition).collect();
        if !partitions.is_empty() {
            let at: Vec<AppPosition> = partitions
                .iter()
                .map(|p| AppPosition { app_id: spec.app_id(*p), from: dead_positions[p], to: held.next[p] })
                .collect();
            let rows = dead_letter_rows(spec, &held.messages, &fresh).map_err(|e| internal(spec, e))?;
            match dead.writer.append_once(&[rows], &at).map_err(delta(spec))? {
                Appended::Committed { .. } | Appended::AlreadyCommitted => {}
                Appended::Moved(_) => {
                    return Err(IngestError::Moved { name: spec.name.clone(), table: dead.uri.clone() })
                }
            }
            dead_committed = partitions.iter().map(|p| (*p, held.next[p])).collect();
            dead_letters = fresh.len() as u64;
        }
    }
    let at: Vec<AppPosition> = held
        .next
        .iter()
        .map(|(p, next)| AppPosition { app_id: spec.app_id(*p), from: positions.get(p).copied().flatten(), to: *next })
        .collect();
    let rows = decoded.rows.num_rows() as u64;
    let bytes = held.bytes as u64;
    let (version, files) = match target.writer.append_once(&[decoded.rows], &at).map_err(delta(spec))? {
        Appended::Committed { version, files } => (Some(version), files),
        Appended::AlreadyCommitted => (None, 0),
        Appended::Moved(_) => return Err(IngestError::Moved { name: spec.name.clone(), table: spec.table.clone() }),
    };
    let mut compacted = false;
    if compact_now {
        let options = CompactOptions {
            target_file_size: spec.target_file_size,
            min_files: 10,
            checkpoint_every: spec.checkpoint_every,
            upgrade_protocol: spec.upgrade_protocol,
        };
        // A failed compaction leaves the table as it was: log it, keep ingesting.
        match compact(&spec.table, &spec.storage, &options) {
            Ok(report) => {
                compacted = report.version.is_some();
                tracing::info!(
                    ingest = spec.name,
                    files_removed = report.files_removed,
                    files_added = report.files_added,
                    "compacted"
                );
            }
            Err(e) => tracing::warn!(ingest = spec.name, error = %e, "compaction failed; the table is unchanged"),
        }
    } else {
        target.writer.checkpoint_if_due(spec.checkpoint_every).map_err(delta(spec))?;
    }
    Ok(Flushed {
        version,
        committed: held.next.iter().map(|(p, n)| (*p, *n)).collect(),
        dead_committed,
        rows,
        bytes,
        dead_letters,
        files,
        compacted,
    })
}

/// Whether `uri` is a local path (the directory must exist before the kernel writes there).
fn local_dir(uri: &str) -> Option<std::path::PathBuf> {
    match uri.split_once("://") {
        None => Some(uri.into()),
        Some(("file", path)) => Some(path.into()),
        Some(_) => None,
    }
}

/// Opens the table, creating it (change data feed on) when missing, and checks it can take
/// this ingest's rows.
fn open_target(spec: &IngestSpec) -> Result<Target, IngestError> {
    let table_err =
        |message: String| IngestError::Table { name: spec.name.clone(), table: spec.table.clone(), message };
    let declared = spec.schema.as_ref().map(|s| {
        let mut fields: Vec<Field> = s.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.extend(spec.kafka_columns.iter().map(|c| c.field()));
        Arc::new(Schema::new(fields))
    });
    let layout = match existing_layout(spec, &spec.table)? {
        Some(layout) => layout,
        None => {
            let Some(schema) = &declared else {
                return Err(table_err(
                    "the table does not exist; give a schema (--schema or `schema`) to create it".into(),
                ));
            };
            create_table(spec, &spec.table, schema, &spec.partition_by, &[("delta.enableChangeDataFeed", "true")])?;
            existing_layout(spec, &spec.table)?
                .ok_or_else(|| table_err("the table was created but cannot be read".into()))?
        }
    };
    check_layout(spec, &spec.table, &layout)?;
    if let Some(schema) = &declared {
        check_same_columns(schema, &layout.schema).map_err(table_err)?;
    }
    for column in &spec.kafka_columns {
        if layout.schema.field_with_name(&column.name()).is_err() {
            return Err(table_err(format!(
                "the table has no column {} for the Kafka {} (add it, or leave it out of kafka_columns)",
                column.name(),
                column.short()
            )));
        }
    }
    if !spec.partition_by.is_empty() && spec.partition_by != layout.partition_columns {
        return Err(table_err(format!(
            "the table is partitioned by {:?}, not {:?}",
            layout.partition_columns, spec.partition_by
        )));
    }
    let writer = DeltaWriter::open_with(&spec.table, &spec.storage).map_err(delta(spec))?;
    Ok(Target { writer, decoder: Decoder::new(&spec.topic, layout.schema.clone()) })
}

/// The dead-letter table's columns.
fn dead_letter_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("ingest", DataType::Utf8, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("kafka_timestamp", ts.clone(), true),
        Field::new("key", DataType::Binary, true),
        Field::new("value", DataType::Binary, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("failed_at", ts, false),
    ]))
}

fn open_dead_letters(spec: &IngestSpec, uri: &str) -> Result<DeadLetters, IngestError> {
    let layout = match existing_layout(spec, uri)? {
        Some(layout) => layout,
        None => {
            create_table(spec, uri, &dead_letter_schema(), &[], &[])?;
            existing_layout(spec, uri)?.ok_or_else(|| IngestError::Table {
                name: spec.name.clone(),
                table: uri.to_string(),
                message: "the dead-letter table was created but cannot be read".into(),
            })?
        }
    };
    check_layout(spec, uri, &layout)?;
    check_same_columns(&dead_letter_schema(), &layout.schema).map_err(|message| IngestError::Table {
        name: spec.name.clone(),
        table: uri.to_string(),
        message: format!("not a dead-letter table: {message}"),
    })?;
    Ok(DeadLetters { uri: uri.to_string(), writer: DeltaWriter::open_with(uri, &spec.storage).map_err(delta(spec))? })
}

fn existing_layout(spec: &IngestSpec, uri: &str) -> Result<Option<TableLayout>, IngestError> {
    if let Some(dir) = local_dir(uri) {
        if !dir.join("_delta_log").exists() {
            return Ok(None);
        }
    } else {
        match DeltaTable::open_with(uri, &spec.storage).and_then(|t| t.snapshot(None)) {
            Ok(_) => {}
            Err(DeltaError::NotATable { .. }) => return Ok(None),
            Err(e) => return Err(delta(spec)(e)),
        }
    }
    let writer = DeltaWriter::open_with(uri, &spec.storage).map_err(delta(spec))?;
    // A table on a legacy protocol (Spark's and delta-rs's change-feed tables) is upgraded
    // only with the user's consent; one lakesync cannot write is refused, naming why.
    let flag = "--upgrade-protocol (upgrade_protocol = true in [[ingest]])";
    if let Some((version, upgrade)) = ensure_writable(&writer, spec.upgrade_protocol, flag).map_err(delta(spec))? {
        tracing::info!(ingest = spec.name, table = uri, version, %upgrade, "upgraded the table's protocol");
    }
    writer.layout().map(Some).map_err(delta(spec))
}

fn create_table(
    spec: &IngestSpec,
    uri: &str,
    schema: &Schema,
    partition_by: &[String],
    properties: &[(&str, &str)],
) -> Result<(), IngestError> {
    if let Some(dir) = local_dir(uri) {
        std::fs::create_dir_all(&dir).map_err(|e| IngestError::Table {
            name: spec.name.clone(),
            table: uri.to_string(),
            message: format!("cannot create directory {}: {e}", dir.display()),
        })?;
    }
    let partition_by: Vec<&str> = partition_by.iter().map(String::as_str).collect();
    match DeltaWriter::create_at(uri, &spec.storage, schema, &partition_by, properties) {
        Ok(_) => {
            tracing::info!(ingest = spec.name, table = uri, "created the table");
            Ok(())
        }
        // Another process created it first: use theirs (the layout checks follow).
        Err(_) if existing_layout(spec, uri)?.is_some() => Ok(()),
        Err(e) => Err(delta(spec)(e)),
    }
}

/// Refuses a table whose `txn` versions expire: the ingest's positions would be forgotten
/// and messages ingested twice.
fn check_layout(spec: &IngestSpec, uri: &str, layout: &TableLayout) -> Result<(), IngestError> {
    if let Some(retention) = layout.txn_retention {
        return Err(IngestError::Table {
            name: spec.name.clone(),
            table: uri.to_string(),
            message: format!(
                "the table sets delta.setTransactionRetentionDuration ({} s): the Kafka positions the ingest records in \
                 the table would expire and messages would be ingested twice. Unset it: \
                 ALTER TABLE delta.`{uri}` UNSET TBLPROPERTIES ('delta.setTransactionRetentionDuration')",
                retention.as_secs()
            ),
        });
    }
    Ok(())
}

/// Whether `expected`'s columns are `actual`'s (names, types; a nullable column may be
/// declared NOT NULL in the table, not the other way around).
fn check_same_columns(expected: &Schema, actual: &Schema) -> Result<(), String> {
    for field in expected.fields() {
        let Ok(found) = actual.field_with_name(field.name()) else {
            return Err(format!("the table has no column {}", field.name()));
        };
        if found.data_type() != field.data_type() {
            return Err(format!(
                "column {} is {} in the table, not {} as declared",
                field.name(),
                found.data_type(),
                field.data_type()
            ));
        }
    }
    for field in actual.fields() {
        if expected.field_with_name(field.name()).is_err() {
            return Err(format!("the table has column {}, which the declared schema lacks", field.name()));
        }
    }
    Ok(())
}

fn dead_letter_rows(
    spec: &IngestSpec,
    messages: &[Message],
    bad: &[&BadRecord],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let m = |b: &&BadRecord| &messages[b.index];
    let now = chrono::Utc::now().timestamp_micros();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(bad.iter().map(|_| spec.name.as_str()))),
        Arc::new(StringArray::from_iter_values(bad.iter().map(|_| spec.topic.as_str()))),
        Arc::new(Int32Array::from_iter_values(bad.iter().map(|b| m(b).partition))),
        Arc::new(Int64Array::from_iter_values(bad.iter().map(|b| m(b).offset))),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(bad.iter().map(|b| m(b).timestamp_ms.saturating_mul(1000)))
                .with_timezone("UTC"),
        ),
        Arc::new(BinaryArray::from_iter(bad.iter().map(|b| m(b).key.as_deref()))),
        Arc::new(BinaryArray::from_iter(bad.iter().map(|b| m(b).value.as_deref()))),
        Arc::new(StringArray::from_iter_values(bad.iter().map(|b| b.reason.as_str()))),
        Arc::new(StringArray::from_iter_values(bad.iter().map(|b| b.detail.as_str()))),
        Arc::new(TimestampMicrosecondArray::from_iter_values(bad.iter().map(|_| now)).with_timezone("UTC")),
    ];
    RecordBatch::try_new(dead_letter_schema(), columns)
}
