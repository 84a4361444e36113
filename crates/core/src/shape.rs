//! What of a Delta table a synced table holds: a row filter, a choice of columns (renamed),
//! what a delete does, and lineage columns. One validated value, shared by the CLI, the TOML
//! file and the API.
//!
//! The filter is SQL (parsed by `sqlparser`, GenericDialect) restricted to what can be both
//! evaluated on Arrow and turned into a Delta data-skipping predicate: comparisons of a column
//! with a literal, `AND`/`OR`/`NOT`, `IN`, `IS [NOT] NULL`, `[I]LIKE`, `BETWEEN`. Anything else
//! is refused here, naming its position, before any table is opened.

use std::collections::BTreeSet;

use sqlparser::ast::{self, BinaryOperator, Expr, Spanned, UnaryOperator, Value};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::model::ModelError;

/// The lineage column holding the Delta version in which a row last changed.
pub const LINEAGE_VERSION_COLUMN: &str = "_lakesync_version";
/// The lineage column holding that version's commit timestamp.
pub const LINEAGE_TIMESTAMP_COLUMN: &str = "_lakesync_commit_timestamp";
/// Under soft deletes, when the row was deleted (NULL while it is live).
pub const DELETED_AT_COLUMN: &str = "_lakesync_deleted_at";

/// A literal in a filter, as written; typed against the column it is compared with when the
/// filter is bound to a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    /// `NULL` (a comparison with it is never true, as in SQL).
    Null,
    /// `TRUE` / `FALSE`.
    Bool(bool),
    /// A number, as written (sign included).
    Number(String),
    /// A quoted string, which may stand for any type (`'2024-01-01'` for a date column).
    Text(String),
    /// `DATE '...'`, `TIMESTAMP '...'` and other typed strings: the text, checked against the
    /// column's type.
    Typed { ty: String, text: String },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// The operator with its operands swapped (`5 < x` is `x > 5`).
    fn flipped(self) -> Self {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            other => other,
        }
    }
}

/// A filter over source columns (names as written; quoted names kept exactly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predicate {
    And(Box<Predicate>, Box<Predicate>),
    Or(Box<Predicate>, Box<Predicate>),
    Not(Box<Predicate>),
    /// `column op literal`.
    Compare {
        column: String,
        op: CmpOp,
        value: Literal,
    },
    /// `column [NOT] IN (literals)`.
    In {
        column: String,
        values: Vec<Literal>,
        negated: bool,
    },
    /// `column IS [NOT] NULL`.
    IsNull {
        column: String,
        negated: bool,
    },
    /// `column [NOT] [I]LIKE 'pattern'` (`%` and `_`, backslash escapes).
    Like {
        column: String,
        pattern: String,
        negated: bool,
        case_insensitive: bool,
    },
    /// A bare boolean column (`WHERE active`).
    Column(String),
}

impl Predicate {
    fn columns<'a>(&'a self, out: &mut BTreeSet<&'a str>) {
        match self {
            Predicate::And(a, b) | Predicate::Or(a, b) => {
                a.columns(out);
                b.columns(out);
            }
            Predicate::Not(p) => p.columns(out),
            Predicate::Compare { column, .. }
            | Predicate::In { column, .. }
            | Predicate::IsNull { column, .. }
            | Predicate::Like { column, .. }
            | Predicate::Column(column) => {
                out.insert(column);
            }
        }
    }
}

/// A parsed row filter: only the source rows for which it is true are synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFilter {
    text: String,
    predicate: Predicate,
}

impl RowFilter {
    /// Parses `text`, a SQL predicate over source columns.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let err = |position: String, message: String| ModelError::InvalidFilter {
            filter: text.to_string(),
            position,
            message,
        };
        let dialect = GenericDialect {};
        let mut parser =
            Parser::new(&dialect).try_with_sql(text).map_err(|e| err(String::new(), strip_position(&e.to_string())))?;
        let expr = parser.parse_expr().map_err(|e| err(String::new(), strip_position(&e.to_string())))?;
        let next = parser.peek_token();
        if next.token != sqlparser::tokenizer::Token::EOF {
            return Err(err(at(next.span.start), format!("unexpected {} after the predicate", next.token)));
        }
        let predicate = predicate(&expr).map_err(|(pos, message)| err(pos, message))?;
        Ok(Self { text: text.trim().to_string(), predicate })
    }

    /// The filter as the user wrote it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The parsed predicate.
    pub fn predicate(&self) -> &Predicate {
        &self.predicate
    }

    /// The source columns the filter reads.
    pub fn columns(&self) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        self.predicate.columns(&mut out);
        out
    }
}

/// sqlparser's messages end with "at Line: 1, Column: 7"; the position is shown our way.
fn strip_position(message: &str) -> String {
    let message = message.strip_prefix("sql parser error: ").unwrap_or(message);
    match message.rfind(" at Line: ") {
        Some(i) => format!("{} ({})", &message[..i], message[i + 4..].to_lowercase()),
        None => message.to_string(),
    }
}

fn at(loc: sqlparser::tokenizer::Location) -> String {
    format!("line {}, column {}", loc.line, loc.column)
}

type Refusal = (String, String);

fn refuse(expr: &Expr, what: &str) -> Refusal {
    (at(expr.span().start), format!("{what} `{expr}` is not supported in a filter; {SUPPORTED}"))
}

const SUPPORTED: &str = "use comparisons of a column with a literal (= <> < <= > >=), AND, OR, NOT, IN (...), \
                         IS [NOT] NULL, [NOT] LIKE / ILIKE and BETWEEN";

fn predicate(expr: &Expr) -> Result<Predicate, Refusal> {
    Ok(match expr {
        Expr::Nested(inner) => predicate(inner)?,
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            Predicate::And(Box::new(predicate(left)?), Box::new(predicate(right)?))
        }
        Expr::BinaryOp { left, op: BinaryOperator::Or, right } => {
            Predicate::Or(Box::new(predicate(left)?), Box::new(predicate(right)?))
        }
        Expr::UnaryOp { op: UnaryOperator::Not, expr } => Predicate::Not(Box::new(predicate(expr)?)),
        Expr::BinaryOp { left, op, right } => {
            let op = match op {
                BinaryOperator::Eq => CmpOp::Eq,
                BinaryOperator::NotEq => CmpOp::Ne,
                BinaryOperator::Lt => CmpOp::Lt,
                BinaryOperator::LtEq => CmpOp::Le,
                BinaryOperator::Gt => CmpOp::Gt,
                BinaryOperator::GtEq => CmpOp::Ge,
                _ => return Err(refuse(expr, "the operator in")),
            };
            match (column(left), column(right)) {
                (Some(c), None) => Predicate::Compare { column: c?, op, value: literal(right)? },
                (None, Some(c)) => Predicate::Compare { column: c?, op: op.flipped(), value: literal(left)? },
                (Some(_), Some(_)) => return Err(refuse(expr, "comparing two columns,")),
                (None, None) => return Err(refuse(expr, "a comparison without a column,")),
            }
        }
        Expr::IsNull(e) => Predicate::IsNull { column: required_column(e)?, negated: false },
        Expr::IsNotNull(e) => Predicate::IsNull { column: required_column(e)?, negated: true },
        Expr::IsTrue(e) => {
            Predicate::Compare { column: required_column(e)?, op: CmpOp::Eq, value: Literal::Bool(true) }
        }
        Expr::IsFalse(e) => {
            Predicate::Compare { column: required_column(e)?, op: CmpOp::Eq, value: Literal::Bool(false) }
        }
        Expr::In { expr: e, target: ast::InTarget::List(list), negated, global: false } => Predicate::In {
            column: required_column(e)?,
            values: list.iter().map(literal).collect::<Result<_, _>>()?,
            negated: *negated,
        },
        Expr::Between { expr: e, negated, low, high } => {
            let column = required_column(e)?;
            let both = Predicate::And(
                Box::new(Predicate::Compare { column: column.clone(), op: CmpOp::Ge, value: literal(low)? }),
                Box::new(Predicate::Compare { column, op: CmpOp::Le, value: literal(high)? }),
            );
            if *negated {
                Predicate::Not(Box::new(both))
            } else {
                both
            }
        }
        Expr::Like { negated, any: false, expr: e, pattern, escape_char: None }
        | Expr::ILike { negated, any: false, expr: e, pattern, escape_char: None } => {
            let pattern = match literal(pattern)? {
                Literal::Text(p) => p,
                _ => return Err(refuse(pattern, "a LIKE pattern that is not a quoted string,")),
            };
            Predicate::Like {
                column: required_column(e)?,
                pattern,
                negated: *negated,
                case_insensitive: matches!(expr, Expr::ILike { .. }),
            }
        }
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => Predicate::Column(required_column(expr)?),
        _ => return Err(refuse(expr, "the expression")),
    })
}

/// The column `expr` names, if it is a column reference (`Some(Err)` for `a.b`).
fn column(expr: &Expr) -> Option<Result<String, Refusal>> {
    match expr {
        Expr::Nested(inner) => column(inner),
        Expr::Identifier(ident) => Some(Ok(ident.value.clone())),
        Expr::CompoundIdentifier(_) => Some(Err(refuse(
            expr,
            "the qualified name (a filter reads the columns of one table: quote a name holding a dot)",
        ))),
        _ => None,
    }
}

fn required_column(expr: &Expr) -> Result<String, Refusal> {
    column(expr).unwrap_or_else(|| Err(refuse(expr, "an operand that is not a column,")))
}

fn literal(expr: &Expr) -> Result<Literal, Refusal> {
    match expr {
        Expr::Nested(inner) => literal(inner),
        Expr::Value(v) => match &v.value {
            Value::Null => Ok(Literal::Null),
            Value::Boolean(b) => Ok(Literal::Bool(*b)),
            Value::Number(n, _) => Ok(Literal::Number(n.clone())),
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) | Value::NationalStringLiteral(s) => {
                Ok(Literal::Text(s.clone()))
            }
            _ => Err(refuse(expr, "the literal")),
        },
        Expr::UnaryOp { op: op @ (UnaryOperator::Minus | UnaryOperator::Plus), expr: inner } => match literal(inner)? {
            Literal::Number(n) if *op == UnaryOperator::Minus => {
                Ok(Literal::Number(n.strip_prefix('-').map(str::to_string).unwrap_or_else(|| format!("-{n}"))))
            }
            Literal::Number(n) => Ok(Literal::Number(n)),
            _ => Err(refuse(expr, "a sign before something that is not a number,")),
        },
        Expr::TypedString(ast::TypedString { data_type, value, .. }) => match &value.value {
            Value::SingleQuotedString(text) => Ok(Literal::Typed { ty: data_type.to_string(), text: text.clone() }),
            _ => Err(refuse(expr, "the typed literal")),
        },
        _ => Err(refuse(expr, "the operand (expected a literal)")),
    }
}

/// One synced column: the source column and its name in Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnChoice {
    /// The Delta column.
    pub source: String,
    /// The Postgres column.
    pub target: String,
}

impl ColumnChoice {
    /// Parses `C` or `C AS NEW` (either may be double-quoted to keep case or spaces).
    pub fn parse(input: &str) -> Result<Self, ModelError> {
        let err = |message: &str| ModelError::InvalidColumn { column: input.to_string(), message: message.to_string() };
        let dialect = GenericDialect {};
        let mut parser = Parser::new(&dialect).try_with_sql(input).map_err(|e| err(&strip_position(&e.to_string())))?;
        let parsed = parser.parse_expr_with_alias().map_err(|e| err(&strip_position(&e.to_string())))?;
        if parser.peek_token().token != sqlparser::tokenizer::Token::EOF {
            return Err(err("expected a column name, optionally followed by AS and its name in Postgres"));
        }
        let source = match parsed.expr {
            Expr::Identifier(ident) => ident.value,
            _ => return Err(err("expected a column name, optionally followed by AS and its name in Postgres")),
        };
        let target = parsed.alias.map(|a| a.value).unwrap_or_else(|| source.clone());
        if target.starts_with("_lakesync") {
            return Err(err("names starting with _lakesync are lakesync's own columns"));
        }
        Ok(Self { source, target })
    }

    /// How the choice is written back (`source AS target`, or `source`).
    pub fn display(&self) -> String {
        let q = |s: &str| {
            if !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                s.to_string()
            } else {
                format!("\"{}\"", s.replace('"', "\"\""))
            }
        };
        if self.source == self.target {
            q(&self.source)
        } else {
            format!("{} AS {}", q(&self.source), q(&self.target))
        }
    }
}

/// Checks a list of column choices: no source chosen twice, no target name used twice.
pub fn check_columns(columns: &[ColumnChoice]) -> Result<(), ModelError> {
    for (i, c) in columns.iter().enumerate() {
        if columns[..i].iter().any(|o| o.source == c.source) {
            return Err(ModelError::InvalidColumn {
                column: c.display(),
                message: format!("source column {:?} is chosen twice", c.source),
            });
        }
        if columns[..i].iter().any(|o| o.target == c.target) {
            return Err(ModelError::InvalidColumn {
                column: c.display(),
                message: format!("two columns would be called {:?} in Postgres", c.target),
            });
        }
    }
    Ok(())
}

/// What of a Delta table a synced table holds, and how deletes and lineage show: one
/// validated value for the CLI, the TOML file and the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// Only rows for which this is true (at the synced version) are in the table.
    pub filter: Option<RowFilter>,
    /// Only these columns, renamed; empty: every column not in `exclude`.
    pub columns: Vec<ColumnChoice>,
    /// Source columns left out (only without `columns`).
    pub exclude: Vec<String>,
    /// What a delete does.
    pub delete_mode: DeleteMode,
    /// Adds `_lakesync_version` and `_lakesync_commit_timestamp`.
    pub lineage: bool,
}

impl Shape {
    /// Checks the parts together: `columns` and `exclude` are alternatives, and `key` (the
    /// Postgres names of the primary key) must be among the chosen columns.
    pub fn check(&self, key: &[String]) -> Result<(), ModelError> {
        check_columns(&self.columns)?;
        if !self.columns.is_empty() && !self.exclude.is_empty() {
            return Err(ModelError::InvalidColumn {
                column: self.exclude.join(","),
                message: "exclude and columns are alternatives: list the columns to sync, or the ones to leave out"
                    .into(),
            });
        }
        if self.columns.is_empty() {
            return Ok(());
        }
        for k in key {
            if !self.columns.iter().any(|c| &c.target == k) {
                let hint = match self.columns.iter().find(|c| &c.source == k) {
                    Some(c) => format!("; it is renamed to {:?}, so name the key {:?}", c.target, c.target),
                    None => String::new(),
                };
                return Err(ModelError::InvalidColumn {
                    column: k.clone(),
                    message: format!("the primary key column must be among the synced columns{hint}"),
                });
            }
        }
        Ok(())
    }

    /// The columns lakesync adds to the table, in order, with whether each is a timestamp
    /// (else a bigint).
    pub fn added_columns(&self) -> Vec<(&'static str, bool)> {
        let mut out = Vec::new();
        if self.delete_mode == DeleteMode::Soft {
            out.push((DELETED_AT_COLUMN, true));
        }
        if self.lineage {
            out.push((LINEAGE_VERSION_COLUMN, false));
            out.push((LINEAGE_TIMESTAMP_COLUMN, true));
        }
        out
    }
}

/// What a delete in the source does to the synced table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeleteMode {
    /// The row goes.
    #[default]
    Hard,
    /// The row stays, with `_lakesync_deleted_at` set; a key inserted again is live again.
    Soft,
    /// The row stays as it was: nothing is ever deleted.
    Ignore,
}

impl DeleteMode {
    /// Parses `hard`, `soft` or `ignore`.
    pub fn parse(input: &str) -> Result<Self, ModelError> {
        match input.trim().to_ascii_lowercase().as_str() {
            "hard" => Ok(Self::Hard),
            "soft" => Ok(Self::Soft),
            "ignore" => Ok(Self::Ignore),
            _ => Err(ModelError::InvalidDeleteMode(input.to_string())),
        }
    }

    /// The mode's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hard => "hard",
            Self::Soft => "soft",
            Self::Ignore => "ignore",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(column: &str, op: CmpOp, value: Literal) -> Predicate {
        Predicate::Compare { column: column.into(), op, value }
    }

    #[test]
    fn a_filter_parses_comparisons_junctions_lists_ranges_and_patterns() {
        let f = RowFilter::parse("region = 'eu' AND (score >= 10 OR NOT active) AND id IN (1, -2)").unwrap();
        assert_eq!(f.columns().into_iter().collect::<Vec<_>>(), ["active", "id", "region", "score"]);
        let f = RowFilter::parse("5 < score").unwrap();
        assert_eq!(f.predicate(), &cmp("score", CmpOp::Gt, Literal::Number("5".into())));
        let f = RowFilter::parse("d BETWEEN DATE '2024-01-01' AND '2024-02-01'").unwrap();
        assert!(matches!(f.predicate(), Predicate::And(..)), "{f:?}");
        let f = RowFilter::parse("name NOT ILIKE 'a%' AND x IS NOT NULL AND \"Odd Col\" <> 1.5").unwrap();
        assert!(f.columns().contains("Odd Col"));
        let f = RowFilter::parse("d NOT BETWEEN 1 AND 2").unwrap();
        assert!(matches!(f.predicate(), Predicate::Not(..)));
    }

    #[test]
    fn unsupported_filter_syntax_is_refused_naming_its_position() {
        let e = RowFilter::parse("id = 1 AND lower(name) = 'x'").unwrap_err().to_string();
        assert!(e.contains("line 1, column 12") && e.contains("lower(name)"), "{e}");
        let e = RowFilter::parse("a = b").unwrap_err().to_string();
        assert!(e.contains("comparing two columns"), "{e}");
        let e = RowFilter::parse("id = 1 garbage").unwrap_err().to_string();
        assert!(e.contains("column 8"), "{e}");
        let e = RowFilter::parse("id = ").unwrap_err().to_string();
        assert!(e.contains("filter"), "{e}");
        let e = RowFilter::parse("t.id = 1").unwrap_err().to_string();
        assert!(e.contains("qualified"), "{e}");
    }

    #[test]
    fn a_column_choice_renames_with_as_and_names_are_checked() {
        assert_eq!(ColumnChoice::parse("id").unwrap(), ColumnChoice { source: "id".into(), target: "id".into() });
        let c = ColumnChoice::parse("email AS contact_email").unwrap();
        assert_eq!((c.source.as_str(), c.target.as_str()), ("email", "contact_email"));
        let c = ColumnChoice::parse("\"Full Name\" as name").unwrap();
        assert_eq!(c.source, "Full Name");
        assert_eq!(c.display(), "\"Full Name\" AS name");
        assert!(ColumnChoice::parse("a + 1").is_err());
        assert!(ColumnChoice::parse("a AS _lakesync_version").is_err());
        let twice = [ColumnChoice::parse("a AS x").unwrap(), ColumnChoice::parse("b AS x").unwrap()];
        assert!(check_columns(&twice).unwrap_err().to_string().contains("\"x\""));
        assert_eq!(DeleteMode::parse("Soft").unwrap(), DeleteMode::Soft);
        let shape = Shape { columns: vec![ColumnChoice::parse("id AS user_id").unwrap()], ..Shape::default() };
        assert!(shape.check(&["id".into()]).unwrap_err().to_string().contains("name the key \"user_id\""));
        shape.check(&["user_id".into()]).unwrap();
        assert!(DeleteMode::parse("sometimes").is_err());
    }
}
