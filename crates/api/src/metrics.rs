//! `/metrics` in the OpenMetrics text format, encoded by `prometheus-client` (the Prometheus
//! project's Rust client) from the daemon's live status on each scrape: a [`Collector`] per
//! scrape, so nothing is kept twice and a table that goes, goes from the scrape.

use std::fmt::Error;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use lakesync_engine::daemon::DURATION_BUCKETS;
use lakesync_engine::{IngestWorker, Worker};
use lakesync_ingest::IngestState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::AppState;

/// `GET /metrics`
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = render(state.daemon.tables(), state.daemon.ingests());
    let mut r = text.into_response();
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    r
}

/// The exposition of `tables` and `ingests`.
pub fn render(tables: Vec<Arc<Worker>>, ingests: Vec<Arc<IngestWorker>>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Tables(tables)));
    registry.register_collector(Box::new(Ingests(ingests)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

type Labels = Vec<(&'static str, String)>;

/// One family: its samples, each a label set and what to encode for it.
fn family<'a, T: 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, T)>,
    mut encode: impl FnMut(&T, MetricEncoder) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        encode(&value, metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(v: &i64, e: MetricEncoder) -> Result<(), Error> {
    ConstGauge::new(*v).encode(e)
}

fn gauge_f64(v: &f64, e: MetricEncoder) -> Result<(), Error> {
    ConstGauge::new(*v).encode(e)
}

fn counter(v: &u64, e: MetricEncoder) -> Result<(), Error> {
    ConstCounter::new(*v).encode(e)
}

/// Every table's gauges, counters and run-duration histogram. In a fleet, the source version,
/// lag and failing gauges come only from the replica that runs the table (the others do not
/// look at its source); the counters are this process's. An unknown value has no sample.
struct Tables(Vec<Arc<Worker>>);

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|w| &w.spec.name)).finish()
    }
}

impl Collector for Tables {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        let e = &mut encoder;
        let table = |w: &Worker| vec![("table", w.spec.name.clone())];
        let owned: Vec<&Arc<Worker>> = self.0.iter().filter(|w| w.owned()).collect();
        let per = |ws: &[&Arc<Worker>], f: &dyn Fn(&Worker) -> Option<i64>| -> Vec<(Labels, i64)> {
            ws.iter().filter_map(|w| f(w).map(|v| (table(w), v))).collect()
        };
        let all: Vec<&Arc<Worker>> = self.0.iter().collect();
        let synced = per(&all, &|w| w.status().synced_version.map(|v| v as i64));
        family(
            e,
            "lakesync_synced_version",
            "Delta version the Postgres table holds.",
            MetricType::Gauge,
            synced,
            gauge,
        )?;
        let source = per(&owned, &|w| w.status().source_version.map(|v| v as i64));
        family(
            e,
            "lakesync_source_version",
            "Newest Delta version seen in the source log.",
            MetricType::Gauge,
            source,
            gauge,
        )?;
        let lag = per(&owned, &|w| w.status().lag_versions().map(|v| v as i64));
        family(e, "lakesync_lag_versions", "Delta versions not yet synced.", MetricType::Gauge, lag, gauge)?;
        let lag_s: Vec<(Labels, f64)> = owned.iter().map(|w| (table(w), w.status().lag_seconds())).collect();
        family(
            e,
            "lakesync_lag_seconds",
            "Age of the oldest Delta commit not yet synced (0 when caught up).",
            MetricType::Gauge,
            lag_s,
            gauge_f64,
        )?;
        let failing = per(&owned, &|w| {
            let s = w.status();
            Some(i64::from(s.consecutive_failures > 0 || s.parked.is_some()))
        });
        family(
            e,
            "lakesync_failing",
            "1 when the last run failed (retrying or parked).",
            MetricType::Gauge,
            failing,
            gauge,
        )?;
        let ownership = per(&all, &|w| Some(i64::from(w.owned())));
        family(e, "lakesync_table_owned", "1 when this replica runs the table.", MetricType::Gauge, ownership, gauge)?;
        let rows = self.0.iter().flat_map(|w| {
            let m = &w.metrics;
            [("insert", &m.rows_inserted), ("update", &m.rows_updated), ("delete", &m.rows_deleted)].map(|(op, c)| {
                (vec![("table", w.spec.name.clone()), ("op", op.to_string())], c.load(Ordering::Relaxed))
            })
        });
        family(
            e,
            "lakesync_rows_applied",
            "Rows written to Postgres by operation.",
            MetricType::Counter,
            rows,
            counter,
        )?;
        let runs = self.0.iter().flat_map(|w| {
            let m = &w.metrics;
            [("applied", &m.runs_applied), ("noop", &m.runs_noop), ("failed", &m.runs_failed)].map(|(outcome, c)| {
                (vec![("table", w.spec.name.clone()), ("outcome", outcome.to_string())], c.load(Ordering::Relaxed))
            })
        });
        family(
            e,
            "lakesync_runs",
            "Sync runs by outcome (applied, noop, failed).",
            MetricType::Counter,
            runs,
            counter,
        )?;
        let durations = self.0.iter().map(|w| (table(w), w.clone()));
        family(
            e,
            "lakesync_run_duration_seconds",
            "Wall time of sync runs.",
            MetricType::Histogram,
            durations,
            |w, mut encoder| {
                let m = &w.metrics;
                let count = m.duration_count.load(Ordering::Relaxed);
                let sum = m.duration_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
                // The daemon counts cumulatively (each bucket holds the runs at or under its
                // bound); the encoder wants each bucket's own runs.
                let mut below = 0;
                let mut buckets: Vec<(f64, u64)> = DURATION_BUCKETS
                    .iter()
                    .zip(&m.duration_buckets)
                    .map(|(bound, c)| {
                        let cumulative = c.load(Ordering::Relaxed);
                        let own = cumulative.saturating_sub(below);
                        below = cumulative.max(below);
                        (*bound, own)
                    })
                    .collect();
                buckets.push((f64::MAX, count.saturating_sub(below)));
                encoder.encode_histogram::<Labels>(sum, count, &buckets, None)
            },
        )
    }
}

/// Every ingest's lag and committed offset per partition, and its counters.
struct Ingests(Vec<Arc<IngestWorker>>);

impl std::fmt::Debug for Ingests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|w| &w.spec.name)).finish()
    }
}

impl Collector for Ingests {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        let e = &mut encoder;
        let states: Vec<(String, IngestState)> = self.0.iter().map(|w| (w.spec.name.clone(), w.status.get())).collect();
        let partitions = |f: &dyn Fn(&lakesync_ingest::PartitionProgress) -> Option<i64>| -> Vec<(Labels, i64)> {
            states
                .iter()
                .flat_map(|(name, s)| {
                    s.partitions.iter().filter_map(move |(p, progress)| {
                        f(progress).map(|v| (vec![("ingest", name.clone()), ("partition", p.to_string())], v))
                    })
                })
                .collect()
        };
        family(
            e,
            "lakesync_ingest_lag_messages",
            "Messages in the Kafka partition not yet committed to the Delta table.",
            MetricType::Gauge,
            partitions(&|p| Some(p.lag())),
            gauge,
        )?;
        family(
            e,
            "lakesync_ingest_committed_offset",
            "Next offset the Delta table records per partition.",
            MetricType::Gauge,
            partitions(&|p| p.committed),
            gauge,
        )?;
        type Field = fn(&IngestState) -> u64;
        let counters: [(&str, &str, Field); 6] = [
            ("lakesync_ingest_rows", "Messages written to the Delta table as rows.", |s| s.rows),
            ("lakesync_ingest_bytes", "Bytes of message keys and values written.", |s| s.bytes),
            ("lakesync_ingest_commits", "Delta commits written by the ingest.", |s| s.commits),
            ("lakesync_ingest_files", "Data files written by the ingest.", |s| s.files),
            ("lakesync_ingest_dead_letters", "Messages set aside in the dead-letter table.", |s| s.dead_letters),
            ("lakesync_ingest_compactions", "Compactions of the ingest's table.", |s| s.compactions),
        ];
        for (name, help, value) in counters {
            let samples = states.iter().map(|(n, s)| (vec![("ingest", n.clone())], value(s)));
            family(e, name, help, MetricType::Counter, samples, counter)?;
        }
        let failing = states.iter().map(|(n, s)| (vec![("ingest", n.clone())], i64::from(s.last_error.is_some())));
        family(
            e,
            "lakesync_ingest_failing",
            "1 when the ingest is retrying or stopped on an error.",
            MetricType::Gauge,
            failing,
            gauge,
        )
    }
}
