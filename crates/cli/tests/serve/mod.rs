//! `lakesync serve`, run as a user would: several tables in different modes from one config
//! file, the management and data API over HTTP, metrics, tokens, and a clean SIGTERM.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use serde_json::{json, Value};

use crate::support::{block_on, PyDelta, TestDb};

pub(crate) const TOKEN: &str = "test-token-7f3a";
const READ_TOKEN: &str = "read-token-91c2";

/// A response: status, lower-cased headers, body.
pub(crate) struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection (no client library: the test sees the bytes).
pub(crate) fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    exchange(&mut stream, addr, method, path, token, body, "")
}

/// [`http`] with these request headers, no token and no body.
pub(crate) fn http_with(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    exchange(&mut stream, addr, method, path, None, None, &extra)
}

/// The same over TLS, trusting only the PEM certificates in `ca`.
fn https(addr: &str, ca: &std::path::Path, method: &str, path: &str, token: Option<&str>) -> Reply {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = addr.rsplit_once(':').unwrap().0.to_string();
    let name = rustls::pki_types::ServerName::try_from(host).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    exchange(&mut rustls::StreamOwned::new(conn, tcp), addr, method, path, token, None, "")
}

fn exchange(
    stream: &mut (impl Read + Write),
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    extra: &str,
) -> Reply {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify once the response is complete.
    if let Err(e) = stream.read_to_end(&mut raw) {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers =
        lines.filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect();
    Reply { status, headers, body: body.to_string() }
}

/// The address `lakesync serve` announces on its first line of output (`child`'s stdout
/// must be piped); panics with its log (`log`) when it exits instead.
pub(crate) fn served_address(child: &mut Child, log: &std::path::Path) -> String {
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    first
        .split("://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {first:?}: {}", std::fs::read_to_string(log).unwrap_or_default()))
        .to_string()
}

pub(crate) struct Server {
    child: Child,
    pub addr: String,
    log: std::path::PathBuf,
}

impl Server {
    pub(crate) fn start(db: &TestDb, config: &str, dir: &std::path::Path) -> Self {
        Self::start_with_env(db, config, dir, &[])
    }

    /// [`Server::start`] with these environment variables besides the test's own.
    pub(crate) fn start_with_env(db: &TestDb, config: &str, dir: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let path = dir.join("lakesync.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_lakesync"))
            .args(["serve", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .env("LAKESYNC_POSTGRES", &db.conn)
            .env("LAKESYNC_TEST_TOKEN", TOKEN)
            .env("LAKESYNC_TEST_READ_TOKEN", READ_TOKEN)
            .env("LAKESYNC_LOG", "warn,lakesync=debug,lakesync_engine=debug,lakesync_api=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
            .spawn()
            .unwrap();
        let addr = served_address(&mut child, &dir.join("serve.log"));
        Self { child, addr, log: dir.join("serve.log") }
    }

    pub(crate) fn wait_for(&self, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("timed out waiting for {what}; server log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, path: &str) -> Reply {
        http(&self.addr, "GET", path, None, None)
    }

    /// What the server logged so far.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn table(&self, name: &str) -> Value {
        self.get(&format!("/api/v1/synced-tables/{name}")).json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn orders_schema() -> Value {
    json!([
        ["region", "pa.string()"],
        ["id", "pa.int64()"],
        ["total", "pa.decimal128(10, 2)"],
        ["placed_at", "pa.timestamp('us', tz='UTC')"],
        ["payload", "pa.binary()"],
        ["score", "pa.float64()"],
        ["tags", "pa.list_(pa.string())"],
        ["note", "pa.string()"]
    ])
}

#[test]
fn serve_keeps_tables_in_every_mode_in_sync_and_serves_their_rows() {
    let db = TestDb::new("cli_serve");
    let dir = tempfile::tempdir().unwrap();

    // Continuous: the sample customers table, written by the kernel writer.
    let customers_path = dir.path().join("customers");
    let writer =
        DeltaWriter::create(&customers_path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
    writer.append(&[customers(0..100, 0)]).unwrap();

    // Triggered: orders with a composite key and every JSON-relevant type.
    let orders = PyDelta::new();
    orders.run(json!([{"op": "create", "schema": orders_schema(), "rows": [
        ["emea", 7, "19.99", "2026-01-02T03:04:05.123456+00:00", "aGk=", 0.5, ["a", "b"], null],
        ["emea", 8, "5.00", "2026-01-03T00:00:00+00:00", null, -1.25, [], "x/y"],
        ["emea", 9, "120.50", "2026-01-04T00:00:00+00:00", null, 2.0, null, null],
        ["emea", 10, null, null, null, null, null, null],
        ["apac", 1, "1.00", null, null, null, null, null]
    ]}]));

    let config = format!(
        r#"
[api]
listen = "127.0.0.1:0"
token_env = "LAKESYNC_TEST_TOKEN"
max_page_size = 50
statement_timeout = "1s"

[api.policy]
local_roots = ["{orders_root}"]

[[tables]]
name = "customers"
source = "{customers}"
target = "crm.customers"
primary_key = ["customer_id"]
mode = "continuous"
poll_interval = "100ms"
indexes = [["email"]]

[[tables]]
source = "{orders}"
target = "crm.orders"
primary_key = ["region", "id"]
mode = "triggered"

[[tables]]
name = "broken"
source = "{missing}"
target = "crm.broken"
primary_key = ["id"]
mode = "triggered"
"#,
        customers = customers_path.display(),
        orders = orders.path().display(),
        orders_root = orders.path().parent().unwrap().display(),
        missing = dir.path().join("no-such-table").display(),
    );
    let server = Server::start(&db, &config, dir.path());

    // Done means committed and the run over: a poll can land between the two.
    server.wait_for("the first syncs", Duration::from_secs(60), || {
        let (customers, orders) = (server.table("customers"), server.table("crm.orders"));
        customers["synced_version"] == 1
            && customers["last_run"]["rows_inserted"] == 100
            && orders["synced_version"] == 0
            && orders["state"] != "ONLINE_TRIGGERED_UPDATE"
            && orders["last_run"].is_object()
    });
    let customers_status = server.table("customers");
    assert_eq!(customers_status["state"], "ONLINE_CONTINUOUS_UPDATE", "{customers_status}");
    assert_eq!(customers_status["mode"], "continuous");
    assert_eq!(customers_status["last_run"]["rows_inserted"], 100, "{customers_status}");
    assert_eq!(server.table("crm.orders")["state"], "ONLINE_NO_PENDING_UPDATE");
    // A table that cannot sync is parked with its error; the others keep running.
    let broken = server.table("broken");
    assert_eq!(broken["state"], "OFFLINE_FAILED", "{broken}");
    assert!(broken["last_error"].as_str().unwrap().contains("no-such-table"), "{broken}");
    let list = server.get("/api/v1/synced-tables").json();
    let names: Vec<&str> =
        list["synced_tables"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["broken", "crm.orders", "customers"]);

    // Key lookup with a composite key: JSON types as documented, version headers.
    let row = server.get("/api/v1/tables/crm.orders/rows/emea/7");
    assert_eq!(row.status, 200, "{}", row.body);
    assert_eq!(
        row.json(),
        json!({"region": "emea", "id": 7, "total": "19.99", "placed_at": "2026-01-02T03:04:05.123456Z",
               "payload": "aGk=", "score": 0.5, "tags": ["a", "b"], "note": null})
    );
    assert_eq!(row.headers["x-lakesync-version"], "0");
    assert!(row.headers["x-lakesync-commit-timestamp"].ends_with('Z'), "{:?}", row.headers);
    assert_eq!(server.get("/api/v1/tables/crm.orders/rows/emea/999").status, 404);
    let bad = server.get("/api/v1/tables/crm.orders/rows/emea/not-a-number");
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(server.get("/api/v1/tables/crm.orders/rows/emea").status, 400);
    // Only synced tables are served.
    for path in [
        "/api/v1/tables/lakesync.synced_tables/rows",
        "/api/v1/tables/pg_catalog.pg_authid/rows",
        "/api/v1/tables/crm.broken/rows",
    ] {
        assert_eq!(server.get(path).status, 404, "{path}");
    }

    // Filters, ordering and keyset pagination; decimals order numerically, NULLs last.
    let mut seen = Vec::new();
    let mut path = "/api/v1/tables/crm.orders/rows?region=emea&order_by=total.desc&limit=3".to_string();
    loop {
        let page = server.get(&path);
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.headers["x-lakesync-version"], "0");
        let body = page.json();
        seen.extend(body["rows"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()));
        match body["next"].as_str() {
            Some(cursor) => {
                path = format!("/api/v1/tables/crm.orders/rows?region=emea&order_by=total.desc&limit=3&after={cursor}")
            }
            None => break,
        }
    }
    assert_eq!(seen, [9, 7, 8, 10]);
    let err = server.get("/api/v1/tables/crm.orders/rows?colour=red");
    assert_eq!(err.status, 400);
    assert!(err.json()["error"].as_str().unwrap().contains("no column \"colour\""), "{}", err.body);
    assert_eq!(server.get("/api/v1/tables/crm.orders/rows?limit=51").status, 400);

    // A data query running past statement_timeout is cancelled with 504; here it waits for a
    // lock another session holds on the table.
    block_on(async {
        let locker = db.config().connect().await.unwrap();
        locker.batch_execute("BEGIN; LOCK TABLE crm.orders IN ACCESS EXCLUSIVE MODE").await.unwrap();
        let started = Instant::now();
        let slow = server.get("/api/v1/tables/crm.orders/rows/emea/7");
        assert_eq!(slow.status, 504, "{}", slow.body);
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        locker.batch_execute("ROLLBACK").await.unwrap();
    });
    assert_eq!(server.get("/api/v1/tables/crm.orders/rows/emea/7").status, 200);

    // Continuous mode: new commits arrive without anyone asking.
    let original = writer.files().unwrap();
    writer.append(&[customers(100..150, 0)]).unwrap();
    writer.remove_files(|p| original.iter().any(|o| o == p)).unwrap(); // deletes customers 0..100
    server.wait_for("the continuous table to catch up", Duration::from_secs(30), || {
        server.get("/api/v1/tables/crm.customers/rows/C000000120").status == 200
            && server.get("/api/v1/tables/crm.customers/rows/C000000005").status == 404
    });
    assert_eq!(db.value("SELECT count(*) FROM crm.customers"), "50");
    let row = server.get("/api/v1/tables/crm.customers/rows/C000000120").json();
    assert_eq!(row["email"], "customer120@example.com");
    assert!(row["total_spend"].is_string(), "{row}");

    // Triggered mode waits for a request; mutations need the token.
    orders.run(json!([{"op": "delete", "predicate": "id = 8"}]));
    let sync = "/api/v1/synced-tables/crm.orders/sync";
    assert_eq!(http(&server.addr, "POST", sync, None, None).status, 401);
    assert_eq!(http(&server.addr, "POST", sync, Some("wrong"), None).status, 401);
    assert_eq!(http(&server.addr, "POST", sync, Some(TOKEN), None).status, 202);
    server
        .wait_for("the requested sync", Duration::from_secs(30), || server.table("crm.orders")["synced_version"] == 1);
    assert_eq!(server.get("/api/v1/tables/crm.orders/rows/emea/8").status, 404);
    let runs = server.get("/api/v1/synced-tables/crm.orders/runs").json();
    let modes: Vec<&str> = runs["runs"].as_array().unwrap().iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["triggered", "snapshot"]);
    assert_eq!(runs["runs"][0]["rows_deleted"], 1);

    // Tables can be added and removed at runtime.
    let new_table = json!({"name": "orders2", "source": orders.path().display().to_string(), "target": "crm.orders2",
                           "primary_key": ["region", "id"], "mode": "snapshot"});
    assert_eq!(http(&server.addr, "POST", "/api/v1/synced-tables", None, Some(&new_table)).status, 401);
    let added = http(&server.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&new_table));
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(http(&server.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&new_table)).status, 409);
    let typo = json!({"source": "/x", "target": "a.b", "primary_key": ["id"], "mode": "snapshot", "shedule": "5m"});
    let rejected = http(&server.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&typo));
    assert_eq!(rejected.status, 400);
    assert!(rejected.body.contains("shedule"), "{}", rejected.body);
    server.wait_for("the added table", Duration::from_secs(30), || server.table("orders2")["synced_version"] == 1);
    assert_eq!(db.value("SELECT count(*) FROM crm.orders2"), "4");
    let removed = http(&server.addr, "DELETE", "/api/v1/synced-tables/orders2?purge_data=true", Some(TOKEN), None);
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(db.value("SELECT to_regclass('crm.orders2') IS NULL"), "true");
    assert_eq!(server.get("/api/v1/synced-tables/orders2").status, 404);
    assert_eq!(server.get("/api/v1/tables/crm.orders2/rows").status, 404);

    // A table lakesync did not create is refused at once, and nothing of it is touched.
    db.execute("CREATE TABLE crm.app_users (region text, id bigint, PRIMARY KEY (region, id)); INSERT INTO crm.app_users VALUES ('x', 1)");
    let mut onto_app = new_table.clone();
    onto_app["name"] = json!("app");
    onto_app["target"] = json!("crm.app_users");
    let refused = http(&server.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&onto_app));
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(refused.body.contains("lakesync did not create") && refused.body.contains("adopt"), "{}", refused.body);
    assert_eq!(server.get("/api/v1/synced-tables/app").status, 404);
    assert_eq!(db.rows("SELECT region, id FROM crm.app_users"), ["(x,1)"]);
    // A purge drops only the table lakesync created: not one re-created by someone else.
    let mut third = new_table.clone();
    third["name"] = json!("orders3");
    third["target"] = json!("crm.orders3");
    assert_eq!(http(&server.addr, "POST", "/api/v1/synced-tables", Some(TOKEN), Some(&third)).status, 201);
    server.wait_for("the third table", Duration::from_secs(30), || server.table("orders3")["synced_version"] == 1);
    db.execute("DROP TABLE crm.orders3; CREATE TABLE crm.orders3 (id bigint); INSERT INTO crm.orders3 VALUES (3)");
    let kept = http(&server.addr, "DELETE", "/api/v1/synced-tables/orders3?purge_data=true", Some(TOKEN), None);
    assert_eq!(kept.status, 409, "{}", kept.body);
    assert!(kept.body.contains("refusing to drop it"), "{}", kept.body);
    assert_eq!(db.rows("SELECT id FROM crm.orders3"), ["(3)"]);
    assert_eq!(server.get("/api/v1/synced-tables/orders3").status, 200);
    let stopped = http(&server.addr, "DELETE", "/api/v1/synced-tables/orders3", Some(TOKEN), None);
    assert_eq!(stopped.status, 200, "{}", stopped.body);
    assert_eq!(db.rows("SELECT id FROM crm.orders3"), ["(3)"]);

    // Metrics and the OpenAPI document.
    let metrics = server.get("/metrics").body;
    for line in [
        "lakesync_synced_version{table=\"customers\"} 3",
        "lakesync_lag_versions{table=\"customers\"} 0",
        "lakesync_rows_applied_total{table=\"crm.orders\",op=\"delete\"} 1",
        "lakesync_failing{table=\"broken\"} 1",
        "lakesync_run_duration_seconds_count{table=\"customers\"}",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let openapi = server.get("/openapi.json").json();
    assert_eq!(openapi["openapi"], "3.1.0");
    assert!(openapi["paths"]["/api/v1/tables/{table}/rows"].is_object());
    assert_eq!(server.get("/healthz").status, 200);

    // SIGTERM: stop taking work, exit 0.
    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", std::fs::read_to_string(dir.path().join("serve.log")).unwrap());
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(!log.contains(TOKEN), "the token must never be logged");
}

#[test]
fn check_config_validates_without_running_and_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lakesync.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_lakesync"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env("LAKESYNC_POSTGRES", "host=127.0.0.1 user=app password=Hidden-Pw dbname=crm")
            .output()
            .unwrap()
    };
    let good = "[[tables]]\nsource = \"/lake/t\"\ntarget = \"public.t\"\nprimary_key = [\"id\"]\nmode = \"triggered\"\nschedule = \"*/5 * * * *\"\n";
    let out = check(good);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("table public.t: /lake/t -> public.t (triggered, cron \"*/5 * * * *\")"), "{stdout}");
    assert!(stdout.contains("postgres: app@127.0.0.1:5432/crm") && !stdout.contains("Hidden-Pw"), "{stdout}");
    let out = check(&good.replace("schedule", "poll_interval"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("table public.t") && stderr.contains("poll_interval"), "{stderr}");
}

/// Faults: Postgres is stopped while commits keep landing, then started again. The replica
/// loses its coordinating session (and so stops the table), reconnects, takes the table back
/// and catches up; the table equals the Delta snapshot at
/// the synced version, with nothing lost or duplicated.
#[test]
fn continuous_mode_rides_out_a_postgres_restart_and_loses_nothing() {
    use lakesync_postgres::cluster::LocalCluster;

    let dir = tempfile::tempdir().unwrap();
    let pg_dir = dir.path().join("pg");
    let port = crate::support::test_port(3);
    let guard = crate::support::StopOnDrop(LocalCluster::start(&pg_dir, port).unwrap());
    let cluster = &guard.0;
    let db = TestDb { conn: cluster.connection_string("postgres"), name: "postgres".into() };
    let path = dir.path().join("customers");
    let writer = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
    let (mut last, files) = writer.append_files((0..5).map(|f| customers(f * 200..(f + 1) * 200, 0))).unwrap();
    let config = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\n\n[[tables]]\nname = \"customers\"\nsource = \"{}\"\ntarget = \"crm.customers\"\n\
         primary_key = [\"customer_id\"]\nmode = \"continuous\"\npoll_interval = \"100ms\"\n",
        path.display()
    );
    let server = Server::start(&db, &config, dir.path());
    server.wait_for("the snapshot", Duration::from_secs(60), || server.table("customers")["synced_version"] == last);

    cluster.stop().unwrap();
    // Commits land while Postgres is down: an update of 200 rows (delete + append) and inserts.
    writer.remove_files(|p| p == files[1]).unwrap();
    writer.append(&[customers(200..400, 1)]).unwrap();
    last = writer.append(&[customers(1000..1100, 0)]).unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // long enough for failed attempts
    LocalCluster::start(&pg_dir, port).unwrap();
    last = {
        writer.append(&[customers(1100..1200, 0)]).unwrap();
        writer.remove_files(|p| p == files[3]).unwrap()
    }
    .max(last);
    server.wait_for("the daemon to reconnect and catch up", Duration::from_secs(60), || {
        let r = http(&server.addr, "GET", "/api/v1/synced-tables/customers", None, None);
        r.status == 200 && r.json()["synced_version"] == last && r.json()["state"] == "ONLINE_CONTINUOUS_UPDATE"
    });
    db.assert_matches_snapshot(&path, "crm.customers", "customer_id", last);
    assert_eq!(db.value("SELECT count(*) FROM crm.customers"), "1000");
    // The replica noticed: its coordinating session (and with it the table) was lost, and
    // it took the table back once Postgres returned.
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("lost the coordinating session"), "{log}");
    assert!(log.matches("took over").count() >= 2, "{log}");
    drop(server);
}

#[test]
fn serve_over_https_needs_a_token_to_read_and_reads_with_its_own_role() {
    let db = TestDb::new("cli_https");
    let dir = tempfile::tempdir().unwrap();
    // The data API's own role: it can read, and nothing else.
    db.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'lakesync_reader') THEN \
           CREATE ROLE lakesync_reader LOGIN NOSUPERUSER; END IF; END $$; \
         CREATE SCHEMA app; CREATE SCHEMA lakesync; \
         GRANT USAGE ON SCHEMA app, lakesync TO lakesync_reader; \
         ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO lakesync_reader; \
         ALTER DEFAULT PRIVILEGES IN SCHEMA lakesync GRANT SELECT ON TABLES TO lakesync_reader;",
    );
    let reader_conn = db.conn.replace("user=postgres", "user=lakesync_reader");
    let crate::support::TestCerts { ca, cert, key, .. } = crate::support::test_certificates(dir.path());
    let people = PyDelta::new();
    people.run(json!([{"op": "create", "schema": [["id", "pa.int64()"], ["name", "pa.string()"]], "rows": [[1, "ada"], [2, "grace"]]}]));
    let config = format!(
        r#"
[api]
listen = "127.0.0.1:0"
token_env = "LAKESYNC_TEST_TOKEN"
read_auth = "read_token"
read_token_env = "LAKESYNC_TEST_READ_TOKEN"
postgres_url = "{reader_conn}"
tls_cert = "{cert}"
tls_key = "{key}"

[[tables]]
name = "people"
source = "{people}"
target = "app.people"
primary_key = ["id"]
mode = "continuous"
poll_interval = "100ms"
"#,
        cert = cert.display(),
        key = key.display(),
        people = people.path().display(),
    );
    let server = Server::start(&db, &config, dir.path());
    let get = |path: &str, token: Option<&str>| https(&server.addr, &ca, "GET", path, token);
    server.wait_for("the first sync", Duration::from_secs(60), || {
        get("/api/v1/synced-tables/people", Some(READ_TOKEN)).json()["synced_version"] == 0
    });
    // Probes and Prometheus stay open; everything else that reads needs a token.
    assert_eq!(get("/healthz", None).status, 200);
    assert_eq!(get("/metrics", None).status, 200);
    for path in [
        "/api/v1/tables/app.people/rows",
        "/api/v1/synced-tables",
        "/api/v1/synced-tables/people/runs",
        "/openapi.json",
    ] {
        assert_eq!(get(path, None).status, 401, "{path}");
        assert_eq!(get(path, Some("wrong")).status, 401, "{path}");
        assert_eq!(get(path, Some(READ_TOKEN)).status, 200, "{path}");
        assert_eq!(get(path, Some(TOKEN)).status, 200, "{path}");
    }
    let rows = get("/api/v1/tables/app.people/rows?order_by=id", Some(READ_TOKEN)).json();
    assert_eq!(rows["rows"].as_array().unwrap().len(), 2, "{rows}");
    // The read token does not manage.
    let sync = "/api/v1/synced-tables/people/sync";
    assert_eq!(https(&server.addr, &ca, "POST", sync, Some(READ_TOKEN)).status, 401);
    assert_eq!(https(&server.addr, &ca, "POST", sync, Some(TOKEN)).status, 202);
    // The data API's sessions are the reader role's.
    assert_eq!(
        db.value("SELECT count(*) > 0 FROM pg_stat_activity WHERE usename = 'lakesync_reader' AND datname = current_database()"),
        "true"
    );
    // Plain HTTP gets no answer from the HTTPS port.
    let mut plain = TcpStream::connect(&server.addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(plain, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = plain.read_to_string(&mut answer);
    assert!(!answer.contains("200 OK"), "{answer}");
}

/// The seed pipeline in one daemon: app events → Kafka → `[[ingest]]` → Delta → a continuous
/// `[[tables]]` entry → Postgres → the data API, read by user, newest first, with the ingest's
/// lag and counters in the management API and `/metrics`.
#[test]
fn serve_runs_the_kafka_to_api_pipeline_from_one_config_file() {
    use crate::support::kafka::{event, KafkaServer, EVENTS_SCHEMA};

    let db = TestDb::new("cli_serve_pipeline");
    let dir = tempfile::tempdir().unwrap();
    let kafka = KafkaServer::start();
    block_on(kafka.create_topic("transactions", 4));
    let schema = dir.path().join("transactions.schema.json");
    std::fs::write(&schema, EVENTS_SCHEMA).unwrap();
    let table = dir.path().join("lake/transactions");
    let config = format!(
        r#"
[api]
listen = "127.0.0.1:0"

[[ingest]]
name = "transactions-ingest"
brokers = ["{brokers}"]
topic = "transactions"
table = "{table}"
schema = "{schema}"
kafka_columns = ["partition", "offset", "timestamp"]
flush_interval = "200ms"

[[tables]]
name = "transactions"
source = "{table}"
target = "app.transactions"
primary_key = ["transaction_id"]
mode = "continuous"
poll_interval = "100ms"
dedup_by = "seq"
indexes = [["user_id", "event_time"]]
"#,
        brokers = kafka.address(),
        table = table.display(),
        schema = schema.display(),
    );
    let server = Server::start(&db, &config, dir.path());
    // Transactions 0..100 are created (even seq) and settled (odd seq).
    block_on(async {
        let producer = kafka.producer("transactions").await;
        for seq in 0..200i64 {
            let t = seq / 2;
            producer.send((t % 4) as i32, Some(format!("t{t}").into_bytes()), Some(event(seq))).await.unwrap();
        }
    });
    let by_user = "/api/v1/tables/app.transactions/rows?user_id=u3&order_by=event_time.desc&limit=50";
    server.wait_for("every transaction settled in the data API", Duration::from_secs(60), || {
        let rows = server.get(by_user).json();
        rows["rows"].as_array().is_some_and(|r| r.len() == 14 && r.iter().all(|r| r["status"] == "settled"))
    });
    let rows = server.get(by_user).json();
    let ids: Vec<&str> =
        rows["rows"].as_array().unwrap().iter().map(|r| r["transaction_id"].as_str().unwrap()).collect();
    // u3 owns t3, t10, t17, ... t94; newest event first.
    assert_eq!(ids.first(), Some(&"t94"), "{rows}");
    assert_eq!(ids.last(), Some(&"t3"), "{rows}");

    // u3's rows can be complete before the last flush of other users' events.
    server.wait_for("the ingest to commit every event", Duration::from_secs(30), || {
        server.get("/api/v1/ingests/transactions-ingest").json()["rows"] == 200
    });
    let ingest = server.get("/api/v1/ingests/transactions-ingest").json();
    assert_eq!((ingest["state"].as_str(), ingest["rows"].as_u64()), (Some("running"), Some(200)), "{ingest}");
    assert_eq!(ingest["lag_messages"], 0, "{ingest}");
    assert_eq!(ingest["partitions"].as_array().unwrap().len(), 4, "{ingest}");
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("lakesync_ingest_rows_total{ingest=\"transactions-ingest\"} 200"), "{metrics}");
    assert!(
        metrics.contains("lakesync_ingest_lag_messages{ingest=\"transactions-ingest\",partition=\"3\"} 0"),
        "{metrics}"
    );
    assert_eq!(server.get("/api/v1/ingests").json()["ingests"].as_array().unwrap().len(), 1);

    // One more event is readable through the API within seconds.
    let produced = Instant::now();
    block_on(async {
        let producer = kafka.producer("transactions").await;
        producer.send(0, None, Some(event(200))).await.unwrap();
    });
    server.wait_for("a new event in the data API", Duration::from_secs(30), || {
        server.get("/api/v1/tables/app.transactions/rows/t100").status == 200
    });
    let fresh = produced.elapsed();
    assert!(fresh < Duration::from_secs(10), "event to API took {fresh:?}");
    eprintln!("event produced → readable through the API in {fresh:?}");

    // A second replica of the same config serves the same rows but leaves the topic to the
    // first: one consumer per ingest in a fleet.
    let second = Server::start(&db, &config, dir.path());
    second.wait_for("the second replica to be ready", Duration::from_secs(30), || second.get("/readyz").status == 200);
    let first_id = server.get("/api/v1/ingests/transactions-ingest").json()["owner"].clone();
    let standby = second.get("/api/v1/ingests/transactions-ingest").json();
    assert!(first_id.is_string(), "{standby}");
    assert_eq!((standby["state"].as_str(), &standby["owner"]), (Some("standby"), &first_id), "{standby}");
    assert_eq!(second.get("/api/v1/tables/app.transactions/rows/t100").status, 200);
}

/// Ingests are managed like synced tables: `POST /api/v1/ingests` takes an `[[ingest]]` entry
/// as JSON (token required, bad definitions refused naming the problem, a name twice is 409),
/// writes it to the registry so a restarted daemon runs it again from the table's positions,
/// and `DELETE` stops it for good.
#[test]
fn ingests_are_added_and_removed_through_the_api_and_outlive_a_restart() {
    use crate::support::kafka::{event, table_seqs, KafkaServer, EVENTS_SCHEMA};

    let db = TestDb::new("cli_serve_ingest_api");
    let dir = tempfile::tempdir().unwrap();
    let kafka = KafkaServer::start();
    block_on(kafka.create_topic("orders", 2));
    let produce = |seqs: std::ops::Range<i64>| {
        block_on(async {
            let producer = kafka.producer("orders").await;
            for seq in seqs {
                producer.send((seq % 2) as i32, None, Some(event(seq))).await.unwrap();
            }
        })
    };
    produce(0..50);
    let schema = dir.path().join("orders.schema.json");
    std::fs::write(&schema, EVENTS_SCHEMA).unwrap();
    let table = dir.path().join("lake/orders");
    // The operator lets API ingests reach this broker and files under this directory.
    let config = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"LAKESYNC_TEST_TOKEN\"\n\n[api.policy]\nbrokers = [\"{}\"]\n\
         local_roots = [\"{}\"]\n",
        kafka.address(),
        dir.path().display()
    );
    let config = config.as_str();
    let server = Server::start(&db, config, dir.path());
    let body = json!({"name": "orders-ingest", "brokers": [kafka.address()], "topic": "orders",
                      "table": table.display().to_string(), "schema": schema.display().to_string(),
                      "flush_interval": "200ms"});
    let post = |server: &Server, token, body: &Value| http(&server.addr, "POST", "/api/v1/ingests", token, Some(body));
    assert_eq!(post(&server, None, &body).status, 401);
    let bad = post(&server, Some(TOKEN), &json!({"brokers": ["no-port"], "topic": "orders", "table": "/tmp/x"}));
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("ingest orders") && bad.body.contains("host:port"), "{}", bad.body);
    let added = post(&server, Some(TOKEN), &body);
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(added.json()["name"], "orders-ingest");
    assert_eq!(post(&server, Some(TOKEN), &body).status, 409);
    server.wait_for("the ingest to commit every event", Duration::from_secs(60), || {
        server.get("/api/v1/ingests/orders-ingest").json()["rows"] == 50
    });

    // The registry keeps it: after a restart it runs again, from the table's positions.
    drop(server);
    let server = Server::start(&db, config, dir.path());
    produce(50..60);
    server.wait_for("the restarted daemon to ingest the new events", Duration::from_secs(60), || {
        server.get("/api/v1/ingests/orders-ingest").json()["rows"] == 10
    });
    assert_eq!(table_seqs(&table).0, (0..60).collect::<Vec<_>>(), "each event once");

    // Removed: gone now and after a restart; its table stays.
    let path = "/api/v1/ingests/orders-ingest";
    assert_eq!(http(&server.addr, "DELETE", path, None, None).status, 401);
    let removed = http(&server.addr, "DELETE", path, Some(TOKEN), None);
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(server.get(path).status, 404);
    assert_eq!(http(&server.addr, "DELETE", path, Some(TOKEN), None).status, 404);
    drop(server);
    let server = Server::start(&db, config, dir.path());
    server
        .wait_for("the restarted daemon to be ready", Duration::from_secs(30), || server.get("/readyz").status == 200);
    assert_eq!(server.get("/api/v1/ingests").json()["ingests"], json!([]));
    assert_eq!(table_seqs(&table).0.len(), 60);
}

/// A TCP listener that records every byte it receives and answers each request 403, as a
/// host an attacker controls would (the 403 ends an object-store request at once).
struct Recorder {
    addr: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Recorder {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let r = r.clone();
                std::thread::spawn(move || {
                    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    let mut buf = [0u8; 8192];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                r.lock().unwrap().extend_from_slice(&buf[..n]);
                                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                    let _ = stream.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => break,
                        }
                    }
                });
            }
        });
        Self { addr, received }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

/// What the management token may make the daemon do is what the operator's `[api.policy]`
/// allows: a spec naming the daemon's own secret variables, an endpoint or broker of the
/// caller's choice, a credential provider or token file, a file outside the allowed roots, or
/// SASL PLAIN in the clear is a 400 naming the field and the rule, and nothing is contacted
/// (a recording listener sees no byte). What the policy allows works: the allowed endpoint
/// receives requests signed with the allowed variable's key id.
#[test]
fn the_management_token_reaches_only_what_the_api_policy_allows() {
    const PG_SECRET: &str = "pg-password-b81c";
    let db = TestDb::new("cli_serve_policy");
    let dir = tempfile::tempdir().unwrap();
    let (trap, allowed) = (Recorder::start(), Recorder::start());
    let config = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"LAKESYNC_TEST_TOKEN\"\n\n[api.policy]\n\
         env = [\"LAKE_TEST_KEY_*\"]\nendpoints = [\"http://{}\"]\nlocations = [\"s3://lake/\"]\n\
         brokers = [\"{}\"]\nlocal_roots = [\"{}\"]\n",
        allowed.addr,
        allowed.addr,
        dir.path().display()
    );
    let env = [
        ("LAKESYNC_PG_PASSWORD", PG_SECRET),
        ("LAKE_TEST_KEY_ID", "AKIDALLOWED1"),
        ("LAKE_TEST_KEY_SECRET", "allowed-secret"),
        ("OTHER_SECRET", "other-secret-55"),
    ];
    let server = Server::start_with_env(&db, &config, dir.path(), &env);
    let table = |options: Value| {
        json!({"name": "lake_t", "source": "s3://lake/t", "target": "app.t", "primary_key": ["id"],
               "mode": "snapshot", "storage_options": options})
    };
    let refused = |path: &str, body: Value, field: &str, rule: &str| {
        let r = http(&server.addr, "POST", path, Some(TOKEN), Some(&body));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let answer = r.json();
        assert_eq!(answer["field"], field, "{}", r.body);
        assert!(answer["rule"].as_str().unwrap().contains(rule), "{}", r.body);
        assert!(answer["error"].as_str().unwrap().contains(field), "{}", r.body);
    };
    let trap_url = format!("http://{}", trap.addr);
    // The attack of the report: the daemon's Postgres password as the SigV4 key id, sent in
    // the clear to a host of the caller's choice.
    refused(
        "/api/v1/synced-tables",
        table(json!({"aws_endpoint": trap_url, "aws_allow_http": "true", "aws_region": "us-east-1",
                     "aws_access_key_id_env": "LAKESYNC_PG_PASSWORD", "aws_secret_access_key_env": "LAKE_TEST_KEY_SECRET"})),
        "storage_options.aws_access_key_id_env",
        "daemon's own",
    );
    refused(
        "/api/v1/synced-tables",
        table(json!({"aws_access_key_id_env": "OTHER_SECRET"})),
        "storage_options.aws_access_key_id_env",
        "[api.policy] env",
    );
    refused(
        "/api/v1/synced-tables",
        table(json!({"aws_endpoint": trap_url, "aws_allow_http": "true", "aws_access_key_id_env": "LAKE_TEST_KEY_ID"})),
        "storage_options.aws_endpoint",
        "endpoints",
    );
    // Any local file as an Authorization header, through the container-credential provider.
    refused(
        "/api/v1/synced-tables",
        table(json!({"aws_container_credentials_full_uri": format!("{trap_url}/creds"),
                     "aws_container_authorization_token_file": "/var/run/secrets/kubernetes.io/serviceaccount/token"})),
        "storage_options.aws_container_authorization_token_file",
        "config file",
    );
    refused(
        "/api/v1/synced-tables",
        table(json!({"aws_allow_invalid_certificates": "true"})),
        "storage_options.aws_allow_invalid_certificates",
        "config file",
    );
    let mut elsewhere = table(json!({}));
    elsewhere["source"] = json!("s3://someone-elses-bucket/t");
    refused("/api/v1/synced-tables", elsewhere, "source", "locations");
    let mut local = table(json!({}));
    local["source"] = json!("/etc");
    refused("/api/v1/synced-tables", local, "source", "local_roots");
    // Ingests: brokers of the caller's choice, files anywhere, a password in the clear.
    let ingest = |extra: Value| {
        let mut body = json!({"name": "i", "brokers": [allowed.addr], "topic": "t",
                              "table": dir.path().join("i").display().to_string()});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    refused("/api/v1/ingests", ingest(json!({"brokers": [trap.addr]})), "brokers", "[api.policy] brokers");
    refused("/api/v1/ingests", ingest(json!({"schema": "/etc/passwd"})), "schema", "local_roots");
    refused(
        "/api/v1/ingests",
        ingest(json!({"security_protocol": "SSL", "ssl_ca_location": "/etc/shadow"})),
        "ssl_ca_location",
        "local_roots",
    );
    refused(
        "/api/v1/ingests",
        ingest(json!({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
                      "sasl_password_env": "LAKESYNC_PG_PASSWORD"})),
        "sasl_password_env",
        "daemon's own",
    );
    refused(
        "/api/v1/ingests",
        ingest(json!({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
                      "sasl_password_env": "LAKE_TEST_KEY_SECRET"})),
        "security_protocol",
        "sasl_plain_without_tls",
    );
    assert_eq!(server.get("/api/v1/synced-tables").json()["synced_tables"], json!([]));
    assert_eq!(server.get("/api/v1/ingests").json()["ingests"], json!([]));

    // What the policy allows works, with the variable it allows: the allowed endpoint gets
    // the table's requests, signed with that key id.
    let ok = http(
        &server.addr,
        "POST",
        "/api/v1/synced-tables",
        Some(TOKEN),
        Some(&table(json!({"aws_endpoint": format!("http://{}", allowed.addr), "aws_allow_http": "true",
                           "aws_region": "us-east-1", "aws_access_key_id_env": "LAKE_TEST_KEY_ID",
                           "aws_secret_access_key_env": "LAKE_TEST_KEY_SECRET"}))),
    );
    assert_eq!(ok.status, 201, "{}", ok.body);
    server.wait_for("the allowed endpoint to get a signed request", Duration::from_secs(30), || {
        allowed.text().contains("Credential=AKIDALLOWED1/")
    });
    // Nothing ever reached the trap, and no request carried another secret.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(trap.text(), "", "the refused specs contacted their host");
    let seen = allowed.text();
    for secret in [PG_SECRET, "other-secret-55", "allowed-secret", TOKEN] {
        assert!(!seen.contains(secret), "a request carried {secret}");
    }
}

/// A topic deleted and recreated under a running `[[ingest]]`: the ingest stops (`failed`)
/// with an error naming the offsets, skipping nothing, and the operator's
/// `POST /api/v1/ingests/<name>/restart?reset_positions=earliest` goes on from the new topic's
/// first message.
#[test]
fn a_recreated_topic_stops_a_served_ingest_until_the_api_resets_its_positions() {
    use crate::support::kafka::{event, table_seqs, KafkaServer, EVENTS_SCHEMA};

    let db = TestDb::new("cli_serve_ingest_reset");
    let dir = tempfile::tempdir().unwrap();
    let kafka = KafkaServer::start();
    let produce = |seqs: std::ops::Range<i64>| {
        block_on(async {
            let producer = kafka.producer("clicks").await;
            for seq in seqs {
                producer.send(0, None, Some(event(seq))).await.unwrap();
            }
        })
    };
    block_on(kafka.create_topic("clicks", 1));
    produce(0..10);
    let schema = dir.path().join("clicks.schema.json");
    std::fs::write(&schema, EVENTS_SCHEMA).unwrap();
    let table = dir.path().join("lake/clicks");
    let config = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"LAKESYNC_TEST_TOKEN\"\n\n[[ingest]]\nname = \"clicks\"\n\
         brokers = [\"{}\"]\ntopic = \"clicks\"\ntable = \"{}\"\nschema = \"{}\"\nflush_interval = \"200ms\"\n\
         request_timeout = \"2s\"\n",
        kafka.address(),
        table.display(),
        schema.display()
    );
    let server = Server::start(&db, &config, dir.path());
    server.wait_for("the ingest to commit every event", Duration::from_secs(60), || {
        server.get("/api/v1/ingests/clicks").json()["rows"] == 10
    });
    block_on(async {
        kafka.delete_topic("clicks").await;
        kafka.create_topic("clicks", 1).await;
    });
    produce(10..13);
    server.wait_for("the ingest to stop on the recreated topic", Duration::from_secs(90), || {
        let ingest = server.get("/api/v1/ingests/clicks").json();
        ingest["state"] == "failed"
    });
    let ingest = server.get("/api/v1/ingests/clicks").json();
    let error = ingest["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the table records offset 10, but the partition holds offsets 0..3")
            && error.contains("reset_positions=earliest|latest"),
        "{ingest}"
    );
    assert_eq!(table_seqs(&table).0, (0..10).collect::<Vec<_>>(), "nothing skipped, nothing written");
    let path = "/api/v1/ingests/clicks/restart?reset_positions=";
    assert_eq!(http(&server.addr, "POST", &format!("{path}earliest"), None, None).status, 401);
    let bad = http(&server.addr, "POST", &format!("{path}middle"), Some(TOKEN), None);
    assert_eq!(bad.status, 400, "{}", bad.body);
    let reset = http(&server.addr, "POST", &format!("{path}earliest"), Some(TOKEN), None);
    assert_eq!(reset.status, 202, "{}", reset.body);
    assert_eq!(reset.json()["reset_positions"], "earliest");
    server.wait_for("the recreated topic's events", Duration::from_secs(60), || table_seqs(&table).0.len() >= 13);
    assert_eq!(table_seqs(&table).0, (0..13).collect::<Vec<_>>(), "each event once");
    assert_eq!(server.get("/api/v1/ingests/clicks").json()["state"], "running");
}
