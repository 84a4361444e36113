//! API errors: each maps to one HTTP status and a JSON body `{"error": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lakesync_postgres::PgError;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404: no such table, row or route.
    #[error("{0}")]
    NotFound(String),
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 400: a posted spec asks for what `[api.policy]` does not allow; names the field and
    /// the rule.
    #[error("{message}")]
    Refused { message: String, field: String, rule: String },
    /// 401: missing or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// 403: mutating calls are disabled.
    #[error("{0}")]
    Forbidden(String),
    /// 409: the table exists already.
    #[error("{0}")]
    Conflict(String),
    /// 503: Postgres is unreachable or the daemon is stopping.
    #[error("{0}")]
    Unavailable(String),
    /// 504: the query ran past the statement timeout.
    #[error("{0}")]
    Timeout(String),
    /// 500: anything else (details are logged, not returned).
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// A spec that cannot be used: a policy refusal keeps its field and rule apart.
    pub fn from_config(e: lakesync_engine::config::ConfigError) -> Self {
        match &e {
            lakesync_engine::config::ConfigError::Refused { field, rule, .. } => {
                ApiError::Refused { message: e.to_string(), field: field.clone(), rule: rule.clone() }
            }
            _ => ApiError::BadRequest(e.to_string()),
        }
    }

    /// A run (a dry run) that failed: what the table's spec or data makes impossible is a
    /// conflict with its message; a busy table or an unreachable store or database, 503.
    pub fn from_engine(e: &lakesync_engine::EngineError) -> Self {
        use lakesync_core::{Classify, ErrorClass};
        match e.class() {
            ErrorClass::Config | ErrorClass::Schema | ErrorClass::Data => ApiError::Conflict(e.to_string()),
            ErrorClass::Transient | ErrorClass::Busy => ApiError::Unavailable(e.to_string()),
            ErrorClass::Internal => {
                tracing::error!(error = %e, "dry run failed");
                ApiError::Internal
            }
        }
    }

    /// Maps a Postgres failure of a data query: bad values are the caller's fault, a
    /// cancelled query is a timeout, a lost connection is unavailability.
    pub fn from_query(e: PgError) -> Self {
        match e.sql_state().map(|s| s.code()) {
            Some(c) if c.starts_with("22") => ApiError::BadRequest(
                match &e {
                    PgError::Query { error, .. } => error.as_db_error().map(|d| d.message().to_string()),
                    _ => None,
                }
                .unwrap_or_else(|| "invalid value".into()),
            ),
            Some("57014") => ApiError::Timeout("the query ran longer than the statement timeout".into()),
            _ if matches!(e, PgError::Connect { .. }) || e.sql_state().is_none() => {
                tracing::warn!(error = %e, "data query failed");
                ApiError::Unavailable("Postgres is unavailable".into())
            }
            _ => {
                tracing::error!(error = %e, "data query failed");
                ApiError::Internal
            }
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) | ApiError::Refused { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match &self {
            ApiError::Refused { message, field, rule } => {
                serde_json::json!({ "error": message, "field": field, "rule": rule })
            }
            _ => serde_json::json!({ "error": self.to_string() }),
        }
        .to_string();
        let mut response = (self.status(), body).into_response();
        response.headers_mut().insert("content-type", "application/json".parse().expect("valid header"));
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert("www-authenticate", "Bearer".parse().expect("valid header"));
        }
        response
    }
}
