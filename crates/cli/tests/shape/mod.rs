//! Choosing what to sync from every surface: `sync` flags, `[[tables]]` entries (continuous
//! and triggered) and `POST /api/v1/synced-tables`, and dry runs from the CLI and the API.

use std::time::Duration;

use serde_json::{json, Value};

use crate::serve::{http, Server, TOKEN};
use crate::support::{PyDelta, TestDb};
use crate::{lakesync, text};

fn orders_schema() -> Value {
    json!([["id", "pa.int64()"], ["region", "pa.string()"], ["amount", "pa.float64()"]])
}

#[test]
fn sync_flags_choose_rows_and_columns_and_a_dry_run_json_predicts_the_run() {
    let db = TestDb::new("cli_shape");
    let t = PyDelta::new();
    t.run(json!([{"op": "create", "schema": orders_schema(), "rows": [[1, "eu", 20.0], [2, "us", 50.0], [3, "eu", 5.0]]}]));
    let source = t.path().display().to_string();
    let args = [
        "sync",
        "--source",
        &source,
        "--table",
        "public.eu_orders",
        "--primary-key",
        "order_id",
        "--filter",
        "region = 'eu'",
        "--column",
        "id AS order_id",
        "--column",
        "amount",
        "--delete-mode",
        "soft",
        "--lineage",
    ];
    let dry = |extra: &[&str]| {
        let out = lakesync(&db, &[&args[..], extra].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let plan: Value = serde_json::from_str(&dry(&["--dry-run", "--json"])).unwrap();
    assert_eq!(
        (plan["mode"].as_str(), plan["inserted"].as_u64(), plan["dry_run"].as_bool()),
        (Some("snapshot"), Some(2), Some(true)),
        "{plan}"
    );
    assert!(
        plan["ddl"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains("\"_lakesync_deleted_at\" timestamp with time zone")),
        "{plan}"
    );
    assert_eq!(db.value("SELECT to_regclass('lakesync.synced_tables') IS NULL"), "true");
    let human = dry(&["--dry-run"]);
    assert!(
        human.contains("dry run: would sync public.eu_orders")
            && human.contains("2 inserted")
            && human.contains("nothing was written"),
        "{human}"
    );
    let out = lakesync(&db, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("2 inserted, 0 updated, 0 deleted"), "{}", text(&out.stdout));
    assert_eq!(
        db.rows(
            "SELECT order_id, amount, _lakesync_deleted_at IS NULL, _lakesync_version FROM public.eu_orders ORDER BY 1"
        ),
        ["(1,20,t,0)", "(3,5,t,0)"]
    );
    // Bad input: named, nothing written.
    let bad = lakesync(
        &db,
        &[
            "sync",
            "--source",
            &source,
            "--table",
            "public.x",
            "--primary-key",
            "id",
            "--filter",
            "region = 'eu' AND upper(region) = 'EU'",
        ],
    );
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("column 19") && text(&bad.stderr).contains("upper(region)"),
        "{}",
        text(&bad.stderr)
    );
    let bad = lakesync(
        &db,
        &["sync", "--source", &source, "--table", "public.x", "--primary-key", "id", "--column", "amount"],
    );
    assert!(text(&bad.stderr).contains("primary key column must be among the synced columns"), "{}", text(&bad.stderr));
}

#[test]
fn served_tables_sync_what_their_entries_choose_and_the_api_previews_the_next_run() {
    let db = TestDb::new("serve_shape");
    let dir = tempfile::tempdir().unwrap();
    let t = PyDelta::new();
    t.run(json!([{"op": "create", "schema": orders_schema(), "rows": [[1, "eu", 20.0], [2, "us", 50.0], [3, "eu", 5.0]]}]));
    let config = format!(
        r#"
[api]
listen = "127.0.0.1:0"
token_env = "LAKESYNC_TEST_TOKEN"

[api.policy]
local_roots = ["{root}"]

[[tables]]
name = "eu-live"
source = "{source}"
target = "app.eu_live"
primary_key = ["order_id"]
mode = "continuous"
poll_interval = "100ms"
filter = "region = 'eu'"
columns = ["id AS order_id", "amount"]
delete_mode = "soft"
lineage = true

[[tables]]
name = "big-orders"
source = "{source}"
target = "app.big_orders"
primary_key = ["id"]
mode = "triggered"
filter = "amount >= 20"
"#,
        source = t.path().display(),
        root = t.path().parent().unwrap().display(),
    );
    let server = Server::start_with_env(&db, &config, dir.path(), &[("LAKESYNC_LOG_FORMAT", "json")]);
    server.wait_for("the first syncs", Duration::from_secs(60), || {
        server.table("eu-live")["synced_version"] == 0 && server.table("big-orders")["last_run"].is_object()
    });
    assert_eq!(db.rows("SELECT order_id, amount FROM app.eu_live ORDER BY 1"), ["(1,20)", "(3,5)"]);
    assert_eq!(db.rows("SELECT id FROM app.big_orders ORDER BY 1"), ["(1)", "(2)"]);

    // Continuous: 1 leaves the filter (soft-deleted), 2 enters it, 3 is deleted (soft).
    let v = t.run(json!([
        {"op": "update", "predicate": "id = 1", "set": {"region": "'us'"}},
        {"op": "update", "predicate": "id = 2", "set": {"region": "'eu'", "amount": "10.0"}},
        {"op": "delete", "predicate": "id = 3"},
    ]));
    server.wait_for("the continuous table to follow", Duration::from_secs(30), || {
        server.table("eu-live")["synced_version"] == v
    });
    assert_eq!(
        db.rows("SELECT order_id, amount, _lakesync_deleted_at IS NULL, _lakesync_version FROM app.eu_live ORDER BY 1"),
        [format!("(1,20,f,{})", v - 2), format!("(2,10,t,{})", v - 1), format!("(3,5,f,{v})")]
    );

    // The triggered table waits for a request: its plan says what that run will do.
    let plan_path = "/api/v1/synced-tables/big-orders/plan";
    assert_eq!(http(&server.addr, "POST", plan_path, None, None).status, 401);
    let plan = http(&server.addr, "POST", plan_path, Some(TOKEN), None);
    assert_eq!(plan.status, 200, "{}", plan.body);
    let plan = plan.json();
    assert_eq!(
        (plan["name"].as_str(), plan["mode"].as_str(), plan["from_version"].as_u64(), plan["to_version"].as_u64()),
        (Some("big-orders"), Some("triggered"), Some(0), Some(v)),
        "{plan}"
    );
    // 1 changed region but stays in (updated), 2 left (deleted), 3 was never in.
    assert_eq!(
        (plan["inserted"].as_u64(), plan["updated"].as_u64(), plan["deleted"].as_u64()),
        (Some(0), Some(1), Some(1)),
        "{plan}"
    );
    assert_eq!(server.table("big-orders")["synced_version"], 0, "a plan changes nothing");
    assert_eq!(http(&server.addr, "POST", "/api/v1/synced-tables/big-orders/sync", Some(TOKEN), None).status, 202);
    server.wait_for("the requested run", Duration::from_secs(30), || server.table("big-orders")["synced_version"] == v);
    let last = server.table("big-orders")["last_run"].clone();
    assert_eq!(
        (last["rows_inserted"].clone(), last["rows_updated"].clone(), last["rows_deleted"].clone()),
        (json!(0), json!(1), json!(1)),
        "{last}"
    );
    assert_eq!(http(&server.addr, "POST", "/api/v1/synced-tables/nope/plan", Some(TOKEN), None).status, 404);

    // Through the API: a filter that does not parse is refused naming where.
    let entry = json!({"name": "bad", "source": t.path().display().to_string(), "target": "app.bad", "primary_key": ["id"],
                       "mode": "triggered", "filter": "amount >>> 3"});
    let refused = http(&server.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&entry));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("filter"), "{}", refused.body);
    let entry = json!({"name": "us", "source": t.path().display().to_string(), "target": "app.us", "primary_key": ["id"],
                       "mode": "triggered", "filter": "region = 'us'", "columns": ["id", "region"]});
    let added = http(&server.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&entry));
    assert_eq!(added.status, 201, "{}", added.body);
    server.wait_for("the added table", Duration::from_secs(30), || server.table("us")["synced_version"] == v);
    assert_eq!(db.rows("SELECT * FROM app.us ORDER BY 1"), ["(1,us)"]);

    // Logged as JSON: one object a line, with the replica, and the table and run of a run.
    let log = server.log_text();
    let lines: Vec<Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(lines.iter().all(|l| l["replica"].is_string() && l["level"].is_string()), "{log}");
    assert!(
        lines.iter().any(|l| l["table"] == "app.big_orders" && l["run"].is_i64() && l["message"] == "applied changes"),
        "{log}"
    );
}
