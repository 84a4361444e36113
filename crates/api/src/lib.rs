//! `lakesync-api`: the HTTP face of the daemon.
//!
//! This crate owns the routes: the management API over synced tables (`/api/v1/synced-tables`),
//! the data API over their rows (`/api/v1/tables/{schema}.{table}/rows`), Prometheus metrics
//! (`/metrics`), the OpenAPI document, `/healthz` (the process is up) and `/readyz` (it serves:
//! in a fleet, once it took part in it), and the operator console at `/` (static assets over
//! the management API, see [`console`]) with the lag history it charts.
//!
//! Invariants:
//! - The data API serves only tables the daemon syncs; anything else is a 404, so the API
//!   cannot be used to read arbitrary tables of the database.
//! - Every data response carries the synced version its rows reflect, read in the same
//!   statement as the rows.
//! - Request values reach Postgres only as parameters; identifiers come from the catalog.
//! - Mutating calls need the bearer token; without a configured token they are refused.
//! - Every replica of a fleet serves every table (reads need no ownership); a sync request is
//!   routed to the owner through Postgres.
//! - With `read_auth` set, every other route but `/healthz`, `/readyz` and `/metrics` needs a bearer
//!   token too (the read token or the management token).
//! - No secret (token, Postgres password) and no row value is logged.

pub mod console;
mod data;
mod error;
mod history;
pub mod https;
mod jwt;
mod manage;
mod metrics;
mod openapi;
mod rest;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use lakesync_engine::config::{ApiSettings, ReadAuth, Secret};
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
    read_auth: ReadAuth,
    max_page_size: u32,
    /// What specs posted to the API may reach.
    policy: lakesync_engine::policy::ApiPolicy,
    /// Table shapes by synced-table name, with the synced version they were read at.
    shapes: Mutex<HashMap<String, CachedShape>>,
    /// JWTs for `/rest/v1`: with them, a request's role is its token's.
    jwt: Option<lakesync_engine::config::JwtSettings>,
    /// The last hour of each table's lag, for the console.
    history: history::LagHistory,
}

impl AppState {
    /// State for serving `daemon`'s tables with `settings`.
    pub fn new(daemon: Arc<Daemon>, settings: &ApiSettings) -> Arc<Self> {
        let setup = format!(
            "SET statement_timeout = {}; SET TimeZone = 'UTC'; SET default_transaction_read_only = on",
            settings.statement_timeout.as_millis()
        );
        Arc::new(Self {
            // The data API's own role when configured (read-only as a privilege), else the
            // syncing one; the sessions are read-only either way.
            pool: Pool::new(
                settings.postgres.clone().unwrap_or_else(|| daemon.postgres().clone()),
                settings.pool_size,
                setup,
            ),
            daemon,
            token: settings.token.clone(),
            read_auth: settings.read_auth.clone(),
            max_page_size: settings.max_page_size,
            policy: settings.policy.clone(),
            shapes: Mutex::new(HashMap::new()),
            jwt: settings.jwt.clone(),
            history: Default::default(),
        })
    }
}

/// `GET /readyz`: 200 while this process serves (in a fleet: it takes part in it), 503 before
/// that, while it cannot reach Postgres to coordinate, and while shutting down.
async fn readyz(axum::extract::State(state): axum::extract::State<Arc<AppState>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    if state.daemon.ready() {
        (axum::http::StatusCode::OK, "ready\n").into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// The router with every route.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(console::index))
        .route("/console/{asset}", get(console::asset))
        .route("/favicon.ico", get(console::favicon))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/api/v1/synced-tables", get(manage::list).post(manage::add))
        .route("/api/v1/synced-tables/{name}", get(manage::get_one).delete(manage::remove))
        .route("/api/v1/synced-tables/{name}/runs", get(manage::runs))
        .route("/api/v1/synced-tables/{name}/lag", get(history::lag))
        .route("/api/v1/synced-tables/{name}/sync", post(manage::sync_now))
        .route("/api/v1/synced-tables/{name}/restart", post(manage::restart))
        .route("/api/v1/synced-tables/{name}/plan", post(manage::plan))
        .route("/api/v1/ingests", get(manage::list_ingests).post(manage::add_ingest))
        .route("/api/v1/ingests/{name}", get(manage::get_ingest).delete(manage::remove_ingest))
        .route("/api/v1/ingests/{name}/restart", post(manage::restart_ingest))
        .route("/api/v1/tables/{table}/rows", get(data::list))
        .route("/api/v1/tables/{table}/rows/{*key}", get(data::lookup))
        .route("/rest/v1/", get(rest::openapi))
        .route("/rest/v1", get(rest::openapi))
        .route(
            "/rest/v1/{table}",
            get(rest::read)
                .head(rest::read)
                .post(rest::refuse_write)
                .patch(rest::refuse_write)
                .put(rest::refuse_write)
                .delete(rest::refuse_write),
        )
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), require_read_token))
        .with_state(state)
}

/// Whether the request carries `Authorization: Bearer <one of tokens>` (constant-time
/// comparison).
pub(crate) fn bearer_matches(headers: &HeaderMap, tokens: &[&Secret]) -> bool {
    let Some(given) =
        headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    tokens.iter().fold(false, |found, token| {
        let (a, b) = (given.as_bytes(), token.expose().as_bytes());
        let diff = a.iter().zip(b).fold(a.len() ^ b.len(), |acc, (x, y)| acc | (x ^ y) as usize);
        found | (diff == 0)
    })
}

/// With `read_auth`, reading routes need a token; `/healthz` and `/metrics` stay open (probes
/// and Prometheus), and mutating routes check the management token themselves.
async fn require_read_token(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let ReadAuth::Tokens(tokens) = &state.read_auth {
        // With JWTs configured, `/rest/v1` authenticates by its own token (and role).
        // The console's page and assets hold no data: it asks for the token itself.
        let open = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics" | "/" | "/favicon.ico")
            || request.uri().path().starts_with("/console/")
            || (state.jwt.is_some() && request.uri().path().starts_with("/rest/v1"));
        let reading = matches!(*request.method(), Method::GET | Method::HEAD);
        if reading && !open && !bearer_matches(request.headers(), &tokens.iter().collect::<Vec<_>>()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    history::spawn(&state);
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

/// Serves the API over HTTPS (see [`https`]) on `listener` until `shutdown` completes.
pub async fn serve_tls(
    listener: https::TlsListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    history::spawn(&state);
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
