//! The data API: synced rows by key and keyset-paginated lists.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use lakesync_core::TableName;
use lakesync_engine::Worker;
use lakesync_postgres::query::{self, Cond, Op, ReadQuery, Sort};
use lakesync_postgres::rows::{SyncedAt, TableShape};

use crate::{ApiError, AppState};

const DEFAULT_LIMIT: u32 = 100;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The synced table behind `{schema}.{table}` and its shape (cached per synced version, so
/// added columns show up after the run that added them).
pub(crate) async fn resolve(state: &AppState, path_table: &str) -> Result<(Arc<Worker>, Arc<TableShape>), ApiError> {
    let not_synced = || ApiError::NotFound(format!("{path_table} is not a synced table"));
    let target = TableName::parse(path_table).map_err(|_| not_synced())?;
    let worker = state.daemon.tables().into_iter().find(|w| w.spec.target == target).ok_or_else(not_synced)?;
    let version = worker.status().synced_version;
    if let Some((v, shape)) = state.shapes.lock().expect("shape cache").get(&worker.spec.name) {
        if *v == version {
            return Ok((worker, shape.clone()));
        }
    }
    let client = state.pool.get().await.map_err(ApiError::from_query)?;
    let shape = TableShape::load(client.client(), &target).await.map_err(ApiError::from_query)?;
    let shape = Arc::new(shape.ok_or_else(|| ApiError::NotFound(format!("{path_table} has not been synced yet")))?);
    state.shapes.lock().expect("shape cache").insert(worker.spec.name.clone(), (version, shape.clone()));
    Ok((worker, shape))
}

fn forget_shape(state: &AppState, worker: &Worker) {
    state.shapes.lock().expect("shape cache").remove(&worker.spec.name);
}

fn respond(status: StatusCode, body: String, synced: &SyncedAt) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if let Some(v) = synced.version {
        h.insert("x-lakesync-version", HeaderValue::from(v));
    }
    if let Some(ts) = synced.commit_timestamp.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
        h.insert("x-lakesync-commit-timestamp", ts);
    }
    r
}

pub(crate) fn query_error(state: &AppState, worker: &Worker, e: lakesync_postgres::PgError) -> ApiError {
    // A column added or dropped under us: reload the shape next time.
    forget_shape(state, worker);
    ApiError::from_query(e)
}

/// `GET /api/v1/tables/{schema}.{table}/rows/{key...}`: one path segment per key column.
pub async fn lookup(
    State(state): State<Arc<AppState>>,
    Path((table, _)): Path<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let (worker, shape) = resolve(&state, &table).await?;
    // Split the raw path so a key value may contain an encoded '/'.
    let raw = uri.path();
    let rest = raw.split_once("/rows/").map(|(_, k)| k).unwrap_or_default();
    let key: Vec<String> = rest
        .split('/')
        .map(|s| percent_decode(s).ok_or_else(|| ApiError::BadRequest("key segment is not valid UTF-8".into())))
        .collect::<Result<_, _>>()?;
    if key.len() != shape.key.len() {
        let names: Vec<&str> = shape.key.iter().map(|&k| shape.columns[k].name.as_str()).collect();
        return Err(ApiError::BadRequest(format!(
            "{table} has a {}-column primary key ({}): give one path segment per key column",
            names.len(),
            names.join(", ")
        )));
    }
    // The same query model as every read: the key's columns equal to the path's values.
    let q = ReadQuery {
        filter: shape.key.iter().zip(key).map(|(&column, value)| Cond::Cmp { column, op: Op::Eq, value }).collect(),
        limit: Some(1),
        ..Default::default()
    };
    let mut client = state.pool.get().await.map_err(ApiError::from_query)?;
    let found = query::read(&mut client, &shape, &q).await.map_err(|e| query_error(&state, &worker, e))?;
    match (found.synced, found.rows.into_iter().next()) {
        (None, _) => {
            forget_shape(&state, &worker);
            Err(ApiError::NotFound(format!("{table} is not a synced table")))
        }
        (Some(synced), Some(row)) => Ok(respond(StatusCode::OK, row, &synced)),
        (Some(synced), None) => {
            Ok(respond(StatusCode::NOT_FOUND, r#"{"error":"no row with this key"}"#.to_string(), &synced))
        }
    }
}

/// `GET /api/v1/tables/{schema}.{table}/rows?<column>=<value>&order_by=<column>[.desc]&limit=N&after=<cursor>`
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(table): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (worker, shape) = resolve(&state, &table).await?;
    let (q, limit, order_spec) = parse_list_query(&shape, raw.as_deref().unwrap_or(""), state.max_page_size)?;
    let mut client = state.pool.get().await.map_err(ApiError::from_query)?;
    let mut page = query::read(&mut client, &shape, &q).await.map_err(|e| query_error(&state, &worker, e))?;
    let Some(synced) = page.synced else {
        forget_shape(&state, &worker);
        return Err(ApiError::NotFound(format!("{table} is not a synced table")));
    };
    // One row more than the page was read: whether another page follows.
    let more = page.rows.len() > limit;
    page.rows.truncate(limit);
    let next = match page.sort_values.get(limit.wrapping_sub(1)).filter(|_| more) {
        Some(values) => serde_json::to_string(&encode_cursor(&order_spec, values)).expect("string"),
        None => "null".to_string(),
    };
    let mut body = String::with_capacity(page.rows.iter().map(|r| r.len() + 1).sum::<usize>() + 32);
    body.push_str("{\"rows\":[");
    for (i, row) in page.rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(row);
    }
    body.push_str("],\"next\":");
    body.push_str(&next);
    body.push('}');
    Ok(respond(StatusCode::OK, body, &synced))
}

/// Parses the list parameters against the table's columns into the query model: equality
/// filters, `order_by` (NULLs last; the key breaks ties, in the same direction), a keyset
/// cursor, and one row more than `limit` (to tell whether a next page exists). Returns the
/// query, the page size and the order spec the cursor is bound to.
fn parse_list_query(shape: &TableShape, raw: &str, max: u32) -> Result<(ReadQuery, usize, String), ApiError> {
    let mut filter = Vec::new();
    let mut limit = DEFAULT_LIMIT;
    let (mut order_by, mut descending) = (None, false);
    let mut cursor = None;
    let mut order_spec = String::new();
    for (name, value) in query_pairs(raw)? {
        match name.as_str() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| ApiError::BadRequest(format!("limit must be between 1 and {max}")))?;
            }
            "after" => cursor = Some(value),
            "order_by" => {
                let (col, desc) = match shape.column(&value) {
                    Some(c) => (c, false),
                    None => match value.rsplit_once('.') {
                        Some((c, "desc")) => (shape.column(c).ok_or_else(|| unknown(shape, c))?, true),
                        Some((c, "asc")) => (shape.column(c).ok_or_else(|| unknown(shape, c))?, false),
                        _ => return Err(unknown(shape, &value)),
                    },
                };
                order_by = Some(col);
                descending = desc;
                order_spec = value;
            }
            column => {
                let col = shape.column(column).ok_or_else(|| unknown(shape, column))?;
                filter.push(Cond::Cmp { column: col, op: Op::Eq, value });
            }
        }
    }
    // The order column (NULLs last in both directions) then the key; keys are never NULL, so
    // their own NULLs clause is left to Postgres (an index on the key then serves the order).
    let order_column = order_by.filter(|c| !shape.key.contains(c));
    let mut order: Vec<Sort> =
        order_column.map(|column| Sort { column, descending, nulls_first: Some(false) }).into_iter().collect();
    let key_first = order_by.filter(|c| shape.key.contains(c));
    order.extend(
        key_first.into_iter().chain(shape.key.iter().copied().filter(|k| Some(*k) != key_first)).map(|column| Sort {
            column,
            descending,
            nulls_first: None,
        }),
    );
    let after = match cursor {
        Some(c) => {
            let values = decode_cursor(&c, &order_spec)?;
            if values.len() != order.len() || values.iter().skip(1).any(Option::is_none) {
                return Err(ApiError::BadRequest("invalid cursor".into()));
            }
            Some(values)
        }
        None => None,
    };
    let q =
        ReadQuery { filter, order, limit: Some(u64::from(limit) + 1), after, sort_values: true, ..Default::default() };
    Ok((q, limit as usize, order_spec))
}

fn unknown(shape: &TableShape, column: &str) -> ApiError {
    let names: Vec<&str> = shape.columns.iter().map(|c| c.name.as_str()).collect();
    ApiError::BadRequest(format!(
        "{} has no column {column:?} (columns: {}; other parameters: order_by, limit, after)",
        shape.table,
        names.join(", ")
    ))
}

/// Cursors are opaque to clients: base64url of `[order_spec, values...]`.
fn encode_cursor(order_spec: &str, values: &[Option<String>]) -> String {
    let mut all: Vec<Option<&str>> = vec![Some(order_spec)];
    all.extend(values.iter().map(|v| v.as_deref()));
    B64.encode(serde_json::to_vec(&all).expect("strings serialize"))
}

fn decode_cursor(cursor: &str, order_spec: &str) -> Result<Vec<Option<String>>, ApiError> {
    let invalid = || ApiError::BadRequest("invalid cursor".into());
    let bytes = B64.decode(cursor).map_err(|_| invalid())?;
    let mut all: Vec<Option<String>> = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if all.is_empty() || all.remove(0).as_deref() != Some(order_spec) {
        return Err(ApiError::BadRequest("the cursor belongs to a different order_by".into()));
    }
    Ok(all)
}

/// The `name=value` pairs of a query string (`+` is a space), decoded strictly: a `%` not
/// followed by two hex digits, or bytes that are not UTF-8, are a 400 rather than a
/// replacement character that could silently match rows holding one.
pub(crate) fn query_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    let decode = |s: &str| {
        percent_decode(&s.replace('+', " ")).ok_or_else(|| {
            ApiError::BadRequest("the query string is not valid: bad percent-encoding or not UTF-8".into())
        })
    };
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// Percent-decodes `s`; `None` for a `%` without two hex digits after it or for bytes that
/// are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakesync_postgres::rows::ColumnInfo;

    fn shape() -> TableShape {
        let col = |n: &str, t: &str| ColumnInfo { name: n.into(), sql_type: t.into(), type_name: t.into() };
        TableShape {
            table: TableName::new("public", "users"),
            columns: vec![col("user_id", "int8"), col("country", "text"), col("score", "float8")],
            key: vec![0],
        }
    }

    #[test]
    fn list_parameters_become_filters_order_and_a_bound_cursor() {
        let (q, limit, spec) = parse_list_query(&shape(), "country=NL&order_by=score.desc&limit=5", 100).unwrap();
        assert_eq!(q.filter, vec![Cond::Cmp { column: 1, op: Op::Eq, value: "NL".into() }]);
        assert_eq!(
            q.order,
            vec![
                Sort { column: 2, descending: true, nulls_first: Some(false) },
                Sort { column: 0, descending: true, nulls_first: None }
            ]
        );
        assert_eq!((limit, q.limit, q.sort_values), (5, Some(6), true), "one row more: is there a next page");
        let cursor = encode_cursor(&spec, &[Some("0.5".into()), Some("42".into())]);
        let (q, _, _) = parse_list_query(&shape(), &format!("order_by=score.desc&after={cursor}"), 100).unwrap();
        assert_eq!(q.after, Some(vec![Some("0.5".into()), Some("42".into())]));
        let err = parse_list_query(&shape(), &format!("order_by=country&after={cursor}"), 100).unwrap_err();
        assert!(err.to_string().contains("different order_by"), "{err}");
    }

    #[test]
    fn bad_list_parameters_are_clear_errors() {
        let err = parse_list_query(&shape(), "colour=red", 100).unwrap_err().to_string();
        assert!(err.contains("no column \"colour\"") && err.contains("user_id, country, score"), "{err}");
        let err = parse_list_query(&shape(), "limit=5000", 1000).unwrap_err().to_string();
        assert!(err.contains("between 1 and 1000"), "{err}");
        assert!(parse_list_query(&shape(), "after=garbage!", 100).is_err());
        let err = parse_list_query(&shape(), "order_by=x;drop table users", 100).unwrap_err().to_string();
        assert!(err.contains("no column"), "{err}");
    }

    #[test]
    fn filters_order_by_and_cursors_with_bad_encoding_are_rejected_not_replaced() {
        for raw in ["country=%FF", "country=caf%C3", "order_by=%FFscore", "after=%ZZ", "country=%4", "%FF=x"] {
            let err = parse_list_query(&shape(), raw, 100).unwrap_err();
            assert!(matches!(err, ApiError::BadRequest(_)), "{raw}: {err}");
        }
        let value = |raw: &str| match parse_list_query(&shape(), raw, 100).unwrap().0.filter.remove(0) {
            Cond::Cmp { value, .. } => value,
            other => panic!("{other:?}"),
        };
        assert_eq!(value("country=caf%C3%A9+au+lait&limit=5"), "café au lait");
        assert_eq!(value("country=a%2Bb"), "a+b");
    }

    #[test]
    fn key_segments_are_percent_decoded() {
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("%FF"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%+1"), None);
        assert_eq!(percent_decode("100%"), None);
    }
}
