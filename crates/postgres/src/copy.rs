//! Binary `COPY` encoding straight from Arrow arrays (no text round trip).
//!
//! Format: <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>.
//! Every value is checked against what Postgres can store (NUL bytes in text, dates and
//! timestamps outside Postgres' range) and a failure names the column and row, so the caller
//! can report table, version and key.

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use bytes::{BufMut, BytesMut};
use lakesync_core::{ColumnType, NulBytePolicy};

/// The binary COPY header.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The binary COPY trailer.
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// Microseconds between 1970-01-01 and 2000-01-01 (Postgres' epoch).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
const PG_EPOCH_OFFSET_DAYS: i64 = 10_957;
/// Postgres' timestamp range in microseconds since its epoch: [4713-11-24 BC, 294277-01-01).
const PG_MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
const PG_END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;
/// Postgres' date range in days since its epoch.
const PG_MIN_DATE: i64 = -2_451_545;
const PG_END_DATE: i64 = 2_147_483_494 - 2_451_545;

/// A value that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError {
    /// Index of the column in the encoded column list.
    pub column: usize,
    /// Row within the batch.
    pub row: usize,
    /// What is wrong, without the value itself.
    pub problem: String,
}

/// Encodes the columns of `batch` in order as binary COPY tuples (no header or trailer).
/// `types` gives the Postgres column type each array is written as.
pub fn encode_batch(
    batch: &RecordBatch,
    types: &[ColumnType],
    nul_bytes: NulBytePolicy,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let columns: Vec<&ArrayRef> = batch.columns().iter().collect();
    debug_assert_eq!(columns.len(), types.len());
    let encoders: Vec<Column<'_>> = columns.iter().zip(types).map(|(a, t)| Column::new(a.as_ref(), *t)).collect();
    let var_bytes: usize = encoders.iter().map(Column::variable_bytes).sum();
    out.reserve(batch.num_rows() * (2 + columns.len() * 12) + var_bytes);
    let ncols = columns.len() as i16;
    for row in 0..batch.num_rows() {
        out.put_i16(ncols);
        for (ci, enc) in encoders.iter().enumerate() {
            enc.write(row, nul_bytes, out).map_err(|problem| EncodeError { column: ci, row, problem })?;
        }
    }
    Ok(())
}

/// One column of a batch, downcast once so the row loop does no type dispatch beyond one
/// match on a per-column tag.
enum Column<'a> {
    Bool(&'a arrow_array::BooleanArray),
    I16(&'a arrow_array::Int16Array),
    I32(&'a arrow_array::Int32Array),
    I64(&'a arrow_array::Int64Array),
    F32(&'a arrow_array::Float32Array),
    F64(&'a arrow_array::Float64Array),
    Text(&'a arrow_array::StringArray),
    Micros(&'a arrow_array::TimestampMicrosecondArray),
    Date(&'a arrow_array::Date32Array),
    Decimal(&'a arrow_array::Decimal128Array, u16),
    /// Anything else goes through the general (slower) path.
    Other(&'a dyn Array, ColumnType),
}

impl<'a> Column<'a> {
    fn new(array: &'a dyn Array, ty: ColumnType) -> Self {
        match (ty, array.data_type()) {
            (ColumnType::Boolean, DataType::Boolean) => Column::Bool(array.as_boolean()),
            (ColumnType::Int16, DataType::Int16) => Column::I16(array.as_primitive()),
            (ColumnType::Int32, DataType::Int32) => Column::I32(array.as_primitive()),
            (ColumnType::Int64, DataType::Int64) => Column::I64(array.as_primitive()),
            (ColumnType::Float32, DataType::Float32) => Column::F32(array.as_primitive()),
            (ColumnType::Float64, DataType::Float64) => Column::F64(array.as_primitive()),
            (ColumnType::Text, DataType::Utf8) => Column::Text(array.as_string()),
            (ColumnType::Timestamptz | ColumnType::Timestamp, DataType::Timestamp(TimeUnit::Microsecond, _)) => {
                Column::Micros(array.as_primitive())
            }
            (ColumnType::Date, DataType::Date32) => Column::Date(array.as_primitive()),
            (ColumnType::Decimal { .. }, DataType::Decimal128(_, s)) if *s >= 0 => {
                Column::Decimal(array.as_primitive(), *s as u16)
            }
            _ => Column::Other(array, ty),
        }
    }

    fn variable_bytes(&self) -> usize {
        match self {
            Column::Text(a) => a.value_data().len(),
            _ => 0,
        }
    }

    #[inline]
    fn write(&self, row: usize, nul: NulBytePolicy, out: &mut BytesMut) -> Result<(), String> {
        let valid = match self {
            Column::Other(a, _) => a.is_valid(row),
            Column::Bool(a) => a.is_valid(row),
            Column::I16(a) => a.is_valid(row),
            Column::I32(a) => a.is_valid(row),
            Column::I64(a) => a.is_valid(row),
            Column::F32(a) => a.is_valid(row),
            Column::F64(a) => a.is_valid(row),
            Column::Text(a) => a.is_valid(row),
            Column::Micros(a) => a.is_valid(row),
            Column::Date(a) => a.is_valid(row),
            Column::Decimal(a, _) => a.is_valid(row),
        };
        if !valid {
            out.put_i32(-1);
            return Ok(());
        }
        match self {
            Column::Bool(a) => {
                out.put_i32(1);
                out.put_u8(a.value(row) as u8);
            }
            Column::I16(a) => {
                out.put_i32(2);
                out.put_i16(a.value(row));
            }
            Column::I32(a) => {
                out.put_i32(4);
                out.put_i32(a.value(row));
            }
            Column::I64(a) => {
                out.put_i32(8);
                out.put_i64(a.value(row));
            }
            Column::F32(a) => {
                out.put_i32(4);
                out.put_f32(a.value(row));
            }
            Column::F64(a) => {
                out.put_i32(8);
                out.put_f64(a.value(row));
            }
            Column::Text(a) => write_text(a.value(row).as_bytes(), nul, out)?,
            Column::Micros(a) => write_micros(a.value(row), out)?,
            Column::Date(a) => write_date(a.value(row) as i64, out)?,
            Column::Decimal(a, scale) => {
                let value = a.value(row);
                field(out, |out| {
                    write_numeric(value, *scale, out);
                    Ok(())
                })?;
            }
            Column::Other(a, ty) => encode_value(*a, *ty, row, nul, out)?,
        }
        Ok(())
    }
}

fn write_micros(us: i64, out: &mut BytesMut) -> Result<(), String> {
    let pg = us
        .checked_sub(PG_EPOCH_OFFSET_US)
        .filter(|v| (PG_MIN_TIMESTAMP..PG_END_TIMESTAMP).contains(v))
        .ok_or("timestamp is outside the range Postgres can store (4713 BC to 294276 AD)")?;
    out.put_i32(8);
    out.put_i64(pg);
    Ok(())
}

fn write_date(days_since_1970: i64, out: &mut BytesMut) -> Result<(), String> {
    let days = days_since_1970 - PG_EPOCH_OFFSET_DAYS;
    if !(PG_MIN_DATE..PG_END_DATE).contains(&days) {
        return Err("date is outside the range Postgres can store (4713 BC to 5874897 AD)".into());
    }
    out.put_i32(4);
    out.put_i32(days as i32);
    Ok(())
}

/// Writes a length-prefixed field whose body `f` writes.
fn field(out: &mut BytesMut, f: impl FnOnce(&mut BytesMut) -> Result<(), String>) -> Result<(), String> {
    let at = out.len();
    out.put_i32(0);
    f(out)?;
    let len = (out.len() - at - 4) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

fn encode_value(
    array: &dyn Array,
    ty: ColumnType,
    row: usize,
    nul: NulBytePolicy,
    out: &mut BytesMut,
) -> Result<(), String> {
    match ty {
        ColumnType::Boolean => {
            out.put_i32(1);
            out.put_u8(array.as_boolean().value(row) as u8);
        }
        ColumnType::Int16 => {
            out.put_i32(2);
            out.put_i16(int_value(array, row)? as i16);
        }
        ColumnType::Int32 => {
            out.put_i32(4);
            out.put_i32(int_value(array, row)? as i32);
        }
        ColumnType::Int64 => {
            out.put_i32(8);
            out.put_i64(int_value(array, row)?);
        }
        ColumnType::Float32 => {
            out.put_i32(4);
            out.put_f32(match array.data_type() {
                DataType::Float32 => array.as_primitive::<Float32Type>().value(row),
                DataType::Float64 => array.as_primitive::<Float64Type>().value(row) as f32,
                other => return Err(unexpected(other, "real")),
            });
        }
        ColumnType::Float64 => {
            out.put_i32(8);
            out.put_f64(match array.data_type() {
                DataType::Float64 => array.as_primitive::<Float64Type>().value(row),
                DataType::Float32 => array.as_primitive::<Float32Type>().value(row) as f64,
                other => return Err(unexpected(other, "double precision")),
            });
        }
        ColumnType::Decimal { .. } => {
            let (value, scale) = match array.data_type() {
                DataType::Decimal128(_, s) => (array.as_primitive::<Decimal128Type>().value(row), *s),
                DataType::Decimal64(_, s) => (array.as_primitive::<Decimal64Type>().value(row) as i128, *s),
                DataType::Decimal32(_, s) => (array.as_primitive::<Decimal32Type>().value(row) as i128, *s),
                other => return Err(unexpected(other, "numeric")),
            };
            field(out, |out| {
                write_numeric(value, scale.max(0) as u16, out);
                Ok(())
            })?;
        }
        ColumnType::Text => {
            let s = string_value(array, row).ok_or_else(|| unexpected(array.data_type(), "text"))?;
            write_text(s.as_bytes(), nul, out)?;
        }
        ColumnType::Bytes => {
            let b = binary_value(array, row).ok_or_else(|| unexpected(array.data_type(), "bytea"))?;
            out.put_i32(b.len() as i32);
            out.put_slice(b);
        }
        ColumnType::Date => {
            let days = match array.data_type() {
                DataType::Date32 => array.as_primitive::<Date32Type>().value(row) as i64,
                DataType::Date64 => array.as_primitive::<Date64Type>().value(row) / 86_400_000,
                other => return Err(unexpected(other, "date")),
            };
            write_date(days, out)?;
        }
        ColumnType::Timestamptz | ColumnType::Timestamp => write_micros(timestamp_micros(array, row)?, out)?,
        ColumnType::Json => {
            field(out, |out| {
                out.put_u8(1); // jsonb binary format version
                let mut text = Vec::with_capacity(64);
                crate::json::write_json(array, row, &mut text, nul)?;
                out.put_slice(&text);
                Ok(())
            })?;
        }
    }
    Ok(())
}

fn unexpected(found: &DataType, target: &str) -> String {
    format!("cannot store Arrow type {found} as {target}")
}

fn int_value(array: &dyn Array, row: usize) -> Result<i64, String> {
    Ok(match array.data_type() {
        DataType::Int8 => array.as_primitive::<Int8Type>().value(row) as i64,
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row) as i64,
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row) as i64,
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(row) as i64,
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(row) as i64,
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(row) as i64,
        other => return Err(unexpected(other, "an integer column")),
    })
}

/// Microseconds since 1970 for any Arrow timestamp unit.
pub(crate) fn timestamp_micros(array: &dyn Array, row: usize) -> Result<i64, String> {
    match array.data_type() {
        DataType::Timestamp(unit, _) => {
            let v = match unit {
                TimeUnit::Second => array.as_primitive::<TimestampSecondType>().value(row).checked_mul(1_000_000),
                TimeUnit::Millisecond => array.as_primitive::<TimestampMillisecondType>().value(row).checked_mul(1_000),
                TimeUnit::Microsecond => Some(array.as_primitive::<TimestampMicrosecondType>().value(row)),
                TimeUnit::Nanosecond => Some(array.as_primitive::<TimestampNanosecondType>().value(row) / 1_000),
            };
            v.ok_or_else(|| "timestamp is outside the range Postgres can store".to_string())
        }
        other => Err(unexpected(other, "timestamp")),
    }
}

pub(crate) fn string_value(array: &dyn Array, row: usize) -> Option<&str> {
    Some(match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value(row),
        DataType::LargeUtf8 => array.as_string::<i64>().value(row),
        DataType::Utf8View => array.as_string_view().value(row),
        _ => return None,
    })
}

pub(crate) fn binary_value(array: &dyn Array, row: usize) -> Option<&[u8]> {
    Some(match array.data_type() {
        DataType::Binary => array.as_binary::<i32>().value(row),
        DataType::LargeBinary => array.as_binary::<i64>().value(row),
        DataType::BinaryView => array.as_binary_view().value(row),
        DataType::FixedSizeBinary(_) => array.as_fixed_size_binary().value(row),
        _ => return None,
    })
}

fn write_text(bytes: &[u8], nul: NulBytePolicy, out: &mut BytesMut) -> Result<(), String> {
    if !bytes.contains(&0) {
        out.put_i32(bytes.len() as i32);
        out.put_slice(bytes);
        return Ok(());
    }
    match nul {
        NulBytePolicy::Error => Err("the string holds a NUL (0x00) byte, which Postgres text cannot store (use --nul-bytes strip to remove them)".into()),
        NulBytePolicy::Strip => {
            let kept: Vec<u8> = bytes.iter().copied().filter(|b| *b != 0).collect();
            out.put_i32(kept.len() as i32);
            out.put_slice(&kept);
            Ok(())
        }
    }
}

/// Writes a numeric in Postgres' binary form: base-10000 digits with weight, sign and scale.
pub fn write_numeric(unscaled: i128, scale: u16, out: &mut BytesMut) {
    // Align the value so the decimal point falls between base-10000 digits.
    let pad = (4 - scale % 4) % 4;
    let frac_groups = ((scale + pad) / 4) as i16;
    let mut digits = [0i16; 12];
    let mut n = 0usize;
    match unscaled.unsigned_abs().checked_mul(10u128.pow(pad as u32)) {
        Some(mut v) => {
            // Least significant group first.
            while v > 0 {
                digits[n] = (v % 10_000) as i16;
                v /= 10_000;
                n += 1;
            }
        }
        None => {
            // Beyond u128 after alignment (38 digits and more): go through decimal text.
            let text = format!("{}{}", unscaled.unsigned_abs(), "0".repeat(pad as usize));
            let bytes = text.as_bytes();
            let mut end = bytes.len();
            while end > 0 {
                let start = end.saturating_sub(4);
                digits[n] = std::str::from_utf8(&bytes[start..end]).expect("ascii").parse().expect("digits");
                n += 1;
                end = start;
            }
        }
    }
    let weight = if n == 0 { 0 } else { n as i16 - frac_groups - 1 };
    // Trailing zero groups (least significant) are implied by the weight.
    let mut low = 0;
    while low < n && digits[low] == 0 {
        low += 1;
    }
    let count = n - low;
    out.put_i16(count as i16);
    out.put_i16(weight);
    out.put_u16(if unscaled < 0 && count > 0 { 0x4000 } else { 0 });
    out.put_u16(scale);
    for i in (low..n).rev() {
        out.put_i16(digits[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Date32Array, StringArray, TimestampMicrosecondArray};
    use std::sync::Arc;

    fn encode_one(array: ArrayRef, ty: ColumnType, nul: NulBytePolicy) -> Result<BytesMut, EncodeError> {
        let batch = RecordBatch::try_from_iter([("c", array)]).unwrap();
        let mut out = BytesMut::new();
        encode_batch(&batch, &[ty], nul, &mut out).map(|_| out)
    }

    #[test]
    fn values_postgres_cannot_store_are_refused_with_the_row() {
        // Postgres goes back to 4713 BC; an i64 of microseconds reaches 290,000 BC.
        let far = Arc::new(TimestampMicrosecondArray::from(vec![0, -300_000_000_000_000_000]).with_timezone("UTC"));
        let err = encode_one(far, ColumnType::Timestamptz, NulBytePolicy::Error).unwrap_err();
        assert_eq!((err.column, err.row), (0, 1));
        assert!(err.problem.contains("outside the range"), "{}", err.problem);
        let err = encode_one(Arc::new(Date32Array::from(vec![i32::MAX])), ColumnType::Date, NulBytePolicy::Error)
            .unwrap_err();
        assert!(err.problem.contains("outside the range"), "{}", err.problem);
        let nul = Arc::new(StringArray::from(vec!["a\0b"]));
        assert!(encode_one(nul.clone(), ColumnType::Text, NulBytePolicy::Error).unwrap_err().problem.contains("NUL"));
        let stripped = encode_one(nul, ColumnType::Text, NulBytePolicy::Strip).unwrap();
        assert_eq!(&stripped[2..], b"\0\0\0\x02ab");
    }

    fn numeric(unscaled: i128, scale: u16) -> (i16, i16, u16, u16, Vec<i16>) {
        let mut b = BytesMut::new();
        write_numeric(unscaled, scale, &mut b);
        let r = |i: usize| i16::from_be_bytes([b[i], b[i + 1]]);
        let n = r(0);
        let digits = (0..n as usize).map(|i| r(8 + 2 * i)).collect();
        (n, r(2), r(4) as u16, r(6) as u16, digits)
    }

    #[test]
    fn numerics_encode_as_base_10000_groups() {
        // 12345.67 → digits [1, 2345, 6700], weight 1
        assert_eq!(numeric(1234567, 2), (3, 1, 0, 2, vec![1, 2345, 6700]));
        // -0.05 → [500], weight -1
        assert_eq!(numeric(-5, 2), (1, -1, 0x4000, 2, vec![500]));
        // 0.00
        assert_eq!(numeric(0, 2), (0, 0, 0, 2, vec![]));
        // 10000 → [1], weight 1
        assert_eq!(numeric(10000, 0), (1, 1, 0, 0, vec![1]));
        // 1.5 with scale 5 → [1, 5000], weight 0
        assert_eq!(numeric(150000, 5), (2, 0, 0, 5, vec![1, 5000]));
        // 38 nines with scale 1 (37 integer digits): the text path.
        let big = 10i128.pow(38) - 1;
        let (n, w, _, _, d) = numeric(big, 1);
        assert_eq!((n, w, d[0], d[n as usize - 1]), (11, 9, 9, 9000));
        // 0.0001 → [1], weight -1
        assert_eq!(numeric(1, 4), (1, -1, 0, 4, vec![1]));
    }
}
