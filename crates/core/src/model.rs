//! The domain model: what a synced table is, independent of where it lives.

use std::fmt;

use crate::class::{Classify, ErrorClass};

/// A Delta table version (commit number).
pub type Version = u64;

/// Errors raised while turning user input into model values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// A table name that is not `schema.table`.
    #[error("invalid table name {0:?}: expected <schema>.<table>, e.g. public.customers (quote parts containing dots with double quotes)")]
    InvalidTableName(String),
    /// An empty or repeated primary-key column list.
    #[error("invalid primary key {0:?}: {1}")]
    InvalidPrimaryKey(String, &'static str),
    /// An unknown mode name.
    #[error("invalid mode {0:?}: expected auto, snapshot or triggered")]
    InvalidMode(String),
    /// A primary-key column the source schema does not have.
    #[error("primary key column {column:?} is not a column of the source table (columns: {available})")]
    UnknownKeyColumn { column: String, available: String },
    /// A primary-key column whose type cannot be a key.
    #[error("primary key column {column:?} has type {ty}, which cannot be part of a primary key")]
    UnsupportedKeyType { column: String, ty: String },
    /// A row filter that does not parse or uses what filters do not support.
    #[error("invalid filter {filter:?}{}: {message}", if position.is_empty() { String::new() } else { format!(" at {position}") })]
    InvalidFilter { filter: String, position: String, message: String },
    /// A column choice (`--column`) that is not `C` or `C AS NEW`, or repeats another.
    #[error("invalid column {column:?}: {message}")]
    InvalidColumn { column: String, message: String },
    /// An unknown delete mode.
    #[error("invalid delete mode {0:?}: expected hard, soft or ignore")]
    InvalidDeleteMode(String),
}

impl Classify for ModelError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Config
    }
}

/// A Postgres table name, `schema.table`, kept unquoted; quoting happens when SQL is built.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// Schema (namespace) name, exactly as stored in the catalog.
    pub schema: String,
    /// Table name, exactly as stored in the catalog.
    pub name: String,
}

impl TableName {
    /// Builds a name from its two parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self { schema: schema.into(), name: name.into() }
    }

    /// Parses `schema.table`. A part may be double-quoted to hold dots or quotes
    /// (`"my.schema"."odd ""name"""`); unquoted parts are taken literally (no case folding,
    /// so what the user typed is what the catalog holds).
    pub fn parse(input: &str) -> Result<Self, ModelError> {
        let err = || ModelError::InvalidTableName(input.to_string());
        let mut parts = Vec::new();
        let mut chars = input.chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err(err()),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    part.push(c);
                    chars.next();
                }
            }
            if part.is_empty() {
                return Err(err());
            }
            parts.push(part);
            match chars.next() {
                Some('.') => continue,
                None => break,
                Some(_) => return Err(err()),
            }
        }
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) => Ok(Self { schema, name }),
            Err(_) => Err(err()),
        }
    }
}

impl fmt::Display for TableName {
    /// Shows the name the way a user would type it: plain when unambiguous, quoted otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |s: &str| {
            if !s.is_empty() && !s.contains(['.', '"']) {
                s.to_string()
            } else {
                format!("\"{}\"", s.replace('"', "\"\""))
            }
        };
        write!(f, "{}.{}", part(&self.schema), part(&self.name))
    }
}

/// The ordered list of primary-key columns of a synced table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrimaryKey(Vec<String>);

impl PrimaryKey {
    /// Builds a key from column names; it must be non-empty and without repeats.
    pub fn new(columns: Vec<String>) -> Result<Self, ModelError> {
        let shown = columns.join(",");
        if columns.is_empty() || columns.iter().any(|c| c.is_empty()) {
            return Err(ModelError::InvalidPrimaryKey(shown, "name at least one column"));
        }
        for (i, c) in columns.iter().enumerate() {
            if columns[..i].contains(c) {
                return Err(ModelError::InvalidPrimaryKey(shown, "a column is repeated"));
            }
        }
        Ok(Self(columns))
    }

    /// Parses a comma-separated list, e.g. `part,id`.
    pub fn parse(input: &str) -> Result<Self, ModelError> {
        Self::new(input.split(',').map(|c| c.trim().to_string()).collect())
    }

    /// The key columns, in key order.
    pub fn columns(&self) -> &[String] {
        &self.0
    }

    /// Checks that every key column exists in `schema` with a type that can be a key.
    pub fn validate_against(&self, schema: &TableSchema) -> Result<(), ModelError> {
        for col in &self.0 {
            let Some(found) = schema.column(col) else {
                return Err(ModelError::UnknownKeyColumn {
                    column: col.clone(),
                    available: schema.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
                });
            };
            if matches!(found.ty, ColumnType::Json) {
                return Err(ModelError::UnsupportedKeyType { column: col.clone(), ty: found.ty.to_string() });
            }
        }
        Ok(())
    }
}

impl fmt::Display for PrimaryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// What `sync` is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Snapshot when nothing is synced yet or CDF cannot serve the range, else apply the CDF.
    #[default]
    Auto,
    /// Always load a fresh snapshot.
    Snapshot,
    /// Only apply the change data feed; fail rather than snapshot (except the very first load).
    Triggered,
}

impl SyncMode {
    /// Parses `auto`, `snapshot` or `triggered`.
    pub fn parse(input: &str) -> Result<Self, ModelError> {
        match input {
            "auto" => Ok(Self::Auto),
            "snapshot" => Ok(Self::Snapshot),
            "triggered" => Ok(Self::Triggered),
            other => Err(ModelError::InvalidMode(other.to_string())),
        }
    }
}

/// A column's type in lakesync's own terms; each maps to exactly one Postgres type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// BOOLEAN → boolean
    Boolean,
    /// TINYINT, SMALLINT → smallint
    Int16,
    /// INT → integer
    Int32,
    /// BIGINT → bigint
    Int64,
    /// FLOAT → real
    Float32,
    /// DOUBLE → double precision
    Float64,
    /// DECIMAL(p,s) → numeric(p,s)
    Decimal { precision: u8, scale: u8 },
    /// STRING → text
    Text,
    /// BINARY → bytea
    Bytes,
    /// DATE → date
    Date,
    /// TIMESTAMP (UTC instant) → timestamptz
    Timestamptz,
    /// TIMESTAMP_NTZ (wall clock) → timestamp
    Timestamp,
    /// ARRAY, MAP, STRUCT → jsonb
    Json,
}

impl ColumnType {
    /// Whether every value of this type converts to `to` without loss: the changes Delta's
    /// type widening makes (byte/short/int to long or double, float to double, date to
    /// timestamp without time zone, integers and decimals to decimals with at least as many
    /// integer digits and as much scale).
    pub fn widens_to(&self, to: &ColumnType) -> bool {
        use ColumnType::*;
        let integer_digits = |t: &ColumnType| match t {
            Decimal { precision, scale } => Some((*precision as i32 - *scale as i32, *scale as i32)),
            _ => None,
        };
        match (self, to) {
            (Int16, Int32 | Int64 | Float64) | (Int32, Int64 | Float64) | (Float32, Float64) | (Date, Timestamp) => {
                true
            }
            (Int16 | Int32 | Int64, Decimal { .. }) => {
                let needed = match self {
                    Int16 => 5,
                    Int32 => 10,
                    _ => 19,
                };
                integer_digits(to).is_some_and(|(digits, _)| digits >= needed)
            }
            (Decimal { .. }, Decimal { .. }) => {
                let ((from_digits, from_scale), (to_digits, to_scale)) =
                    (integer_digits(self).unwrap_or_default(), integer_digits(to).unwrap_or_default());
                to_digits >= from_digits && to_scale >= from_scale
            }
            _ => false,
        }
    }

    /// The type whose [`ColumnType::postgres_type`] is `spelled` (as `format_type` spells
    /// it), if any.
    pub fn from_postgres(spelled: &str) -> Option<ColumnType> {
        use ColumnType::*;
        Some(match spelled {
            "boolean" => Boolean,
            "smallint" => Int16,
            "integer" => Int32,
            "bigint" => Int64,
            "real" => Float32,
            "double precision" => Float64,
            "text" => Text,
            "bytea" => Bytes,
            "date" => Date,
            "timestamp with time zone" => Timestamptz,
            "timestamp without time zone" => Timestamp,
            "jsonb" => Json,
            other => {
                let (p, s) = other.strip_prefix("numeric(")?.strip_suffix(')')?.split_once(',')?;
                Decimal { precision: p.trim().parse().ok()?, scale: s.trim().parse().ok()? }
            }
        })
    }

    /// The Postgres type this column is stored as.
    pub fn postgres_type(&self) -> String {
        match self {
            ColumnType::Boolean => "boolean".into(),
            ColumnType::Int16 => "smallint".into(),
            ColumnType::Int32 => "integer".into(),
            ColumnType::Int64 => "bigint".into(),
            ColumnType::Float32 => "real".into(),
            ColumnType::Float64 => "double precision".into(),
            ColumnType::Decimal { precision, scale } => format!("numeric({precision},{scale})"),
            ColumnType::Text => "text".into(),
            ColumnType::Bytes => "bytea".into(),
            ColumnType::Date => "date".into(),
            ColumnType::Timestamptz => "timestamp with time zone".into(),
            ColumnType::Timestamp => "timestamp without time zone".into(),
            ColumnType::Json => "jsonb".into(),
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.postgres_type())
    }
}

/// One column of a synced table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The column name, identical in Delta and Postgres.
    pub name: String,
    /// Its type.
    pub ty: ColumnType,
    /// Whether the source allows NULL.
    pub nullable: bool,
}

/// The columns of a synced table, in source order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableSchema {
    /// Columns in source order.
    pub columns: Vec<Column>,
}

/// How a schema moved between two source versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaChange {
    /// Nothing changed.
    None,
    /// New columns appeared and/or existing ones were widened (Delta type widening: see
    /// [`ColumnType::widens_to`]); every value the table holds still fits. Applied with
    /// `ADD COLUMN` and `ALTER COLUMN .. TYPE .. USING` a cast, and the feed goes on.
    Evolved {
        /// New columns.
        added: Vec<Column>,
        /// Existing columns with their new, wider type.
        widened: Vec<Column>,
    },
    /// A column was dropped, renamed or retyped otherwise: only a fresh snapshot can follow it.
    Breaking(String),
}

impl TableSchema {
    /// The column called `name`, if any.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Compares `self` (the old schema) with `new`.
    pub fn change_to(&self, new: &TableSchema) -> SchemaChange {
        if self.columns == new.columns {
            return SchemaChange::None;
        }
        let mut widened = Vec::new();
        for old in &self.columns {
            match new.column(&old.name) {
                None => return SchemaChange::Breaking(format!("column {:?} was dropped or renamed", old.name)),
                Some(n) if n.ty != old.ty && old.ty.widens_to(&n.ty) => widened.push(n.clone()),
                Some(n) if n.ty != old.ty => {
                    return SchemaChange::Breaking(format!(
                        "column {:?} changed type from {} to {}",
                        old.name, old.ty, n.ty
                    ))
                }
                Some(_) => {}
            }
        }
        let added: Vec<Column> = new.columns.iter().filter(|c| self.column(&c.name).is_none()).cloned().collect();
        if added.is_empty() && widened.is_empty() {
            // Only nullability or order moved; the Postgres table needs nothing.
            SchemaChange::None
        } else {
            SchemaChange::Evolved { added, widened }
        }
    }
}

/// What to do with a string that holds a NUL byte, which Postgres text cannot store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NulBytePolicy {
    /// Fail the run with an error naming table, column, version and key (default).
    #[default]
    Error,
    /// Remove NUL bytes from the value.
    Strip,
}

/// Policies for data Postgres cannot hold as is. Defaults never change data silently.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataPolicy {
    /// Strings holding NUL bytes.
    pub nul_bytes: NulBytePolicy,
    /// When a snapshot holds several rows with one key, keep the row with the greatest value of
    /// this column (like Lakebase's timeseries key). `None`: duplicates are an error.
    pub dedup_by: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_with_and_without_quotes() {
        assert_eq!(TableName::parse("public.customers").unwrap(), TableName::new("public", "customers"));
        assert_eq!(TableName::parse("\"my.schema\".\"a \"\"b\"\"\"").unwrap(), TableName::new("my.schema", "a \"b\""));
        assert_eq!(TableName::parse("Sales.Orders").unwrap(), TableName::new("Sales", "Orders"));
        for bad in ["customers", "a.b.c", ".x", "x.", "\"unterminated.x"] {
            assert!(TableName::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn table_names_display_as_typed() {
        assert_eq!(TableName::new("public", "t").to_string(), "public.t");
        assert_eq!(TableName::new("public", "a.b").to_string(), "public.\"a.b\"");
    }

    #[test]
    fn primary_keys_reject_empty_and_repeated_columns() {
        assert_eq!(PrimaryKey::parse("part, id").unwrap().columns(), ["part", "id"]);
        assert!(PrimaryKey::parse("").is_err());
        assert!(PrimaryKey::parse("id,id").is_err());
    }

    fn col(name: &str, ty: ColumnType) -> Column {
        Column { name: name.into(), ty, nullable: true }
    }

    #[test]
    fn added_and_widened_columns_evolve_and_a_narrowed_or_dropped_one_is_breaking() {
        let old = TableSchema { columns: vec![col("id", ColumnType::Int64)] };
        let added = TableSchema { columns: vec![col("id", ColumnType::Int64), col("x", ColumnType::Text)] };
        assert_eq!(
            old.change_to(&added),
            SchemaChange::Evolved { added: vec![col("x", ColumnType::Text)], widened: vec![] }
        );
        let narrowed = TableSchema { columns: vec![col("id", ColumnType::Int32)] };
        assert!(matches!(old.change_to(&narrowed), SchemaChange::Breaking(_)));
        assert_eq!(
            narrowed.change_to(&old),
            SchemaChange::Evolved { added: vec![], widened: vec![col("id", ColumnType::Int64)] }
        );
        assert!(matches!(added.change_to(&old), SchemaChange::Breaking(_)));
        assert_eq!(old.change_to(&old), SchemaChange::None);
    }

    #[test]
    fn widening_is_exactly_what_keeps_every_value() {
        use ColumnType::*;
        let dec = |precision, scale| Decimal { precision, scale };
        for (from, to) in [
            (Int16, Int32),
            (Int16, Float64),
            (Int32, Int64),
            (Int32, Float64),
            (Float32, Float64),
            (Date, Timestamp),
            (dec(10, 2), dec(12, 2)),
            (dec(10, 2), dec(12, 4)),
            (Int32, dec(12, 2)),
            (Int64, dec(38, 0)),
        ] {
            assert!(from.widens_to(&to), "{from} -> {to}");
        }
        for (from, to) in [
            (Int64, Int32),
            (Int64, Float64),
            (Int32, Text),
            (Float64, Float32),
            (Date, Timestamptz),
            (dec(10, 2), dec(10, 3)),
            (dec(10, 2), dec(12, 1)),
            (Int64, dec(18, 0)),
            (Text, Int64),
        ] {
            assert!(!from.widens_to(&to), "{from} -> {to}");
        }
        for ty in [
            Boolean,
            Int16,
            Int32,
            Int64,
            Float32,
            Float64,
            dec(38, 18),
            Text,
            Bytes,
            Date,
            Timestamptz,
            Timestamp,
            Json,
        ] {
            assert_eq!(ColumnType::from_postgres(&ty.postgres_type()), Some(ty));
        }
    }
}
