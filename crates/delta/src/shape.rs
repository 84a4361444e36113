//! A [`Shape`] bound to one Delta schema: which source columns are read, the row filter as a
//! data-skipping predicate for the kernel and as an Arrow evaluation, and what each batch
//! becomes (chosen columns, renamed, plus lineage and soft-delete columns).
//!
//! Skipping is only ever an optimisation: every row read is evaluated, so a file the kernel
//! cannot skip costs time, never correctness. The kernel predicate is therefore built so that
//! it is implied by the filter (an `AND` keeps the parts it can express, an `OR` or `NOT`
//! only whole), and a file it skips holds no row the filter keeps.

use std::sync::Arc;

use arrow_arith::boolean::{and_kleene, is_not_null, is_null, not, or_kleene};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{new_null_array, Array, ArrayRef, BooleanArray, RecordBatch, Scalar, StringArray};
use arrow_cast::{cast_with_options, CastOptions};
use arrow_schema::{DataType as ArrowType, Field, Schema, TimeUnit};
use delta_kernel::engine::arrow_conversion::TryFromKernel;
use delta_kernel::expressions::{ColumnName, Expression as KExpr, Predicate as KPred, Scalar as KScalar};
use delta_kernel::schema::StructType;
use lakesync_core::shape::{
    CmpOp, Literal, Predicate, DELETED_AT_COLUMN, LINEAGE_TIMESTAMP_COLUMN, LINEAGE_VERSION_COLUMN,
};
use lakesync_core::{Column, ColumnType, DeleteMode, Shape, TableSchema, Version};

use crate::{DeltaError, CHANGE_TYPE_COLUMN, COMMIT_VERSION_COLUMN};

/// The change feed's commit timestamp column.
pub const COMMIT_TIMESTAMP_COLUMN: &str = "_commit_timestamp";

/// A [`Shape`] bound to a table's schema at one version.
#[derive(Debug, Clone)]
pub struct ReadShape {
    uri: String,
    filter: Option<(Bound, Option<KPred>)>,
    /// (source, target) per synced column, in order.
    outputs: Vec<(String, String)>,
    /// Source columns the filter reads.
    filter_columns: Vec<String>,
    soft: bool,
    lineage: bool,
}

/// The columns of `schema` the shape syncs, as (source field name, target name).
fn chosen(
    uri: &str,
    version: Version,
    schema: &StructType,
    shape: &Shape,
) -> Result<Vec<(String, String)>, DeltaError> {
    if shape.columns.is_empty() {
        return Ok(schema
            .fields()
            .filter(|f| !shape.exclude.contains(f.name()))
            .map(|f| (f.name().clone(), f.name().clone()))
            .collect());
    }
    shape
        .columns
        .iter()
        .map(|c| Ok((resolve(uri, version, schema, &c.source, "--column")?, c.target.clone())))
        .collect()
}

/// The field `name` refers to: exactly, or else the one field equal ignoring ASCII case (as
/// Spark resolves names).
fn resolve(uri: &str, version: Version, schema: &StructType, name: &str, what: &str) -> Result<String, DeltaError> {
    if schema.field(name).is_some() {
        return Ok(name.to_string());
    }
    let folded: Vec<&String> = schema.fields().map(|f| f.name()).filter(|f| f.eq_ignore_ascii_case(name)).collect();
    match folded.as_slice() {
        [one] => Ok((*one).clone()),
        _ => Err(DeltaError::Selection {
            uri: uri.to_string(),
            message: format!(
                "{what} names {name:?}, which is not a column of the table at version {version} (columns: {})",
                schema.fields().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// The Postgres-side schema `shape` gives a Delta `schema`: the chosen columns (renamed),
/// then lakesync's own.
pub(crate) fn shaped_schema(
    uri: &str,
    version: Version,
    schema: &StructType,
    shape: &Shape,
) -> Result<TableSchema, DeltaError> {
    let mut columns = Vec::new();
    for (source, target) in chosen(uri, version, schema, shape)? {
        let field = schema.field(&source).expect("resolved");
        let ty = crate::schema::column_type(field.data_type()).ok_or_else(|| DeltaError::UnsupportedType {
            uri: uri.to_string(),
            column: source.clone(),
            ty: crate::schema::type_name(field.data_type()),
        })?;
        columns.push(Column { name: target, ty, nullable: field.is_nullable() });
    }
    for (name, timestamp) in shape.added_columns() {
        let ty = if timestamp { ColumnType::Timestamptz } else { ColumnType::Int64 };
        columns.push(Column { name: name.to_string(), ty, nullable: true });
    }
    Ok(TableSchema { columns })
}

impl ReadShape {
    /// Binds `shape` to `schema` (the table's at `version`): resolves names, types the
    /// filter's literals by their columns.
    pub(crate) fn bind(uri: &str, version: Version, schema: &StructType, shape: &Shape) -> Result<Self, DeltaError> {
        let outputs = chosen(uri, version, schema, shape)?;
        let mut filter_columns = Vec::new();
        let filter = match &shape.filter {
            None => None,
            Some(f) => {
                let err = |message: String| DeltaError::Selection {
                    uri: uri.to_string(),
                    message: format!("filter {:?}: {message}", f.text()),
                };
                let bound = bind(f.predicate(), &mut |name: &str| {
                    let source = resolve(uri, version, schema, name, "the filter")?;
                    let field = schema.field(&source).expect("resolved");
                    let ty = ArrowType::try_from_kernel(field.data_type())
                        .map_err(|e| err(format!("column {source:?} cannot be filtered on: {e}")))?;
                    if !filter_columns.contains(&source) {
                        filter_columns.push(source.clone());
                    }
                    Ok((source, ty))
                })
                .map_err(|e| match e {
                    BindError::Delta(d) => d,
                    BindError::Message(m) => err(m),
                })?;
                let skipping = bound.to_kernel().map(|(p, _)| p);
                Some((bound, skipping))
            }
        };
        Ok(Self {
            uri: uri.to_string(),
            filter,
            outputs,
            filter_columns,
            soft: shape.delete_mode == DeleteMode::Soft,
            lineage: shape.lineage,
        })
    }

    /// Whether rows are filtered.
    pub fn filters(&self) -> bool {
        self.filter.is_some()
    }

    /// The predicate the kernel may skip files by, if the filter has a part it can express.
    pub(crate) fn skipping(&self) -> Option<Arc<KPred>> {
        self.filter.as_ref().and_then(|(_, k)| k.clone()).map(Arc::new)
    }

    /// The source columns to read for the target columns `targets` (all synced ones when
    /// `None`) and the filter.
    pub(crate) fn source_columns(&self, targets: Option<&[String]>) -> Vec<String> {
        let mut out: Vec<String> = match targets {
            None => self.outputs.iter().map(|(s, _)| s.clone()).collect(),
            Some(targets) => targets
                .iter()
                .filter_map(|t| self.outputs.iter().find(|(_, o)| o == t).map(|(s, _)| s.clone()))
                .collect(),
        };
        for c in &self.filter_columns {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
        out
    }

    /// Keeps the rows the filter is true for; then the synced columns renamed (only
    /// `targets` when given), `keep` columns as they are, and lakesync's added columns: for
    /// a change batch from its `_commit_version`/`_commit_timestamp`, for a snapshot from
    /// `snapshot` (its version and commit timestamp in ms).
    pub(crate) fn apply(
        &self,
        batch: RecordBatch,
        targets: Option<&[String]>,
        keep: &[&str],
        snapshot: Option<(Version, i64)>,
    ) -> Result<RecordBatch, DeltaError> {
        let arrow = |e: arrow_schema::ArrowError| DeltaError::Shape {
            uri: self.uri.clone(),
            message: format!("applying the row filter or column choice: {e}"),
        };
        let batch = match &self.filter {
            Some((bound, _)) => {
                let keep = bound.eval(&batch).map_err(arrow)?;
                if keep.true_count() == batch.num_rows() {
                    batch
                } else {
                    arrow_select::filter::filter_record_batch(&batch, &keep).map_err(arrow)?
                }
            }
            None => batch,
        };
        let rows = batch.num_rows();
        let mut fields = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for (source, target) in &self.outputs {
            if targets.is_some_and(|t| !t.contains(target)) {
                continue;
            }
            let Some(array) = batch.column_by_name(source) else { continue };
            let field = batch.schema().field_with_name(source).map_err(arrow)?.clone();
            fields.push(field.with_name(target));
            arrays.push(array.clone());
        }
        for name in keep {
            if let Some(array) = batch.column_by_name(name) {
                fields.push(Field::new(*name, array.data_type().clone(), true));
                arrays.push(array.clone());
            }
        }
        if targets.is_none() {
            let utc = || ArrowType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
            if self.soft {
                fields.push(Field::new(DELETED_AT_COLUMN, utc(), true));
                arrays.push(new_null_array(&utc(), rows));
            }
            if self.lineage {
                let (versions, stamps): (ArrayRef, ArrayRef) = match snapshot {
                    Some((v, ms)) => (
                        Arc::new(arrow_array::Int64Array::from(vec![v as i64; rows])),
                        Arc::new(
                            arrow_array::TimestampMicrosecondArray::from(vec![ms * 1000; rows]).with_timezone("UTC"),
                        ),
                    ),
                    None => {
                        let missing = |c: &str| DeltaError::Shape {
                            uri: self.uri.clone(),
                            message: format!("a change batch without {c}"),
                        };
                        let v = batch
                            .column_by_name(COMMIT_VERSION_COLUMN)
                            .ok_or_else(|| missing(COMMIT_VERSION_COLUMN))?;
                        let t = batch
                            .column_by_name(COMMIT_TIMESTAMP_COLUMN)
                            .ok_or_else(|| missing(COMMIT_TIMESTAMP_COLUMN))?;
                        (
                            cast_with_options(v, &ArrowType::Int64, &CastOptions::default()).map_err(arrow)?,
                            cast_with_options(t, &utc(), &CastOptions::default()).map_err(arrow)?,
                        )
                    }
                };
                fields.push(Field::new(LINEAGE_VERSION_COLUMN, ArrowType::Int64, true));
                arrays.push(versions);
                fields.push(Field::new(LINEAGE_TIMESTAMP_COLUMN, utc(), true));
                arrays.push(stamps);
            }
        }
        RecordBatch::try_new_with_options(
            Arc::new(Schema::new(fields)),
            arrays,
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(rows)),
        )
        .map_err(arrow)
    }
}

/// The change feed's own columns a shaped change batch keeps.
pub(crate) const CHANGE_COLUMNS: [&str; 3] = [CHANGE_TYPE_COLUMN, COMMIT_VERSION_COLUMN, COMMIT_TIMESTAMP_COLUMN];

/// A filter bound to column types: literals are Arrow scalars of their column's type.
#[derive(Debug, Clone)]
enum Bound {
    And(Box<Bound>, Box<Bound>),
    Or(Box<Bound>, Box<Bound>),
    Not(Box<Bound>),
    Compare { column: String, op: CmpOp, value: ArrayRef },
    In { column: String, values: Vec<ArrayRef>, negated: bool },
    IsNull { column: String, negated: bool },
    Like { column: String, pattern: String, negated: bool, case_insensitive: bool },
    Column(String),
}

enum BindError {
    Delta(DeltaError),
    Message(String),
}

impl From<DeltaError> for BindError {
    fn from(e: DeltaError) -> Self {
        BindError::Delta(e)
    }
}

/// Resolves a filter's column name to the field's name and Arrow type.
type Lookup<'a> = dyn FnMut(&str) -> Result<(String, ArrowType), DeltaError> + 'a;

fn bind(p: &Predicate, lookup: &mut Lookup<'_>) -> Result<Bound, BindError> {
    Ok(match p {
        Predicate::And(a, b) => Bound::And(Box::new(bind(a, lookup)?), Box::new(bind(b, lookup)?)),
        Predicate::Or(a, b) => Bound::Or(Box::new(bind(a, lookup)?), Box::new(bind(b, lookup)?)),
        Predicate::Not(a) => Bound::Not(Box::new(bind(a, lookup)?)),
        Predicate::Compare { column, op, value } => {
            let (column, ty) = lookup(column)?;
            let value = literal(&column, &ty, value)?;
            Bound::Compare { column, op: *op, value }
        }
        Predicate::In { column, values, negated } => {
            let (column, ty) = lookup(column)?;
            let values = values.iter().map(|v| literal(&column, &ty, v)).collect::<Result<_, _>>()?;
            Bound::In { column, values, negated: *negated }
        }
        Predicate::IsNull { column, negated } => Bound::IsNull { column: lookup(column)?.0, negated: *negated },
        Predicate::Like { column, pattern, negated, case_insensitive } => {
            let (column, ty) = lookup(column)?;
            if !matches!(ty, ArrowType::Utf8 | ArrowType::LargeUtf8 | ArrowType::Utf8View) {
                return Err(BindError::Message(format!("LIKE applies to string columns; {column:?} is {ty}")));
            }
            Bound::Like { column, pattern: pattern.clone(), negated: *negated, case_insensitive: *case_insensitive }
        }
        Predicate::Column(column) => {
            let (column, ty) = lookup(column)?;
            if ty != ArrowType::Boolean {
                return Err(BindError::Message(format!(
                    "column {column:?} ({ty}) is used as a condition, which only a boolean column can be"
                )));
            }
            Bound::Column(column)
        }
    })
}

/// A literal as a one-value array of `ty`, the type of `column`.
fn literal(column: &str, ty: &ArrowType, value: &Literal) -> Result<ArrayRef, BindError> {
    let strict = CastOptions { safe: false, ..Default::default() };
    let text = |s: &str| -> ArrayRef { Arc::new(StringArray::from(vec![s])) };
    let (array, shown): (ArrayRef, String) = match value {
        Literal::Null => return Ok(new_null_array(ty, 1)),
        Literal::Bool(b) => (Arc::new(BooleanArray::from(vec![*b])), b.to_string()),
        Literal::Number(n) => {
            if matches!(ty, ArrowType::Utf8 | ArrowType::LargeUtf8 | ArrowType::Utf8View) {
                return Err(BindError::Message(format!(
                    "column {column:?} is a string, compared with the number {n}: quote the value ('{n}')"
                )));
            }
            (text(n), n.clone())
        }
        Literal::Text(s) => (text(s), format!("'{s}'")),
        Literal::Typed { ty: t, text: s } => (text(s), format!("{t} '{s}'")),
    };
    cast_with_options(&array, ty, &strict)
        .map_err(|e| BindError::Message(format!("{shown} is not a value of column {column:?}, of type {ty}: {e}")))
}

impl Bound {
    /// The kernel predicate implied by this filter, and whether it is exactly the filter.
    fn to_kernel(&self) -> Option<(KPred, bool)> {
        let col = |c: &str| KExpr::Column(ColumnName::new([c.to_string()]));
        match self {
            Bound::And(a, b) => match (a.to_kernel(), b.to_kernel()) {
                (Some((a, ea)), Some((b, eb))) => Some((KPred::and(a, b), ea && eb)),
                (Some((p, _)), None) | (None, Some((p, _))) => Some((p, false)),
                (None, None) => None,
            },
            Bound::Or(a, b) => match (a.to_kernel()?, b.to_kernel()?) {
                ((a, true), (b, true)) => Some((KPred::or(a, b), true)),
                ((a, _), (b, _)) => Some((KPred::or(a, b), false)),
            },
            Bound::Not(a) => match a.to_kernel()? {
                (p, true) => Some((KPred::not(p), true)),
                _ => None,
            },
            Bound::Compare { column, op, value } => {
                let v = KExpr::literal(kernel_scalar(value)?);
                let c = col(column);
                Some((
                    match op {
                        CmpOp::Eq => KPred::eq(c, v),
                        CmpOp::Ne => KPred::ne(c, v),
                        CmpOp::Lt => KPred::lt(c, v),
                        CmpOp::Le => KPred::le(c, v),
                        CmpOp::Gt => KPred::gt(c, v),
                        CmpOp::Ge => KPred::ge(c, v),
                    },
                    true,
                ))
            }
            Bound::In { column, values, negated } => {
                let eqs: Option<Vec<KPred>> =
                    values.iter().map(|v| Some(KPred::eq(col(column), KExpr::literal(kernel_scalar(v)?)))).collect();
                let any = KPred::or_from(eqs?);
                Some((if *negated { KPred::not(any) } else { any }, true))
            }
            Bound::IsNull { column, negated } => {
                Some((if *negated { KPred::is_not_null(col(column)) } else { KPred::is_null(col(column)) }, true))
            }
            Bound::Like { .. } => None,
            Bound::Column(column) => Some((KPred::eq(col(column), KExpr::literal(true)), true)),
        }
    }

    /// Evaluates the filter on `batch` (SQL's three-valued logic: NULL keeps no row).
    fn eval(&self, batch: &RecordBatch) -> Result<BooleanArray, arrow_schema::ArrowError> {
        let column = |name: &str| {
            batch.column_by_name(name).cloned().ok_or_else(|| {
                arrow_schema::ArrowError::SchemaError(format!("the filter's column {name:?} was not read"))
            })
        };
        // A literal typed by the table's schema may meet a batch whose type differs in a
        // detail (a time zone's spelling, a widened type): it is cast to the batch's.
        let scalar = |array: &ArrayRef, ty: &ArrowType| -> Result<ArrayRef, arrow_schema::ArrowError> {
            if array.data_type() == ty {
                Ok(array.clone())
            } else {
                cast_with_options(array, ty, &CastOptions { safe: false, ..Default::default() })
            }
        };
        Ok(match self {
            Bound::And(a, b) => and_kleene(&a.eval(batch)?, &b.eval(batch)?)?,
            Bound::Or(a, b) => or_kleene(&a.eval(batch)?, &b.eval(batch)?)?,
            Bound::Not(a) => not(&a.eval(batch)?)?,
            Bound::Compare { column: c, op, value } => {
                let array = column(c)?;
                let value = Scalar::new(scalar(value, array.data_type())?);
                use arrow_ord::cmp;
                match op {
                    CmpOp::Eq => cmp::eq(&array, &value)?,
                    CmpOp::Ne => cmp::neq(&array, &value)?,
                    CmpOp::Lt => cmp::lt(&array, &value)?,
                    CmpOp::Le => cmp::lt_eq(&array, &value)?,
                    CmpOp::Gt => cmp::gt(&array, &value)?,
                    CmpOp::Ge => cmp::gt_eq(&array, &value)?,
                }
            }
            Bound::In { column: c, values, negated } => {
                let array = column(c)?;
                let mut any = BooleanArray::from(vec![false; array.len()]);
                for v in values {
                    let eq = arrow_ord::cmp::eq(&array, &Scalar::new(scalar(v, array.data_type())?))?;
                    any = or_kleene(&any, &eq)?;
                }
                if *negated {
                    not(&any)?
                } else {
                    any
                }
            }
            Bound::IsNull { column: c, negated } => {
                let array = column(c)?;
                if *negated {
                    is_not_null(&array)?
                } else {
                    is_null(&array)?
                }
            }
            Bound::Like { column: c, pattern, negated, case_insensitive } => {
                let array = column(c)?;
                let pattern: ArrayRef = Arc::new(StringArray::from(vec![pattern.as_str()]));
                let pattern = Scalar::new(scalar(&pattern, array.data_type())?);
                use arrow_string::like;
                match (negated, case_insensitive) {
                    (false, false) => like::like(&array, &pattern)?,
                    (true, false) => like::nlike(&array, &pattern)?,
                    (false, true) => like::ilike(&array, &pattern)?,
                    (true, true) => like::nilike(&array, &pattern)?,
                }
            }
            Bound::Column(c) => column(c)?.as_boolean().clone(),
        })
    }
}

/// The kernel's scalar for a one-value array, for the types statistics are kept for.
fn kernel_scalar(value: &ArrayRef) -> Option<KScalar> {
    if value.is_null(0) {
        return None;
    }
    Some(match value.data_type() {
        ArrowType::Int8 => KScalar::Byte(value.as_primitive::<Int8Type>().value(0)),
        ArrowType::Int16 => KScalar::Short(value.as_primitive::<Int16Type>().value(0)),
        ArrowType::Int32 => KScalar::Integer(value.as_primitive::<Int32Type>().value(0)),
        ArrowType::Int64 => KScalar::Long(value.as_primitive::<Int64Type>().value(0)),
        ArrowType::Float32 => KScalar::Float(value.as_primitive::<Float32Type>().value(0)),
        ArrowType::Float64 => KScalar::Double(value.as_primitive::<Float64Type>().value(0)),
        ArrowType::Boolean => KScalar::Boolean(value.as_boolean().value(0)),
        ArrowType::Utf8 => KScalar::String(value.as_string::<i32>().value(0).to_string()),
        ArrowType::Date32 => KScalar::Date(value.as_primitive::<Date32Type>().value(0)),
        ArrowType::Timestamp(TimeUnit::Microsecond, Some(_)) => {
            KScalar::Timestamp(value.as_primitive::<TimestampMicrosecondType>().value(0))
        }
        ArrowType::Timestamp(TimeUnit::Microsecond, None) => {
            KScalar::TimestampNtz(value.as_primitive::<TimestampMicrosecondType>().value(0))
        }
        ArrowType::Decimal128(p, s) => {
            KScalar::decimal(value.as_primitive::<Decimal128Type>().value(0), *p, u8::try_from(*s).ok()?).ok()?
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakesync_core::RowFilter;

    fn schema() -> StructType {
        serde_json::from_str(
            r#"{"type":"struct","fields":[
                {"name":"id","type":"long","nullable":false,"metadata":{}},
                {"name":"region","type":"string","nullable":true,"metadata":{}},
                {"name":"score","type":"decimal(10,2)","nullable":true,"metadata":{}},
                {"name":"day","type":"date","nullable":true,"metadata":{}},
                {"name":"active","type":"boolean","nullable":true,"metadata":{}}]}"#,
        )
        .unwrap()
    }

    fn batch() -> RecordBatch {
        let arrow = Schema::try_from_kernel(&schema()).unwrap();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(arrow_array::Int64Array::from(vec![1, 2, 3, 4])),
            Arc::new(StringArray::from(vec![Some("eu-west"), Some("us"), None, Some("EU-north")])),
            Arc::new(
                arrow_array::Decimal128Array::from(vec![Some(1000), Some(2550), None, Some(99)])
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
            ),
            Arc::new(arrow_array::Date32Array::from(vec![Some(19723), Some(19724), Some(19725), None])),
            Arc::new(BooleanArray::from(vec![Some(true), Some(false), None, Some(true)])),
        ];
        RecordBatch::try_new(Arc::new(arrow), cols).unwrap()
    }

    fn ids(filter: &str) -> Vec<i64> {
        let shape = Shape { filter: Some(RowFilter::parse(filter).unwrap()), ..Shape::default() };
        let bound = ReadShape::bind("t", 0, &schema(), &shape).unwrap();
        let out = bound.apply(batch(), None, &[], None).unwrap();
        out.column_by_name("id").unwrap().as_primitive::<Int64Type>().values().to_vec()
    }

    #[test]
    fn a_filter_keeps_the_rows_it_is_true_for_with_sql_nulls() {
        assert_eq!(ids("id >= 2 AND id < 4"), [2, 3]);
        assert_eq!(ids("region LIKE 'eu%'"), [1]);
        assert_eq!(ids("region ILIKE 'eu%'"), [1, 4]);
        // NULL region: neither LIKE nor NOT LIKE.
        assert_eq!(ids("region NOT LIKE 'eu%'"), [2, 4]);
        assert_eq!(ids("score > 10.5"), [2]);
        assert_eq!(ids("score BETWEEN 0 AND 10"), [1, 4]);
        assert_eq!(ids("day = '2024-01-02'"), [2]);
        assert_eq!(ids("day >= DATE '2024-01-02' OR day IS NULL"), [2, 3, 4]);
        assert_eq!(ids("active"), [1, 4]);
        assert_eq!(ids("NOT active"), [2]);
        assert_eq!(ids("id IN (1, 3) OR region IN ('us')"), [1, 2, 3]);
        assert_eq!(ids("id NOT IN (1, NULL)"), Vec::<i64>::new());
        assert_eq!(ids("score = NULL"), Vec::<i64>::new());
        assert_eq!(ids("region IS NULL"), [3]);
        assert_eq!(ids("\"ID\" = 4"), [4]);
    }

    #[test]
    fn a_filter_that_does_not_fit_the_table_is_refused_naming_the_column() {
        let bind = |f: &str| {
            let shape = Shape { filter: Some(RowFilter::parse(f).unwrap()), ..Shape::default() };
            ReadShape::bind("t", 7, &schema(), &shape).unwrap_err().to_string()
        };
        let e = bind("regoin = 'eu'");
        assert!(e.contains("\"regoin\"") && e.contains("version 7") && e.contains("region"), "{e}");
        let e = bind("id = 'abc'");
        assert!(e.contains("'abc'") && e.contains("\"id\""), "{e}");
        let e = bind("region = 5");
        assert!(e.contains("quote the value"), "{e}");
        let e = bind("id LIKE '1%'");
        assert!(e.contains("LIKE applies to string columns"), "{e}");
        let e = bind("day = '2024-13-45'");
        assert!(e.contains("\"day\""), "{e}");
    }

    #[test]
    fn the_skipping_predicate_keeps_only_what_the_kernel_can_express_and_is_implied_by_the_filter() {
        let skip = |f: &str| {
            let shape = Shape { filter: Some(RowFilter::parse(f).unwrap()), ..Shape::default() };
            ReadShape::bind("t", 0, &schema(), &shape).unwrap().skipping().map(|p| p.to_string())
        };
        assert!(skip("id > 5").is_some());
        // The LIKE part is dropped from an AND, which only weakens it.
        let and = skip("id > 5 AND region LIKE 'eu%'").unwrap();
        assert!(!and.contains("LIKE") && and.contains("id"), "{and}");
        // An OR or NOT over what the kernel cannot express skips nothing.
        assert_eq!(skip("id > 5 OR region LIKE 'eu%'"), None);
        assert_eq!(skip("NOT (id > 5 AND region LIKE 'eu%')"), None);
    }

    #[test]
    fn chosen_columns_are_renamed_and_lineage_columns_added_to_a_snapshot_batch() {
        let shape = Shape {
            columns: vec![
                lakesync_core::ColumnChoice::parse("id").unwrap(),
                lakesync_core::ColumnChoice::parse("region AS area").unwrap(),
            ],
            lineage: true,
            delete_mode: DeleteMode::Soft,
            ..Shape::default()
        };
        let schema = shaped_schema("t", 0, &super::tests::schema(), &shape).unwrap();
        let names: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "area", DELETED_AT_COLUMN, LINEAGE_VERSION_COLUMN, LINEAGE_TIMESTAMP_COLUMN]);
        let bound = ReadShape::bind("t", 0, &super::tests::schema(), &shape).unwrap();
        let out = bound.apply(batch(), None, &[], Some((3, 1_700_000_000_000))).unwrap();
        let got: Vec<String> = out.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(got, names);
        assert_eq!(out.column(3).as_primitive::<Int64Type>().value(0), 3);
        assert_eq!(out.column(2).null_count(), 4);
    }
}
