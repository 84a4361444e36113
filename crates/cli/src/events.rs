//! The seed use case's transaction events (about 200 bytes of JSON each), for `demo
//! --pipeline` and `bench --scenario ingest`.

/// Their Delta schema, as `lakesync ingest --schema` takes it.
pub const SCHEMA: &str = r#"{"type":"struct","fields":[
    {"name":"transaction_id","type":"string","nullable":false,"metadata":{}},
    {"name":"user_id","type":"string","nullable":true,"metadata":{}},
    {"name":"amount","type":"decimal(12,2)","nullable":true,"metadata":{}},
    {"name":"currency","type":"string","nullable":true,"metadata":{}},
    {"name":"status","type":"string","nullable":true,"metadata":{}},
    {"name":"merchant","type":"string","nullable":true,"metadata":{}},
    {"name":"event_time","type":"timestamp","nullable":true,"metadata":{}},
    {"name":"seq","type":"long","nullable":false,"metadata":{}}]}"#;

/// Event `seq`: transaction `seq / 2`, created (even `seq`) then settled (odd `seq`).
pub fn event(seq: u64) -> Vec<u8> {
    let status = if seq.is_multiple_of(2) { "pending" } else { "settled" };
    let t = chrono::DateTime::from_timestamp_micros(1_780_000_000_000_000 + seq as i64 * 1000).unwrap_or_default();
    format!(
        r#"{{"transaction_id":"txn-{:012}","user_id":"user-{:08}","amount":"{}.{:02}","currency":"EUR","status":"{status}","merchant":"merchant-{:05}","event_time":"{}","seq":{seq}}}"#,
        seq / 2,
        (seq / 2) % 101,
        seq % 5000,
        seq % 100,
        seq % 9973,
        t.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
    )
    .into_bytes()
}
