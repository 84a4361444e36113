//! Delta types → lakesync column types (the same mapping as Lakebase synced tables).

use delta_kernel::schema::{DataType, PrimitiveType, StructType};
use lakesync_core::{Column, ColumnType, TableSchema};

use crate::DeltaError;

/// Maps a Delta table schema to lakesync's model, without the `excluded` columns.
/// Unsupported types fail with the column name.
pub fn table_schema(uri: &str, schema: &StructType, excluded: &[String]) -> Result<TableSchema, DeltaError> {
    let columns = schema
        .fields()
        .filter(|field| !excluded.contains(field.name()))
        .map(|field| {
            let ty = column_type(field.data_type()).ok_or_else(|| DeltaError::UnsupportedType {
                uri: uri.to_string(),
                column: field.name().clone(),
                ty: type_name(field.data_type()),
            })?;
            Ok(Column { name: field.name().clone(), ty, nullable: field.is_nullable() })
        })
        .collect::<Result<_, DeltaError>>()?;
    Ok(TableSchema { columns })
}

/// Parses a Delta schema as JSON (the `schemaString` of a table's metadata:
/// `{"type":"struct","fields":[{"name":..,"type":"long","nullable":true,"metadata":{}}]}`)
/// into the Arrow schema writers and readers use. `what` names the source in errors.
pub fn arrow_schema_from_json(what: &str, json: &str) -> Result<arrow_schema::Schema, String> {
    use delta_kernel::engine::arrow_conversion::TryFromKernel;
    let schema: StructType =
        serde_json::from_str(json).map_err(|e| format!("{what} is not a Delta schema (a JSON struct type): {e}"))?;
    arrow_schema::Schema::try_from_kernel(&schema).map_err(|e| format!("{what}: {e}"))
}

/// The lakesync type for a Delta type, or `None` when Postgres has no faithful home for it.
pub fn column_type(data_type: &DataType) -> Option<ColumnType> {
    Some(match data_type {
        DataType::Primitive(p) => match p {
            PrimitiveType::String => ColumnType::Text,
            PrimitiveType::Long => ColumnType::Int64,
            PrimitiveType::Integer => ColumnType::Int32,
            PrimitiveType::Short | PrimitiveType::Byte => ColumnType::Int16,
            PrimitiveType::Float => ColumnType::Float32,
            PrimitiveType::Double => ColumnType::Float64,
            PrimitiveType::Boolean => ColumnType::Boolean,
            PrimitiveType::Binary => ColumnType::Bytes,
            PrimitiveType::Date => ColumnType::Date,
            PrimitiveType::Timestamp => ColumnType::Timestamptz,
            PrimitiveType::TimestampNtz => ColumnType::Timestamp,
            PrimitiveType::Decimal(d) => ColumnType::Decimal { precision: d.precision(), scale: d.scale() },
            _ => return None,
        },
        DataType::Array(a) => {
            nested_supported(&a.element_type).then_some(())?;
            ColumnType::Json
        }
        DataType::Map(m) => {
            (nested_supported(&m.key_type) && nested_supported(&m.value_type)).then_some(())?;
            ColumnType::Json
        }
        DataType::Struct(s) => {
            s.fields().all(|f| nested_supported(f.data_type())).then_some(())?;
            ColumnType::Json
        }
        _ => return None,
    })
}

fn nested_supported(data_type: &DataType) -> bool {
    column_type(data_type).is_some()
}

pub(crate) fn type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Primitive(p) => format!("{p:?}").to_lowercase(),
        DataType::Variant(_) => "variant".into(),
        DataType::Array(_) => "array (with an unsupported element type)".into(),
        DataType::Map(_) => "map (with an unsupported key or value type)".into(),
        DataType::Struct(_) => "struct (with an unsupported field type)".into(),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delta_kernel::schema::{ArrayType, DecimalType, StructField};

    #[test]
    fn delta_types_map_to_the_documented_postgres_types() {
        let schema = StructType::try_new(vec![
            StructField::nullable("b", DataType::BYTE),
            StructField::nullable(
                "d",
                DataType::Primitive(PrimitiveType::Decimal(DecimalType::try_new(10, 2).unwrap())),
            ),
            StructField::nullable("ts", DataType::TIMESTAMP),
            StructField::nullable("ntz", DataType::TIMESTAMP_NTZ),
            StructField::nullable("tags", DataType::Array(Box::new(ArrayType::new(DataType::STRING, true)))),
        ])
        .unwrap();
        let mapped = table_schema("t", &schema, &[]).unwrap();
        let pg: Vec<String> = mapped.columns.iter().map(|c| c.ty.postgres_type()).collect();
        assert_eq!(
            pg,
            ["smallint", "numeric(10,2)", "timestamp with time zone", "timestamp without time zone", "jsonb"]
        );
    }

    #[test]
    fn an_unsupported_type_names_the_column_unless_it_is_excluded() {
        let variant = DataType::Variant(Box::new(
            StructType::try_new(vec![
                StructField::nullable("metadata", DataType::BINARY),
                StructField::nullable("value", DataType::BINARY),
            ])
            .unwrap(),
        ));
        let schema = StructType::try_new(vec![
            StructField::nullable("id", DataType::LONG),
            StructField::nullable("payload", variant),
        ])
        .unwrap();
        let err = table_schema("/data/events", &schema, &[]).unwrap_err().to_string();
        assert!(err.contains("column \"payload\" has type variant") && err.contains("/data/events"), "{err}");
        let mapped = table_schema("/data/events", &schema, &["payload".to_string()]).unwrap();
        assert_eq!(mapped.columns.len(), 1);
    }
}
