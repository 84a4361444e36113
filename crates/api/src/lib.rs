//! `lakesync-api`: the HTTP face of the daemon.
//!
//! This crate owns the routes: the management API over synced tables (`/api/v1/synced-tables`),
//! the data API over their rows (`/api/v1/tables/{schema}.{table}/rows`), Prometheus metrics
//! (`/metrics`), the OpenAPI document and `/healthz`.
//!
//! Invariants:
//! - The data API serves only tables the daemon syncs; anything else is a 404, so the API
//!   cannot be used to read arbitrary tables of the database.
//! - Every data response carries the synced version its rows reflect, read in the same
//!   statement as the rows.
//! - Request values reach Postgres only as parameters; identifiers come from the catalog.
//! - Mutating calls need the bearer token; without a configured token they are refused.
//! - No secret (token, Postgres password) and no row value is logged.

mod data;
mod error;
mod manage;
mod metrics;
mod openapi;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::routing::{get, post};
use axum::Router;
use lakesync_engine::config::{ApiSettings, Secret};
use lakesync_engine::Daemon;
use lakesync_postgres::pool::Pool;
use lakesync_postgres::rows::TableShape;

pub use error::ApiError;

/// A table's shape and the synced version it was read at.
type CachedShape = (Option<u64>, Arc<TableShape>);

/// What the handlers share.
pub struct AppState {
    daemon: Arc<Daemon>,
    pool: Pool,
    token: Option<Secret>,
    max_page_size: u32,
    /// Table shapes by synced-table name, with the synced version they were read at.
    shapes: Mutex<HashMap<String, CachedShape>>,
}

impl AppState {
    /// State for serving `daemon`'s tables with `settings`.
    pub fn new(daemon: Arc<Daemon>, settings: &ApiSettings) -> Arc<Self> {
        let setup = format!(
            "SET statement_timeout = {}; SET TimeZone = 'UTC'; SET default_transaction_read_only = on",
            settings.statement_timeout.as_millis()
        );
        Arc::new(Self {
            pool: Pool::new(daemon.postgres().clone(), settings.pool_size, setup),
            daemon,
            token: settings.token.clone(),
            max_page_size: settings.max_page_size,
            shapes: Mutex::new(HashMap::new()),
        })
    }
}

/// The router with every route.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/api/v1/synced-tables", get(manage::list).post(manage::add))
        .route("/api/v1/synced-tables/{name}", get(manage::get_one).delete(manage::remove))
        .route("/api/v1/synced-tables/{name}/runs", get(manage::runs))
        .route("/api/v1/synced-tables/{name}/sync", post(manage::sync_now))
        .route("/api/v1/tables/{table}/rows", get(data::list))
        .route("/api/v1/tables/{table}/rows/{*key}", get(data::lookup))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
