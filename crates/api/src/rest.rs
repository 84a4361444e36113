//! The data API in PostgREST's dialect, at `/rest/v1/<table>`: what `@supabase/postgrest-js`,
//! `supabase-js`, `postgrest-py` and curl users of Supabase, Neon and Lakebase already call.
//!
//! Read-only: filters (`eq neq gt gte lt lte like ilike in is`, `not.`, nested `or=(…)` /
//! `and=(…)`), `select=` (columns, `alias:column`), `order=`, `limit`/`offset`, the `Range`
//! header and `Content-Range`, `Prefer: count=exact|planned|estimated`, `HEAD`, a single object
//! (`Accept: application/vnd.pgrst.object+json`) and CSV (`Accept: text/csv`); the schema is
//! the `Accept-Profile` header's (default `public`). Errors are PostgREST's
//! `{code, message, details, hint}`. Every answer names the Delta version its rows reflect
//! (`X-Lakesync-Version`, `X-Lakesync-Commit-Timestamp`).
//!
//! Requests are parsed against the table's catalog shape into a
//! [`lakesync_postgres::query::ReadQuery`]; every value is bound, no SQL comes from the client.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use lakesync_postgres::query::{self, Cond, Count, IsValue, Op, Output, ReadQuery, Sort};
use lakesync_postgres::rows::{SyncedAt, TableShape};
use serde_json::{json, Value};

use crate::{ApiError, AppState};

/// A PostgREST-shaped error.
#[derive(Debug)]
pub struct RestError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<String>,
    hint: Option<String>,
}

impl RestError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), details: None, hint: None }
    }

    /// PGRST100: the query string does not parse.
    fn parse(message: impl Into<String>, details: impl Into<String>) -> Self {
        Self { details: Some(details.into()), ..Self::new(StatusCode::BAD_REQUEST, "PGRST100", message) }
    }

    fn unknown_column(shape: &TableShape, column: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "42703", format!("column {}.{} does not exist", shape.table.name, column))
    }
}

impl From<ApiError> for RestError {
    fn from(e: ApiError) -> Self {
        let (status, code) = match &e {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "PGRST205"),
            ApiError::BadRequest(_) | ApiError::Refused { .. } => (StatusCode::BAD_REQUEST, "22P02"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "PGRST302"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "42501"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "23505"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "PGRST001"),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "57014"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "XX000"),
        };
        Self::new(status, code, e.to_string())
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let body = json!({"code": self.code, "message": self.message, "details": self.details, "hint": self.hint});
        let mut r = (self.status, body.to_string()).into_response();
        r.headers_mut().insert("content-type", HeaderValue::from_static("application/json; charset=utf-8"));
        r
    }
}

/// What the client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Array,
    Object,
    Csv,
}

/// A parsed request: the query and how to answer.
#[derive(Debug)]
struct Request {
    query: ReadQuery,
    /// Output columns' names, in order (for CSV).
    names: Vec<String>,
    /// The `Range` header's first offset, when one was given.
    ranged: bool,
}

/// `GET`/`HEAD /rest/v1/{table}`.
pub async fn read(
    State(state): State<Arc<AppState>>,
    method: Method,
    Path(table): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, RestError> {
    let schema = header(&headers, "accept-profile").unwrap_or("public").to_string();
    let path_table = format!("{schema}.{table}");
    let (worker, shape) = crate::data::resolve(&state, &path_table).await.map_err(|_| {
        let mut e = RestError::new(
            StatusCode::NOT_FOUND,
            "PGRST205",
            format!("Could not find the table '{schema}.{table}' in the schema cache"),
        );
        e.hint = Some("lakesync serves synced tables only; the schema comes from the Accept-Profile header".into());
        e
    })?;
    let accept = accepted(&headers)?;
    let mut request = parse(&shape, raw.as_deref().unwrap_or(""), state.max_page_size)?;
    apply_range(&headers, &mut request)?;
    request.query.count = prefer_count(&headers);
    let role = match &state.jwt {
        None => None,
        Some(settings) => Some(jwt_role(settings, &headers)?),
    };
    let mut client = state.pool.get().await.map_err(|e| RestError::from(ApiError::from_query(e)))?;
    let result = match &role {
        None => query::read(&mut client, &shape, &request.query).await,
        Some(role) => query::read_as(&mut client, &shape, &request.query, role).await,
    }
    .map_err(|e| rest_query_error(&state, &worker, e))?;
    let Some(synced) = result.synced else {
        return Err(RestError::new(StatusCode::NOT_FOUND, "PGRST205", format!("{path_table} is no longer synced")));
    };
    let offset = request.query.offset;
    let n = result.rows.len() as u64;
    if let Some(total) = result.total {
        if offset > 0 && offset >= total.max(0) as u64 && n == 0 {
            let mut e =
                RestError::new(StatusCode::RANGE_NOT_SATISFIABLE, "PGRST103", "Requested range not satisfiable");
            e.details = Some(format!("An offset of {offset} was requested, but there are only {total} rows."));
            let mut r = e.into_response();
            r.headers_mut().insert("content-range", HeaderValue::from_str(&format!("*/{total}")).expect("ascii"));
            return Ok(r);
        }
    }
    let range = if n == 0 { "*".to_string() } else { format!("{}-{}", offset, offset + n - 1) };
    let total = result.total.map_or("*".to_string(), |t| t.to_string());
    let partial = result.total.is_some_and(|t| (offset > 0 || offset + n < t.max(0) as u64) && request.ranged);
    let (status, body, content_type) = match accept {
        Shape::Array => (
            if partial { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK },
            format!("[{}]", result.rows.join(",")),
            "application/json; charset=utf-8",
        ),
        Shape::Object if n == 1 => {
            (StatusCode::OK, result.rows[0].clone(), "application/vnd.pgrst.object+json; charset=utf-8")
        }
        Shape::Object => {
            let mut e = RestError::new(
                StatusCode::NOT_ACCEPTABLE,
                "PGRST116",
                "JSON object requested, multiple (or no) rows returned",
            );
            e.details = Some(format!("The result contains {n} rows"));
            return Err(e);
        }
        Shape::Csv => (StatusCode::OK, csv(&request.names, &result.rows), "text/csv; charset=utf-8"),
    };
    let mut r = if method == Method::HEAD { (status, String::new()) } else { (status, body) }.into_response();
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static(content_type));
    h.insert("content-range", HeaderValue::from_str(&format!("{range}/{total}")).expect("ascii"));
    h.insert("range-unit", HeaderValue::from_static("items"));
    versions(h, &synced);
    Ok(r)
}

/// `GET /rest/v1/`: PostgREST's OpenAPI (Swagger 2.0) document for the synced tables of the
/// `Accept-Profile` schema (default `public`), for code generators and API explorers.
pub async fn openapi(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, RestError> {
    let schema = header(&headers, "accept-profile").unwrap_or("public").to_string();
    let mut definitions = serde_json::Map::new();
    let mut paths = serde_json::Map::new();
    let mut parameters = serde_json::Map::new();
    let shared = [
        ("select", "Filtering Columns"),
        ("order", "Ordering"),
        ("offset", "Limiting and Pagination"),
        ("limit", "Limiting and Pagination"),
    ];
    for (name, description) in shared {
        parameters.insert(
            name.into(),
            json!({"name": name, "description": description, "required": false, "in": "query", "type": "string"}),
        );
    }
    parameters.insert("range".into(), json!({"name": "Range", "description": "Limiting and Pagination", "required": false, "in": "header", "type": "string"}));
    parameters.insert("rangeUnit".into(), json!({"name": "Range-Unit", "description": "Limiting and Pagination", "required": false, "default": "items", "in": "header", "type": "string"}));
    parameters.insert("preferCount".into(), json!({"name": "Prefer", "description": "Preference", "required": false, "in": "header", "type": "string", "enum": ["count=none", "count=exact", "count=planned", "count=estimated"]}));
    let mut tables: Vec<_> = state.daemon.tables().into_iter().filter(|w| w.spec.target.schema == schema).collect();
    tables.sort_by(|a, b| a.spec.target.name.cmp(&b.spec.target.name));
    for worker in tables {
        let name = worker.spec.target.name.clone();
        // A table not synced yet has no columns to describe.
        let Ok((_, shape)) = crate::data::resolve(&state, &worker.spec.target.to_string()).await else { continue };
        let mut properties = serde_json::Map::new();
        let mut refs = Vec::new();
        for (i, c) in shape.columns.iter().enumerate() {
            let mut property = match c.type_name.as_str() {
                "int2" | "int4" | "int8" => json!({"type": "integer"}),
                "float4" | "float8" | "numeric" => json!({"type": "number"}),
                "bool" => json!({"type": "boolean"}),
                "jsonb" | "json" => json!({}),
                _ => json!({"type": "string"}),
            };
            property["format"] = json!(c.sql_type);
            if shape.key.contains(&i) {
                property["description"] = json!("Note:\nThis is a Primary Key.<pk/>");
            }
            properties.insert(c.name.clone(), property);
            let key = format!("rowFilter.{name}.{}", c.name);
            parameters.insert(
                key.clone(),
                json!({"name": c.name, "required": false, "in": "query", "type": "string", "format": c.sql_type}),
            );
            refs.push(json!({"$ref": format!("#/parameters/{key}")}));
        }
        let required: Vec<&str> = shape.key.iter().map(|&k| shape.columns[k].name.as_str()).collect();
        definitions.insert(name.clone(), json!({"type": "object", "required": required, "properties": properties}));
        for p in ["select", "order", "range", "rangeUnit", "offset", "limit", "preferCount"] {
            refs.push(json!({"$ref": format!("#/parameters/{p}")}));
        }
        paths.insert(
            format!("/{name}"),
            json!({"get": {
                "tags": [name],
                "summary": format!("{} (synced from Delta; read-only)", worker.spec.target),
                "parameters": refs,
                "responses": {
                    "200": {"description": "OK", "schema": {"type": "array", "items": {"$ref": format!("#/definitions/{name}")}}},
                    "206": {"description": "Partial Content"}
                }
            }}),
        );
    }
    let document = json!({
        "swagger": "2.0",
        "info": {"title": "lakesync synced tables", "description": "PostgREST-dialect, read-only", "version": env!("CARGO_PKG_VERSION")},
        "basePath": "/rest/v1",
        "schemes": ["http", "https"],
        "consumes": ["application/json", "application/vnd.pgrst.object+json", "text/csv"],
        "produces": ["application/json", "application/vnd.pgrst.object+json", "text/csv"],
        "paths": paths,
        "definitions": definitions,
        "parameters": parameters,
    });
    let mut r = (StatusCode::OK, document.to_string()).into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/openapi+json; charset=utf-8"));
    Ok(r)
}

/// `POST`/`PATCH`/`PUT`/`DELETE /rest/v1/{table}`: refused, nothing changed.
pub async fn refuse_write(method: Method, Path(table): Path<String>) -> RestError {
    let mut e = RestError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "42501",
        format!("lakesync's data API is read-only: {method} on {table} was refused and nothing was changed"),
    );
    e.hint = Some("the synced table follows its Delta table; write to the Delta table instead".into());
    e
}

/// The role of a request: its JWT's (`Authorization: Bearer`, else `apikey`, as Supabase
/// clients send it), or the anonymous role.
fn jwt_role(settings: &lakesync_engine::config::JwtSettings, headers: &HeaderMap) -> Result<query::Role, RestError> {
    let token = header(headers, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header(headers, "apikey"))
        .map(str::trim);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    crate::jwt::role(settings, token, now).map_err(|e| {
        let (code, message) = match e {
            crate::jwt::JwtError::Expired => ("PGRST303", "JWT expired".to_string()),
            crate::jwt::JwtError::AnonymousDisabled => ("PGRST302", "Anonymous access is disabled".to_string()),
            crate::jwt::JwtError::Invalid(why) => ("PGRST301", format!("JWT invalid: {why}")),
        };
        let mut r = RestError::new(StatusCode::UNAUTHORIZED, code, message);
        r.hint = Some(
            "sign HS256 tokens with the secret of [api] jwt_secret_env; the role claim names the Postgres role".into(),
        );
        r
    })
}

/// A failed read: a role that does not exist or may not read the table is the caller's
/// problem (401/403 with Postgres' code), the rest as for the other data routes.
fn rest_query_error(state: &AppState, worker: &lakesync_engine::Worker, e: lakesync_postgres::PgError) -> RestError {
    match e.sql_state().map(|s| s.code().to_string()).as_deref() {
        Some(code @ ("42501" | "42704" | "22023")) => {
            let message = match &e {
                lakesync_postgres::PgError::Query { error, .. } => {
                    error.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
                }
                _ => e.to_string(),
            };
            let (status, code) = match code {
                "42501" => (StatusCode::FORBIDDEN, "42501"),
                "42704" => (StatusCode::UNAUTHORIZED, "42704"),
                _ => (StatusCode::UNAUTHORIZED, "22023"),
            };
            RestError::new(status, code, message)
        }
        _ => RestError::from(crate::data::query_error(state, worker, e)),
    }
}

fn versions(h: &mut HeaderMap, synced: &SyncedAt) {
    if let Some(v) = synced.version {
        h.insert("x-lakesync-version", HeaderValue::from(v));
    }
    if let Some(ts) = synced.commit_timestamp.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
        h.insert("x-lakesync-commit-timestamp", ts);
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn accepted(headers: &HeaderMap) -> Result<Shape, RestError> {
    let accept = header(headers, "accept").unwrap_or("*/*");
    for kind in accept.split(',').map(|k| k.split(';').next().unwrap_or("").trim()) {
        match kind {
            "application/vnd.pgrst.object+json" | "application/vnd.pgrst.object" => return Ok(Shape::Object),
            "text/csv" => return Ok(Shape::Csv),
            "application/json" | "*/*" | "application/*" | "" => return Ok(Shape::Array),
            _ => {}
        }
    }
    Err(RestError::new(
        StatusCode::NOT_ACCEPTABLE,
        "PGRST107",
        format!("None of these media types are available: {accept}"),
    ))
}

fn prefer_count(headers: &HeaderMap) -> Option<Count> {
    let prefer = headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    prefer.split(',').map(str::trim).find_map(|p| match p {
        "count=exact" => Some(Count::Exact),
        "count=planned" | "count=estimated" => Some(Count::Planned),
        _ => None,
    })
}

/// The `Range: <from>-[<to>]` header (items), over `limit`/`offset` from the query string.
fn apply_range(headers: &HeaderMap, request: &mut Request) -> Result<(), RestError> {
    let Some(range) = header(headers, "range") else { return Ok(()) };
    let bad = || RestError::new(StatusCode::RANGE_NOT_SATISFIABLE, "PGRST103", "Requested range not satisfiable");
    let range = range.trim().strip_prefix("items=").unwrap_or(range.trim());
    let (from, to) = range.split_once('-').ok_or_else(bad)?;
    let from: u64 = from.trim().parse().map_err(|_| bad())?;
    let to: Option<u64> = match to.trim() {
        "" => None,
        t => Some(t.parse().map_err(|_| bad())?),
    };
    if to.is_some_and(|t| t < from) {
        return Err(bad());
    }
    request.query.offset = from;
    if let Some(to) = to {
        let n = to - from + 1;
        request.query.limit = Some(request.query.limit.map_or(n, |l| l.min(n)));
    }
    request.ranged = true;
    Ok(())
}

/// Parses the query string against the table's columns.
fn parse(shape: &TableShape, raw: &str, max_rows: u32) -> Result<Request, RestError> {
    let mut query = ReadQuery::default();
    let mut names: Vec<String> = shape.columns.iter().map(|c| c.name.clone()).collect();
    let pairs =
        crate::data::query_pairs(raw).map_err(|e| RestError::parse("the query string is not valid", e.to_string()))?;
    for (key, value) in pairs {
        match key.as_str() {
            "select" => {
                query.select = parse_select(shape, &value)?;
                if !query.select.is_empty() {
                    names = query.select.iter().map(|o| o.name.clone()).collect();
                }
            }
            "order" => query.order = parse_order(shape, &value)?,
            "limit" => {
                query.limit = Some(value.parse().map_err(|_| RestError::parse("limit is not a number", value.clone()))?)
            }
            "offset" => {
                query.offset = value.parse().map_err(|_| RestError::parse("offset is not a number", value.clone()))?
            }
            "or" | "and" | "not.or" | "not.and" => {
                let (negated, op) = match key.strip_prefix("not.") {
                    Some(op) => (true, op),
                    None => (false, key.as_str()),
                };
                let inner = value
                    .strip_prefix('(')
                    .and_then(|v| v.strip_suffix(')'))
                    .ok_or_else(|| RestError::parse(format!("{key} needs a parenthesized list"), value.clone()))?;
                let cond = logic(shape, op, inner)?;
                query.filter.push(if negated { Cond::Not(Box::new(cond)) } else { cond });
            }
            // Write-only parameters of PostgREST have no meaning on a read.
            "columns" | "on_conflict" => {}
            column => query.filter.push(filter(shape, column, &value)?),
        }
    }
    // Like PostgREST's `max-rows`: the server's page size bounds every answer.
    let max = u64::from(max_rows);
    query.limit = Some(query.limit.map_or(max, |l| l.min(max)));
    Ok(Request { query, names, ranged: false })
}

fn column(shape: &TableShape, name: &str) -> Result<usize, RestError> {
    shape.column(name).ok_or_else(|| RestError::unknown_column(shape, name))
}

fn parse_select(shape: &TableShape, value: &str) -> Result<Vec<Output>, RestError> {
    let mut out = Vec::new();
    for item in split_top(value) {
        let item = item.trim();
        if item == "*" {
            out.extend(shape.columns.iter().enumerate().map(|(i, c)| Output { column: i, name: c.name.clone() }));
            continue;
        }
        let (alias, name) = match item.split_once(':') {
            Some((alias, name)) => (Some(alias.trim()), name.trim()),
            None => (None, item),
        };
        if name.contains("->") || name.contains('(') || name.contains("::") {
            return Err(RestError::parse(
                "select supports columns and alias:column",
                format!("{item:?}: JSON paths, casts and embedded resources are not supported"),
            ));
        }
        out.push(Output { column: column(shape, name)?, name: alias.unwrap_or(name).to_string() });
    }
    Ok(out)
}

fn parse_order(shape: &TableShape, value: &str) -> Result<Vec<Sort>, RestError> {
    value
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let mut parts = item.trim().split('.');
            let name = parts.next().unwrap_or_default();
            let mut sort = Sort { column: column(shape, name)?, descending: false, nulls_first: None };
            for modifier in parts {
                match modifier {
                    "asc" => sort.descending = false,
                    "desc" => sort.descending = true,
                    "nullsfirst" => sort.nulls_first = Some(true),
                    "nullslast" => sort.nulls_first = Some(false),
                    other => {
                        return Err(RestError::parse(
                            "order: expected column[.asc|.desc][.nullsfirst|.nullslast]",
                            format!("unknown modifier {other:?} in {item:?}"),
                        ))
                    }
                }
            }
            Ok(sort)
        })
        .collect()
}

/// `column=[not.]op.value`.
fn filter(shape: &TableShape, name: &str, value: &str) -> Result<Cond, RestError> {
    let c = column(shape, name)?;
    condition(shape, c, value)
}

/// `[not.]op.value` on column `c`.
fn condition(shape: &TableShape, c: usize, value: &str) -> Result<Cond, RestError> {
    if let Some(rest) = value.strip_prefix("not.") {
        return Ok(Cond::Not(Box::new(condition(shape, c, rest)?)));
    }
    let bad = |why: &str| {
        RestError::parse(
            format!("failed to parse filter ({value})"),
            format!("{why}; expected [not.]eq|neq|gt|gte|lt|lte|like|ilike|in|is.<value> on {}", shape.columns[c].name),
        )
    };
    let (op, arg) = value.split_once('.').ok_or_else(|| bad("no operator"))?;
    let cmp = |op| Ok(Cond::Cmp { column: c, op, value: arg.to_string() });
    match op {
        "eq" => cmp(Op::Eq),
        "neq" => cmp(Op::Neq),
        "gt" => cmp(Op::Gt),
        "gte" => cmp(Op::Gte),
        "lt" => cmp(Op::Lt),
        "lte" => cmp(Op::Lte),
        "like" => cmp(Op::Like),
        "ilike" => cmp(Op::Ilike),
        "in" => {
            let inner =
                arg.strip_prefix('(').and_then(|a| a.strip_suffix(')')).ok_or_else(|| bad("in needs (a,b,...)"))?;
            let values =
                if inner.is_empty() { Vec::new() } else { split_top(inner).into_iter().map(unquote).collect() };
            Ok(Cond::In { column: c, values })
        }
        "is" => {
            let value = match arg.to_ascii_lowercase().as_str() {
                "null" => IsValue::Null,
                "true" => IsValue::True,
                "false" => IsValue::False,
                "unknown" => IsValue::Unknown,
                _ => return Err(bad("is takes null, true, false or unknown")),
            };
            Ok(Cond::Is { column: c, value })
        }
        other => Err(bad(&format!("unknown operator {other:?}"))),
    }
}

/// The items of an `or=(...)`/`and=(...)` list: `column.[not.]op.value`, or a nested
/// `[not.]and(...)`/`[not.]or(...)`.
fn logic(shape: &TableShape, op: &str, list: &str) -> Result<Cond, RestError> {
    let mut items = Vec::new();
    for item in split_top(list) {
        let item = item.trim();
        let (negated, body) = match item.strip_prefix("not.") {
            Some(rest) if rest.starts_with("and(") || rest.starts_with("or(") => (true, rest),
            _ => (false, item),
        };
        let nested = ["and", "or"].iter().find_map(|k| {
            body.strip_prefix(k).and_then(|r| r.strip_prefix('(')).and_then(|r| r.strip_suffix(')')).map(|r| (*k, r))
        });
        let cond = match nested {
            Some((k, inner)) => logic(shape, k, inner)?,
            None => {
                let (name, rest) = body.split_once('.').ok_or_else(|| {
                    RestError::parse(format!("failed to parse logic tree ({list})"), item.to_string())
                })?;
                condition(shape, column(shape, name)?, rest)?
            }
        };
        items.push(if negated { Cond::Not(Box::new(cond)) } else { cond });
    }
    Ok(if op == "or" { Cond::Or(items) } else { Cond::And(items) })
}

/// Splits on commas outside parentheses and double quotes.
fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut quoted, mut escaped) = (Vec::new(), String::new(), 0i32, false, false);
    for ch in s.chars() {
        if escaped {
            cur.push(ch);
            escaped = false;
            continue;
        }
        match ch {
            '\\' if quoted => {
                escaped = true;
                cur.push(ch);
            }
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            '(' if !quoted => {
                depth += 1;
                cur.push(ch);
            }
            ')' if !quoted => {
                depth -= 1;
                cur.push(ch);
            }
            ',' if !quoted && depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    out.push(cur);
    out
}

/// A list value without its double quotes (`"a,b"` → `a,b`; `\"` → `"`).
fn unquote(v: String) -> String {
    let t = v.trim();
    match t.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => t.to_string(),
    }
}

/// The rows (JSON objects) as CSV with a header line, columns in `names`' order.
fn csv(names: &[String], rows: &[String]) -> String {
    let field = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = names.iter().map(|n| field(n)).collect::<Vec<_>>().join(",");
    out.push('\n');
    for row in rows {
        let value: Value = serde_json::from_str(row).unwrap_or(Value::Null);
        let line: Vec<String> = names
            .iter()
            .map(|n| match value.get(n) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => field(s),
                Some(other) => field(&other.to_string()),
            })
            .collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakesync_core::TableName;
    use lakesync_postgres::rows::ColumnInfo;

    fn shape() -> TableShape {
        let col = |n: &str, t: &str| ColumnInfo { name: n.into(), sql_type: t.into(), type_name: t.into() };
        TableShape {
            table: TableName::new("public", "orders"),
            columns: vec![col("id", "bigint"), col("status", "text"), col("total", "numeric")],
            key: vec![0],
        }
    }

    #[test]
    fn postgrest_filters_nest_negate_and_quote_as_clients_send_them() {
        let q = parse(
            &shape(),
            "status=not.in.(new,%22a,b%22)&or=(total.gt.10,and(id.lt.5,status.is.null),not.and(id.eq.1))&total=not.is.null",
            1000,
        )
        .unwrap()
        .query;
        assert_eq!(
            q.filter,
            vec![
                Cond::Not(Box::new(Cond::In { column: 1, values: vec!["new".into(), "a,b".into()] })),
                Cond::Or(vec![
                    Cond::Cmp { column: 2, op: Op::Gt, value: "10".into() },
                    Cond::And(vec![
                        Cond::Cmp { column: 0, op: Op::Lt, value: "5".into() },
                        Cond::Is { column: 1, value: IsValue::Null },
                    ]),
                    Cond::Not(Box::new(Cond::And(vec![Cond::Cmp { column: 0, op: Op::Eq, value: "1".into() }]))),
                ]),
                Cond::Not(Box::new(Cond::Is { column: 2, value: IsValue::Null })),
            ]
        );
        assert_eq!(q.limit, Some(1000), "the server's page size bounds an unlimited read");
    }

    #[test]
    fn select_order_and_limits_are_read_against_the_columns() {
        let r =
            parse(&shape(), "select=order_id:id,total&order=total.desc.nullslast,id&limit=5&offset=10", 1000).unwrap();
        assert_eq!(r.names, ["order_id", "total"]);
        assert_eq!(r.query.order[0], Sort { column: 2, descending: true, nulls_first: Some(false) });
        assert_eq!((r.query.limit, r.query.offset), (Some(5), 10));
        let e = parse(&shape(), "nope=eq.1", 1000).unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, "42703"));
        assert_eq!(e.message, "column orders.nope does not exist");
        let e = parse(&shape(), "id=between.1", 1000).unwrap_err();
        assert_eq!(e.code, "PGRST100");
        let e = parse(&shape(), "select=total->x", 1000).unwrap_err();
        assert_eq!(e.code, "PGRST100");
    }

    #[test]
    fn csv_quotes_what_needs_quoting_in_the_selected_order() {
        let rows = vec![r#"{"b":"x,y","a":1}"#.to_string(), r#"{"a":null,"b":"say \"hi\""}"#.to_string()];
        assert_eq!(csv(&["a".into(), "b".into()], &rows), "a,b\n1,\"x,y\"\n,\"say \"\"hi\"\"\"\n");
    }
}
