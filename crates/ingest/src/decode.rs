//! Kafka messages (JSON values) into Arrow rows of the table's schema, with the opt-in Kafka
//! metadata columns. A message that does not parse or does not fit is reported, never dropped
//! and never half-written: the caller applies the bad-record policy.

use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_json::ReaderBuilder;
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};

/// A Kafka message as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch (the record's timestamp).
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl Message {
    /// Bytes of key and value.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// A Kafka metadata column a table can carry beside the message's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaColumn {
    Topic,
    Partition,
    Offset,
    Timestamp,
    Key,
}

impl KafkaColumn {
    pub const ALL: [KafkaColumn; 5] =
        [KafkaColumn::Topic, KafkaColumn::Partition, KafkaColumn::Offset, KafkaColumn::Timestamp, KafkaColumn::Key];

    /// `topic`, `partition`, `offset`, `timestamp` or `key`.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|c| c.short() == text).ok_or_else(|| {
            format!("unknown Kafka column {text:?}: expected topic, partition, offset, timestamp or key")
        })
    }

    pub fn short(self) -> &'static str {
        match self {
            KafkaColumn::Topic => "topic",
            KafkaColumn::Partition => "partition",
            KafkaColumn::Offset => "offset",
            KafkaColumn::Timestamp => "timestamp",
            KafkaColumn::Key => "key",
        }
    }

    /// The column's name in the table: `_kafka_` and the short name.
    pub fn name(self) -> String {
        format!("_kafka_{}", self.short())
    }

    pub fn field(self) -> Field {
        let data_type = match self {
            KafkaColumn::Topic => DataType::Utf8,
            KafkaColumn::Partition => DataType::Int32,
            KafkaColumn::Offset => DataType::Int64,
            KafkaColumn::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            KafkaColumn::Key => DataType::Binary,
        };
        Field::new(self.name(), data_type, self == KafkaColumn::Key)
    }
}

/// A message that cannot be stored under the table's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Index into the decoded messages.
    pub index: usize,
    /// What is wrong, naming the field but never its value: safe for logs and errors.
    pub reason: String,
    /// The decoder's own message, which may quote the value: only for the dead-letter table,
    /// which holds the raw message anyway.
    pub detail: String,
}

/// Rows decoded from a run of messages.
#[derive(Debug)]
pub struct Decoded {
    /// The good messages' rows, in message order, in the table's schema.
    pub rows: RecordBatch,
    pub bad: Vec<BadRecord>,
}

/// Decodes messages of one topic into rows of one table.
#[derive(Debug, Clone)]
pub struct Decoder {
    topic: String,
    table: SchemaRef,
    /// The table's columns the message value fills (all but the Kafka columns).
    values: SchemaRef,
    /// Whether any of them holds integers (at any depth): the JSON decoder truncates `5.7` to
    /// `5` there, so such numbers are looked for ([`fractional_integer`]).
    integers: bool,
}

impl Decoder {
    /// A decoder for rows of `table`, whose columns named like [`KafkaColumn::name`] take the
    /// message's metadata and all others the message value's fields.
    pub fn new(topic: &str, table: SchemaRef) -> Self {
        let kafka: Vec<String> = KafkaColumn::ALL.iter().map(|c| c.name()).collect();
        let values: Vec<Field> =
            table.fields().iter().filter(|f| !kafka.contains(f.name())).map(|f| f.as_ref().clone()).collect();
        let integers = values.iter().any(|f| holds_integers(f.data_type()));
        Self { topic: topic.to_string(), table, values: Arc::new(Schema::new(values)), integers }
    }

    fn json_decoder(&self, rows: usize) -> Result<arrow_json::reader::Decoder, ArrowError> {
        ReaderBuilder::new(self.values.clone()).with_strict_mode(true).with_batch_size(rows.max(1)).build_decoder()
    }

    /// Decodes `messages`: every message becomes one row or one [`BadRecord`].
    pub fn decode(&self, messages: &[Message]) -> Result<Decoded, ArrowError> {
        // Fast path: the whole run in one decoder; any failure sends it message by message.
        if let Some(rows) = self.decode_all(messages) {
            return Ok(Decoded { rows: self.with_metadata(rows, messages.iter())?, bad: Vec::new() });
        }
        let mut good = Vec::new();
        let mut batches = Vec::new();
        let mut bad = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            match self.decode_one(message) {
                Ok(batch) => {
                    good.push(message);
                    batches.push(batch);
                }
                Err((reason, detail)) => bad.push(BadRecord { index, reason, detail }),
            }
        }
        let rows = arrow_select::concat::concat_batches(&self.values, &batches)?;
        Ok(Decoded { rows: self.with_metadata(rows, good.into_iter())?, bad })
    }

    fn decode_all(&self, messages: &[Message]) -> Option<RecordBatch> {
        let mut decoder = self.json_decoder(messages.len()).ok()?;
        for (i, message) in messages.iter().enumerate() {
            let value = message.value.as_deref()?;
            if self.fractional_integer(value).is_some() {
                return None;
            }
            // Exactly one whole document per message: a partial one left buffered would be
            // completed by the next message's bytes.
            match decoder.decode(value) {
                Ok(n) if n == value.len() && decoder.len() == i + 1 && !decoder.has_partial_record() => {}
                _ => return None,
            }
        }
        let rows = decoder.flush().ok()?;
        Some(rows.unwrap_or_else(|| RecordBatch::new_empty(self.values.clone())))
    }

    fn decode_one(&self, message: &Message) -> Result<RecordBatch, (String, String)> {
        let Some(value) = message.value.as_deref() else {
            let reason = "the message has no value (a tombstone)".to_string();
            return Err((reason.clone(), reason));
        };
        if let Some(path) = self.fractional_integer(value) {
            let reason = format!("field '{path}': a number with a fraction for an integer column");
            return Err((reason.clone(), reason));
        }
        let failed = |e: ArrowError| (describe(&e, &self.values, || self.locate(value)), e.to_string());
        let mut decoder = self.json_decoder(1).map_err(failed)?;
        let consumed = decoder.decode(value).map_err(failed)?;
        if decoder.has_partial_record() {
            // It ends inside a document (truncated, or a second one begun).
            let reason = "the value is not valid JSON".to_string();
            return Err((reason.clone(), reason));
        }
        if consumed != value.len() || decoder.len() != 1 {
            let reason = "the value is not exactly one JSON object".to_string();
            return Err((reason.clone(), reason));
        }
        match decoder.flush().map_err(failed)? {
            Some(batch) if batch.num_rows() == 1 => Ok(batch),
            _ => {
                let reason = "the value is not exactly one JSON object".to_string();
                Err((reason.clone(), reason))
            }
        }
    }

    /// The path of a field of an integer column that `value` gives a non-integral number
    /// (`5.7`; `5.0` and `1e3` are integral and kept), which the JSON decoder would truncate.
    /// A byte scan first: only a value with a fraction or exponent outside its strings is
    /// parsed again.
    fn fractional_integer(&self, value: &[u8]) -> Option<String> {
        if !self.integers || !has_fraction_or_exponent(value) {
            return None;
        }
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(value).ok()?;
        self.values.fields().iter().find_map(|f| {
            let v = object.get(f.name())?;
            non_integral(f.data_type(), v, f.name())
        })
    }

    /// The top-level field of a JSON object `value` that fails to decode alone, for errors
    /// the decoder reports without a field (a decimal that does not parse, say).
    fn locate(&self, value: &[u8]) -> Option<String> {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(value).ok()?;
        for (name, v) in object {
            let Ok(field) = self.values.field_with_name(&name) else { continue };
            let schema = Arc::new(Schema::new(vec![field.clone()]));
            let one = serde_json::to_vec(&serde_json::json!({ name.clone(): v })).ok()?;
            let mut decoder = ReaderBuilder::new(schema).build_decoder().ok()?;
            if decoder.decode(&one).is_err() || decoder.flush().is_err() {
                return Some(name);
            }
        }
        None
    }

    /// `rows` (the value columns) with the Kafka columns of `messages`, in the table's order.
    fn with_metadata<'a>(
        &self,
        rows: RecordBatch,
        messages: impl Iterator<Item = &'a Message> + Clone,
    ) -> Result<RecordBatch, ArrowError> {
        let columns = self
            .table
            .fields()
            .iter()
            .map(|field| {
                if let Some(column) = rows.column_by_name(field.name()) {
                    return Ok(column.clone());
                }
                let m = messages.clone();
                let kafka = KafkaColumn::ALL.into_iter().find(|c| &c.name() == field.name());
                Ok(match kafka {
                    Some(KafkaColumn::Topic) => {
                        Arc::new(StringArray::from_iter_values(m.map(|_| self.topic.as_str()))) as ArrayRef
                    }
                    Some(KafkaColumn::Partition) => Arc::new(Int32Array::from_iter_values(m.map(|m| m.partition))),
                    Some(KafkaColumn::Offset) => Arc::new(Int64Array::from_iter_values(m.map(|m| m.offset))),
                    Some(KafkaColumn::Timestamp) => Arc::new(
                        TimestampMicrosecondArray::from_iter_values(m.map(|m| m.timestamp_ms.saturating_mul(1000)))
                            .with_timezone("UTC"),
                    ),
                    Some(KafkaColumn::Key) => Arc::new(BinaryArray::from_iter(m.map(|m| m.key.as_deref()))),
                    None => return Err(ArrowError::SchemaError(format!("no values for column {}", field.name()))),
                })
            })
            .collect::<Result<Vec<_>, ArrowError>>()?;
        RecordBatch::try_new(self.table.clone(), columns)
    }
}

fn holds_integers(t: &DataType) -> bool {
    match t {
        t if t.is_integer() => true,
        DataType::Struct(fields) => fields.iter().any(|f| holds_integers(f.data_type())),
        DataType::List(f) | DataType::LargeList(f) | DataType::Map(f, _) => holds_integers(f.data_type()),
        _ => false,
    }
}

/// Whether JSON text has a number with a fraction or an exponent outside its strings.
fn has_fraction_or_exponent(json: &[u8]) -> bool {
    let (mut in_string, mut escaped, mut in_number) = (false, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => (in_string, in_number) = (true, false),
            b'-' | b'0'..=b'9' => in_number = true,
            b'.' | b'e' | b'E' if in_number => return true,
            _ => in_number = false,
        }
    }
    false
}

/// The path below `path` where `v`, of type `t`, has a non-integral number for an integer.
fn non_integral(t: &DataType, v: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value;
    match (t, v) {
        (t, Value::Number(n)) if t.is_integer() => {
            // Integral values written with a fraction or exponent are exact up to 2^53.
            let exact = n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15);
            (!exact).then(|| path.to_string())
        }
        (DataType::Struct(fields), Value::Object(o)) => {
            fields.iter().find_map(|f| non_integral(f.data_type(), o.get(f.name())?, &format!("{path}.{}", f.name())))
        }
        (DataType::List(f) | DataType::LargeList(f), Value::Array(items)) => {
            items.iter().find_map(|item| non_integral(f.data_type(), item, path))
        }
        (DataType::Map(entries, _), Value::Object(o)) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => o.values().find_map(|x| non_integral(kv[1].data_type(), x, path)),
            _ => None,
        },
        _ => None,
    }
}

/// What is wrong with a message, from the JSON decoder's error, naming the field path but
/// never the value (the decoder's own messages quote it).
/// `locate` finds the field when the decoder does not say.
fn describe(err: &ArrowError, schema: &Schema, locate: impl FnOnce() -> Option<String>) -> String {
    let text = err.to_string();
    let mut rest = text.strip_prefix("Json error: ").unwrap_or(&text);
    let mut path: Vec<String> = Vec::new();
    while let Some(r) = rest.strip_prefix("whilst decoding field '") {
        let Some(end) = r.find("': ") else { break };
        path.push(r[..end].to_string());
        rest = &r[end + 3..];
    }
    let value_error =
        rest.starts_with("failed to parse") || text.starts_with("Parser error") || rest.starts_with("expected ");
    if path.is_empty() && value_error {
        path.extend(locate());
    }
    let type_at = |path: &[String]| -> Option<String> {
        let mut fields = schema.fields().clone();
        let mut found = None;
        for name in path {
            let field = fields.iter().find(|f| f.name() == name)?.clone();
            if let DataType::Struct(children) = field.data_type() {
                fields = children.clone();
            }
            found = Some(field);
        }
        found.map(|f| f.data_type().to_string())
    };
    let what = if rest.starts_with("failed to parse") || text.starts_with("Parser error") {
        match type_at(&path) {
            Some(t) => format!("the value is not a valid {t}"),
            None => "the value does not fit the column's type".to_string(),
        }
    } else if let Some(r) = rest.strip_prefix("expected ") {
        let expected = r.split(" got ").next().unwrap_or(r);
        format!("the value has the wrong JSON type (expected {expected})")
    } else if let Some(r) = rest.strip_prefix("column '") {
        let name = r.split("' missing from schema").next().unwrap_or(r);
        path.push(name.to_string());
        "is not a column of the table".to_string()
    } else if let Some(r) =
        rest.strip_prefix("Encountered unmasked nulls in non-nullable StructArray child: Field { \"")
    {
        if let Some(name) = r.split("\":").next() {
            path.push(name.to_string());
        }
        "is missing or null, and the column is not nullable".to_string()
    } else if rest.contains("UTF-8") {
        "the value is not valid UTF-8".to_string()
    } else {
        "the value is not valid JSON".to_string()
    };
    if path.is_empty() {
        what
    } else {
        format!("field '{}': {what}", path.join("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Decimal128Type, Int64Type};
    use arrow_array::Array;

    fn schema() -> SchemaRef {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        Arc::new(Schema::new(vec![
            Field::new("transaction_id", DataType::Utf8, false),
            Field::new("amount", DataType::Decimal128(12, 2), true),
            Field::new("n", DataType::Int64, true),
            Field::new("at", ts, true),
            Field::new(
                "device",
                DataType::Struct(
                    vec![Field::new("os", DataType::Utf8, true), Field::new("v", DataType::Int32, true)].into(),
                ),
                true,
            ),
            KafkaColumn::Partition.field(),
            KafkaColumn::Offset.field(),
            KafkaColumn::Key.field(),
        ]))
    }

    #[test]
    fn a_row_is_never_built_from_another_messages_bytes() {
        let d = Decoder::new("t", schema());
        let cases: [&[&str]; 4] = [
            // Two documents in one message.
            &[r#"{"transaction_id":"a"}{"transaction_id":"b"}"#, r#"{"transaction_id":"c"}"#],
            // One document split over two messages.
            &[r#"{"transaction_id":"#, r#""a"}"#, r#"{"transaction_id":"c"}"#],
            // A whole document and the start of another, completed by the next message.
            &[r#"{"transaction_id":"a"} {"transaction_id":"#, r#""b"}"#, r#"{"transaction_id":"c"}"#],
            // Trailing garbage after a whole document.
            &[r#"{"transaction_id":"a"} x"#, r#"{"transaction_id":"c"}"#],
        ];
        for values in cases {
            let messages: Vec<Message> = values.iter().enumerate().map(|(i, v)| message(i as i64, v)).collect();
            let decoded = d.decode(&messages).unwrap();
            let last = messages.len() - 1;
            let bad: Vec<usize> = decoded.bad.iter().map(|b| b.index).collect();
            assert_eq!(bad, (0..last).collect::<Vec<_>>(), "{values:?}: {:?}", decoded.bad);
            // Only the last, whole message becomes a row, with its own offset.
            assert_eq!(decoded.rows.num_rows(), 1, "{values:?}");
            let id = decoded.rows.column_by_name("transaction_id").unwrap().as_string::<i32>().value(0).to_string();
            let offset = decoded.rows.column_by_name("_kafka_offset").unwrap().as_primitive::<Int64Type>().value(0);
            assert_eq!((id.as_str(), offset), ("c", last as i64), "{values:?}");
        }
    }

    fn message(offset: i64, value: &str) -> Message {
        Message {
            partition: 3,
            offset,
            timestamp_ms: 1_700_000_000_000,
            key: Some(b"k".to_vec()),
            value: Some(value.into()),
        }
    }

    #[test]
    fn json_values_become_typed_rows_with_the_kafka_columns() {
        let decoder = Decoder::new("events", schema());
        let out = decoder
            .decode(&[
                message(7, r#"{"transaction_id":"t1","amount":"12.50","n":5,"at":"2026-12-03T10:00:00Z","device":{"os":"ios","v":17}}"#),
                message(8, r#"{"transaction_id":"t2","amount":3.1}"#),
            ])
            .unwrap();
        assert!(out.bad.is_empty());
        let rows = out.rows;
        assert_eq!(rows.schema(), schema());
        assert_eq!(rows.num_rows(), 2);
        assert_eq!(rows.column(1).as_primitive::<Decimal128Type>().value(0), 1250);
        assert_eq!(rows.column(1).as_primitive::<Decimal128Type>().value(1), 310);
        assert_eq!(rows.column(2).as_primitive::<Int64Type>().value(0), 5);
        assert!(rows.column(2).is_null(1));
        assert_eq!(rows.column(6).as_primitive::<Int64Type>().values(), &[7, 8]);
        assert_eq!(rows.column(7).as_binary::<i32>().value(0), b"k");
    }

    #[test]
    fn every_delta_type_decodes_from_json_including_arrays_maps_and_nested_structs() {
        let schema = lakesync_delta::schema::arrow_schema_from_json(
            "test",
            r#"{"type":"struct","fields":[
                {"name":"b","type":"boolean","nullable":true,"metadata":{}},
                {"name":"i8","type":"byte","nullable":true,"metadata":{}},
                {"name":"i16","type":"short","nullable":true,"metadata":{}},
                {"name":"i32","type":"integer","nullable":true,"metadata":{}},
                {"name":"f","type":"float","nullable":true,"metadata":{}},
                {"name":"d","type":"double","nullable":true,"metadata":{}},
                {"name":"dec","type":"decimal(38,9)","nullable":true,"metadata":{}},
                {"name":"day","type":"date","nullable":true,"metadata":{}},
                {"name":"ntz","type":"timestamp_ntz","nullable":true,"metadata":{}},
                {"name":"bin","type":"binary","nullable":true,"metadata":{}},
                {"name":"tags","type":{"type":"array","elementType":"string","containsNull":true},"nullable":true,"metadata":{}},
                {"name":"attrs","type":{"type":"map","keyType":"string","valueType":"long","valueContainsNull":true},"nullable":true,"metadata":{}},
                {"name":"geo","type":{"type":"struct","fields":[{"name":"lat","type":"double","nullable":true,"metadata":{}},
                    {"name":"tags","type":{"type":"array","elementType":"integer","containsNull":true},"nullable":true,"metadata":{}}]},"nullable":true,"metadata":{}}]}"#,
        )
        .unwrap();
        let decoder = Decoder::new("t", Arc::new(schema));
        let json = r#"{"b":true,"i8":-8,"i16":300,"i32":70000,"f":1.5,"d":2.25,"dec":"12345678901234567890.123456789",
            "day":"2026-12-03","ntz":"2026-12-03T10:00:00.000001","bin":"6869","tags":["a",null],"attrs":{"x":1,"y":null},
            "geo":{"lat":52.5,"tags":[1,2]}}"#;
        let out = decoder.decode(&[message(0, json)]).unwrap();
        assert!(out.bad.is_empty(), "{:?}", out.bad);
        let row = out.rows;
        let shown = debug_columns(&row);
        assert!(shown.contains("12345678901234567890123456789"), "{shown}"); // unscaled, scale 9
        assert!(shown.contains("2026-12-03T10:00:00.000001"), "{shown}");
        assert_eq!(row.column_by_name("attrs").unwrap().as_map().value(0).len(), 2);
        assert_eq!(row.column_by_name("tags").unwrap().as_list::<i32>().value(0).len(), 2);
    }

    #[test]
    fn a_number_with_a_fraction_for_an_integer_column_is_a_bad_record_never_truncated() {
        let decoder = Decoder::new("events", schema());
        let messages = [
            message(1, r#"{"transaction_id":"t1","n":5.7}"#),
            message(2, r#"{"transaction_id":"t2","n":5.0,"amount":1.25,"at":"2026-12-03T10:00:00.5Z"}"#),
            message(3, r#"{"transaction_id":"t3","device":{"os":"v1.2e3","v":1.5}}"#),
            message(4, r#"{"transaction_id":"t4.5","n":-3e2}"#),
            message(5, r#"{"transaction_id":"t5","n":1e-1}"#),
        ];
        let out = decoder.decode(&messages).unwrap();
        let reasons: Vec<(usize, &str)> = out.bad.iter().map(|b| (b.index, b.reason.as_str())).collect();
        assert_eq!(
            reasons,
            [
                (0, "field 'n': a number with a fraction for an integer column"),
                (2, "field 'device.v': a number with a fraction for an integer column"),
                (4, "field 'n': a number with a fraction for an integer column"),
            ]
        );
        assert_eq!(out.rows.column(2).as_primitive::<Int64Type>().values(), &[5, -300]);
        assert_eq!(out.rows.column(6).as_primitive::<Int64Type>().values(), &[2, 4]);
        // Strings, decimals and floats with dots and exponents never look like one.
        assert!(!has_fraction_or_exponent(br#"{"a":"1.5","b":"x\"2.5","c":true,"d":[1,-2]}"#));
        assert!(has_fraction_or_exponent(br#"{"a":[1,2.5]}"#));
        assert!(has_fraction_or_exponent(br#"{"a":-1E3}"#));
    }

    /// The columns as text (their Debug form).
    fn debug_columns(batch: &RecordBatch) -> String {
        batch.columns().iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn bad_messages_are_reported_by_field_without_their_values_and_good_ones_kept() {
        let decoder = Decoder::new("events", schema());
        let mut tombstone = message(5, "");
        tombstone.value = None;
        let messages = [
            message(1, r#"{"transaction_id":"t1","n":"secret-value"}"#),
            message(2, r#"{"transaction_id":"t2"}"#),
            message(3, r#"{"amount":1}"#),
            message(4, r#"{"transaction_id":"t4","extra":1}"#),
            tombstone,
            message(6, r#"{"transaction_id":"t6","device":{"v":"secret-value"}}"#),
            message(7, r#"{"transaction_id":"t7"#),
            message(8, r#"{"transaction_id":"t8"}{"transaction_id":"t9"}"#),
            message(9, r#"[1,2]"#),
        ];
        let out = decoder.decode(&messages).unwrap();
        assert_eq!(out.rows.num_rows(), 1);
        assert_eq!(out.rows.column(6).as_primitive::<Int64Type>().values(), &[2]);
        let reasons: Vec<(usize, &str)> = out.bad.iter().map(|b| (b.index, b.reason.as_str())).collect();
        assert_eq!(
            reasons,
            [
                (0, "field 'n': the value is not a valid Int64"),
                (2, "field 'transaction_id': is missing or null, and the column is not nullable"),
                (3, "field 'extra': is not a column of the table"),
                (4, "the message has no value (a tombstone)"),
                (5, "field 'device.v': the value is not a valid Int32"),
                (6, "the value is not valid JSON"),
                (7, "the value is not exactly one JSON object"),
                (8, "the value has the wrong JSON type (expected {)"),
            ]
        );
        assert!(out.bad.iter().all(|b| !b.reason.contains("secret")));
    }
}
