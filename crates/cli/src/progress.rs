//! A one-line progress display on a terminal: rows, rows/s and ETA during snapshot loads.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lakesync_engine::{Phase, Progress};

/// Redraws the progress line every quarter second until aborted.
pub async fn show(progress: Arc<Progress>) {
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (done, total) = progress.rows();
        let line = match progress.phase() {
            Phase::Planning => "reading the Delta log ...".to_string(),
            Phase::Loading => {
                let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
                let eta = if total > done && rate > 0.0 {
                    format!(", ETA {:.0}s", (total - done) as f64 / rate)
                } else {
                    String::new()
                };
                let of = if total > 0 { format!(" / {total}") } else { String::new() };
                format!("loading snapshot: {done}{of} rows ({rate:.0} rows/s{eta})")
            }
            Phase::Indexing => format!("building the primary key and indexes ({done} rows loaded) ..."),
            Phase::Applying => "applying the change data feed ...".to_string(),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line} [{:.0}s]", started.elapsed().as_secs_f64());
        let _ = err.flush();
    }
}
