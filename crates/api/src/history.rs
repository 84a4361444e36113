//! The last hour of each table's lag, sampled in memory by the replica that runs it, for the
//! console's chart (`GET /api/v1/synced-tables/{name}/lag`). Prometheus keeps the long
//! history; this is what an operator sees without one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use crate::manage::json_response;
use crate::{ApiError, AppState};

/// How often a sample is taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept per table: one hour.
const KEPT: usize = 720;

/// One sample: when (ms since the epoch), lag in seconds and in versions.
type Sample = (i64, f64, Option<u64>);

#[derive(Default)]
pub struct LagHistory {
    samples: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl LagHistory {
    /// Samples every table this replica runs now, and forgets tables that are gone.
    fn sample(&self, state: &AppState) {
        let now = chrono::Utc::now().timestamp_millis();
        let tables = state.daemon.tables();
        let mut samples = self.samples.lock().expect("lag history lock");
        samples.retain(|name, _| tables.iter().any(|w| &w.spec.name == name));
        for w in tables.iter().filter(|w| w.owned()) {
            let status = w.status();
            let kept = samples.entry(w.spec.name.clone()).or_default();
            if kept.len() == KEPT {
                kept.pop_front();
            }
            kept.push_back((now, status.lag_seconds(), status.lag_versions()));
        }
    }

    fn of(&self, name: &str) -> Vec<Sample> {
        self.samples
            .lock()
            .expect("lag history lock")
            .get(name)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Samples while the state lives.
pub fn spawn(state: &Arc<AppState>) {
    let weak: Weak<AppState> = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { return };
            state.history.sample(&state);
        }
    });
}

/// `GET /api/v1/synced-tables/{name}/lag`: the samples of the last hour, oldest first.
pub async fn lag(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let worker =
        state.daemon.table(&name).ok_or_else(|| ApiError::NotFound(format!("no synced table named {name:?}")))?;
    let samples: Vec<_> = state
        .history
        .of(&name)
        .into_iter()
        .map(|(at, seconds, versions)| {
            json!({
                "at": chrono::DateTime::from_timestamp_millis(at).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                "lag_seconds": seconds,
                "lag_versions": versions,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({
            "name": name,
            "interval_seconds": SAMPLE_EVERY.as_secs(),
            "sampled_here": worker.owned(),
            "samples": samples,
        }),
    ))
}
