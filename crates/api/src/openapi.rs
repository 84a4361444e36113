//! The OpenAPI 3.1 document at `/openapi.json`, listing the synced tables the data API serves.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::AppState;

/// `GET /openapi.json`
pub async fn document(State(state): State<Arc<AppState>>) -> Response {
    let tables: Vec<String> = state.daemon.tables().iter().map(|w| w.spec.target.to_string()).collect();
    let mut r = spec(&tables).to_string().into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn spec(tables: &[String]) -> Value {
    let error = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let name = json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}});
    let table = json!({"name": "table", "in": "path", "required": true, "description": "schema.table of a synced table", "schema": {"type": "string", "enum": tables}});
    let version_headers = json!({
        "X-Lakesync-Version": {"description": "Delta version the rows reflect", "schema": {"type": "integer"}},
        "X-Lakesync-Commit-Timestamp": {"description": "commit time of that version (RFC 3339)", "schema": {"type": "string"}}
    });
    let auth = json!([{"bearer": []}]);
    json!({
        "openapi": "3.1.0",
        "info": {"title": "lakesync", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Synced Delta tables in Postgres: management and data API. Row JSON: integers and floats are numbers, decimals strings, timestamps RFC 3339, bytea base64, jsonb JSON."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
                "TableConfig": {"type": "object", "required": ["source", "target", "primary_key", "mode"], "properties": {
                    "name": {"type": "string"}, "source": {"type": "string"}, "target": {"type": "string"},
                    "primary_key": {"type": "array", "items": {"type": "string"}},
                    "mode": {"enum": ["snapshot", "triggered", "continuous"]},
                    "schedule": {"type": "string"}, "poll_interval": {"type": "string"},
                    "indexes": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                    "parallelism": {"type": "integer"}, "nul_bytes": {"enum": ["error", "strip"]},
                    "dedup_by": {"type": "string"}, "exclude": {"type": "array", "items": {"type": "string"}},
                    "filter": {"type": "string", "description": "SQL predicate over source columns: only rows it is true for are synced"},
                    "columns": {"type": "array", "items": {"type": "string"}, "description": "only these source columns, each C or C AS NEW"},
                    "delete_mode": {"enum": ["hard", "soft", "ignore"]}, "lineage": {"type": "boolean"},
                    "versions_per_transaction": {"type": "integer"},
                    "adopt": {"type": "boolean"}, "allow_drop_columns": {"type": "boolean"},
                    "keep_runs": {"type": "integer"}, "keep_runs_days": {"type": "integer"},
                    "storage_options": {"type": "object", "description": "object-store settings (aws_region, aws_endpoint, azure_storage_account_name, ...); a secret only as KEY_env naming the variable that holds it",
                        "additionalProperties": {"type": ["string", "boolean", "number"]}}}},
                "SyncedTable": {"type": "object", "properties": {
                    "name": {"type": "string"}, "source": {"type": "string"}, "target": {"type": "string"},
                    "mode": {"type": "string"}, "state": {"type": "string"},
                    "synced_version": {"type": ["integer", "null"]}, "source_version": {"type": ["integer", "null"]},
                    "synced_commit_timestamp": {"type": ["string", "null"]}, "lag_seconds": {"type": ["number", "null"], "description": "null on a replica that does not run the table"},
                    "lag_versions": {"type": ["integer", "null"]}, "last_error": {"type": ["string", "null"]},
                    "last_run": {"$ref": "#/components/schemas/Run"}, "config": {"$ref": "#/components/schemas/TableConfig"},
                    "owner": {"type": ["string", "null"], "description": "the replica that runs the table"}}},
                "Ingest": {"type": "object", "properties": {
                    "name": {"type": "string"}, "brokers": {"type": "array", "items": {"type": "string"}}, "security_protocol": {"type": "string", "enum": ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]}, "topic": {"type": "string"}, "table": {"type": "string"},
                    "state": {"type": "string", "enum": ["starting", "running", "retrying", "failed", "stopped", "standby"]},
                    "last_error": {"type": ["string", "null"]}, "error_class": {"type": ["string", "null"]}, "lag_messages": {"type": "integer"},
                    "partitions": {"type": "array", "items": {"type": "object", "properties": {"partition": {"type": "integer"},
                        "committed_offset": {"type": ["integer", "null"]}, "high_watermark": {"type": "integer"}, "lag": {"type": "integer"}}}},
                    "rows": {"type": "integer"}, "bytes": {"type": "integer"}, "dead_letters": {"type": "integer"}, "commits": {"type": "integer"},
                    "files": {"type": "integer"}, "compactions": {"type": "integer"}, "table_version": {"type": ["integer", "null"]},
                    "seconds_since_commit": {"type": ["number", "null"]},
                    "owner": {"type": ["string", "null"], "description": "the replica that runs the ingest"}}},
                "Plan": {"type": "object", "description": "what the next run would do; nothing was written", "properties": {
                    "name": {"type": "string"}, "table": {"type": "string"}, "dry_run": {"const": true},
                    "mode": {"enum": ["snapshot", "triggered", "noop"]}, "reason": {"type": "string"},
                    "from_version": {"type": ["integer", "null"]}, "to_version": {"type": "integer"},
                    "inserted": {"type": "integer"}, "updated": {"type": "integer"}, "deleted": {"type": "integer"},
                    "ddl": {"type": "array", "items": {"type": "string"}}}},
                "Run": {"type": ["object", "null"], "properties": {
                    "run_id": {"type": "integer"}, "mode": {"type": "string"}, "outcome": {"type": "string"},
                    "from_version": {"type": ["integer", "null"]}, "to_version": {"type": ["integer", "null"]},
                    "rows_inserted": {"type": "integer"}, "rows_updated": {"type": "integer"}, "rows_deleted": {"type": "integer"},
                    "started_at": {"type": "string"}, "duration_seconds": {"type": ["number", "null"]}, "error": {"type": ["string", "null"]},
                    "replica": {"type": ["string", "null"], "description": "the replica that ran it"}}}
            }
        },
        "paths": {
            "/healthz": {"get": {"summary": "liveness", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "readiness: took part in the fleet, not stopping", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OpenMetrics text format 1.0.0"}}}},
            "/api/v1/synced-tables": {
                "get": {"summary": "list synced tables", "responses": {"200": {"description": "tables", "content": {"application/json": {"schema": {"type": "object", "properties": {"synced_tables": {"type": "array", "items": {"$ref": "#/components/schemas/SyncedTable"}}}}}}}}},
                "post": {"summary": "add a synced table (recorded in the registry in Postgres: every replica runs it, it survives restarts); what it may reach is confined by [api.policy] (a refusal is a 400 naming the field and rule)", "security": auth,
                         "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TableConfig"}}}},
                         "responses": {"201": {"description": "added"}, "400": error, "401": error, "403": error, "409": error}}
            },
            "/api/v1/synced-tables/{name}": {
                "parameters": [name],
                "get": {"summary": "one synced table", "responses": {"200": {"description": "table", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SyncedTable"}}}}, "404": error}},
                "delete": {"summary": "stop syncing; purge_data=true also drops the Postgres table", "security": auth,
                           "parameters": [{"name": "purge_data", "in": "query", "schema": {"type": "boolean"}}],
                           "responses": {"200": {"description": "stopped"}, "401": error, "403": error, "404": error}}
            },
            "/api/v1/synced-tables/{name}/runs": {"parameters": [name], "get": {"summary": "run history, newest first",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 1000}}],
                "responses": {"200": {"description": "runs", "content": {"application/json": {"schema": {"type": "object", "properties": {"runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}}}}}}}, "404": error}}},
            "/api/v1/synced-tables/{name}/sync": {"parameters": [name], "post": {"summary": "sync now (also resumes a failed table)", "security": auth,
                "responses": {"202": {"description": "requested"}, "401": error, "403": error, "404": error}}},
            "/api/v1/synced-tables/{name}/plan": {"parameters": [name], "post": {"summary": "dry run: what the next run would do (mode, reason, versions, rows, DDL), writing nothing", "security": auth,
                "responses": {"200": {"description": "the plan", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Plan"}}}}, "401": error, "403": error, "404": error, "409": error}}},
            "/api/v1/synced-tables/{name}/restart": {"parameters": [name], "post": {"summary": "resume a failed table (clears its error and syncs now, on its owner)", "security": auth,
                "responses": {"202": {"description": "requested"}, "401": error, "403": error, "404": error}}},
            "/api/v1/ingests/{name}/restart": {"parameters": [name], "post": {"summary": "run a failed ingest again (every replica may try it again; its owner, or the first to claim it, starts it)", "security": auth,
                "responses": {"202": {"description": "requested"}, "401": error, "403": error, "404": error}}},
            "/api/v1/ingests": {"get": {"summary": "Kafka ingests: state, lag per partition, counters", "responses": {"200": {"description": "ingests",
                "content": {"application/json": {"schema": {"type": "object", "properties": {"ingests": {"type": "array", "items": {"$ref": "#/components/schemas/Ingest"}}}}}}}}},
                "post": {"summary": "add an ingest: an [[ingest]] entry as JSON (recorded in the registry in Postgres: one replica runs it, it survives restarts; file paths are the replicas'); what it may reach is confined by [api.policy]", "security": auth,
                         "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["brokers", "topic", "table"]}}}},
                         "responses": {"201": {"description": "added", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ingest"}}}}, "400": error, "401": error, "403": error, "409": error}}},
            "/api/v1/ingests/{name}": {"parameters": [name], "get": {"summary": "one ingest", "responses": {"200": {"description": "ingest",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ingest"}}}}, "404": error}},
                "delete": {"summary": "stop the ingest on every replica, after it commits what it holds (its table and positions stay)", "security": auth,
                           "responses": {"200": {"description": "stopped"}, "401": error, "403": error, "404": error}}},
            "/api/v1/tables/{table}/rows": {"parameters": [table], "get": {
                "summary": "rows of a synced table, keyset-paginated; any other query parameter filters a column by equality",
                "parameters": [
                    {"name": "order_by", "in": "query", "description": "column, optionally suffixed .desc or .asc", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 100}},
                    {"name": "after", "in": "query", "description": "the previous page's next cursor", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "a page", "headers": version_headers,
                    "content": {"application/json": {"schema": {"type": "object", "properties": {"rows": {"type": "array", "items": {"type": "object"}}, "next": {"type": ["string", "null"]}}}}}},
                    "400": error, "404": error, "504": error}}},
            "/api/v1/tables/{table}/rows/{key}": {"parameters": [table, {"name": "key", "in": "path", "required": true, "description": "the primary key; one path segment per key column, in key order", "schema": {"type": "string"}}],
                "get": {"summary": "one row by primary key", "responses": {"200": {"description": "the row", "headers": version_headers, "content": {"application/json": {"schema": {"type": "object"}}}}, "400": error, "404": error}}}
        }
    })
}
