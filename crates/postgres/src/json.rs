//! Nested Delta values (struct, array, map) as JSON text for `jsonb` columns.
//!
//! Structs become objects keyed by field name, arrays become arrays, maps with string keys
//! become objects (other maps become arrays of `{"key": .., "value": ..}`). Decimals are
//! written as JSON numbers with their exact digits, timestamps as RFC 3339 strings, binary as
//! base64 strings, and NaN/±Infinity (which JSON cannot hold) as the strings "NaN",
//! "Infinity", "-Infinity".

use std::io::Write;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::Array;
use arrow_schema::DataType;
use lakesync_core::NulBytePolicy;

use crate::copy::{binary_value, string_value, timestamp_micros};

/// Appends the JSON text of `array[row]` to `out`.
pub fn write_json(array: &dyn Array, row: usize, out: &mut Vec<u8>, nul: NulBytePolicy) -> Result<(), String> {
    if array.is_null(row) {
        out.extend_from_slice(b"null");
        return Ok(());
    }
    match array.data_type() {
        DataType::Null => out.extend_from_slice(b"null"),
        DataType::Boolean => out.extend_from_slice(if array.as_boolean().value(row) { b"true" } else { b"false" }),
        DataType::Int8 => write!(out, "{}", array.as_primitive::<Int8Type>().value(row)).unwrap(),
        DataType::Int16 => write!(out, "{}", array.as_primitive::<Int16Type>().value(row)).unwrap(),
        DataType::Int32 => write!(out, "{}", array.as_primitive::<Int32Type>().value(row)).unwrap(),
        DataType::Int64 => write!(out, "{}", array.as_primitive::<Int64Type>().value(row)).unwrap(),
        DataType::Float32 => write_float(array.as_primitive::<Float32Type>().value(row) as f64, out),
        DataType::Float64 => write_float(array.as_primitive::<Float64Type>().value(row), out),
        DataType::Decimal128(_, s) => {
            let v = array.as_primitive::<Decimal128Type>().value(row);
            out.extend_from_slice(decimal_text(v, *s).as_bytes());
        }
        DataType::Date32 => {
            let d = array.as_primitive::<Date32Type>().value(row);
            let date = chrono::DateTime::from_timestamp(d as i64 * 86_400, 0).ok_or("date out of range")?;
            write!(out, "\"{}\"", date.format("%Y-%m-%d")).unwrap();
        }
        DataType::Timestamp(_, tz) => {
            let us = timestamp_micros(array, row)?;
            let t = chrono::DateTime::from_timestamp_micros(us).ok_or("timestamp out of range")?;
            if tz.is_some() {
                write!(out, "\"{}\"", t.format("%Y-%m-%dT%H:%M:%S%.6fZ")).unwrap();
            } else {
                write!(out, "\"{}\"", t.format("%Y-%m-%dT%H:%M:%S%.6f")).unwrap();
            }
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            write_string(string_value(array, row).expect("string type"), out, nul)?
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            out.push(b'"');
            base64(binary_value(array, row).expect("binary type"), out);
            out.push(b'"');
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            out.push(b'{');
            for (i, f) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(f.name(), out, nul)?;
                out.push(b':');
                write_json(s.column(i).as_ref(), row, out, nul)?;
            }
            out.push(b'}');
        }
        DataType::List(_) => {
            let l = array.as_list::<i32>();
            write_elements(l.value(row).as_ref(), out, nul)?;
        }
        DataType::LargeList(_) => {
            let l = array.as_list::<i64>();
            write_elements(l.value(row).as_ref(), out, nul)?;
        }
        DataType::Map(_, _) => {
            let m = array.as_map();
            let entries = m.value(row);
            let keys = entries.column(0);
            let values = entries.column(1);
            let string_keys = matches!(keys.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
            if string_keys {
                out.push(b'{');
            } else {
                out.push(b'[');
            }
            for i in 0..entries.len() {
                if i > 0 {
                    out.push(b',');
                }
                if string_keys {
                    write_json(keys.as_ref(), i, out, nul)?;
                    out.push(b':');
                    write_json(values.as_ref(), i, out, nul)?;
                } else {
                    out.extend_from_slice(b"{\"key\":");
                    write_json(keys.as_ref(), i, out, nul)?;
                    out.extend_from_slice(b",\"value\":");
                    write_json(values.as_ref(), i, out, nul)?;
                    out.push(b'}');
                }
            }
            out.push(if string_keys { b'}' } else { b']' });
        }
        other => return Err(format!("cannot store Arrow type {other} as JSON")),
    }
    Ok(())
}

fn write_elements(values: &dyn Array, out: &mut Vec<u8>, nul: NulBytePolicy) -> Result<(), String> {
    out.push(b'[');
    for i in 0..values.len() {
        if i > 0 {
            out.push(b',');
        }
        write_json(values, i, out, nul)?;
    }
    out.push(b']');
    Ok(())
}

fn write_float(v: f64, out: &mut Vec<u8>) {
    if v.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if v.is_infinite() {
        out.extend_from_slice(if v > 0.0 { b"\"Infinity\"" } else { b"\"-Infinity\"" });
    } else {
        write!(out, "{v}").unwrap();
    }
}

/// The exact decimal text of an unscaled value with `scale` fraction digits.
pub fn decimal_text(unscaled: i128, scale: i8) -> String {
    let digits = unscaled.unsigned_abs().to_string();
    let sign = if unscaled < 0 { "-" } else { "" };
    if scale <= 0 {
        return format!("{sign}{digits}{}", "0".repeat((-scale) as usize));
    }
    let s = scale as usize;
    let padded = if digits.len() <= s { format!("{}{}", "0".repeat(s + 1 - digits.len()), digits) } else { digits };
    let (i, f) = padded.split_at(padded.len() - s);
    format!("{sign}{i}.{f}")
}

fn write_string(s: &str, out: &mut Vec<u8>, nul: NulBytePolicy) -> Result<(), String> {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\0' => match nul {
                NulBytePolicy::Error => {
                    return Err("a string inside the value holds a NUL (0x00) byte, which Postgres jsonb cannot store (use --nul-bytes strip to remove them)".into())
                }
                NulBytePolicy::Strip => {}
            },
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
    Ok(())
}

fn base64(bytes: &[u8], out: &mut Vec<u8>) {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(T[(n >> 18) as usize & 63]);
        out.push(T[(n >> 12) as usize & 63]);
        out.push(if chunk.len() > 1 { T[(n >> 6) as usize & 63] } else { b'=' });
        out.push(if chunk.len() > 2 { T[n as usize & 63] } else { b'=' });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_keep_every_digit() {
        assert_eq!(decimal_text(1234567, 2), "12345.67");
        assert_eq!(decimal_text(-5, 3), "-0.005");
        assert_eq!(decimal_text(7, 0), "7");
    }

    #[test]
    fn base64_pads_like_rfc_4648() {
        let enc = |b: &[u8]| {
            let mut o = Vec::new();
            base64(b, &mut o);
            String::from_utf8(o).unwrap()
        };
        assert_eq!(enc(b"f"), "Zg==");
        assert_eq!(enc(b"fo"), "Zm8=");
        assert_eq!(enc(b"foo"), "Zm9v");
    }
}
