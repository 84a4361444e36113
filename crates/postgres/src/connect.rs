//! Connection settings and connecting, without ever exposing the password.

use tokio_postgres::{Client, NoTls};

use crate::tls::{split_tls, RustlsConnect, SslMode, TlsSettings};
use crate::PgError;

/// Parsed Postgres connection settings.
#[derive(Clone)]
pub struct PgConfig {
    config: tokio_postgres::Config,
    tls: TlsSettings,
    /// The TLS connector (`None` with `sslmode=disable`).
    connector: Option<RustlsConnect>,
}

impl std::fmt::Debug for PgConfig {
    /// Shows where we connect, never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgConfig({})", self.target())
    }
}

impl PgConfig {
    /// Parses a libpq-style connection string (`host=.. user=..` or `postgresql://..`),
    /// including `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`) and
    /// `sslrootcert`; see [`crate::tls`].
    pub fn parse(conn: &str) -> Result<Self, PgError> {
        let (conn, tls) = split_tls(conn).map_err(PgError::InvalidConnection)?;
        let conn = conn.as_str();
        let connector = match tls.mode {
            SslMode::Disable => None,
            _ => Some(tls.connector().map_err(PgError::InvalidConnection)?),
        };
        let config: tokio_postgres::Config = conn.parse().map_err(|e: tokio_postgres::Error| {
            // The parser's message may quote the offending fragment; keep only its kind.
            let msg = e.to_string();
            let safe = if msg.contains("password") || conn.contains(msg.as_str()) {
                "malformed connection string".to_string()
            } else {
                msg
            };
            PgError::InvalidConnection(safe)
        })?;
        let mut config = config;
        if config.get_application_name().is_none() {
            config.application_name("lakesync");
        }
        Ok(Self { config, tls, connector })
    }

    /// The TLS mode.
    pub fn ssl_mode(&self) -> SslMode {
        self.tls.mode
    }

    /// The same settings with `password` (kept in memory only, never shown).
    pub fn with_password(mut self, password: &str) -> Self {
        self.config.password(password);
        self
    }

    /// `user@host:port/dbname`, for messages. Never includes the password.
    pub fn target(&self) -> String {
        let host = self
            .config
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(s) => s.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{}:{}/{}",
            self.config.get_user().unwrap_or("?"),
            host,
            port,
            self.config.get_dbname().or(self.config.get_user()).unwrap_or("?")
        )
    }

    /// The settings a fleet replica connects with: `application_name` is
    /// [`crate::fleet::session_name`] (`lakesync/<id>`, shortened with a hash when too long:
    /// how other replicas find and end the sessions of a replica whose lease expired) and the
    /// session setting `lakesync.replica` names the replica in the run history. `replica`
    /// must be a valid replica id (see [`crate::fleet::valid_replica_id`]).
    pub fn for_replica(&self, replica: &str) -> Self {
        let mut out = self.clone();
        out.config.application_name(crate::fleet::session_name(replica));
        out.add_option("lakesync.replica", replica);
        out
    }

    /// Adds `-c name=value` to the startup options (values here never hold spaces or quotes).
    fn add_option(&mut self, name: &str, value: &str) {
        let options = match self.config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} -c {name}={value}"),
            _ => format!("-c {name}={value}"),
        };
        self.config.options(options);
    }

    /// The `application_name` sessions use.
    pub fn application_name(&self) -> Option<&str> {
        self.config.get_application_name()
    }

    /// Opens a connection whose `NOTIFY` messages arrive on the returned channel (which
    /// closes when the connection ends).
    pub async fn connect_listening(
        &self,
    ) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>), PgError> {
        let err = |source| PgError::Connect { target: self.target(), source };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = match &self.connector {
            None => drive_listening(self.config.connect(NoTls).await.map_err(err)?, tx),
            Some(tls) => drive_listening(self.config.connect(tls.clone()).await.map_err(err)?, tx),
        };
        Ok((client, rx))
    }

    /// Opens a connection; its I/O runs on a spawned task.
    pub async fn connect(&self) -> Result<Client, PgError> {
        let err = |source| PgError::Connect { target: self.target(), source };
        let client = match &self.connector {
            None => drive(self.config.connect(NoTls).await.map_err(err)?),
            Some(tls) => drive(self.config.connect(tls.clone()).await.map_err(err)?),
        };
        Ok(client)
    }
}

impl PgConfig {
    /// Fails with [`PgError::TransactionPooler`] when these settings reach Postgres through a
    /// pooler in transaction or statement mode (PgBouncer, Supavisor, RDS Proxy): there, one
    /// client's statements run on whichever server session is free, so advisory locks,
    /// `LISTEN`, prepared statements and session settings silently belong to other clients.
    ///
    /// The probe, with simple queries only (a pooler serves those): session A reads its
    /// backend pid and goes idle; session B opens a transaction and reads its pid; A reads
    /// its pid again while B's transaction is open. Directly (or through a session-mode
    /// pooler, or a TCP proxy) the two pids differ and A's stays the same; a transaction
    /// pooler gives B the backend A just released, or moves A to another one (or makes A
    /// wait for the one B holds).
    pub async fn refuse_transaction_pooler(&self) -> Result<(), PgError> {
        // Both sessions connect at once: the check costs one connection's latency, not two.
        let (a, b) = tokio::try_join!(self.connect(), self.connect())?;
        let pooled = || PgError::TransactionPooler { target: self.target() };
        for _ in 0..3 {
            let first = backend_pid(&a).await?;
            simple(&b, "BEGIN").await?;
            let other = backend_pid(&b).await?;
            let again = tokio::time::timeout(std::time::Duration::from_secs(2), backend_pid(&a)).await;
            let _ = simple(&b, "COMMIT").await;
            // A wait past the deadline: A queued for the one backend B holds.
            let Ok(again) = again else { return Err(pooled()) };
            if first == other || again? != first {
                return Err(pooled());
            }
        }
        Ok(())
    }
}

async fn simple(client: &Client, sql: &str) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, PgError> {
    client.simple_query(sql).await.map_err(PgError::query("lakesync", "check for a transaction pooler"))
}

async fn backend_pid(client: &Client) -> Result<String, PgError> {
    simple(client, "SELECT pg_backend_pid()")
        .await?
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .ok_or_else(|| PgError::Mismatch {
            table: "lakesync".into(),
            message: "pg_backend_pid() returned no row".into(),
        })
}

/// Runs a connection's I/O on its own task; returns the client.
fn drive<S, T>((client, connection): (Client, tokio_postgres::Connection<S, T>)) -> Client
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    client
}

/// Like [`drive`], forwarding notifications to `notifications`.
fn drive_listening<S, T>(
    (client, mut connection): (Client, tokio_postgres::Connection<S, T>),
    notifications: tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>,
) -> Client
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::StreamExt;
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let _ = notifications.send(n);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "postgres connection ended");
                    break;
                }
            }
        }
    });
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "hunter2-Secret";

    #[tokio::test]
    async fn the_password_never_appears_in_debug_output_or_errors() {
        let config = PgConfig::parse(&format!("host=127.0.0.1 port=1 user=app password={SECRET} dbname=crm")).unwrap();
        assert_eq!(config.target(), "app@127.0.0.1:1/crm");
        assert!(!format!("{config:?}").contains(SECRET));
        let err = config.connect().await.unwrap_err();
        assert!(!err.to_string().contains(SECRET) && !format!("{err:?}").contains(SECRET), "{err:?}");
        let url = PgConfig::parse(&format!("postgresql://app:{SECRET}@127.0.0.1:1/crm")).unwrap();
        assert!(!format!("{url:?}").contains(SECRET));
        for bad in [format!("host=x password='{SECRET}"), format!("postgresql://app:{SECRET}@[bad/crm")] {
            let err = PgConfig::parse(&bad).unwrap_err();
            assert!(!err.to_string().contains(SECRET), "{err}");
        }
    }
}
