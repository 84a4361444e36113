//! Real object-store servers for the tests: `moto` in server mode (S3 protocol, from PyPI, in
//! the workspace's `.venv`) and Azurite (Azure Blob, from npm), each started per test on a
//! free port and stopped when dropped; and a TCP proxy that cuts connections mid-transfer.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::python;

/// A free port below Linux's ephemeral range (see `test_port` for why), never one this
/// process was given before: a test that asks for two ports before binding either (a broker
/// and the proxy in front of it) once got the same port twice, so the proxy listened on the
/// broker's port, the broker exited at start and the test hung on a proxy forwarding to
/// itself. The search starts from the process id and the clock.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let seed = std::process::id() as u64 ^ clock;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for i in 0..2000u64 {
        let port = 10_000 + ((seed.wrapping_mul(7919) + i * 131) % 10_000) as u16;
        if !given.contains(&port) && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port between 10000 and 20000");
}

pub fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start ({status}); run `bash scripts/test` to install it");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on port {port} within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Something answers; a server that could not bind the port (another process holds it)
    // exits at once, and the test would otherwise talk to that other process.
    std::thread::sleep(Duration::from_millis(100));
    if let Ok(Some(status)) = child.try_wait() {
        panic!("{what} exited at start ({status}) while port {port} answers: another process holds that port");
    }
}

/// The S3-protocol server: `moto_server` from the `.venv` (`LAKESYNC_TEST_MOTO` overrides),
/// checking signatures as AWS does: after the three calls that create an IAM user with an
/// access key, every request must be signed with that key.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub key_id: String,
    pub secret: String,
    /// With TLS: the CA that signed the server's certificate.
    ca: Option<PathBuf>,
}

pub const S3_REGION: &str = "eu-west-1";

impl S3Server {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// The server over HTTPS (`https://localhost:PORT`) with `certs`' server certificate.
    pub fn start_tls(certs: &super::TestCerts) -> Self {
        Self::start_with(Some(certs))
    }

    fn start_with(tls: Option<&super::TestCerts>) -> Self {
        let bin = std::env::var_os("LAKESYNC_TEST_MOTO").map(PathBuf::from).unwrap_or_else(|| {
            let venv = python().with_file_name("moto_server");
            if venv.exists() {
                venv
            } else {
                "moto_server".into()
            }
        });
        let port = free_port();
        let mut command = Command::new(&bin);
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(certs) = tls {
            command.arg("-c").arg(&certs.cert).arg("-k").arg(&certs.key);
        }
        let mut child = command
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; run `bash scripts/test` to install moto", bin.display()));
        wait_for_port(port, &mut child, "moto_server");
        let ca = tls.map(|c| c.ca.clone());
        let mut server = Self { child, port, key_id: "bootstrap".into(), secret: "bootstrap".into(), ca };
        let keys = server.boto(
            "iam = boto3.client('iam', endpoint_url=s3.meta.endpoint_url, aws_access_key_id='x', aws_secret_access_key='y', region_name='us-east-1', verify=verify)\n\
             iam.create_user(UserName='lakesync')\n\
             iam.put_user_policy(UserName='lakesync', PolicyName='lake', PolicyDocument='{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"*\",\"Resource\":\"*\"}]}')\n\
             k = iam.create_access_key(UserName='lakesync')['AccessKey']\n\
             print(k['AccessKeyId'], k['SecretAccessKey'])",
        );
        let (id, secret) = keys.trim().split_once(' ').expect("an access key");
        (server.key_id, server.secret) = (id.to_string(), secret.to_string());
        server
    }

    pub fn endpoint(&self) -> String {
        match self.ca {
            None => format!("http://127.0.0.1:{}", self.port),
            Some(_) => format!("https://localhost:{}", self.port),
        }
    }

    /// The standard variables a user of an S3-compatible store sets (what the issue tried).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_at(&self.endpoint())
    }

    /// The variables for reaching this server's buckets through `endpoint` (a proxy).
    pub fn env_at(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", endpoint.to_string()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", S3_REGION.to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// Sets [`Self::env`] in this process (each test is a process of its own under nextest),
    /// so lakesync, the writer it starts and the checks all find the server as a user's
    /// shell would.
    pub fn export_env(&self) {
        for (k, v) in self.env() {
            std::env::set_var(k, v);
        }
    }

    /// Creates a bucket (through boto3, which moto brings).
    pub fn create_bucket(&self, bucket: &str) {
        self.boto(&format!(
            "s3.create_bucket(Bucket={bucket:?}, CreateBucketConfiguration={{'LocationConstraint': {S3_REGION:?}}})"
        ));
    }

    /// Uploads every file under `dir` to `s3://bucket/prefix/...`, as `aws s3 cp --recursive`.
    pub fn upload(&self, dir: &Path, bucket: &str, prefix: &str) {
        self.boto(&format!(
            "import os\nroot = {root:?}\nfor d, _, files in os.walk(root):\n    for f in files:\n        p = os.path.join(d, f)\n        s3.upload_file(p, {bucket:?}, {prefix:?} + '/' + os.path.relpath(p, root))",
            root = dir.display().to_string()
        ));
    }

    /// Runs Python with `s3`, a boto3 client signed with the server's key; returns stdout.
    /// Every object key in `bucket`.
    pub fn list(&self, bucket: &str) -> Vec<String> {
        self.boto(&format!(
            "for page in s3.get_paginator('list_objects_v2').paginate(Bucket={bucket:?}):\n    for o in page.get('Contents', []):\n        print(o['Key'])"
        ))
        .lines()
        .map(str::to_string)
        .collect()
    }

    fn boto(&self, code: &str) -> String {
        let script = format!(
            "import boto3\nverify = {3}\ns3 = boto3.client('s3', endpoint_url={0:?}, aws_access_key_id={1:?}, aws_secret_access_key={2:?}, region_name={S3_REGION:?}, verify=verify)\n{code}\n",
            self.endpoint(),
            self.key_id,
            self.secret,
            self.ca.as_ref().map_or("None".to_string(), |ca| format!("{:?}", ca.display().to_string())),
        );
        let out = Command::new(python()).arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "boto3 failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Azurite's Blob service (npm `azurite`, installed by `scripts/test` under the machine's
/// tool cache; `LAKESYNC_TEST_AZURITE` names the `azurite-blob` script).
pub struct AzureServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// Azurite's well-known development account (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl AzureServer {
    /// `None` when Azurite is not installed and the suite does not require it.
    pub fn start() -> Option<Self> {
        let bin = match std::env::var_os("LAKESYNC_TEST_AZURITE") {
            Some(p) => PathBuf::from(p),
            None => {
                let cache =
                    if std::process::Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false)
                    {
                        PathBuf::from("/opt/lakesync-test-azurite")
                    } else {
                        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/lakesync-test-azurite")
                    };
                cache.join("node_modules/.bin/azurite-blob")
            }
        };
        if !bin.exists() {
            if std::env::var("LAKESYNC_REQUIRE_FIXTURES").as_deref() == Ok("1") {
                panic!("Azurite is not installed at {}; `bash scripts/test` installs it", bin.display());
            }
            eprintln!("SKIPPED Azure check: Azurite not found at {}", bin.display());
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--inMemoryPersistence"])
            .args(["--skipApiVersionCheck", "--loose", "--silent"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        wait_for_port(port, &mut child, "azurite-blob");
        Some(Self { child, port, _dir: dir })
    }

    /// The variables a user of the emulator sets.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT.to_string()),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY.to_string()),
            ("AZURE_STORAGE_USE_EMULATOR", "true".to_string()),
            ("AZURITE_BLOB_STORAGE_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AZURE_ALLOW_HTTP", "true".to_string()),
        ]
    }

    pub fn export_env(&self) {
        for (k, v) in self.env() {
            std::env::set_var(k, v);
        }
    }

    /// Creates a container: one REST call signed with the account key (Shared Key), through
    /// Python's standard library (no Azure SDK to install).
    pub fn create_container(&self, name: &str) {
        let script = format!(
            r#"
import base64, hashlib, hmac, datetime, urllib.request
account, key = {AZURITE_ACCOUNT:?}, base64.b64decode({AZURITE_KEY:?})
date = datetime.datetime.now(datetime.timezone.utc).strftime('%a, %d %b %Y %H:%M:%S GMT')
version = '2021-08-06'
canonical = f"PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{{date}}\nx-ms-version:{{version}}\n/{{account}}/{{account}}/{name}\nrestype:container"
sig = base64.b64encode(hmac.new(key, canonical.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/{{account}}/{name}?restype=container", method='PUT',
    headers={{'x-ms-date': date, 'x-ms-version': version, 'Authorization': f'SharedKey {{account}}:{{sig}}', 'Content-Length': '0'}})
urllib.request.urlopen(req).read()
"#,
            port = self.port
        );
        let out = Command::new(python()).arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "creating the container failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for AzureServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of a server that, once it has passed `cut_after` bytes from the
/// server, resets every open connection and refuses new ones for a while: a server that
/// drops connections mid-read and restarts.
pub struct TcpProxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

struct ProxyState {
    target: SocketAddr,
    forwarded: AtomicU64,
    cut_after: AtomicU64,
    cuts: AtomicU64,
    down_for: Duration,
    down_until: Mutex<Option<Instant>>,
    open: Mutex<Vec<TcpStream>>,
    /// The request lines (`GET /path?query HTTP/1.1`) clients sent, in order.
    requests: Mutex<Vec<String>>,
    /// While set, nothing is forwarded either way and connections stay open: a server lost
    /// without a reset (a half-open connection).
    frozen: std::sync::atomic::AtomicBool,
}

impl TcpProxy {
    pub fn start(target_port: u16, down_for: Duration) -> Self {
        let port = free_port();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        let state = Arc::new(ProxyState {
            target: (Ipv4Addr::LOCALHOST, target_port).into(),
            forwarded: AtomicU64::new(0),
            cut_after: AtomicU64::new(u64::MAX),
            cuts: AtomicU64::new(0),
            down_for,
            down_until: Mutex::new(None),
            open: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            frozen: Default::default(),
        });
        let accept = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let down = accept.down_until.lock().unwrap().is_some_and(|t| Instant::now() < t);
                if down {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(accept.target) else { continue };
                {
                    let mut open = accept.open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let logged = accept.clone();
                std::thread::spawn(move || pump(client, server, Way::Requests(logged)));
                let counted = accept.clone();
                std::thread::spawn(move || pump(s2, c2, Way::Responses(counted)));
            }
        });
        Self { port, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cut every connection once `bytes` more have come from the server.
    pub fn cut_after(&self, bytes: u64) {
        let now = self.state.forwarded.load(Ordering::SeqCst);
        self.state.cut_after.store(now + bytes, Ordering::SeqCst);
    }

    /// Stops (or resumes) forwarding anything, keeping every connection open.
    pub fn freeze(&self, frozen: bool) {
        self.state.frozen.store(frozen, Ordering::SeqCst);
    }

    /// How many times connections were cut.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// The request lines sent since the last call (reads send no bodies, so every line that
    /// ends in an HTTP version is a request).
    pub fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut *self.state.requests.lock().unwrap())
    }
}

enum Way {
    /// Client to server: request lines are logged.
    Requests(Arc<ProxyState>),
    /// Server to client: bytes are counted for `cut_after`.
    Responses(Arc<ProxyState>),
}

fn pump(mut from: TcpStream, mut to: TcpStream, way: Way) {
    let mut buf = [0u8; 16 * 1024];
    let mut line = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (Way::Requests(state) | Way::Responses(state)) = &way;
        while state.frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        match &way {
            Way::Requests(state) => {
                for &b in &buf[..n] {
                    if b != b'\n' {
                        line.push(b);
                        continue;
                    }
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    if text.ends_with(" HTTP/1.1") || text.ends_with(" HTTP/1.0") {
                        state.requests.lock().unwrap().push(text);
                    }
                    line.clear();
                }
            }
            Way::Responses(state) => {
                let total = state.forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if total >= state.cut_after.load(Ordering::SeqCst) {
                    state.cut_after.store(u64::MAX, Ordering::SeqCst);
                    state.cuts.fetch_add(1, Ordering::SeqCst);
                    *state.down_until.lock().unwrap() = Some(Instant::now() + state.down_for);
                    for s in state.open.lock().unwrap().drain(..) {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    break;
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
