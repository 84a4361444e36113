//! Shared test fixtures: a real Postgres (shared by all test processes, one database per
//! test), a real Delta writer (Python `deltalake`), and helpers to run syncs and read rows.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use lakesync_core::{DataPolicy, PrimaryKey, SyncMode, TableName};
use lakesync_engine::{sync, EngineError, SyncOutcome, SyncRequest};
use lakesync_postgres::cluster::LocalCluster;
use lakesync_postgres::PgConfig;

pub mod kafka;
pub mod stores;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A port for a test server (`offset` 0 to 7), distinct per checkout so two clones can run
/// their tests at once (`LAKESYNC_TEST_PG_PORT` overrides the base).
///
/// Kept below Linux's ephemeral range (32768 and up): the TLS test's server, started mid-run
/// on a port in that range, now and then exited at start (about one full-suite run in three
/// today); a port taken as the local end of one of the suite's own client connections is the
/// likely cause, and it cannot happen below that range.
pub fn test_port(offset: u16) -> u16 {
    let base = std::env::var("LAKESYNC_TEST_PG_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or_else(|| {
        let path = workspace_root().display().to_string();
        let hash = path.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
        20_000 + (hash % 1_500) as u16 * 8
    });
    base + offset
}

/// Runs a future to completion on a fresh runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(f)
}

/// The admin connection string of the test server: `LAKESYNC_TEST_POSTGRES` if set, else a
/// private server under `target/test-postgres` started on first use and shared by every test
/// process (guarded by a lock file).
fn server() -> String {
    if let Ok(conn) = std::env::var("LAKESYNC_TEST_POSTGRES") {
        return conn;
    }
    let dir = workspace_root().join("target/test-postgres");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = dir.with_extension("lock");
    let deadline = SystemTime::now() + Duration::from_secs(180);
    loop {
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&lock) {
            Ok(_) => break,
            Err(_) => {
                // A lock older than two minutes belongs to a killed process.
                if let Ok(meta) = std::fs::metadata(&lock) {
                    if meta
                        .modified()
                        .map(|m| m.elapsed().unwrap_or_default() > Duration::from_secs(120))
                        .unwrap_or(false)
                    {
                        let _ = std::fs::remove_file(&lock);
                    }
                }
                assert!(SystemTime::now() < deadline, "timed out waiting for {}", lock.display());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let started = LocalCluster::start(&dir, test_port(0));
    let _ = std::fs::remove_file(&lock);
    started.expect("start the test Postgres").connection_string("postgres")
}

/// A fresh database for one test.
pub struct TestDb {
    pub conn: String,
    pub name: String,
}

impl TestDb {
    pub fn new(name: &str) -> Self {
        let admin = server();
        let db = format!("t_{}", name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        block_on(async {
            let client = PgConfig::parse(&admin).unwrap().connect().await.unwrap();
            client.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await.unwrap();
            client.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
        });
        let conn = admin.replace("dbname=postgres", &format!("dbname={db}"));
        Self { conn, name: db }
    }

    /// A database whose default collation is ICU's `en-US` (where "a" sorts before "B", unlike
    /// byte order), or `None` with a note where the server cannot make one (before Postgres
    /// 15, or built without ICU).
    pub fn with_icu_collation(name: &str) -> Option<Self> {
        let admin = server();
        let db = format!("t_{}", name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        let made = block_on(async {
            let client = PgConfig::parse(&admin).unwrap().connect().await.unwrap();
            client.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await.unwrap();
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {db} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
                ))
                .await
        });
        if let Err(e) = made {
            eprintln!("SKIPPED: this server cannot create an ICU-collated database: {e}");
            return None;
        }
        let conn = admin.replace("dbname=postgres", &format!("dbname={db}"));
        Some(Self { conn, name: db })
    }

    pub fn config(&self) -> PgConfig {
        PgConfig::parse(&self.conn).unwrap()
    }

    /// Each row of `sql` as Postgres' record text, e.g. `(1,alice)`.
    pub fn rows(&self, sql: &str) -> Vec<String> {
        block_on(async {
            let client = self.config().connect().await.unwrap();
            client
                .query(&format!("SELECT q::text FROM ({sql}) q"), &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect()
        })
    }

    /// One value of `sql` as text (NULL as "NULL").
    pub fn value(&self, sql: &str) -> String {
        block_on(async {
            let client = self.config().connect().await.unwrap();
            let row =
                client.query_one(&format!("SELECT ({sql})::text"), &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            row.get::<_, Option<String>>(0).unwrap_or_else(|| "NULL".into())
        })
    }

    pub fn execute(&self, sql: &str) {
        block_on(async {
            let client = self.config().connect().await.unwrap();
            client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        })
    }

    pub fn request(&self, source: &Path, table: &str, key: &str) -> SyncRequest {
        SyncRequest {
            source: source.display().to_string(),
            storage: Default::default(),
            postgres: self.config(),
            table: TableName::parse(table).unwrap(),
            primary_key: PrimaryKey::parse(key).unwrap(),
            mode: SyncMode::Auto,
            to_version: None,
            parallelism: 2,
            indexes: Vec::new(),
            policy: DataPolicy::default(),
            versions_per_transaction: 100,
            shape: Default::default(),
            lock_wait: std::time::Duration::from_secs(10),
            adopt: false,
            allow_drop_columns: false,
            history: Default::default(),
            progress: Default::default(),
            fence: None,
            dry_run: false,
        }
    }

    pub fn sync(&self, req: &SyncRequest) -> Result<SyncOutcome, EngineError> {
        block_on(sync(req))
    }

    /// Asserts that `table` holds exactly the rows of the Delta snapshot of `source` at
    /// `version`, by loading that snapshot into a scratch table and comparing with EXCEPT ALL.
    pub fn assert_matches_snapshot(&self, source: &Path, table: &str, key: &str, version: u64) {
        self.assert_matches_snapshot_by(source, table, key, version, None)
    }

    /// [`TestDb::assert_matches_snapshot`] for a source that repeats keys: the snapshot keeps
    /// each key's row with the greatest `dedup_by`.
    pub fn assert_matches_snapshot_by(
        &self,
        source: &Path,
        table: &str,
        key: &str,
        version: u64,
        dedup_by: Option<&str>,
    ) {
        self.assert_matches_snapshot_where(source, table, key, version, dedup_by, "TRUE")
    }

    /// [`TestDb::assert_matches_snapshot`] for a filtered table: Postgres evaluates `filter`
    /// (the same SQL) over the whole snapshot, an oracle independent of lakesync's filter.
    pub fn assert_matches_filtered_snapshot(&self, source: &Path, table: &str, key: &str, version: u64, filter: &str) {
        self.assert_matches_snapshot_where(source, table, key, version, None, filter)
    }

    fn assert_matches_snapshot_where(
        &self,
        source: &Path,
        table: &str,
        key: &str,
        version: u64,
        dedup_by: Option<&str>,
        filter: &str,
    ) {
        let expected = "expected.snapshot";
        self.execute(
            "CREATE SCHEMA IF NOT EXISTS expected; DROP TABLE IF EXISTS expected.snapshot; \
             DELETE FROM lakesync.synced_tables WHERE target_schema = 'expected'",
        );
        let mut req = self.request(source, expected, key);
        req.mode = SyncMode::Snapshot;
        req.to_version = Some(version);
        req.policy.dedup_by = dedup_by.map(str::to_string);
        self.sync(&req).unwrap_or_else(|e| panic!("loading the expected snapshot at version {version}: {e}"));
        let cols = self.value(&format!(
            "SELECT string_agg(quote_ident(attname), ',' ORDER BY attnum) FROM pg_attribute \
             WHERE attrelid = '{expected}'::regclass AND attnum > 0 AND NOT attisdropped"
        ));
        let t = TableName::parse(table).unwrap();
        let actual = format!("{}.{}", quote(&t.schema), quote(&t.name));
        let diff = self.rows(&format!(
            "(SELECT 'missing' AS side, e FROM (SELECT {cols} FROM {expected} WHERE {filter} EXCEPT ALL SELECT {cols} FROM {actual}) e) \
             UNION ALL (SELECT 'extra', a FROM (SELECT {cols} FROM {actual} EXCEPT ALL SELECT {cols} FROM {expected} WHERE {filter}) a) LIMIT 20"
        ));
        assert!(diff.is_empty(), "{table} differs from the Delta snapshot at version {version}:\n{}", diff.join("\n"));
        let n: i64 = self.value(&format!("SELECT count(*) FROM {actual}")).parse().unwrap();
        let m: i64 = self.value(&format!("SELECT count(*) FROM {expected} WHERE {filter}")).parse().unwrap();
        assert_eq!(n, m);
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The Python interpreter with `deltalake` installed: `LAKESYNC_TEST_PYTHON`, else the
/// workspace's `.venv`, else `python3`.
impl TestDb {
    /// Asserts the two tables hold the same rows, compared both ways with EXCEPT ALL.
    pub fn assert_same_rows(&self, a: &str, b: &str) {
        let diff = format!(
            "SELECT count(*) FROM ((TABLE {a} EXCEPT ALL TABLE {b}) UNION ALL (TABLE {b} EXCEPT ALL TABLE {a})) d"
        );
        assert_eq!(self.value(&diff), "0", "{a} and {b} differ");
        assert_eq!(self.value(&format!("SELECT count(*) FROM {a}")), self.value(&format!("SELECT count(*) FROM {b}")));
    }
}

pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("LAKESYNC_TEST_PYTHON") {
        return p.into();
    }
    let venv = workspace_root().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// A Delta table written through the Python `deltalake` package.
pub struct PyDelta {
    pub dir: tempfile::TempDir,
    /// An object-store URI instead of a local directory (the store's settings come from the
    /// process environment, which the writer inherits).
    uri: Option<String>,
    /// Extra environment for the writer (store settings not in this process's environment).
    env: Vec<(String, String)>,
}

impl PyDelta {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), uri: None, env: Vec::new() }
    }

    /// A table at an object-store URI (`s3://bucket/path`, `abfss://...`).
    pub fn at(uri: &str) -> Self {
        Self { dir: tempfile::tempdir().unwrap(), uri: Some(uri.to_string()), env: Vec::new() }
    }

    /// Gives the writer these environment variables.
    pub fn with_env(mut self, env: &[(&str, String)]) -> Self {
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        self
    }

    /// The table's location: a local path, or the URI (as a path, for `request`).
    pub fn path(&self) -> PathBuf {
        match &self.uri {
            Some(uri) => PathBuf::from(uri),
            None => self.dir.path().join("table"),
        }
    }

    /// Applies operations (see `delta_writer.py`); returns the version after the last one.
    pub fn run(&self, ops: serde_json::Value) -> u64 {
        let script = workspace_root().join("crates/engine/tests/support/delta_writer.py");
        // Operations go through stdin: they may hold values larger than an argument may be.
        let mut child = Command::new(python())
            .arg(&script)
            .arg(self.path())
            .arg("-")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}; run `bash scripts/test` to set up the Python deltalake writer",
                    python().display()
                )
            });
        {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(ops.to_string().as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "delta_writer.py failed (is the Python `deltalake` package installed? `bash scripts/test` sets it up):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).lines().last().expect("a version").trim().parse().unwrap()
    }
}

/// The Spark-written fixtures, or `None` (with a clear message) when `../shared` is absent.
/// With `LAKESYNC_REQUIRE_FIXTURES=1` (set by CI) their absence is a failure.
pub fn spark_fixture(name: &str) -> Option<PathBuf> {
    let dir = workspace_root().join("../shared/fixtures/delta/spark").join(name);
    if dir.exists() {
        return Some(dir);
    }
    if std::env::var("LAKESYNC_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("Spark fixture {} is missing and LAKESYNC_REQUIRE_FIXTURES=1", dir.display());
    }
    eprintln!("SKIPPED conformance check: {} not found (the ../shared folder is absent)", dir.display());
    None
}

/// A copy of a directory tree (a Spark fixture is read in place; compaction writes).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Stops a private test cluster even when the test fails, so its port is free next time.
pub struct StopOnDrop(pub lakesync_postgres::cluster::LocalCluster);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.stop();
    }
}

/// Certificates made with openssl in a directory, for the TLS tests.
pub struct TestCerts {
    /// The CA that signed `cert`.
    pub ca: PathBuf,
    /// A CA that did not.
    pub other_ca: PathBuf,
    /// A server certificate for `localhost` and `127.0.0.1`, and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn test_certificates(dir: &Path) -> TestCerts {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    for ca in ["ca", "other-ca"] {
        let (key, pem, subject) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=lakesync test {ca}"));
        openssl(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem, "-days", "2", "-subj",
            &subject,
        ]);
    }
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    TestCerts {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other-ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

/// A seeded xorshift generator for randomized tests (the seed is printed so a failure can be
/// replayed): `next(n)` is in `0..n`.
pub fn seeded_rng(what: &str) -> (u64, impl FnMut(u64) -> u64) {
    let seed = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("{what} seed {seed}");
    let mut rng = seed | 1;
    let next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    (seed, next)
}
