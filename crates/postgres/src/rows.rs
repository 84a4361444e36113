//! A synced table's shape for the data API (columns and key from the catalog) and how its
//! rows render as JSON; the reads themselves are [`crate::query`]'s, each one statement that
//! also reads the synced version, so the version reported with the rows is the version they
//! reflect (the state commits with the data, and a statement sees one snapshot).
//!
//! Rows are rendered to JSON by Postgres with lakesync's JSON conventions: integers and
//! floats as numbers, numerics as strings (no precision loss), `timestamptz` as RFC 3339 in
//! UTC, `timestamp` (Delta `TIMESTAMP_NTZ`, no zone) as `YYYY-MM-DDTHH:MM:SS.ffffff`, `bytea`
//! as base64, `jsonb` as JSON. Identifiers come from the catalog and are quoted; every value
//! from a request is a `text` parameter cast in SQL to the column's type.

use lakesync_core::TableName;
use tokio_postgres::GenericClient;

use crate::ddl::{ident, qualified};
use crate::PgError;

/// A column of a synced table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// SQL type, e.g. `numeric(10,2)`.
    pub sql_type: String,
    /// Type name in `pg_type`, e.g. `numeric`.
    pub type_name: String,
}

/// A synced table's columns and key, read from the catalog and the sync state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// The table.
    pub table: TableName,
    /// Columns in table order.
    pub columns: Vec<ColumnInfo>,
    /// Primary-key columns (indexes into `columns`), in key order.
    pub key: Vec<usize>,
}

/// The synced version the rows of a response reflect.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncedAt {
    /// Delta version.
    pub version: Option<i64>,
    /// Its commit timestamp, RFC 3339.
    pub commit_timestamp: Option<String>,
}

impl TableShape {
    /// Reads the shape of `table`; `None` when it does not exist or is not synced.
    pub async fn load(client: &impl GenericClient, table: &TableName) -> Result<Option<Self>, PgError> {
        let err = PgError::query(table, "read the table's columns");
        let key: Option<Vec<String>> = if crate::state::exists(client).await? {
            client
                .query_opt(
                    "SELECT primary_key FROM lakesync.synced_tables WHERE target_schema = $1 AND target_table = $2",
                    &[&table.schema, &table.name],
                )
                .await
                .map_err(err)?
                .map(|r| r.get(0))
        } else {
            None
        };
        let Some(key) = key else { return Ok(None) };
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typname::text \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = to_regclass($1)::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&qualified(table)],
            )
            .await
            .map_err(PgError::query(table, "read the table's columns"))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let columns: Vec<ColumnInfo> =
            rows.iter().map(|r| ColumnInfo { name: r.get(0), sql_type: r.get(1), type_name: r.get(2) }).collect();
        let key = key.iter().map(|k| columns.iter().position(|c| &c.name == k)).collect::<Option<Vec<_>>>();
        Ok(key.map(|key| Self { table: table.clone(), columns, key }))
    }

    /// The column named `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The columns `outputs` (index, name in the answer) of row `t` as a JSON object, rendered
    /// with lakesync's conventions.
    pub(crate) fn json_of(&self, outputs: &[(usize, String)]) -> String {
        let fields: Vec<String> = outputs
            .iter()
            .map(|(i, name)| {
                let c = &self.columns[*i];
                let col = format!("t.{}", ident(&c.name));
                let expr = match c.type_name.as_str() {
                    "numeric" => format!("{col}::text"),
                    "timestamptz" => format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"),
                    "timestamp" => format!("to_char({col}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"),
                    "bytea" => format!("translate(encode({col}, 'base64'), E'\\n', '')"),
                    _ => col,
                };
                format!("{expr} AS {}", ident(name))
            })
            .collect();
        format!("(SELECT row_to_json(v) FROM (SELECT {}) v)::text", fields.join(", "))
    }
}

/// The synced version's commit timestamp of `lakesync.synced_tables s`, as RFC 3339 text.
pub(crate) const COMMIT_TS: &str =
    "to_char(s.synced_commit_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";
