//! A private local Postgres server under a directory, for the demo and the tests.
//!
//! Uses the `initdb`/`pg_ctl` binaries on the machine (from `PATH` or
//! `/usr/lib/postgresql/<major>/bin`). Postgres refuses to run as root, so when we are root
//! the server runs as the `postgres` user (via `runuser`) and owns its directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::PgError;

/// A local Postgres server listening on 127.0.0.1.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl LocalCluster {
    /// Starts (initializing if needed) the server whose data lives in `dir/data`, on `port`.
    /// If it is already running, just returns it.
    pub fn start(dir: &Path, port: u16) -> Result<Self, PgError> {
        Self::start_with(dir, port, &[])
    }

    /// Like [`LocalCluster::start`], with extra server settings (`name`, `value`) that
    /// override the defaults. An already running server keeps the settings it has.
    pub fn start_with(dir: &Path, port: u16, settings: &[(&str, &str)]) -> Result<Self, PgError> {
        let bin = find_bin_dir()?;
        std::fs::create_dir_all(dir).map_err(|e| PgError::Cluster(format!("cannot create {}: {e}", dir.display())))?;
        let dir = std::path::absolute(dir).map_err(|e| PgError::Cluster(e.to_string()))?;
        let cluster = Self { dir, bin, port };
        let data = cluster.data_dir();
        if cluster.is_running() {
            return Ok(cluster);
        }
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&cluster.dir))?;
            // The server user must be able to reach its directory.
            let mut p = cluster.dir.parent();
            while let Some(d) = p {
                let _ = Command::new("chmod").arg("o+x").arg(d).status();
                p = d.parent();
            }
        }
        if !data.join("PG_VERSION").exists() {
            run(cluster
                .command("initdb")
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--locale=C", "-D"])
                .arg(&data))?;
        }
        let mut opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c shared_buffers=512MB -c max_wal_size=4GB -c max_connections=200 \
             -c maintenance_work_mem=512MB",
            cluster.port,
            cluster.dir.display()
        );
        for (name, value) in settings {
            opts.push_str(&format!(" -c {name}={value}"));
        }
        let log = cluster.dir.join("postgres.log");
        run(cluster
            .command("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &opts, "start"]))
        .map_err(|e| {
            // pg_ctl says only "examine the log output"; the log may be gone with its directory
            // by the time anyone looks, so the error carries its end.
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
            PgError::Cluster(format!("{e}\nserver log ({}):\n{}", log.display(), tail.join("\n")))
        })?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// The shell command that stops this server, for people to copy.
    pub fn stop_command(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = format!("{} -D {} -m fast stop", pg_ctl.display(), self.data_dir().display());
        if is_root() {
            format!("runuser -u postgres -- {stop}")
        } else {
            stop
        }
    }

    /// The path of a client tool (e.g. `psql`) next to the server binaries, if it is there.
    pub fn tool(&self, name: &str) -> Option<PathBuf> {
        Some(self.bin.join(name)).filter(|p| p.exists())
    }

    /// Whether the server is up.
    pub fn is_running(&self) -> bool {
        self.data_dir().join("postmaster.pid").exists()
            && self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("status")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
    }

    /// A connection string for the `postgres` superuser and `dbname`.
    pub fn connection_string(&self, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={dbname}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&self) -> Result<(), PgError> {
        run(self.command("pg_ctl").args(["-w", "-m", "fast", "-D"]).arg(self.data_dir()).arg("stop"))
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn find_bin_dir() -> Result<PathBuf, PgError> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
                return Ok(dir);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        PgError::Cluster(
            "no PostgreSQL server binaries found (initdb, pg_ctl); install them (Debian: apt-get install -y postgresql) or pass --postgres".into(),
        )
    })
}

fn run(cmd: &mut Command) -> Result<(), PgError> {
    let out = cmd.output().map_err(|e| PgError::Cluster(format!("cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PgError::Cluster(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )))
    }
}
