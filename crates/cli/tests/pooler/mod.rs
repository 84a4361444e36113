//! lakesync behind PgBouncer (Debian's `pgbouncer`, started per test): in transaction mode a
//! client's statements run on whichever server session is free, so per-session locks and
//! settings would belong to other clients. `sync` and `serve` refuse it at start, naming the
//! pooler, before anything is written; session mode works.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;

use crate::support::TestDb;
use crate::text;

/// A PgBouncer in front of the test Postgres.
struct PgBouncer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl PgBouncer {
    fn start(db: &TestDb, pool_mode: &str) -> Self {
        let bin = std::env::var("LAKESYNC_TEST_PGBOUNCER").unwrap_or_else(|_| "/usr/sbin/pgbouncer".into());
        let pg_port: u16 =
            db.conn.split_whitespace().find_map(|kv| kv.strip_prefix("port=")).and_then(|p| p.parse().ok()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host=127.0.0.1 port={pg_port} user=postgres\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = any\n\
                 pool_mode = {pool_mode}\nignore_startup_parameters = extra_float_digits,options\n\
                 max_client_conn = 200\ndefault_pool_size = 20\nlogfile = {log}\n",
                log = dir.path().join("pgbouncer.log").display()
            ),
        )
        .unwrap();
        // PgBouncer refuses to run as root.
        let root = Command::new("id").arg("-u").output().map(|o| text(&o.stdout).trim() == "0").unwrap_or(false);
        let mut command = if root {
            Command::new("chown").args(["-R", "postgres"]).arg(dir.path()).status().unwrap();
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let child = command.arg(&ini).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = std::fs::read_to_string(dir.path().join("pgbouncer.log")).unwrap_or_default();
            assert!(started.elapsed() < Duration::from_secs(10), "PgBouncer ({bin}) did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port, dir }
    }

    /// `db`'s connection string, through this pooler.
    fn conn(&self, db: &TestDb) -> String {
        db.conn
            .split_whitespace()
            .map(|kv| if kv.starts_with("port=") { format!("port={}", self.port) } else { kv.to_string() })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // Started through runuser: end PgBouncer itself, not only its parent.
        let ini = self.dir.path().join("pgbouncer.ini");
        let _ = Command::new("pkill").args(["-f", &ini.display().to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sync_through(conn: &str, source: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lakesync"))
        .args(["sync", "--source", source, "--table", "crm.customers", "--primary-key", "customer_id"])
        .env("LAKESYNC_POSTGRES", conn)
        .output()
        .unwrap()
}

#[test]
fn a_transaction_pooler_is_refused_at_start_naming_it_and_a_session_pooler_works() {
    let db = TestDb::new("cli_pooler");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers");
    let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
    w.append(&[customers(0..100, 0)]).unwrap();
    let source = path.display().to_string();

    let transaction = PgBouncer::start(&db, "transaction");
    let out = sync_through(&transaction.conn(&db), &source);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "sync through a transaction pooler succeeded: {}", text(&out.stdout));
    assert!(stderr.contains("connection pooler in transaction or statement mode"), "{stderr}");
    assert!(stderr.contains("PgBouncer pool_mode = transaction") && stderr.contains("session mode"), "{stderr}");
    assert_eq!(db.value("SELECT to_regnamespace('lakesync') IS NULL AND to_regclass('crm.customers') IS NULL"), "true");

    // `serve` exits at start with the same reason (before any table runs).
    let config = dir.path().join("lakesync.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\n\n[[tables]]\nsource = \"{source}\"\ntarget = \"crm.customers\"\n\
             primary_key = [\"customer_id\"]\nmode = \"continuous\"\n"
        ),
    )
    .unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_lakesync"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("LAKESYNC_POSTGRES", transaction.conn(&db))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = serve.kill();
            panic!("serve kept running behind a transaction pooler");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(serve.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("connection pooler in transaction or statement mode"), "{stderr}");
    assert_eq!(db.value("SELECT to_regnamespace('lakesync') IS NULL AND to_regclass('crm.customers') IS NULL"), "true");
    drop(transaction);

    // In session mode each client keeps its server session: lakesync works through it.
    let session = PgBouncer::start(&db, "session");
    let out = sync_through(&session.conn(&db), &source);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(db.value("SELECT count(*) FROM crm.customers"), "100");
}
