//! The operator console in a real browser: Debian's Chromium driven by playwright-core
//! (`browser.js`), against `lakesync serve` with real tables, a real Kafka ingest and the
//! management token.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use serde_json::{json, Value};

use crate::serve::{Server, TOKEN};
use crate::support::{block_on, PyDelta, TestDb};

/// The node package directory holding playwright-core (installed once per machine by
/// `scripts/test`, named by `LAKESYNC_TEST_PLAYWRIGHT`).
fn playwright() -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("LAKESYNC_TEST_PLAYWRIGHT") {
        return dir.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    ["/opt/lakesync-test-playwright".to_string(), format!("{home}/.cache/lakesync-test-playwright")]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.join("node_modules/playwright-core").exists())
        .unwrap_or_else(|| panic!("playwright-core is not installed; run `bash scripts/test` (it installs it once)"))
}

/// One browser page, driven command by command.
struct Browser {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Browser {
    fn open(server: &Server) -> Self {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/browser.js");
        let mut child = Command::new("node")
            .arg(script)
            .arg(playwright())
            .arg(format!("http://{}", server.addr))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node");
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Self { child, input, output }
    }

    fn try_cmd(&mut self, command: Value) -> Result<Value, String> {
        writeln!(self.input, "{command}").unwrap();
        let mut line = String::new();
        self.output.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("browser answered {line:?}: {e}"));
        if answer["ok"] == true {
            Ok(answer["value"].clone())
        } else {
            Err(answer["error"].as_str().unwrap_or_default().to_string())
        }
    }

    fn cmd(&mut self, command: Value) -> Value {
        let shown = command.to_string();
        self.try_cmd(command).unwrap_or_else(|e| panic!("{shown}: {e}"))
    }

    fn text(&mut self, selector: &str) -> String {
        self.cmd(json!({"cmd": "text", "selector": selector})).as_str().unwrap_or_default().to_string()
    }

    fn wait_text(&mut self, selector: &str, contains: &str, timeout_ms: u64) -> String {
        let command = json!({"cmd": "waitText", "selector": selector, "contains": contains, "timeout": timeout_ms});
        match self.try_cmd(command) {
            Ok(v) => v.as_str().unwrap_or_default().to_string(),
            Err(e) => {
                let now = self.try_cmd(json!({"cmd": "text", "selector": selector})).unwrap_or_default();
                panic!("waiting for {selector} to show {contains:?}: {e}; it shows {now}")
            }
        }
    }

    fn count(&mut self, selector: &str) -> u64 {
        self.cmd(json!({"cmd": "count", "selector": selector})).as_u64().unwrap()
    }

    fn problems(&mut self) -> Vec<String> {
        serde_json::from_value(self.cmd(json!({"cmd": "problems"}))).unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.input, "{}", json!({"cmd": "close"}));
        let _ = self.child.wait();
    }
}

#[test]
fn the_console_shows_tables_and_ingests_live_and_syncs_a_triggered_table_with_the_token() {
    use crate::support::kafka::{event, KafkaServer, EVENTS_SCHEMA};

    let db = TestDb::new("console");
    let dir = tempfile::tempdir().unwrap();
    let customers_path = dir.path().join("customers");
    let writer =
        DeltaWriter::create(&customers_path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
    writer.append(&[customers(0..100, 0)]).unwrap();
    let orders = PyDelta::new();
    let schema = json!([["id", "pa.int64()"], ["region", "pa.string()"]]);
    orders.run(json!([{"op": "create", "schema": schema, "rows": [[1, "eu"], [2, "us"]]}]));
    let kafka = KafkaServer::start();
    block_on(kafka.create_topic("events", 2));
    let events_schema = dir.path().join("events.schema.json");
    std::fs::write(&events_schema, EVENTS_SCHEMA).unwrap();
    let config = format!(
        r#"
[api]
listen = "127.0.0.1:0"
token_env = "LAKESYNC_TEST_TOKEN"

[[tables]]
name = "customers"
source = "{customers}"
target = "crm.customers"
primary_key = ["customer_id"]
mode = "continuous"
poll_interval = "100ms"

[[tables]]
source = "{orders}"
target = "crm.orders"
primary_key = ["id"]
mode = "triggered"

[[tables]]
name = "broken"
source = "{missing}"
target = "crm.broken"
primary_key = ["id"]
mode = "triggered"

[[tables]]
name = "zz-archive"
source = "s3://archive/orders"
target = "crm.archive"
primary_key = ["id"]
mode = "triggered"
storage_options = {{ aws_region = "eu-west-1", aws_endpoint = "http://127.0.0.1:9", aws_allow_http = true, aws_access_key_id_env = "NOT_SHOWN_KEY_VAR", aws_secret_access_key_env = "NOT_SHOWN_SECRET_VAR" }}

[[ingest]]
name = "events-ingest"
brokers = ["{brokers}"]
topic = "events"
table = "{events}"
schema = "{events_schema}"
flush_interval = "200ms"
"#,
        customers = customers_path.display(),
        orders = orders.path().display(),
        missing = dir.path().join("no-such-table").display(),
        brokers = kafka.address(),
        events = dir.path().join("lake/events").display(),
        events_schema = events_schema.display(),
    );
    let server = Server::start_with_env(
        &db,
        &config,
        dir.path(),
        &[("NOT_SHOWN_SECRET_VAR", "s3cr3t-value"), ("NOT_SHOWN_KEY_VAR", "AKIAEXAMPLE")],
    );
    server.wait_for("the first syncs", Duration::from_secs(60), || {
        server.table("customers")["synced_version"] == 1 && server.table("crm.orders")["last_run"].is_object()
    });
    block_on(async {
        let producer = kafka.producer("events").await;
        for seq in 0..40i64 {
            producer.send((seq % 2) as i32, Some(format!("t{seq}").into_bytes()), Some(event(seq))).await.unwrap();
        }
    });

    let mut b = Browser::open(&server);
    b.cmd(json!({"cmd": "goto", "path": "/"}));
    // Every table, failing first, each with its state and synced version.
    let customers_row = b.wait_text("[data-table=\"customers\"]", "v1", 10_000);
    assert!(customers_row.contains("ONLINE_CONTINUOUS_UPDATE"), "{customers_row}");
    let orders_row = b.text("[data-table=\"crm.orders\"]");
    assert!(orders_row.contains("v0") && orders_row.contains("ONLINE_NO_PENDING_UPDATE"), "{orders_row}");
    let order = b.cmd(json!({"cmd": "order", "selector": "[data-table]", "name": "data-table"}));
    let order: Vec<String> = serde_json::from_value(order).unwrap();
    let at = |name: &str| order.iter().position(|n| n == name).unwrap();
    assert!(at("broken") == 0 && at("crm.orders") < at("customers"), "{order:?}");
    assert!(b.text("[data-table=\"broken\"]").contains("OFFLINE_FAILED"));
    b.wait_text("[data-ingest=\"events-ingest\"]", "running", 20_000);
    // Every table's row has its own "Sync now"; without the token it asks for it.
    assert_eq!(b.count("[data-table] button:text-is(\"Sync now\")"), b.count("[data-table]"));
    b.cmd(json!({"cmd": "click", "selector": "[data-table=\"crm.orders\"] button:text-is(\"Sync now\")"}));
    b.wait_text("#live", "Enter the management token", 5_000);

    // A commit to the continuous table shows up without a reload.
    writer.append(&[customers(100..120, 0)]).unwrap();
    b.wait_text("[data-table=\"customers\"]", "v2", 10_000);

    // Filtering by name or state.
    b.cmd(json!({"cmd": "fill", "selector": "#search", "value": "failed"}));
    b.cmd(json!({"cmd": "waitGone", "selector": "[data-table=\"customers\"]", "timeout": 5_000}));
    assert_eq!((b.count("[data-table=\"crm.orders\"]"), b.count("[data-table=\"broken\"]")), (0, 1));
    b.cmd(json!({"cmd": "fill", "selector": "#search", "value": "orders"}));
    b.cmd(json!({"cmd": "waitGone", "selector": "[data-table=\"broken\"]", "timeout": 5_000}));
    assert_eq!(b.count("[data-table=\"crm.orders\"]"), 1);
    b.cmd(json!({"cmd": "fill", "selector": "#search", "value": ""}));

    // The ingest's page: per-partition lag and throughput.
    b.cmd(json!({"cmd": "click", "selector": "a[href=\"#/ingests/events-ingest\"]"}));
    b.wait_text("h1", "events-ingest", 5_000);
    b.wait_text("[data-partition=\"1\"]", "msg/s", 10_000);
    assert_eq!(b.count("[data-partition]"), 2);

    // A table's configuration: secrets only by their variables' names.
    b.cmd(json!({"cmd": "goto", "path": "/#/tables/zz-archive"}));
    b.wait_text("h1", "zz-archive", 5_000);
    let config = b.text("dl.config");
    assert!(config.contains("NOT_SHOWN_SECRET_VAR") && config.contains("eu-west-1"), "{config}");
    let body = b.text("body");
    assert!(!body.contains("s3cr3t-value") && !body.contains("AKIAEXAMPLE"), "{body}");

    // The continuous table's page: runs and a lag chart.
    b.cmd(json!({"cmd": "goto", "path": "/#/tables/customers"}));
    b.wait_text("h1", "customers", 5_000);
    b.wait_text("[data-run]", "succeeded", 5_000);
    assert!(b.count("[data-run]") >= 2, "runs listed");
    // The lag chart needs two samples (one every 5 s).
    b.wait_text("section", "Lag (seconds) over the last hour", 15_000);
    assert_eq!(b.count("svg polyline"), 1);

    // "Sync now" on the triggered table: refused without the token, runs with it.
    let v = orders.run(json!([{"op": "delete", "predicate": "id = 2"}]));
    b.cmd(json!({"cmd": "goto", "path": "/#/tables/crm.orders"}));
    b.wait_text("[data-table=\"crm.orders\"]", "v0", 5_000);
    b.cmd(json!({"cmd": "click", "selector": "button:text-is(\"Sync now\")"}));
    b.wait_text("#action-result", "Enter the management token", 5_000);
    assert_eq!(server.table("crm.orders")["synced_version"], 0);
    b.cmd(json!({"cmd": "fill", "selector": "#token", "value": TOKEN}));
    b.cmd(json!({"cmd": "press", "selector": "#token", "key": "Enter"}));
    b.cmd(json!({"cmd": "click", "selector": "button:text-is(\"Sync now\")"}));
    b.wait_text("#action-result", "Sync requested", 5_000);
    b.wait_text("[data-table=\"crm.orders\"] .synced", &format!("v{v}"), 15_000);
    b.wait_text("[data-run]", "triggered", 10_000);
    // The token lives only in this tab.
    let storage = b.cmd(json!({"cmd": "storage"}));
    assert_eq!(storage["session"]["lakesync.token"], TOKEN);
    assert_eq!((storage["local"].clone(), storage["cookies"].clone()), (json!({}), json!("")));

    // A narrow window: nothing scrolls sideways, the keyboard reaches the table links.
    b.cmd(json!({"cmd": "viewport", "width": 360, "height": 800}));
    b.cmd(json!({"cmd": "goto", "path": "/#/"}));
    b.wait_text("[data-table=\"customers\"]", "v2", 10_000);
    let width = b.cmd(json!({"cmd": "scrollWidth"})).as_u64().unwrap();
    assert!(width <= 360, "the page is {width}px wide in a 360px window");
    b.cmd(json!({"cmd": "focus", "selector": "#search"}));
    b.cmd(json!({"cmd": "keyboard", "key": "Tab"}));
    assert_eq!(b.cmd(json!({"cmd": "focused"})), json!("broken"));
    if let Ok(path) = std::env::var("LAKESYNC_CONSOLE_SCREENSHOT") {
        b.cmd(json!({"cmd": "viewport", "width": 1280, "height": 720}));
        b.cmd(json!({"cmd": "goto", "path": "/#/"}));
        b.wait_text("[data-table=\"customers\"]", "v2", 10_000);
        b.cmd(json!({"cmd": "screenshot", "path": path}));
    }
    assert_eq!(b.problems(), Vec::<String>::new(), "no script errors, failed requests or other hosts");
}

#[test]
fn with_read_auth_the_console_shows_nothing_until_a_token_is_given() {
    let db = TestDb::new("console_read_auth");
    let dir = tempfile::tempdir().unwrap();
    let orders = PyDelta::new();
    let schema = json!([["id", "pa.int64()"], ["region", "pa.string()"]]);
    orders.run(json!([{"op": "create", "schema": schema, "rows": [[1, "eu"]]}]));
    let config = format!(
        r#"
[api]
listen = "127.0.0.1:0"
token_env = "LAKESYNC_TEST_TOKEN"
read_auth = "token"

[[tables]]
name = "orders"
source = "{orders}"
target = "crm.orders"
primary_key = ["id"]
mode = "triggered"
"#,
        orders = orders.path().display(),
    );
    let server = Server::start(&db, &config, dir.path());
    let mut b = Browser::open(&server);
    b.cmd(json!({"cmd": "goto", "path": "/"}));
    b.wait_text("main", "Token needed", 10_000);
    assert_eq!(b.count("[data-table]"), 0);
    assert!(!b.text("body").contains("crm.orders"));
    b.cmd(json!({"cmd": "goto", "path": "/#/tables/orders"}));
    b.wait_text("main", "Token needed", 10_000);
    assert!(!b.text("body").contains("crm.orders"));
    // A wrong token is refused, the right one shows the tables.
    b.cmd(json!({"cmd": "fill", "selector": "#token", "value": "wrong"}));
    b.cmd(json!({"cmd": "press", "selector": "#token", "key": "Enter"}));
    b.wait_text("main", "The token was refused", 10_000);
    b.cmd(json!({"cmd": "fill", "selector": "#token", "value": TOKEN}));
    b.cmd(json!({"cmd": "press", "selector": "#token", "key": "Enter"}));
    b.wait_text("[data-table=\"orders\"]", "crm.orders", 10_000);
    // The refused requests are the browser's only complaints.
    for p in b.problems() {
        assert!(p.contains("401"), "{p}");
    }
}
