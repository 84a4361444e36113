//! Reads of a synced table with filters, projections, ordering, ranges and counts: the
//! query model behind the PostgREST-dialect data API (`/rest/v1`), validated against the
//! table's shape before any SQL is built.
//!
//! Invariants: identifiers come from the catalog ([`TableShape`]) and are quoted; every value
//! from a request is a `text` parameter cast in SQL to its column's type (a value that does
//! not fit is Postgres' `22P02`, a 400); one statement reads the rows, the count and the synced
//! version, so all three describe one snapshot.

use crate::ddl::{ident, qualified};
use crate::pool::PooledClient;
use crate::rows::{SyncedAt, TableShape};
use crate::PgError;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    Like,
    Ilike,
}

impl Op {
    fn sql(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Neq => "<>",
            Op::Gt => ">",
            Op::Gte => ">=",
            Op::Lt => "<",
            Op::Lte => "<=",
            Op::Like => "LIKE",
            Op::Ilike => "ILIKE",
        }
    }
}

/// What `IS` tests for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsValue {
    Null,
    True,
    False,
    Unknown,
}

/// A condition on a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// `column op value` (for LIKE/ILIKE the value is a pattern with `%` and `_`).
    Cmp {
        column: usize,
        op: Op,
        value: String,
    },
    /// `column IN (values)`.
    In {
        column: usize,
        values: Vec<String>,
    },
    /// `column IS ...`.
    Is {
        column: usize,
        value: IsValue,
    },
    Not(Box<Cond>),
    And(Vec<Cond>),
    Or(Vec<Cond>),
}

/// One output column: the table's column `column`, named `name` in the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub column: usize,
    pub name: String,
}

/// One sort key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sort {
    pub column: usize,
    pub descending: bool,
    /// `None`: Postgres' default (NULLs last ascending, first descending).
    pub nulls_first: Option<bool>,
}

/// How to count the rows a filter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// `count(*)`.
    Exact,
    /// The planner's estimate (cheap on large tables).
    Planned,
}

/// A read of a synced table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadQuery {
    /// Conditions, all of which must hold.
    pub filter: Vec<Cond>,
    /// Output columns; empty: every column, under its own name.
    pub select: Vec<Output>,
    /// Sort keys; the table's key follows, so pages are stable.
    pub order: Vec<Sort>,
    pub limit: Option<u64>,
    pub offset: u64,
    pub count: Option<Count>,
    /// Keyset pagination: the sort values (as text; one per `order` entry) of the previous
    /// page's last row; this page starts after it. Needs every sort key in one direction, the
    /// first with NULLs last, and `order` ending with the key (what `/api/v1` lists use).
    pub after: Option<Vec<Option<String>>>,
    /// Also return each row's sort values as text ([`ReadResult::sort_values`]), for cursors.
    pub sort_values: bool,
}

/// What a read returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResult {
    /// What the rows reflect; `None` when the table is no longer synced.
    pub synced: Option<SyncedAt>,
    /// Each row as a JSON object.
    pub rows: Vec<String>,
    /// The count asked for.
    pub total: Option<i64>,
    /// Per row, its sort values as text, when [`ReadQuery::sort_values`] asked.
    pub sort_values: Vec<Vec<Option<String>>>,
}

/// `%`-free PostgREST wildcards: `*` stands for `%` in LIKE patterns (URLs mangle `%`).
pub fn like_pattern(value: &str) -> String {
    value.replace('*', "%")
}

/// A Postgres array literal of `values`, every element quoted.
fn array_literal(values: &[String]) -> String {
    let items: Vec<String> =
        values.iter().map(|v| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("{{{}}}", items.join(","))
}

struct Sql<'a> {
    shape: &'a TableShape,
    /// Text parameters, numbered from `base + 1`.
    params: Vec<String>,
    base: usize,
}

impl Sql<'_> {
    fn param(&mut self, value: String) -> usize {
        self.params.push(value);
        self.params.len() + self.base
    }

    fn col(&self, c: usize) -> String {
        format!("t.{}", ident(&self.shape.columns[c].name))
    }

    fn cond(&mut self, cond: &Cond) -> String {
        match cond {
            Cond::Cmp { column, op: op @ (Op::Like | Op::Ilike), value } => {
                let n = self.param(like_pattern(value));
                format!("{}::text {} ${n}::text", self.col(*column), op.sql())
            }
            Cond::Cmp { column, op, value } => {
                let n = self.param(value.clone());
                format!("{} {} ${n}::{}", self.col(*column), op.sql(), self.shape.columns[*column].sql_type)
            }
            Cond::In { column, values } => {
                let n = self.param(array_literal(values));
                format!("{} = ANY(${n}::{}[])", self.col(*column), self.shape.columns[*column].sql_type)
            }
            Cond::Is { column, value } => {
                let what = match value {
                    IsValue::Null => "NULL",
                    IsValue::True => "TRUE",
                    IsValue::False => "FALSE",
                    IsValue::Unknown => "UNKNOWN",
                };
                format!("{} IS {what}", self.col(*column))
            }
            Cond::Not(c) => format!("NOT ({})", self.cond(c)),
            Cond::And(cs) if cs.is_empty() => "TRUE".into(),
            Cond::Or(cs) if cs.is_empty() => "FALSE".into(),
            Cond::And(cs) => format!("({})", cs.iter().map(|c| self.cond(c)).collect::<Vec<_>>().join(" AND ")),
            Cond::Or(cs) => format!("({})", cs.iter().map(|c| self.cond(c)).collect::<Vec<_>>().join(" OR ")),
        }
    }

    fn filter(&mut self, q: &ReadQuery) -> String {
        let mut parts: Vec<String> = q.filter.iter().map(|c| self.cond(c)).collect();
        if let Some(after) = &q.after {
            parts.push(self.keyset(&q.order, after));
        }
        if parts.is_empty() {
            return String::new();
        }
        format!("WHERE {}", parts.join(" AND "))
    }

    /// Rows after `after` in `order` (one direction; a first column that is not a key may hold
    /// NULLs, which sort last).
    fn keyset(&mut self, order: &[Sort], after: &[Option<String>]) -> String {
        let cmp = if order.first().is_some_and(|s| s.descending) { "<" } else { ">" };
        let tuple = |sql: &mut Self, sorts: &[Sort], values: &[Option<String>]| {
            let lhs: Vec<String> = sorts.iter().map(|s| sql.col(s.column)).collect();
            let rhs: Vec<String> = sorts
                .iter()
                .zip(values)
                .map(|(s, v)| {
                    let n = sql.param(v.clone().unwrap_or_default());
                    format!("${n}::{}", sql.shape.columns[s.column].sql_type)
                })
                .collect();
            format!("({}) {cmp} ({})", lhs.join(", "), rhs.join(", "))
        };
        let nullable = order.first().filter(|s| !self.shape.key.contains(&s.column));
        match nullable {
            Some(first) => {
                let col = self.col(first.column);
                match &after[0] {
                    Some(_) => format!("({} OR {col} IS NULL)", tuple(self, order, after)),
                    None => format!("({col} IS NULL AND {})", tuple(self, &order[1..], &after[1..])),
                }
            }
            None => tuple(self, order, after),
        }
    }
}

impl TableShape {
    /// The read's statement and its text parameters (after `$1` schema and `$2` table):
    /// columns synced version, commit timestamp, exact count (or NULL), row JSON (NULL when
    /// no row matched).
    pub fn read_sql(&self, q: &ReadQuery) -> (String, Vec<String>) {
        self.read_sql_with(q, true)
    }

    /// [`Self::read_sql`]; without `with_state` the statement does not read the sync state
    /// (its first two columns are NULL; `$1`/`$2` stay in the numbering, unused), for a role
    /// that may not read it.
    pub fn read_sql_with(&self, q: &ReadQuery, with_state: bool) -> (String, Vec<String>) {
        let mut sql = Sql { shape: self, params: Vec::new(), base: 2 };
        let filter = sql.filter(q);
        let outputs: Vec<(usize, String)> = if q.select.is_empty() {
            self.columns.iter().enumerate().map(|(i, c)| (i, c.name.clone())).collect()
        } else {
            q.select.iter().map(|o| (o.column, o.name.clone())).collect()
        };
        let json = self.json_of(&outputs);
        // The sort values as text, for a cursor (c0, c1, ...).
        let sort_texts: Vec<String> = if q.sort_values {
            q.order.iter().enumerate().map(|(i, s)| format!("{}::text AS c{i}", sql.col(s.column))).collect()
        } else {
            Vec::new()
        };
        let mut order: Vec<String> = q
            .order
            .iter()
            .map(|s| {
                let dir = if s.descending { " DESC" } else { "" };
                let nulls = match s.nulls_first {
                    Some(true) => " NULLS FIRST",
                    Some(false) => " NULLS LAST",
                    None => "",
                };
                format!("{}{dir}{nulls}", sql.col(s.column))
            })
            .collect();
        order.extend(self.key.iter().filter(|k| !q.order.iter().any(|s| s.column == **k)).map(|&k| sql.col(k)));
        let limit = match q.limit {
            Some(n) => format!(" LIMIT ${}::bigint", sql.param(n.to_string())),
            None => String::new(),
        };
        let offset =
            if q.offset > 0 { format!(" OFFSET ${}::bigint", sql.param(q.offset.to_string())) } else { String::new() };
        let table = qualified(&self.table);
        let count = if q.count == Some(Count::Exact) {
            format!("(SELECT count(*) FROM {table} t {filter})")
        } else {
            "NULL::bigint".to_string()
        };
        let order = order.join(", ");
        let (state, from, wher) = if with_state {
            (
                format!("s.synced_version, {}", crate::rows::COMMIT_TS),
                "lakesync.synced_tables s",
                "WHERE s.target_schema = $1 AND s.target_table = $2",
            )
        } else {
            ("NULL::bigint, NULL::text".to_string(), "(SELECT $1::text, $2::text) s", "")
        };
        let (inner_texts, outer_texts): (String, String) =
            sort_texts.iter().enumerate().map(|(i, t)| (format!(", {t}"), format!(", r.c{i}"))).unzip();
        let text = format!(
            "SELECT {state}, {count}, r.j{outer_texts} FROM {from} \
             LEFT JOIN LATERAL (SELECT {json} AS j{inner_texts}, row_number() OVER (ORDER BY {order}) AS n FROM \
             (SELECT * FROM {table} t {filter} ORDER BY {order}{limit}{offset}) t) r ON true \
             {wher} ORDER BY r.n",
        );
        (text, sql.params)
    }

    /// The statement whose plan estimates how many rows `q`'s filter matches.
    pub fn estimate_sql(&self, q: &ReadQuery) -> (String, Vec<String>) {
        let mut sql = Sql { shape: self, params: Vec::new(), base: 0 };
        let filter = sql.filter(q);
        (format!("EXPLAIN (FORMAT JSON) SELECT 1 FROM {} t {filter}", qualified(&self.table)), sql.params)
    }
}

fn read_err(shape: &TableShape) -> impl FnOnce(tokio_postgres::Error) -> PgError + use<> {
    PgError::query(shape.table.to_string(), "read rows")
}

/// The Postgres role a read runs as, and the claims its JWT carried (for policies reading
/// `current_setting('request.jwt.claims', true)`, as under PostgREST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    /// The JWT's claims as JSON; `None` for the anonymous role.
    pub claims: Option<String>,
}

/// Runs `q` on the table of `shape` as `role`: in one REPEATABLE READ transaction, the synced
/// version is read first with the API's own role, then `SET LOCAL ROLE`, and the rows and the
/// count are read as `role`, so its grants and row-level security policies decide what it
/// sees, and all of it describes one snapshot.
pub async fn read_as(
    client: &mut PooledClient,
    shape: &TableShape,
    q: &ReadQuery,
    role: &Role,
) -> Result<ReadResult, PgError> {
    let (sql, values) = shape.read_sql_with(q, false);
    let statement = client.prepare_text_params(&sql, 2 + values.len()).await.map_err(read_err(shape))?;
    let state = client
        .prepare_text_params(
            &format!(
                "SELECT synced_version, {} FROM lakesync.synced_tables s WHERE target_schema = $1 AND target_table = $2",
                crate::rows::COMMIT_TS
            ),
            2,
        )
        .await
        .map_err(read_err(shape))?;
    let tx = client
        .client_mut()
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(read_err(shape))?;
    let Some(state) = tx.query_opt(&state, &[&shape.table.schema, &shape.table.name]).await.map_err(read_err(shape))?
    else {
        return Ok(ReadResult { synced: None, rows: Vec::new(), total: None, sort_values: Vec::new() });
    };
    let synced = SyncedAt { version: state.get(0), commit_timestamp: state.get(1) };
    tx.batch_execute(&format!("SET LOCAL ROLE {}", ident(&role.name))).await.map_err(read_err(shape))?;
    let claims = role.claims.clone().unwrap_or_else(|| "{}".into());
    tx.execute("SELECT set_config('request.jwt.claims', $1::text, true)", &[&claims]).await.map_err(read_err(shape))?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&shape.table.schema, &shape.table.name];
    params.extend(values.iter().map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)));
    let result = tx.query(&statement, &params).await.map_err(read_err(shape))?;
    let mut total: Option<i64> = result.first().and_then(|r| r.get(2));
    let (rows, sort_values) = rows_of(&result, q);
    if q.count == Some(Count::Planned) {
        let (sql, values) = shape.estimate_sql(q);
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let types = vec![tokio_postgres::types::Type::TEXT; values.len()];
        let plan = tx.prepare_typed(&sql, &types).await.map_err(read_err(shape))?;
        let row = tx.query_one(&plan, &params).await.map_err(read_err(shape))?;
        let plan: serde_json::Value = row.get(0);
        total = Some(plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0).round() as i64);
    }
    tx.commit().await.map_err(read_err(shape))?;
    Ok(ReadResult { synced: Some(synced), rows, total, sort_values })
}

/// Runs `q` on the table of `shape`.
pub async fn read(client: &mut PooledClient, shape: &TableShape, q: &ReadQuery) -> Result<ReadResult, PgError> {
    let (sql, values) = shape.read_sql(q);
    let statement = client.prepare_text_params(&sql, 2 + values.len()).await.map_err(read_err(shape))?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&shape.table.schema, &shape.table.name];
    params.extend(values.iter().map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)));
    let result = client.client().query(&statement, &params).await.map_err(read_err(shape))?;
    let Some(first) = result.first() else {
        return Ok(ReadResult { synced: None, rows: Vec::new(), total: None, sort_values: Vec::new() });
    };
    let synced = SyncedAt { version: first.get(0), commit_timestamp: first.get(1) };
    let mut total: Option<i64> = first.get(2);
    let (rows, sort_values) = rows_of(&result, q);
    if q.count == Some(Count::Planned) {
        total = Some(estimate(client, shape, q).await?);
    }
    Ok(ReadResult { synced: Some(synced), rows, total, sort_values })
}

/// The rows' JSON (a LEFT JOIN's NULL row when none matched is skipped) and, when asked, their
/// sort values.
fn rows_of(result: &[tokio_postgres::Row], q: &ReadQuery) -> (Vec<String>, Vec<Vec<Option<String>>>) {
    let mut rows = Vec::with_capacity(result.len());
    let mut sort_values = Vec::new();
    for r in result {
        let Some(json) = r.get::<_, Option<String>>(3) else { continue };
        rows.push(json);
        if q.sort_values {
            sort_values.push((0..q.order.len()).map(|i| r.get::<_, Option<String>>(4 + i)).collect());
        }
    }
    (rows, sort_values)
}

/// The planner's estimate of the rows `q`'s filter matches.
async fn estimate(client: &mut PooledClient, shape: &TableShape, q: &ReadQuery) -> Result<i64, PgError> {
    let (sql, values) = shape.estimate_sql(q);
    let statement = client.prepare_text_params(&sql, values.len()).await.map_err(read_err(shape))?;
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        values.iter().map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
    let row = client.client().query_one(&statement, &params).await.map_err(read_err(shape))?;
    let plan: serde_json::Value = row.get(0);
    Ok(plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::ColumnInfo;
    use lakesync_core::TableName;

    fn shape() -> TableShape {
        let col = |name: &str, sql_type: &str, type_name: &str| ColumnInfo {
            name: name.into(),
            sql_type: sql_type.into(),
            type_name: type_name.into(),
        };
        TableShape {
            table: TableName::new("crm", "orders"),
            columns: vec![
                col("id", "bigint", "int8"),
                col("status", "text", "text"),
                col("total", "numeric(10,2)", "numeric"),
            ],
            key: vec![0],
        }
    }

    #[test]
    fn conditions_bind_every_value_cast_to_its_column_type() {
        let q = ReadQuery {
            filter: vec![
                Cond::Cmp { column: 2, op: Op::Gte, value: "10.5".into() },
                Cond::Or(vec![
                    Cond::In { column: 1, values: vec!["new".into(), "a \"b\", c".into()] },
                    Cond::Not(Box::new(Cond::Is { column: 2, value: IsValue::Null })),
                    Cond::Cmp { column: 1, op: Op::Ilike, value: "*ship*".into() },
                ]),
            ],
            select: vec![Output { column: 0, name: "order_id".into() }],
            order: vec![Sort { column: 2, descending: true, nulls_first: Some(false) }],
            limit: Some(10),
            offset: 20,
            count: Some(Count::Exact),
            ..Default::default()
        };
        let (sql, params) = shape().read_sql(&q);
        assert!(sql.contains(r#"t."total" >= $3::numeric(10,2)"#), "{sql}");
        assert!(
            sql.contains(
                r#"(t."status" = ANY($4::text[]) OR NOT (t."total" IS NULL) OR t."status"::text ILIKE $5::text)"#
            ),
            "{sql}"
        );
        assert!(
            sql.contains(r#"ORDER BY t."total" DESC NULLS LAST, t."id" LIMIT $6::bigint OFFSET $7::bigint"#),
            "{sql}"
        );
        assert!(sql.contains(r#"AS "order_id""#) && !sql.contains(r#"AS "status""#), "{sql}");
        assert!(sql.contains("SELECT count(*) FROM"), "{sql}");
        assert_eq!(params, ["10.5", r#"{"new","a \"b\", c"}"#, "%ship%", "10", "20"]);
    }

    #[test]
    fn pages_after_a_cursor_compare_sort_tuples_and_keep_nulls_last() {
        let desc = |column| Sort { column, descending: true, nulls_first: Some(false) };
        let q = ReadQuery {
            filter: vec![Cond::Cmp { column: 1, op: Op::Eq, value: "new".into() }],
            order: vec![desc(2), desc(0)],
            limit: Some(11),
            after: Some(vec![Some("9.50".into()), Some("7".into())]),
            sort_values: true,
            ..Default::default()
        };
        let (sql, params) = shape().read_sql(&q);
        assert!(sql.contains(r#"t."status" = $3::text"#), "{sql}");
        assert!(
            sql.contains(r#"((t."total", t."id") < ($4::numeric(10,2), $5::bigint) OR t."total" IS NULL)"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"ORDER BY t."total" DESC NULLS LAST, t."id" DESC NULLS LAST LIMIT $6::bigint"#),
            "{sql}"
        );
        assert!(sql.contains(r#"t."total"::text AS c0, t."id"::text AS c1"#), "{sql}");
        assert_eq!(params, ["new", "9.50", "7", "11"]);
        // After a row whose order value is NULL: only NULLs, then by key.
        let q = ReadQuery { after: Some(vec![None, Some("7".into())]), ..q };
        let (sql, _) = shape().read_sql(&q);
        assert!(sql.contains(r#"(t."total" IS NULL AND (t."id") < ($4::bigint))"#), "{sql}");
    }
}
