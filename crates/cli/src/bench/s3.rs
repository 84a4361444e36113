//! `lakesync bench --source-store s3`: the bench's Delta table served by a local S3-protocol
//! server, so the snapshot and the incremental sync from `s3://` are measured against the
//! local-path runs of the same round.
//!
//! The server is `moto` in server mode (PyPI `moto[server]`, which `scripts/test` installs
//! into `.venv`), run by the same Python as the MERGE writer. It serves every request from
//! one Python process: what it bounds is the store's side, not lakesync's.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A bucket with the bench's table in it.
pub const BUCKET: &str = "bench";

/// Uploads every file under a directory as `s3://bucket/prefix/<relative path>`.
const UPLOAD_PY: &str = r#"
import os, sys, boto3
endpoint, root, bucket, prefix = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
try:
    s3.create_bucket(Bucket=bucket)
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass
n = 0
for d, _, files in os.walk(root):
    for f in files:
        path = os.path.join(d, f)
        s3.upload_file(path, bucket, prefix + "/" + os.path.relpath(path, root))
        n += 1
print(n)
"#;

/// A running local S3-protocol server; stopped on drop.
pub struct LocalS3 {
    child: Child,
    port: u16,
}

impl LocalS3 {
    pub fn start(python: &Path) -> anyhow::Result<Self> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
        let mut child = Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting moto's S3 server with {}", python.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "moto's S3 server exited at start ({status}): --source-store s3 needs `moto[server]` in {} \
                     (`bash scripts/test` installs it in .venv)",
                    python.display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("moto's S3 server did not listen on port {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self { child, port })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The variables a user of an S3-compatible store exports.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "bench".into()),
            ("AWS_SECRET_ACCESS_KEY", "bench".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Uploads the table directory `dir` as `s3://bench/<prefix>` and returns that URI.
    pub fn upload(&self, python: &Path, dir: &Path, prefix: &str) -> anyhow::Result<String> {
        let out = Command::new(python)
            .arg("-c")
            .arg(UPLOAD_PY)
            .arg(self.endpoint())
            .arg(dir)
            .args([BUCKET, prefix])
            .output()
            .with_context(|| format!("running {} to upload the table", python.display()))?;
        if !out.status.success() {
            bail!(
                "uploading {} to the S3 server failed:\n{}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(format!("s3://{BUCKET}/{prefix}"))
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
