//! `/metrics` in the Prometheus text format (version 0.0.4).

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use lakesync_engine::daemon::DURATION_BUCKETS;
use lakesync_engine::{IngestWorker, Worker};
use lakesync_ingest::IngestState;

use crate::AppState;

/// `GET /metrics`
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut text = render(&state.daemon.tables());
    text.push_str(&render_ingests(&state.daemon.ingests()));
    let mut r = text.into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders every table's gauges, counters and run-duration histogram. In a fleet, the source
/// version, lag and failing gauges come only from the replica that runs the table (the
/// others do not look at its source); the counters are this process's.
pub fn render(tables: &[Arc<Worker>]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &mut dyn FnMut(&Worker, &str, &mut String)| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for w in tables {
            samples(w, &label(&w.spec.name), &mut out);
        }
    };
    let gauge = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_else(|| "NaN".into());
    family("lakesync_synced_version", "gauge", "Delta version the Postgres table holds.", &mut |w, t, o| {
        let _ = writeln!(
            o,
            "lakesync_synced_version{{table=\"{t}\"}} {}",
            gauge(w.status().synced_version.map(|v| v as f64))
        );
    });
    family("lakesync_source_version", "gauge", "Newest Delta version seen in the source log.", &mut |w, t, o| {
        if !w.owned() {
            return; // the owner reports it
        }
        let _ = writeln!(
            o,
            "lakesync_source_version{{table=\"{t}\"}} {}",
            gauge(w.status().source_version.map(|v| v as f64))
        );
    });
    family("lakesync_lag_versions", "gauge", "Delta versions not yet synced.", &mut |w, t, o| {
        if !w.owned() {
            return; // the owner reports it
        }
        let _ = writeln!(
            o,
            "lakesync_lag_versions{{table=\"{t}\"}} {}",
            gauge(w.status().lag_versions().map(|v| v as f64))
        );
    });
    family(
        "lakesync_lag_seconds",
        "gauge",
        "Age of the oldest Delta commit not yet synced (0 when caught up).",
        &mut |w, t, o| {
            if !w.owned() {
                return; // the owner reports it
            }
            let _ = writeln!(o, "lakesync_lag_seconds{{table=\"{t}\"}} {}", w.status().lag_seconds());
        },
    );
    family("lakesync_failing", "gauge", "1 when the last run failed (retrying or parked).", &mut |w, t, o| {
        if !w.owned() {
            return; // the owner reports it
        }
        let s = w.status();
        let _ = writeln!(
            o,
            "lakesync_failing{{table=\"{t}\"}} {}",
            u8::from(s.consecutive_failures > 0 || s.parked.is_some())
        );
    });
    family("lakesync_table_owned", "gauge", "1 when this replica runs the table.", &mut |w, t, o| {
        let _ = writeln!(o, "lakesync_table_owned{{table=\"{t}\"}} {}", u8::from(w.owned()));
    });
    family("lakesync_rows_applied_total", "counter", "Rows written to Postgres by operation.", &mut |w, t, o| {
        let m = &w.metrics;
        for (op, c) in [("insert", &m.rows_inserted), ("update", &m.rows_updated), ("delete", &m.rows_deleted)] {
            let _ =
                writeln!(o, "lakesync_rows_applied_total{{table=\"{t}\",op=\"{op}\"}} {}", c.load(Ordering::Relaxed));
        }
    });
    family("lakesync_runs_total", "counter", "Sync runs by outcome (applied, noop, failed).", &mut |w, t, o| {
        let m = &w.metrics;
        for (outcome, c) in [("applied", &m.runs_applied), ("noop", &m.runs_noop), ("failed", &m.runs_failed)] {
            let _ =
                writeln!(o, "lakesync_runs_total{{table=\"{t}\",outcome=\"{outcome}\"}} {}", c.load(Ordering::Relaxed));
        }
    });
    family("lakesync_run_duration_seconds", "histogram", "Wall time of sync runs.", &mut |w, t, o| {
        let m = &w.metrics;
        for (bound, bucket) in DURATION_BUCKETS.iter().zip(&m.duration_buckets) {
            let _ = writeln!(
                o,
                "lakesync_run_duration_seconds_bucket{{table=\"{t}\",le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = m.duration_count.load(Ordering::Relaxed);
        let _ = writeln!(o, "lakesync_run_duration_seconds_bucket{{table=\"{t}\",le=\"+Inf\"}} {count}");
        let sum = m.duration_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(o, "lakesync_run_duration_seconds_sum{{table=\"{t}\"}} {sum}");
        let _ = writeln!(o, "lakesync_run_duration_seconds_count{{table=\"{t}\"}} {count}");
    });
    out
}

/// Renders every ingest's lag per partition and its counters.
pub fn render_ingests(ingests: &[Arc<IngestWorker>]) -> String {
    let mut out = String::new();
    let states: Vec<(String, IngestState)> = ingests.iter().map(|w| (label(&w.spec.name), w.status.get())).collect();
    let _ = writeln!(
        out,
        "# HELP lakesync_ingest_lag_messages Messages in the Kafka partition not yet committed to the Delta table.\n\
         # TYPE lakesync_ingest_lag_messages gauge"
    );
    for (name, s) in &states {
        for (p, progress) in &s.partitions {
            let _ =
                writeln!(out, "lakesync_ingest_lag_messages{{ingest=\"{name}\",partition=\"{p}\"}} {}", progress.lag());
        }
    }
    let _ = writeln!(
        out,
        "# HELP lakesync_ingest_committed_offset Next offset the Delta table records per partition.\n\
         # TYPE lakesync_ingest_committed_offset gauge"
    );
    for (name, s) in &states {
        for (p, progress) in &s.partitions {
            let v = progress.committed.map_or("NaN".to_string(), |c| c.to_string());
            let _ = writeln!(out, "lakesync_ingest_committed_offset{{ingest=\"{name}\",partition=\"{p}\"}} {v}");
        }
    }
    type Field = fn(&IngestState) -> u64;
    let counters: [(&str, &str, Field); 6] = [
        ("lakesync_ingest_rows_total", "Messages written to the Delta table as rows.", |s| s.rows),
        ("lakesync_ingest_bytes_total", "Bytes of message keys and values written.", |s| s.bytes),
        ("lakesync_ingest_commits_total", "Delta commits written by the ingest.", |s| s.commits),
        ("lakesync_ingest_files_total", "Data files written by the ingest.", |s| s.files),
        ("lakesync_ingest_dead_letters_total", "Messages set aside in the dead-letter table.", |s| s.dead_letters),
        ("lakesync_ingest_compactions_total", "Compactions of the ingest's table.", |s| s.compactions),
    ];
    for (metric, help, value) in counters {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for (name, s) in &states {
            let _ = writeln!(out, "{metric}{{ingest=\"{name}\"}} {}", value(s));
        }
    }
    let _ = writeln!(
        out,
        "# HELP lakesync_ingest_failing 1 when the ingest is retrying or stopped on an error.\n\
         # TYPE lakesync_ingest_failing gauge"
    );
    for (name, s) in &states {
        let _ = writeln!(out, "lakesync_ingest_failing{{ingest=\"{name}\"}} {}", u8::from(s.last_error.is_some()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
