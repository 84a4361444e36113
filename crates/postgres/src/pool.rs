//! A small connection pool for the data API: a fixed number of sessions, each caching its
//! prepared statements, replaced when the server drops them.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use crate::{PgConfig, PgError};

/// A pooled session with its statement cache.
pub struct PooledClient {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl PooledClient {
    /// The session.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The session, to open a transaction on (its `Drop` rolls back what it leaves open, so a
    /// cancelled request never leaves a transaction, or a role, to the next).
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Prepares `sql` once per session; every parameter is `text` (values are cast in SQL).
    pub async fn prepare_text_params(&mut self, sql: &str, params: usize) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let types = vec![Type::TEXT; params];
        let statement = self.client.prepare_typed(sql, &types).await?;
        // Bounded: statements depend on the table shape and the query's filters and order.
        if self.statements.len() >= 256 {
            self.statements.clear();
        }
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

/// Up to `size` sessions, opened on demand with `setup` run on each.
pub struct Pool {
    config: PgConfig,
    setup: String,
    idle: Mutex<Vec<PooledClient>>,
    permits: Semaphore,
}

/// A session on loan from the pool; returned when dropped unless the connection broke.
pub struct PoolGuard<'a> {
    pool: &'a Pool,
    client: Option<PooledClient>,
    _permit: SemaphorePermit<'a>,
}

impl std::ops::Deref for PoolGuard<'_> {
    type Target = PooledClient;
    fn deref(&self) -> &PooledClient {
        self.client.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for PoolGuard<'_> {
    fn deref_mut(&mut self) -> &mut PooledClient {
        self.client.as_mut().expect("present until drop")
    }
}

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.client.is_closed() {
                self.pool.idle.lock().expect("pool lock").push(c);
            }
        }
    }
}

impl Pool {
    /// A pool of at most `size` sessions; `setup` (e.g. `SET statement_timeout ...`) runs on
    /// each new session.
    pub fn new(config: PgConfig, size: usize, setup: impl Into<String>) -> Self {
        Self { config, setup: setup.into(), idle: Mutex::new(Vec::new()), permits: Semaphore::new(size.max(1)) }
    }

    /// Borrows a session, waiting while all are in use.
    pub async fn get(&self) -> Result<PoolGuard<'_>, PgError> {
        let permit = self.permits.acquire().await.expect("pool semaphore never closes");
        let reused = loop {
            let candidate = self.idle.lock().expect("pool lock").pop();
            match candidate {
                Some(c) if c.client.is_closed() => continue,
                other => break other,
            }
        };
        let client = match reused {
            Some(c) => c,
            None => {
                let client = self.config.connect().await?;
                if !self.setup.is_empty() {
                    client.batch_execute(&self.setup).await.map_err(PgError::query("api", "set up a session"))?;
                }
                PooledClient { client, statements: HashMap::new() }
            }
        };
        Ok(PoolGuard { pool: self, client: Some(client), _permit: permit })
    }
}
