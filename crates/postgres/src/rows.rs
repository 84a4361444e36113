//! Reading synced rows for the data API: key lookups and keyset-paginated lists, each one
//! statement that also reads the synced version, so the version reported with the rows is
//! the version they reflect (the state commits with the data, and a statement sees one
//! snapshot).
//!
//! Rows are rendered to JSON by Postgres with lakesync's JSON conventions: integers and
//! floats as numbers, numerics as strings (no precision loss), `timestamptz` as RFC 3339 in
//! UTC, `timestamp` (Delta `TIMESTAMP_NTZ`, no zone) as `YYYY-MM-DDTHH:MM:SS.ffffff`, `bytea`
//! as base64, `jsonb` as JSON. Identifiers come from the catalog and are quoted; every value
//! from a request is a `text` parameter cast in SQL to the column's type.

use lakesync_core::TableName;
use tokio_postgres::GenericClient;

use crate::ddl::{ident, qualified};
use crate::pool::PooledClient;
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

/// A page of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// What the rows reflect; `None` when the table is no longer synced.
    pub synced: Option<SyncedAt>,
    /// Each row as a JSON object.
    pub rows: Vec<String>,
    /// Sort values of the last row when more rows follow (for the next cursor).
    pub next: Option<Vec<Option<String>>>,
}

/// A list request, validated against the shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowQuery {
    /// Equality filters: column index and value text.
    pub filters: Vec<(usize, String)>,
    /// Sort column (index) other than the key, if any.
    pub order_by: Option<usize>,
    /// Descending order.
    pub descending: bool,
    /// Rows per page.
    pub limit: u32,
    /// Sort values of the previous page's last row.
    pub after: Option<Vec<Option<String>>>,
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

    /// `$n` cast to column `col`'s type.
    fn param(&self, n: usize, col: usize) -> String {
        format!("${n}::{}", self.columns[col].sql_type)
    }

    /// The row as JSON text, rendered with lakesync's conventions.
    fn json_expr(&self) -> String {
        let all: Vec<(usize, String)> = self.columns.iter().enumerate().map(|(i, c)| (i, c.name.clone())).collect();
        self.json_of(&all)
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

    /// Key lookup: parameters `$1` schema, `$2` table, then one per key column.
    pub fn lookup_sql(&self) -> String {
        let predicate: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(i, &c)| format!("t.{} = {}", ident(&self.columns[c].name), self.param(i + 3, c)))
            .collect();
        format!(
            "SELECT s.synced_version, {ts}, r.j FROM lakesync.synced_tables s \
             LEFT JOIN LATERAL (SELECT {json} AS j FROM {table} t WHERE {pred}) r ON true \
             WHERE s.target_schema = $1 AND s.target_table = $2",
            ts = TS,
            json = self.json_expr(),
            table = qualified(&self.table),
            pred = predicate.join(" AND "),
        )
    }

    /// The sort columns of a list: the order column (if any) then the key.
    pub fn sort_columns(&self, order_by: Option<usize>) -> Vec<usize> {
        order_by.into_iter().chain(self.key.iter().copied().filter(|&k| Some(k) != order_by)).collect()
    }

    /// List query and its parameters (after `$1` schema and `$2` table).
    pub fn page_sql(&self, q: &RowQuery) -> (String, Vec<Option<String>>) {
        let mut params: Vec<Option<String>> = Vec::new();
        let next_param = |v: Option<String>, params: &mut Vec<Option<String>>| {
            params.push(v);
            params.len() + 2
        };
        let mut conditions: Vec<String> = Vec::new();
        for (col, value) in &q.filters {
            let n = next_param(Some(value.clone()), &mut params);
            conditions.push(format!("t.{} = {}", ident(&self.columns[*col].name), self.param(n, *col)));
        }
        // The order column may hold NULLs: they sort last in both directions; keys never do.
        let nullable_first = q.order_by.filter(|c| !self.key.contains(c));
        let sort = self.sort_columns(q.order_by);
        let cmp = if q.descending { "<" } else { ">" };
        if let Some(after) = &q.after {
            let tuple = |cols: &[usize], values: &[Option<String>], params: &mut Vec<Option<String>>| {
                let lhs: Vec<String> = cols.iter().map(|&c| format!("t.{}", ident(&self.columns[c].name))).collect();
                let rhs: Vec<String> =
                    cols.iter().zip(values).map(|(&c, v)| self.param(next_param(v.clone(), params), c)).collect();
                format!("({}) {cmp} ({})", lhs.join(", "), rhs.join(", "))
            };
            let condition = match nullable_first {
                Some(o) => {
                    let col = format!("t.{}", ident(&self.columns[o].name));
                    match &after[0] {
                        Some(_) => format!("({} OR {col} IS NULL)", tuple(&sort, after, &mut params)),
                        None => format!("({col} IS NULL AND {})", tuple(&sort[1..], &after[1..], &mut params)),
                    }
                }
                None => tuple(&sort, after, &mut params),
            };
            conditions.push(condition);
        }
        let dir = if q.descending { " DESC" } else { "" };
        let order = |prefix: &str| -> String {
            sort.iter()
                .enumerate()
                .map(|(i, &c)| {
                    let nulls = if Some(c) == nullable_first { " NULLS LAST" } else { "" };
                    match prefix {
                        "t" => format!("t.{}{dir}{nulls}", ident(&self.columns[c].name)),
                        _ => format!("r.o{i}{dir}{nulls}"),
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let outputs: Vec<String> = sort
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let col = format!("t.{}", ident(&self.columns[c].name));
                format!("{col}::text AS c{i}, {col} AS o{i}")
            })
            .collect();
        let limit_param = next_param(Some((q.limit + 1).to_string()), &mut params);
        let sql = format!(
            "SELECT s.synced_version, {TS}, r.j, {texts} FROM lakesync.synced_tables s \
             LEFT JOIN LATERAL (SELECT {json} AS j, {outputs} FROM {table} t {filter} ORDER BY {inner} LIMIT ${limit_param}::bigint) r ON true \
             WHERE s.target_schema = $1 AND s.target_table = $2 ORDER BY {outer}",
            texts = (0..sort.len()).map(|i| format!("r.c{i}")).collect::<Vec<_>>().join(", "),
            json = self.json_expr(),
            outputs = outputs.join(", "),
            table = qualified(&self.table),
            filter = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) },
            inner = order("t"),
            outer = order("r"),
        );
        (sql, params)
    }
}

pub(crate) const COMMIT_TS: &str = TS;
const TS: &str = "to_char(s.synced_commit_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

fn read_err(shape: &TableShape) -> impl FnOnce(tokio_postgres::Error) -> PgError + use<> {
    PgError::query(shape.table.to_string(), "read rows")
}

/// Looks up the row with `key` (one text value per key column). `Ok(None)` when the table is
/// no longer synced; otherwise the synced version and the row if present.
pub async fn lookup(
    client: &mut PooledClient,
    shape: &TableShape,
    key: &[String],
) -> Result<Option<(SyncedAt, Option<String>)>, PgError> {
    let sql = shape.lookup_sql();
    let statement = client.prepare_text_params(&sql, 2 + key.len()).await.map_err(read_err(shape))?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&shape.table.schema, &shape.table.name];
    params.extend(key.iter().map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync)));
    let row = client.client().query_opt(&statement, &params).await.map_err(read_err(shape))?;
    Ok(row.map(|r| (SyncedAt { version: r.get(0), commit_timestamp: r.get(1) }, r.get(2))))
}

/// Reads one page of rows.
pub async fn page(client: &mut PooledClient, shape: &TableShape, q: &RowQuery) -> Result<Page, PgError> {
    let (sql, values) = shape.page_sql(q);
    let statement = client.prepare_text_params(&sql, 2 + values.len()).await.map_err(read_err(shape))?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&shape.table.schema, &shape.table.name];
    params.extend(values.iter().map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)));
    let result = client.client().query(&statement, &params).await.map_err(read_err(shape))?;
    let Some(first) = result.first() else {
        return Ok(Page { synced: None, rows: Vec::new(), next: None });
    };
    let synced = SyncedAt { version: first.get(0), commit_timestamp: first.get(1) };
    let width = shape.sort_columns(q.order_by).len();
    let mut rows = Vec::with_capacity(result.len());
    let mut last_sort = None;
    let mut more = false;
    for r in &result {
        let Some(json) = r.get::<_, Option<String>>(2) else { continue }; // no rows: LEFT JOIN's NULL row
        if rows.len() == q.limit as usize {
            more = true;
            break;
        }
        rows.push(json);
        last_sort = Some((0..width).map(|i| r.get::<_, Option<String>>(3 + i)).collect::<Vec<_>>());
    }
    Ok(Page { synced: Some(synced), rows, next: if more { last_sort } else { None } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> TableShape {
        let col = |name: &str, sql_type: &str, type_name: &str| ColumnInfo {
            name: name.into(),
            sql_type: sql_type.into(),
            type_name: type_name.into(),
        };
        TableShape {
            table: TableName::new("crm", "orders"),
            columns: vec![
                col("region", "text", "text"),
                col("id", "bigint", "int8"),
                col("total", "numeric(10,2)", "numeric"),
                col("placed_at", "timestamp with time zone", "timestamptz"),
            ],
            key: vec![0, 1],
        }
    }

    #[test]
    fn a_lookup_casts_text_parameters_to_the_key_types() {
        let sql = shape().lookup_sql();
        assert!(sql.contains("WHERE t.\"region\" = $3::text AND t.\"id\" = $4::bigint"), "{sql}");
        assert!(sql.contains("t.\"total\"::text AS \"total\""), "{sql}");
        assert!(sql.contains("AT TIME ZONE 'UTC'"), "{sql}");
    }

    #[test]
    fn pages_after_a_cursor_compare_sort_tuples_and_keep_nulls_last() {
        let q = RowQuery {
            filters: vec![(0, "emea".into())],
            order_by: Some(2),
            descending: true,
            limit: 10,
            after: Some(vec![Some("9.50".into()), Some("emea".into()), Some("7".into())]),
        };
        let (sql, params) = shape().page_sql(&q);
        assert!(sql.contains("t.\"region\" = $3::text"), "{sql}");
        assert!(
            sql.contains("((t.\"total\", t.\"region\", t.\"id\") < ($4::numeric(10,2), $5::text, $6::bigint) OR t.\"total\" IS NULL)"),
            "{sql}"
        );
        assert!(
            sql.contains("ORDER BY t.\"total\" DESC NULLS LAST, t.\"region\" DESC, t.\"id\" DESC LIMIT $7::bigint"),
            "{sql}"
        );
        assert_eq!(params.last().unwrap().as_deref(), Some("11"));

        let q = RowQuery { after: Some(vec![None, Some("emea".into()), Some("7".into())]), ..q };
        let (sql, _) = shape().page_sql(&q);
        assert!(sql.contains("(t.\"total\" IS NULL AND (t.\"region\", t.\"id\") < ($4::text, $5::bigint))"), "{sql}");
    }

    #[test]
    fn ordering_by_a_key_column_does_not_repeat_it() {
        let q = RowQuery { filters: vec![], order_by: Some(1), descending: false, limit: 5, after: None };
        assert_eq!(shape().sort_columns(q.order_by), vec![1, 0]);
        let (sql, _) = shape().page_sql(&q);
        assert!(sql.contains("ORDER BY t.\"id\", t.\"region\" LIMIT $3::bigint"), "{sql}");
    }
}
