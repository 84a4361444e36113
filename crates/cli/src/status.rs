//! `lakesync status`: the state tables as a table or JSON.

use lakesync_postgres::{state, PgConfig, TableStatus};
use serde_json::json;

/// Prints the status of every synced table.
pub async fn print(config: &PgConfig, as_json: bool) -> anyhow::Result<()> {
    let client = config.connect().await?;
    let tables = state::status(&client).await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&to_json(&tables))?);
        return Ok(());
    }
    if tables.is_empty() {
        println!("no synced tables in {}", config.target());
        return Ok(());
    }
    println!(
        "{:<32} {:>8} {:<28} {:<10} {:>10} {:>10} {:>10} {:>9}",
        "TABLE", "VERSION", "STATE", "LAST RUN", "INSERTED", "UPDATED", "DELETED", "SECONDS"
    );
    for t in &tables {
        let run = t.last_run.as_ref();
        println!(
            "{:<32} {:>8} {:<28} {:<10} {:>10} {:>10} {:>10} {:>9}",
            t.table.table.to_string(),
            t.table.synced_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            t.table.state,
            run.map(|r| format!("{}/{}", r.mode, r.outcome)).unwrap_or_else(|| "-".into()),
            run.map(|r| r.counts.inserted).unwrap_or(0),
            run.map(|r| r.counts.updated).unwrap_or(0),
            run.map(|r| r.counts.deleted).unwrap_or(0),
            run.and_then(|r| r.duration_seconds).map(|d| format!("{d:.2}")).unwrap_or_else(|| "-".into()),
        );
        if let Some(err) = &t.table.last_error {
            println!("  last error: {err}");
        }
    }
    Ok(())
}

/// The JSON form of `lakesync status --json`.
pub fn to_json(tables: &[TableStatus]) -> serde_json::Value {
    json!(tables
        .iter()
        .map(|t| json!({
            "table": t.table.table.to_string(),
            "source": t.table.source,
            "primary_key": t.table.primary_key,
            "synced_version": t.table.synced_version,
            "synced_commit_timestamp": t.table.synced_commit_timestamp,
            "state": t.table.state,
            "last_error": t.table.last_error,
            "totals": {"rows_inserted": t.totals.inserted, "rows_updated": t.totals.updated, "rows_deleted": t.totals.deleted},
            "last_run": t.last_run.as_ref().map(|r| json!({
                "run_id": r.run_id,
                "mode": r.mode,
                "reason": r.reason,
                "outcome": r.outcome,
                "from_version": r.from_version,
                "to_version": r.to_version,
                "rows_inserted": r.counts.inserted,
                "rows_updated": r.counts.updated,
                "rows_deleted": r.counts.deleted,
                "started_at": r.started_at,
                "duration_seconds": r.duration_seconds,
                "error": r.error,
            })),
        }))
        .collect::<Vec<_>>())
}
