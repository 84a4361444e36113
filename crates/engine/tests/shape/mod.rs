//! Choosing what to sync: row filters, chosen and renamed columns, delete modes and lineage,
//! through snapshots and the change feed, on real Delta tables (delta-rs and Spark written).

use lakesync_core::{Classify, ColumnChoice, DeleteMode, RowFilter, SyncMode};
use serde_json::json;

use crate::support::{spark_fixture, PyDelta, TestDb};

fn orders_schema() -> serde_json::Value {
    json!([["id", "pa.int64()"], ["region", "pa.string()"], ["amount", "pa.float64()"]])
}

fn orders(rows: serde_json::Value) -> serde_json::Value {
    json!({"op": "create", "schema": orders_schema(), "rows": rows})
}

const FILTER: &str = "region IN ('eu', 'uk') AND amount >= 10";

#[test]
fn a_filtered_table_equals_the_filtered_source_as_rows_move_in_and_out_of_the_filter() {
    let db = TestDb::new("filter_moves");
    let t = PyDelta::new();
    let v = t.run(json!([orders(json!([
        [1, "eu", 20.0],
        [2, "us", 50.0],
        [3, "uk", 5.0],
        [4, "eu", 10.0],
        [5, "eu", 99.0],
        [6, "uk", 30.0]
    ]))]));
    let mut req = db.request(&t.path(), "public.orders", "id");
    req.shape.filter = Some(RowFilter::parse(FILTER).unwrap());
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.counts.inserted), ("snapshot", 4));
    db.assert_matches_filtered_snapshot(&t.path(), "public.orders", "id", v, FILTER);
    let v = t.run(json!([
        // 1 leaves the filter (region), 3 enters it (amount), 2 stays out, 4 stays in, changed.
        {"op": "update", "predicate": "id = 1", "set": {"region": "'us'"}},
        {"op": "update", "predicate": "id = 3", "set": {"amount": "15.0"}},
        {"op": "update", "predicate": "id = 2", "set": {"amount": "60.0"}},
        {"op": "update", "predicate": "id = 4", "set": {"amount": "11.0"}},
        // 5 is deleted, 6 deleted and inserted again outside the filter, 7 inserted inside.
        {"op": "delete", "predicate": "id = 5"},
        {"op": "delete", "predicate": "id = 6"},
        {"op": "append", "schema": orders_schema(), "rows": [[6, "us", 30.0], [7, "eu", 70.0], [8, "fr", 80.0]]},
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "triggered", "{}", out.reason);
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (2, 1, 3));
    db.assert_matches_filtered_snapshot(&t.path(), "public.orders", "id", v, FILTER);
    // A key that left comes back in; one that entered leaves again.
    let v = t.run(json!([
        {"op": "update", "predicate": "id = 1", "set": {"region": "'uk'"}},
        {"op": "update", "predicate": "id = 3", "set": {"amount": "1.0"}},
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (1, 0, 1));
    db.assert_matches_filtered_snapshot(&t.path(), "public.orders", "id", v, FILTER);
    assert_eq!(db.rows("SELECT id FROM public.orders ORDER BY id"), ["(1)", "(4)", "(7)"]);
}

#[test]
fn a_filter_with_unknown_columns_or_bad_literals_is_refused_before_anything_is_written() {
    let db = TestDb::new("filter_refused");
    let t = PyDelta::new();
    t.run(json!([orders(json!([[1, "eu", 20.0]]))]));
    let mut req = db.request(&t.path(), "public.orders", "id");
    req.shape.filter = Some(RowFilter::parse("regoin = 'eu'").unwrap());
    let e = db.sync(&req).unwrap_err();
    assert_eq!(e.class(), lakesync_core::ErrorClass::Config);
    let msg = e.to_string();
    assert!(msg.contains("\"regoin\"") && msg.contains("version 0") && msg.contains("region"), "{msg}");
    req.shape.filter = Some(RowFilter::parse("amount > 'lots'").unwrap());
    let msg = db.sync(&req).unwrap_err().to_string();
    assert!(msg.contains("'lots'") && msg.contains("\"amount\""), "{msg}");
    assert_eq!(db.value("SELECT count(*) FROM lakesync.synced_tables"), "0");
    assert_eq!(db.value("SELECT to_regclass('public.orders') IS NULL"), "true");
}

#[test]
fn chosen_columns_are_synced_renamed_through_snapshots_and_the_change_feed() {
    let db = TestDb::new("columns_renamed");
    let t = PyDelta::new();
    t.run(json!([orders(json!([[1, "eu", 20.0], [2, "us", 50.0]]))]));
    let mut req = db.request(&t.path(), "public.orders", "order_id");
    req.shape.columns =
        vec![ColumnChoice::parse("id AS order_id").unwrap(), ColumnChoice::parse("amount AS total").unwrap()];
    db.sync(&req).unwrap();
    assert_eq!(
        db.rows("SELECT attname FROM pg_attribute WHERE attrelid = 'public.orders'::regclass AND attnum > 0 ORDER BY attnum"),
        ["(order_id)", "(total)"]
    );
    t.run(json!([
        {"op": "update", "predicate": "id = 1", "set": {"amount": "21.5", "region": "'uk'"}},
        {"op": "update", "predicate": "id = 2", "set": {"region": "'fr'"}},
        {"op": "delete", "predicate": "id = 2"},
        {"op": "append", "schema": orders_schema(), "rows": [[3, "eu", 3.0]]},
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "triggered");
    assert_eq!(db.rows("SELECT order_id, total FROM public.orders ORDER BY 1"), ["(1,21.5)", "(3,3)"]);
    // The key is named as in Postgres; its source name is refused with the hint.
    let mut wrong = req.clone();
    wrong.primary_key = lakesync_core::PrimaryKey::parse("id").unwrap();
    let msg = db.sync(&wrong).unwrap_err().to_string();
    assert!(msg.contains("id"), "{msg}");
}

#[test]
fn soft_deletes_keep_rows_marked_and_a_key_inserted_again_is_live_again_with_lineage() {
    let db = TestDb::new("soft_deletes");
    let t = PyDelta::new();
    let v0 = t.run(json!([orders(json!([[1, "eu", 20.0], [2, "us", 50.0], [3, "uk", 5.0]]))]));
    let mut req = db.request(&t.path(), "public.orders", "id");
    req.shape.delete_mode = DeleteMode::Soft;
    req.shape.lineage = true;
    db.sync(&req).unwrap();
    assert_eq!(
        db.rows("SELECT id, _lakesync_deleted_at IS NULL, _lakesync_version FROM public.orders ORDER BY id"),
        [format!("(1,t,{v0})"), format!("(2,t,{v0})"), format!("(3,t,{v0})")]
    );
    let v1 = t.run(json!([{"op": "delete", "predicate": "id = 2"}]));
    let v2 = t.run(json!([{"op": "update", "predicate": "id = 3", "set": {"amount": "6.0"}}]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (0, 1, 1));
    // The deletion is stamped with its commit's timestamp, and lineage with its version.
    let committed = |v: u64| {
        db.value(&format!(
            "SELECT to_timestamp({}::double precision / 1000)",
            lakesync_delta::DeltaTable::open(&t.path().display().to_string())
                .unwrap()
                .snapshot(Some(v))
                .unwrap()
                .commit_timestamp_ms()
                .unwrap()
        ))
    };
    assert_eq!(
        db.rows("SELECT id, _lakesync_deleted_at, _lakesync_version, _lakesync_commit_timestamp FROM public.orders WHERE id > 1 ORDER BY id"),
        [
            format!("(2,\"{}\",{v1},\"{}\")", committed(v1), committed(v1)),
            format!("(3,,{v2},\"{}\")", committed(v2))
        ]
    );
    // Inserted again: live again, with the new values.
    let v3 = t.run(json!([{"op": "append", "schema": orders_schema(), "rows": [[2, "us", 51.0]]}]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (0, 1, 0));
    assert_eq!(
        db.value("SELECT (_lakesync_deleted_at IS NULL, amount, _lakesync_version) FROM public.orders WHERE id = 2"),
        format!("(t,51,{v3})")
    );
    // A snapshot (requested, or a fallback) keeps what the source no longer has, marked.
    t.run(json!([{"op": "delete", "predicate": "id = 1"}]));
    req.mode = SyncMode::Snapshot;
    let out = db.sync(&req).unwrap();
    assert_eq!(out.counts.deleted, 1);
    assert_eq!(
        db.rows("SELECT id, _lakesync_deleted_at IS NULL FROM public.orders ORDER BY id"),
        ["(1,f)", "(2,t)", "(3,t)"]
    );
    // Unchanged rows kept their lineage through the snapshot.
    assert_eq!(db.value("SELECT _lakesync_version FROM public.orders WHERE id = 3"), v2.to_string());
}

#[test]
fn ignored_deletes_keep_rows_and_a_key_inserted_again_is_updated() {
    let db = TestDb::new("ignore_deletes");
    let t = PyDelta::new();
    t.run(json!([orders(json!([[1, "eu", 20.0], [2, "us", 50.0]]))]));
    let mut req = db.request(&t.path(), "public.orders", "id");
    req.shape.delete_mode = DeleteMode::Ignore;
    db.sync(&req).unwrap();
    t.run(json!([{"op": "delete", "predicate": "id = 2"}]));
    let out = db.sync(&req).unwrap();
    assert_eq!(out.counts.deleted, 0);
    t.run(json!([{"op": "append", "schema": orders_schema(), "rows": [[2, "us", 7.0]]}]));
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT id, amount FROM public.orders ORDER BY id"), ["(1,20)", "(2,7)"]);
    t.run(json!([{"op": "delete", "predicate": "id = 1"}]));
    req.mode = SyncMode::Snapshot;
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT id FROM public.orders ORDER BY id"), ["(1)", "(2)"]);
}

#[test]
fn changing_the_filter_columns_or_modes_re_snapshots_with_the_reason() {
    let db = TestDb::new("shape_changes");
    let t = PyDelta::new();
    t.run(json!([orders(json!([[1, "eu", 20.0], [2, "us", 50.0]]))]));
    let mut req = db.request(&t.path(), "public.orders", "id");
    db.sync(&req).unwrap();
    let mut expect = |change: &dyn Fn(&mut lakesync_engine::SyncRequest), option: &str| {
        change(&mut req);
        let out = db.sync(&req).unwrap();
        assert_eq!(out.mode.as_str(), "snapshot", "{option}");
        assert!(out.reason.contains(&format!("the {option} option changed")), "{}", out.reason);
        // And the next run follows the feed again.
        assert_eq!(db.sync(&req).unwrap().mode.as_str(), "noop");
    };
    expect(&|r| r.shape.filter = Some(RowFilter::parse("region = 'eu'").unwrap()), "filter");
    expect(&|r| r.shape.filter = Some(RowFilter::parse("region = 'us'").unwrap()), "filter");
    expect(&|r| r.shape.delete_mode = DeleteMode::Soft, "delete_mode");
    expect(&|r| r.shape.lineage = true, "lineage");
    expect(
        &|r| r.shape.columns = vec![ColumnChoice::parse("id").unwrap(), ColumnChoice::parse("region AS area").unwrap()],
        "columns",
    );
    assert_eq!(
        db.rows("SELECT id, area, _lakesync_deleted_at IS NULL, _lakesync_version FROM public.orders"),
        ["(2,us,t,0)"]
    );
    // Back to the whole table: lakesync's own columns go with the options that added them.
    expect(
        &|r| {
            r.shape = Default::default();
        },
        "filter",
    );
    assert_eq!(db.rows("SELECT id, region, amount FROM public.orders ORDER BY id"), ["(1,eu,20)", "(2,us,50)"]);
    assert_eq!(
        db.value("SELECT string_agg(attname, ',' ORDER BY attname) FROM pg_attribute WHERE attrelid = 'public.orders'::regclass AND attnum > 0 AND NOT attisdropped"),
        "amount,id,region"
    );
}

/// Syncs a Spark-written fixture version by version under `filter`, checking every step
/// against the Delta snapshot filtered by Postgres evaluating the same SQL.
fn filtered_conformance(name: &str, key: &str, last: u64, filter: &str) {
    let Some(path) = spark_fixture(name) else { return };
    let db = TestDb::new(&format!("spark_filtered_{}", name.replace('-', "_")));
    let mut req = db.request(&path, "public.t", key);
    req.shape.filter = Some(RowFilter::parse(filter).unwrap());
    let (mut kept, mut left_out) = (false, false);
    for v in 0..=last {
        req.to_version = Some(v);
        let out = db.sync(&req).unwrap_or_else(|e| panic!("{name}: sync to version {v} failed: {e}"));
        if v > 0 {
            assert_ne!(out.mode.as_str(), "snapshot", "{name} v{v}: {}", out.reason);
        }
        db.assert_matches_filtered_snapshot(&path, "public.t", key, v, filter);
        let counts = db.rows(&format!("SELECT count(*) FILTER (WHERE {filter}) > 0, count(*) FILTER (WHERE {filter}) < count(*) FROM expected.snapshot"));
        kept |= counts[0].starts_with("(t");
        left_out |= counts[0].ends_with("t)");
    }
    assert!(kept && left_out, "{name}: the filter should keep some rows and leave others out");
}

#[test]
fn a_filtered_spark_table_with_deletion_vectors_and_cdc_files_syncs_step_by_step() {
    filtered_conformance("cdf-table-with-cdc-and-dvs", "id", 25, "(id >= 4 AND id <= 40) OR comment LIKE '%update%'");
}

#[test]
fn a_filtered_partitioned_spark_table_syncs_step_by_step() {
    filtered_conformance("cdf-table", "id", 3, "birthday >= DATE '2023-12-23' OR name ILIKE 'B%'");
}

/// Everything a dry run could have written: the state, the run history, the target's rows
/// and columns, and any table in the database.
fn footprint(db: &TestDb) -> Vec<String> {
    let mut out = db.rows(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'i') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'expected') ORDER BY 1",
    );
    out.extend(db.rows(
        "SELECT attname || ':' || format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = to_regclass('public.orders') AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    ));
    if db.value("SELECT to_regclass('lakesync.synced_tables') IS NOT NULL") == "true" {
        out.extend(
            db.rows("SELECT synced_version, state, options FROM lakesync.synced_tables WHERE target_schema = 'public'"),
        );
        out.extend(db.rows("SELECT count(*) FROM lakesync.runs"));
    }
    if db.value("SELECT to_regclass('public.orders') IS NOT NULL") == "true" {
        out.extend(db.rows("SELECT o::text FROM public.orders o ORDER BY 1"));
    }
    out
}

#[test]
fn a_dry_run_says_what_the_next_run_would_do_and_writes_nothing() {
    let db = TestDb::new("dry_run");
    let t = PyDelta::new();
    t.run(json!([orders(json!([[1, "eu", 20.0], [2, "us", 50.0], [3, "uk", 5.0], [4, "eu", 40.0]]))]));
    let mut req = db.request(&t.path(), "public.orders", "id");
    req.shape.filter = Some(RowFilter::parse("amount >= 10").unwrap());
    req.indexes = vec![vec!["region".into()]];
    let dry = |req: &lakesync_engine::SyncRequest| {
        let mut req = req.clone();
        req.dry_run = true;
        let before = footprint(&db);
        let out = db.sync(&req).unwrap();
        assert_eq!(footprint(&db), before, "the dry run wrote something");
        out
    };
    let counts = |o: &lakesync_engine::SyncOutcome| (o.counts.inserted, o.counts.updated, o.counts.deleted);

    // A database lakesync never ran against: the state schema is listed, not created.
    let plan = dry(&req);
    assert_eq!(
        (plan.mode.as_str(), plan.reason.as_str(), plan.from_version, plan.to_version),
        ("snapshot", "initial snapshot: nothing synced yet", None, 0)
    );
    assert_eq!(counts(&plan), (3, 0, 0));
    let ddl = plan.ddl.join(";\n");
    assert!(ddl.starts_with("CREATE SCHEMA lakesync"), "{ddl}");
    assert!(ddl.contains("CREATE TABLE IF NOT EXISTS lakesync.synced_tables"), "{ddl}");
    assert!(
        ddl.contains("PRIMARY KEY (\"id\")") && ddl.contains("CREATE INDEX") && ddl.contains("RENAME TO \"orders\""),
        "{ddl}"
    );
    let real = db.sync(&req).unwrap();
    assert_eq!((real.mode, counts(&real), real.to_version), (plan.mode, counts(&plan), plan.to_version));

    // Changes through the feed, with a new column: counted by the same apply, rolled back.
    t.run(json!([
        {"op": "update", "predicate": "id = 1", "set": {"amount": "21.0"}},
        {"op": "update", "predicate": "id = 3", "set": {"amount": "30.0"}},
        {"op": "delete", "predicate": "id = 4"},
        {"op": "append", "schema": orders_schema(), "rows": [[5, "fr", 1.0], [6, "de", 60.0]]},
    ]));
    t.run(json!([{"op": "append", "schema": [["id", "pa.int64()"], ["region", "pa.string()"], ["amount", "pa.float64()"], ["note", "pa.string()"]], "rows": [[7, "eu", 70.0, "new"]], "schema_mode": "merge"}]));
    let plan = dry(&req);
    assert_eq!((plan.mode.as_str(), plan.from_version), ("triggered", Some(0)), "{}", plan.reason);
    assert!(plan.ddl.iter().any(|s| s.contains("ADD COLUMN IF NOT EXISTS \"note\"")), "{:?}", plan.ddl);
    let real = db.sync(&req).unwrap();
    assert_eq!((counts(&real), real.to_version), (counts(&plan), plan.to_version));
    assert_eq!(counts(&real), (3, 1, 1));

    // Nothing new: a no-op, with nothing to run.
    let plan = dry(&req);
    assert_eq!((plan.mode.as_str(), plan.ddl.len()), ("noop", 0));

    // A changed filter and index: a snapshot replacing rows in place, counted against the
    // target without changing it.
    req.shape.filter = Some(RowFilter::parse("amount >= 25 OR region = 'fr'").unwrap());
    req.indexes = vec![vec!["amount".into()]];
    let plan = dry(&req);
    assert!(plan.reason.contains("the filter option changed"), "{}", plan.reason);
    assert!(
        plan.ddl.iter().any(|s| s.contains("CREATE INDEX IF NOT EXISTS") && s.contains("amount")),
        "{:?}",
        plan.ddl
    );
    let real = db.sync(&req).unwrap();
    assert_eq!((real.mode, counts(&real)), (plan.mode, counts(&plan)));
    assert_eq!(counts(&real), (1, 0, 1));
}
