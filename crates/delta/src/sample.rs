//! The sample `customer_profiles` table used by the demo and benchmarks: deterministic rows,
//! so any version can be regenerated and checked.

use std::sync::Arc;

use arrow_array::{BooleanArray, Decimal128Array, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};

/// The customer_profiles schema (customer_id is the key).
pub fn customer_schema() -> Arc<Schema> {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Utf8, false),
        Field::new("full_name", DataType::Utf8, true),
        Field::new("email", DataType::Utf8, true),
        Field::new("segment", DataType::Utf8, true),
        Field::new("last_purchase_date", ts.clone(), true),
        Field::new("total_spend", DataType::Decimal128(10, 2), true),
        Field::new("propensity_score", DataType::Float64, true),
        Field::new("is_active", DataType::Boolean, true),
        Field::new("created_at", ts.clone(), true),
        Field::new("updated_at", ts, true),
    ]))
}

const SEGMENTS: [&str; 4] = ["enterprise", "smb", "consumer", "startup"];
const FIRST: [&str; 8] = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken"];
const LAST: [&str; 8] = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson"];

/// Rows for customer ids `ids`; `revision` changes the mutable columns (0 = original).
pub fn customers(ids: impl IntoIterator<Item = u64>, revision: u32) -> RecordBatch {
    let ids: Vec<u64> = ids.into_iter().collect();
    let base = 1_700_000_000_000_000i64; // 2023-11-14
    let h = |i: u64, salt: u64| (i.wrapping_add(salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) as i64;
    let r = revision as u64;
    let batch = RecordBatch::try_new(
        customer_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(ids.iter().map(|i| format!("C{i:09}")))),
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|i| format!("{} {}", FIRST[(*i % 8) as usize], LAST[(*i / 8 % 8) as usize])),
            )),
            Arc::new(StringArray::from_iter_values(ids.iter().map(|i| format!("customer{i}@example.com")))),
            Arc::new(StringArray::from_iter_values(ids.iter().map(|i| SEGMENTS[((*i + r) % 4) as usize]))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(ids.iter().map(|i| base + h(*i, r) % 31_536_000_000_000))
                    .with_timezone("UTC"),
            ),
            Arc::new(
                Decimal128Array::from_iter_values(ids.iter().map(|i| (h(*i, 7 + r) % 10_000_000) as i128))
                    .with_precision_and_scale(10, 2)
                    .expect("valid decimal"),
            ),
            Arc::new(Float64Array::from_iter_values(ids.iter().map(|i| (h(*i, 13 + r) % 1000) as f64 / 1000.0))),
            Arc::new(BooleanArray::from_iter(ids.iter().map(|i| Some(!(*i + r).is_multiple_of(5))))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(ids.iter().map(|i| base - h(*i, 3) % 31_536_000_000_000))
                    .with_timezone("UTC"),
            ),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(ids.iter().map(|_| base + r as i64 * 86_400_000_000))
                    .with_timezone("UTC"),
            ),
        ],
    )
    .expect("sample batch matches its schema");
    batch
}
