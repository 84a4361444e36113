//! Integration tests: real Postgres, real Delta tables (written by the kernel and by the Python
//! `deltalake` writer), and the Spark-written conformance fixtures.

mod compaction;
mod fleet;
mod ingest;
mod object_stores;
mod shape;
mod support;

use lakesync_core::{Classify, ErrorClass, NulBytePolicy, SyncMode};
use lakesync_delta::sample::{customer_schema, customers};
use lakesync_delta::write::DeltaWriter;
use lakesync_engine::SyncRequest;
use serde_json::json;
use support::{spark_fixture, PyDelta, TestDb};

fn people_schema() -> serde_json::Value {
    json!([["id", "pa.int64()"], ["name", "pa.string()"], ["score", "pa.float64()"]])
}

fn people(rows: serde_json::Value) -> serde_json::Value {
    json!({"op": "create", "schema": people_schema(), "rows": rows})
}

fn runs(db: &TestDb) -> Vec<String> {
    db.rows("SELECT mode, outcome, from_version, to_version, rows_inserted, rows_updated, rows_deleted FROM lakesync.runs ORDER BY run_id")
}

#[test]
fn an_initial_sync_snapshots_the_table_and_records_the_version() {
    let db = TestDb::new("initial_snapshot");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers");
    let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
    w.append(&[customers(0..500, 0), customers(500..1200, 0)]).unwrap();
    let mut req = db.request(&path, "crm.customer_profiles", "customer_id");
    req.indexes = vec![vec!["email".into()]];
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version, out.counts.inserted), ("snapshot", 1, 1200));
    assert_eq!(db.value("SELECT count(*) FROM crm.customer_profiles"), "1200");
    assert_eq!(
        db.rows("SELECT customer_id, segment, total_spend, is_active FROM crm.customer_profiles ORDER BY customer_id LIMIT 2"),
        ["(C000000000,enterprise,56428.84,f)", "(C000000001,smb,69377.69,t)"]
    );
    assert_eq!(
        db.rows("SELECT indexname FROM pg_indexes WHERE schemaname = 'crm' ORDER BY 1"),
        ["(customer_profiles_email_idx)", "(customer_profiles_pkey)"]
    );
    assert_eq!(
        db.rows("SELECT synced_version, state, primary_key FROM lakesync.synced_tables"),
        ["(1,ONLINE_NO_PENDING_UPDATE,{customer_id})"]
    );
    assert_eq!(runs(&db), ["(snapshot,succeeded,,1,1200,0,0)"]);
    assert_eq!(db.value("SELECT count(*) FROM pg_tables WHERE tablename LIKE '_lakesync%'"), "0");
    db.assert_matches_snapshot(&path, "crm.customer_profiles", "customer_id", 1);
}

#[test]
fn updates_deletes_and_merges_are_applied_from_the_change_feed() {
    let db = TestDb::new("cdf_apply");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "ada", 1.0], [2, "grace", 2.0], [3, "alan", 3.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let v = t.run(json!([
        {"op": "update", "predicate": "id = 1", "set": {"score": "10.5"}},
        {"op": "delete", "predicate": "id = 2"},
        {"op": "merge", "schema": people_schema(), "rows": [[3, "alan turing", 3.0], [4, "edsger", 4.0]], "on": "t.id = s.id"},
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "triggered");
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (1, 2, 1));
    assert_eq!(
        db.rows("SELECT * FROM public.people ORDER BY id"),
        ["(1,ada,10.5)", "(3,\"alan turing\",3)", "(4,edsger,4)"]
    );
    assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables"), v.to_string());
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

#[test]
fn an_update_that_changes_the_key_deletes_the_old_key() {
    let db = TestDb::new("key_change");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "ada", 1.0], [2, "grace", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    t.run(json!([{"op": "update", "predicate": "id = 1", "set": {"id": "100"}}]));
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT id, name FROM public.people ORDER BY id"), ["(2,grace)", "(100,ada)"]);
}

#[test]
fn a_rewrite_that_deletes_and_reinserts_every_row_keeps_the_rows() {
    let db = TestDb::new("rewrite");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "ada", 1.0], [2, "grace", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    // An overwrite removes the old file and adds a new one in ONE version: each key gets a
    // delete and an insert in that version, which must resolve to the insert.
    let v = t.run(json!([{"op": "overwrite", "schema": people_schema(), "rows": [[1, "ada", 1.0], [2, "grace", 20.0], [3, "new", 3.0]]}]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (1, 1, 0));
    assert_eq!(db.rows("SELECT * FROM public.people ORDER BY id"), ["(1,ada,1)", "(2,grace,20)", "(3,new,3)"]);
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

#[test]
fn a_sync_with_nothing_new_is_a_recorded_noop() {
    let db = TestDb::new("noop");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "ada", 1.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "noop");
    assert_eq!(runs(&db), ["(snapshot,succeeded,,0,1,0,0)", "(noop,succeeded,0,0,0,0,0)"]);
}

#[test]
fn to_version_stops_at_that_version_and_each_chunk_is_a_checkpoint() {
    let db = TestDb::new("to_version");
    let t = PyDelta::new();
    t.run(json!([
        people(json!([[1, "a", 1.0]])),
        {"op": "append", "schema": people_schema(), "rows": [[2, "b", 2.0]]},
        {"op": "append", "schema": people_schema(), "rows": [[3, "c", 3.0]]},
        {"op": "append", "schema": people_schema(), "rows": [[4, "d", 4.0]]},
    ]));
    let mut req = db.request(&t.path(), "public.people", "id");
    req.to_version = Some(1);
    assert_eq!(db.sync(&req).unwrap().to_version, 1);
    assert_eq!(db.value("SELECT count(*) FROM public.people"), "2");
    req.to_version = None;
    req.versions_per_transaction = 1;
    let out = db.sync(&req).unwrap();
    assert_eq!((out.to_version, out.counts.inserted), (3, 2));
    assert_eq!(runs(&db).last().unwrap(), "(triggered,succeeded,1,3,2,0,0)");
    req.to_version = Some(9);
    let err = db.sync(&req).unwrap_err().to_string();
    assert!(err.contains("--to-version 9 does not exist") && err.contains("latest version is 3"), "{err}");
}

#[test]
fn a_table_without_the_change_feed_fails_with_the_statement_to_enable_it() {
    let db = TestDb::new("no_cdf");
    let t = PyDelta::new();
    t.run(json!([{"op": "create", "schema": people_schema(), "rows": [[1, "a", 1.0]], "cdf": false}]));
    let mut req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap(); // the first load is a snapshot: no feed needed
    t.run(json!([{"op": "append", "schema": people_schema(), "rows": [[2, "b", 2.0]]}]));
    let err = db.sync(&req).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("ALTER TABLE delta.`") && msg.contains("SET TBLPROPERTIES (delta.enableChangeDataFeed = true)"),
        "{msg}"
    );
    assert_eq!(err.class(), ErrorClass::Config);
    assert_eq!(db.value("SELECT state FROM lakesync.synced_tables"), "ONLINE_PIPELINE_FAILED");
    assert_eq!(db.value("SELECT count(*) FROM public.people"), "1");
    req.mode = SyncMode::Snapshot;
    db.sync(&req).unwrap();
    assert_eq!(db.value("SELECT count(*) FROM public.people"), "2");
}

#[test]
fn enabling_the_change_feed_after_the_synced_version_falls_back_to_a_snapshot() {
    let db = TestDb::new("cdf_enabled_later");
    let t = PyDelta::new();
    t.run(json!([{"op": "create", "schema": people_schema(), "rows": [[1, "a", 1.0], [2, "b", 2.0]], "cdf": false}]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let v = t.run(json!([
        {"op": "delete", "predicate": "id = 1"},
        {"op": "set_properties", "properties": {"delta.enableChangeDataFeed": "true"}},
        {"op": "append", "schema": people_schema(), "rows": [[3, "c", 3.0]]},
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "snapshot");
    assert!(out.reason.contains("change data feed cannot serve"), "{}", out.reason);
    assert_eq!(db.rows("SELECT id FROM public.people ORDER BY id"), ["(2)", "(3)"]);
    let reasons = db.rows("SELECT mode, outcome FROM lakesync.runs ORDER BY run_id");
    assert_eq!(reasons, ["(snapshot,succeeded)", "(triggered,failed)", "(snapshot,succeeded)"]);
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

#[test]
fn vacuumed_change_files_fall_back_to_a_snapshot() {
    let db = TestDb::new("vacuumed");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let v = t.run(json!([{"op": "update", "predicate": "id = 1", "set": {"name": "'z'"}}]));
    let cdc = t.path().join("_change_data");
    assert!(cdc.exists(), "the writer should have written change files");
    std::fs::remove_dir_all(&cdc).unwrap(); // what VACUUM does to old change files
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "snapshot");
    assert!(out.reason.contains("change data file is missing"), "{}", out.reason);
    assert_eq!(db.rows("SELECT id, name FROM public.people ORDER BY id"), ["(1,z)", "(2,b)"]);
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

#[test]
fn a_truncated_log_falls_back_to_a_snapshot() {
    let db = TestDb::new("truncated_log");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let v = t.run(json!([
        {"op": "append", "schema": people_schema(), "rows": [[2, "b", 2.0]]},
        {"op": "delete", "predicate": "id = 1"},
        {"op": "append", "schema": people_schema(), "rows": [[3, "c", 3.0]]},
        {"op": "checkpoint"},
    ]));
    // Log cleanup removes the commits before the checkpoint.
    for old in 0..v {
        std::fs::remove_file(t.path().join(format!("_delta_log/{old:020}.json"))).unwrap();
    }
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "snapshot", "{}", out.reason);
    assert_eq!(db.rows("SELECT id FROM public.people ORDER BY id"), ["(2)", "(3)"]);
}

#[test]
fn an_excluded_column_is_not_synced() {
    let db = TestDb::new("excluded");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    req.shape.exclude = vec!["score".into()];
    db.sync(&req).unwrap();
    t.run(json!([{"op": "update", "predicate": "id = 1", "set": {"name": "'b'", "score": "2.0"}}]));
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT * FROM public.people"), ["(1,b)"]);
}

#[test]
fn an_added_column_is_added_to_the_table_and_the_sync_continues() {
    let db = TestDb::new("added_column");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let wider =
        json!([["id", "pa.int64()"], ["name", "pa.string()"], ["score", "pa.float64()"], ["email", "pa.string()"]]);
    let v = t.run(json!([
        {"op": "append", "schema": people_schema(), "rows": [[2, "b", 2.0]]},
        {"op": "append", "schema": wider, "rows": [[3, "c", 3.0, "c@example.com"]], "schema_mode": "merge"},
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "triggered", "{}", out.reason);
    assert_eq!(db.rows("SELECT * FROM public.people ORDER BY id"), ["(1,a,1,)", "(2,b,2,)", "(3,c,3,c@example.com)"]);
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

#[test]
fn a_dropped_column_triggers_a_snapshot_that_keeps_grants_and_views() {
    let db = TestDb::new("breaking_change");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    db.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_reader') THEN CREATE ROLE app_reader; END IF; END $$; \
         GRANT SELECT ON public.people TO app_reader; CREATE VIEW public.people_names AS SELECT id, name FROM public.people",
    );
    let oid = db.value("SELECT 'public.people'::regclass::oid");
    let narrow = json!([["id", "pa.int64()"], ["name", "pa.string()"]]);
    let v =
        t.run(json!([{"op": "overwrite", "schema": narrow, "rows": [[2, "b"], [3, "c"]], "schema_mode": "overwrite"}]));
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "snapshot");
    assert!(out.reason.contains("\"score\" was dropped"), "{}", out.reason);
    assert_eq!(db.rows("SELECT * FROM public.people ORDER BY id"), ["(2,b)", "(3,c)"]);
    assert_eq!(db.rows("SELECT * FROM public.people_names ORDER BY id"), ["(2,b)", "(3,c)"]);
    assert_eq!(db.value("SELECT has_table_privilege('app_reader', 'public.people', 'SELECT')"), "true");
    assert_eq!(db.value("SELECT 'public.people'::regclass::oid"), oid);
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

#[test]
fn a_re_snapshot_changes_only_the_rows_that_differ() {
    let db = TestDb::new("resnapshot");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0], [3, "c", 3.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    t.run(json!([{"op": "update", "predicate": "id = 2", "set": {"name": "'bee'"}}, {"op": "delete", "predicate": "id = 3"}]));
    req.mode = SyncMode::Snapshot;
    let out = db.sync(&req).unwrap();
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (0, 1, 1));
    assert_eq!(db.rows("SELECT id, name FROM public.people ORDER BY id"), ["(1,a)", "(2,bee)"]);
    assert_eq!(db.value("SELECT count(*) FROM pg_tables WHERE tablename LIKE '_lakesync%'"), "0");
}

#[test]
fn a_null_primary_key_fails_naming_table_column_and_version() {
    let db = TestDb::new("null_key");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [null, "nobody", 0.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    let err = db.sync(&req).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("public.people") && msg.contains("\"id\" is NULL") && msg.contains("version 0"), "{msg}");
    assert_eq!(err.class(), ErrorClass::Data);
    assert_eq!(db.value("SELECT to_regclass('public.people') IS NULL"), "true");
    assert_eq!(db.value("SELECT state FROM lakesync.synced_tables"), "OFFLINE_FAILED");
    assert_eq!(db.value("SELECT count(*) FROM pg_tables WHERE tablename LIKE '_lakesync%'"), "0");
}

#[test]
fn state_left_by_an_older_build_is_brought_up_to_date() {
    // The state tables as the first builds created them, before row counts, commit
    // timestamps and run reasons were recorded.
    let db = TestDb::new("old_state");
    db.execute(
        "CREATE SCHEMA lakesync; \
         CREATE TABLE lakesync.synced_tables (target_schema text NOT NULL, target_table text NOT NULL, \
           source_uri text NOT NULL, primary_key text[] NOT NULL, synced_version bigint, state text NOT NULL, \
           PRIMARY KEY (target_schema, target_table)); \
         CREATE TABLE lakesync.runs (run_id bigserial PRIMARY KEY, target_schema text NOT NULL, \
           target_table text NOT NULL, started_at timestamptz NOT NULL DEFAULT clock_timestamp(), \
           mode text NOT NULL, outcome text NOT NULL); \
         CREATE INDEX runs_by_table ON lakesync.runs (target_schema, target_table, run_id DESC)",
    );
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    t.run(json!([{"op": "delete", "predicate": "id = 2"}]));
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT id FROM public.people"), ["(1)"]);
    assert_eq!(db.value("SELECT row_count FROM lakesync.synced_tables"), "1");
    assert_eq!(runs(&db), ["(snapshot,succeeded,,0,2,0,0)", "(triggered,succeeded,0,1,0,0,1)"]);
}

#[test]
fn tables_first_synced_at_once_into_a_new_schema_all_succeed() {
    // Two first runs racing to create the same schema: the loser must not fail (serve starts
    // all its tables at once, and several often share a schema).
    let db = TestDb::new("schema_race");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    for round in 0..5 {
        let reqs: Vec<_> = (0..4).map(|i| db.request(&t.path(), &format!("race{round}.people{i}"), "id")).collect();
        std::thread::scope(|s| {
            let runs: Vec<_> = reqs.iter().map(|r| s.spawn(|| db.sync(r))).collect();
            for run in runs {
                run.join().unwrap().unwrap();
            }
        });
    }
    assert_eq!(db.value("SELECT count(*) FROM lakesync.synced_tables WHERE synced_version = 0"), "20");
}

#[test]
fn duplicate_keys_fail_clearly_unless_a_dedup_column_is_given() {
    let db = TestDb::new("duplicates");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "old", 1.0], [1, "new", 2.0], [2, "b", 2.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    let msg = db.sync(&req).unwrap_err().to_string();
    assert!(msg.contains("more than one row with primary key (id)=(1)") && msg.contains("version 0"), "{msg}");
    req.policy.dedup_by = Some("score".into());
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT id, name FROM public.people ORDER BY id"), ["(1,new)", "(2,b)"]);
    // In the change feed too the greatest value wins, whichever commit wrote it: a later
    // commit's row with a smaller value does not replace the key's row.
    t.run(json!([{"op": "append", "schema": people_schema(), "rows": [[2, "again", 5.0], [3, "c", 1.0], [3, "c2", 2.0]]}]));
    t.run(json!([{"op": "append", "schema": people_schema(), "rows": [[2, "later", 4.0], [1, "newest", 9.0]]}]));
    let out = db.sync(&req).unwrap();
    assert_eq!(out.to_version, 2);
    assert_eq!(db.rows("SELECT id, name FROM public.people ORDER BY id"), ["(1,newest)", "(2,again)", "(3,c2)"]);
    db.assert_matches_snapshot_by(&t.path(), "public.people", "id", 2, Some("score"));
    // Without a dedup column (a changed option: the table reloads by snapshot) every repeated
    // key is a duplicate again; which one is named first depends on the parallel load.
    t.run(json!([{"op": "append", "schema": people_schema(), "rows": [[3, "again", 5.0]]}]));
    req.policy.dedup_by = None;
    let msg = db.sync(&req).unwrap_err().to_string();
    assert!(msg.contains("more than one row with primary key (id)=(") && msg.contains("version 3"), "{msg}");
    assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables WHERE target_table = 'people'"), "2");
}

/// With `dedup_by` the source is an event log that repeats keys, and a key's row is its event
/// with the greatest value whichever commit wrote it, in the change feed as in a snapshot:
/// a late event does not replace a greater one, deleting older events (retention) keeps the
/// key's greatest, deleting all of a key's events removes it, an update in place is applied;
/// run by run (the guards in Postgres) and in one run over every commit (the planner).
#[test]
fn an_event_log_keeps_each_keys_greatest_event_across_commits_deletes_and_runs() {
    let db = TestDb::new("event_log");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a5", 5.0], [2, "b1", 1.0], [4, "d2", 2.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    req.policy.dedup_by = Some("score".into());
    db.sync(&req).unwrap();
    let mut once = db.request(&t.path(), "public.people_once", "id");
    once.policy.dedup_by = Some("score".into());
    db.sync(&once).unwrap();
    req.mode = SyncMode::Triggered;
    let append = |rows: serde_json::Value| json!([{"op": "append", "schema": people_schema(), "rows": rows}]);
    let steps = [
        // A late event: smaller than the key's greatest, in a later commit.
        (append(json!([[1, "a3", 3.0]])), vec!["(1,a5)", "(2,b1)", "(4,d2)"]),
        (append(json!([[1, "a7", 7.0], [3, "c1", 1.0], [4, "d1", 1.0]])), vec!["(1,a7)", "(2,b1)", "(3,c1)", "(4,d2)"]),
        // Retention deletes older events: each key keeps its greatest.
        (json!([{"op": "delete", "predicate": "score < 1.5"}]), vec!["(1,a7)", "(4,d2)"]),
        (json!([{"op": "delete", "predicate": "id = 1 AND score < 7.0"}]), vec!["(1,a7)", "(4,d2)"]),
        // A key's events all deleted (a user's data erased), and an update in place.
        (json!([{"op": "delete", "predicate": "id = 4"}]), vec!["(1,a7)"]),
        (json!([{"op": "update", "predicate": "id = 1", "set": {"name": "'a7x'"}}]), vec!["(1,a7x)"]),
        (append(json!([[1, "a6", 6.0], [5, "e9", 9.0]])), vec!["(1,a7x)", "(5,e9)"]),
    ];
    for (ops, expected) in steps {
        let v = t.run(ops);
        let out = db.sync(&req).unwrap();
        assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v));
        assert_eq!(db.rows("SELECT id, name FROM public.people ORDER BY id"), expected, "version {v}");
        db.assert_matches_snapshot_by(&t.path(), "public.people", "id", v, Some("score"));
    }
    // More events of one key than the planner keeps, then its greatest ones deleted, in the
    // range of one run: the key is planned again from a second read, and keeps its row.
    t.run(append(json!([
        [6, "f1", 1.0],
        [6, "f2", 2.0],
        [6, "f3", 3.0],
        [6, "f4", 4.0],
        [6, "f5", 5.0],
        [6, "f6", 6.0]
    ])));
    let v = t.run(json!([{"op": "delete", "predicate": "id = 6 AND score > 2.5"}]));
    once.mode = SyncMode::Triggered;
    let out = db.sync(&once).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v));
    assert_eq!(db.rows("SELECT id, name FROM public.people_once ORDER BY id"), ["(1,a7x)", "(5,e9)", "(6,f2)"]);
    db.assert_matches_snapshot_by(&t.path(), "public.people_once", "id", v, Some("score"));
}

/// `dedup_by` on a text column in a database whose collation sorts "a" before "B": Postgres
/// (the snapshot's dedup, the change guards) and the change planner order the values the same
/// way, by bytes ("a" > "C" > "B"), so a snapshot and the change feed keep the same row.
#[test]
fn dedup_by_a_text_column_orders_by_bytes_in_the_snapshot_and_the_change_feed_alike() {
    let Some(db) = TestDb::with_icu_collation("dedup_text") else { return };
    assert_eq!(db.value("SELECT 'a' < 'B'"), "true", "the database collation sorts by ICU rules");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [1, "B", 2.0], [2, "B", 1.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    req.policy.dedup_by = Some("name".into());
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT id, name, score FROM public.people ORDER BY id"), ["(1,a,1)", "(2,B,1)"]);
    // "C" is greater than "B" but less than "a" in bytes.
    let v = t.run(json!([{"op": "append", "schema": people_schema(), "rows": [[1, "C", 3.0], [2, "C", 3.0]]}]));
    req.mode = SyncMode::Triggered;
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v));
    assert_eq!(db.rows("SELECT id, name, score FROM public.people ORDER BY id"), ["(1,a,1)", "(2,C,3)"]);
    let mut fresh = db.request(&t.path(), "public.people_fresh", "id");
    fresh.policy.dedup_by = Some("name".into());
    db.sync(&fresh).unwrap();
    db.assert_same_rows("public.people", "public.people_fresh");
}

/// Records the tables created in `db` (a superuser's event trigger), to see which staging
/// tables a run made.
fn log_created_tables(db: &TestDb) {
    db.execute(
        "CREATE TABLE public.created_tables (name text); \
         CREATE FUNCTION public.log_created_tables() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO public.created_tables SELECT object_identity FROM pg_event_trigger_ddl_commands() \
           WHERE command_tag = 'CREATE TABLE'; END $$; \
         CREATE EVENT TRIGGER log_created_tables ON ddl_command_end EXECUTE FUNCTION public.log_created_tables();",
    );
}

/// `public.people` synced from a new Delta table of `rows`, and the tables created from then on
/// logged (see `log_created_tables`).
fn people_synced_with_a_table_log(name: &str, rows: Vec<serde_json::Value>) -> (TestDb, PyDelta, SyncRequest) {
    let db = TestDb::new(name);
    let t = PyDelta::new();
    t.run(json!([people(json!(rows))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    log_created_tables(&db);
    (db, t, req)
}

fn staging_tables_created(db: &TestDb) -> String {
    db.value("SELECT count(*) FROM public.created_tables WHERE name LIKE 'lakesync.stage\\_%'")
}

fn staging_tables_left(db: &TestDb) -> String {
    db.value("SELECT count(*) FROM pg_tables WHERE schemaname = 'lakesync' AND tablename LIKE 'stage\\_%'")
}

#[test]
fn a_large_change_set_is_staged_part_by_part_and_leaves_no_staging_tables() {
    let rows = (0..6000).map(|i| json!([i, format!("p{i}"), i as f64])).collect();
    let (db, t, req) = people_synced_with_a_table_log("staged_apply", rows);
    // What a crashed run would have left behind.
    let prefix = lakesync_postgres::apply::staging_prefix(&lakesync_core::TableName::new("public", "people"));
    db.execute(&format!("CREATE UNLOGGED TABLE lakesync.{prefix}_7 (id bigint)"));
    // 4,000 updates and 1,500 inserts: 5,500 upserts, more than the first staged part holds.
    let merged: Vec<_> = (2000..7500).map(|i| json!([i, format!("q{i}"), (2 * i) as f64])).collect();
    let v = t.run(json!([
        {"op": "merge", "schema": people_schema(), "rows": merged, "on": "t.id = s.id"},
        {"op": "delete", "predicate": "id < 500"},
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (1500, 4000, 500));
    assert_eq!(
        db.rows("SELECT * FROM public.people WHERE id IN (499, 500, 1999, 2000, 7499) ORDER BY id"),
        ["(500,p500,500)", "(1999,p1999,1999)", "(2000,q2000,4000)", "(7499,q7499,14998)"]
    );
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
    // Parts of 2,048 and 3,452 rows, each in its own table, all dropped after the commit
    // (with the crashed run's).
    assert_eq!(staging_tables_created(&db), "3");
    assert_eq!(staging_tables_left(&db), "0");
}

#[test]
fn a_duplicate_key_in_a_staged_change_set_fails_clearly_and_changes_nothing() {
    let (db, t, req) =
        people_synced_with_a_table_log("staged_duplicate", (0..3000).map(|i| json!([i, "a", 1.0])).collect());
    // 3,000 new keys and one that is already there: staged in two parts, and the insert of
    // the part holding key 5 meets the existing row.
    let mut appended: Vec<_> = (3000..6000).map(|i| json!([i, "b", 2.0])).collect();
    appended.push(json!([5, "again", 2.0]));
    t.run(json!([{"op": "append", "schema": people_schema(), "rows": appended}]));
    let msg = db.sync(&req).unwrap_err().to_string();
    assert!(msg.contains("more than one row with primary key (id)=(5)") && msg.contains("version 1"), "{msg}");
    assert_eq!(db.value("SELECT count(*) FROM public.people"), "3000");
    assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables"), "0");
    // The second part may or may not be staged before the first one fails.
    assert_ne!(staging_tables_created(&db), "0");
    assert_eq!(staging_tables_left(&db), "0");
}

#[test]
fn nul_bytes_fail_by_default_and_are_stripped_on_request() {
    let db = TestDb::new("nul_bytes");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "fine", 1.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    t.run(json!([{"op": "append", "schema": people_schema(), "rows": [[2, "bad\u{0}name", 2.0], [3, "ok", 3.0]]}]));
    let err = db.sync(&req).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("public.people")
            && msg.contains("column \"name\"")
            && msg.contains("version 1")
            && msg.contains("(id)=(2)")
            && msg.contains("NUL"),
        "{msg}"
    );
    // Nothing of the failed chunk was applied, the version did not move.
    assert_eq!(db.rows("SELECT id FROM public.people"), ["(1)"]);
    assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables"), "0");
    assert!(db.value("SELECT last_error FROM lakesync.synced_tables").contains("NUL"));
    req.policy.nul_bytes = NulBytePolicy::Strip;
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT id, name FROM public.people ORDER BY id"), ["(1,fine)", "(2,badname)", "(3,ok)"]);
}

#[test]
fn every_delta_type_maps_to_its_postgres_type() {
    let db = TestDb::new("types");
    let t = PyDelta::new();
    let schema = json!([
        ["id", "pa.int32()"],
        ["i8", "pa.int8()"],
        ["i16", "pa.int16()"],
        ["i64", "pa.int64()"],
        ["f32", "pa.float32()"],
        ["f64", "pa.float64()"],
        ["ok", "pa.bool_()"],
        ["amount", "pa.decimal128(12, 3)"],
        ["s", "pa.string()"],
        ["b", "pa.binary()"],
        ["d", "pa.date32()"],
        ["ts", "pa.timestamp('us', tz='UTC')"],
        ["ntz", "pa.timestamp('us')"],
        ["tags", "pa.list_(pa.string())"],
        ["attrs", "pa.map_(pa.string(), pa.int64())"],
        ["addr", "pa.struct([('city', pa.string()), ('zip', pa.int32())])"],
    ]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [
        [1, -8, 16, 9007199254740993i64, 1.5, 2.25, true, "-1234.567", "héllo \"q\"", "AAEC", "2024-02-29",
         "2024-01-02T03:04:05.123456+00:00", "2024-01-02T03:04:05", ["x", "y"], [["k", 1]], {"city": "Oslo", "zip": 150}],
        [2, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null]
    ]}]));
    let req = db.request(&t.path(), "public.types", "id");
    db.sync(&req).unwrap();
    assert_eq!(
        db.rows("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'public.types'::regclass AND attnum > 0 ORDER BY attnum"),
        [
            "(id,integer)", "(i8,smallint)", "(i16,smallint)", "(i64,bigint)", "(f32,real)", "(f64,\"double precision\")",
            "(ok,boolean)", "(amount,\"numeric(12,3)\")", "(s,text)", "(b,bytea)", "(d,date)",
            "(ts,\"timestamp with time zone\")", "(ntz,\"timestamp without time zone\")", "(tags,jsonb)", "(attrs,jsonb)", "(addr,jsonb)"
        ]
    );
    db.execute("SET TIME ZONE 'UTC'");
    assert_eq!(
        db.rows("SELECT id, i8, i16, i64, f32, f64, ok, amount, s, encode(b, 'hex'), d, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), ntz, tags, attrs, addr FROM public.types ORDER BY id"),
        [
            "(1,-8,16,9007199254740993,1.5,2.25,t,-1234.567,\"héllo \"\"q\"\"\",000102,2024-02-29,\"2024-01-02 03:04:05.123456\",\"2024-01-02 03:04:05\",\"[\"\"x\"\", \"\"y\"\"]\",\"{\"\"k\"\": 1}\",\"{\"\"zip\"\": 150, \"\"city\"\": \"\"Oslo\"\"}\")",
            "(2,,,,,,,,,,,,,,,)"
        ]
    );
}

#[test]
fn a_second_process_cannot_sync_the_same_table_at_once() {
    let db = TestDb::new("lock");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    req.lock_wait = std::time::Duration::from_millis(300);
    support::block_on(async {
        let holder = db.config().connect().await.unwrap();
        let key = lakesync_postgres::state::lock_key(&req.table);
        holder.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key]).await.unwrap();
        let err = lakesync_engine::sync(&req).await.unwrap_err();
        assert!(err.to_string().contains("being synced by another lakesync process"), "{err}");
        assert_eq!(err.class(), ErrorClass::Busy);
    });
    db.sync(&req).unwrap();
}

#[test]
fn a_least_privilege_role_can_snapshot_apply_and_resnapshot() {
    let db = TestDb::new("least_privilege");
    // The grants README.md documents, and nothing more.
    db.execute(&format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'lakesync_app') THEN \
           CREATE ROLE lakesync_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE; END IF; END $$; \
         GRANT CONNECT, TEMPORARY ON DATABASE {db} TO lakesync_app; \
         CREATE SCHEMA lakesync AUTHORIZATION lakesync_app; \
         CREATE SCHEMA analytics AUTHORIZATION lakesync_app;",
        db = db.name
    ));
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let mut req = db.request(&t.path(), "analytics.people", "id");
    req.postgres = lakesync_postgres::PgConfig::parse(&db.conn.replace("user=postgres", "user=lakesync_app")).unwrap();
    db.sync(&req).unwrap();
    t.run(json!([{"op": "update", "predicate": "id = 1", "set": {"name": "'z'"}}, {"op": "delete", "predicate": "id = 2"}]));
    db.sync(&req).unwrap();
    req.mode = SyncMode::Snapshot;
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT id, name FROM analytics.people"), ["(1,z)"]);
    assert_eq!(db.value("SELECT tableowner FROM pg_tables WHERE tablename = 'people'"), "lakesync_app");
}

#[test]
fn a_source_change_is_refused_and_a_key_change_reloads_the_table() {
    let db = TestDb::new("identity");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    db.sync(&db.request(&t.path(), "public.people", "id")).unwrap();
    let other = PyDelta::new();
    other.run(json!([people(json!([[1, "a", 1.0]]))]));
    let msg = db.sync(&db.request(&other.path(), "public.people", "id")).unwrap_err().to_string();
    assert!(msg.contains("already synced from"), "{msg}");
    let msg = db.sync(&db.request(&t.path(), "public.people2", "nope")).unwrap_err().to_string();
    assert!(msg.contains("\"nope\" is not a column"), "{msg}");
    // Another key: the table is reloaded with the new key's index, even in triggered mode.
    let mut by_name = db.request(&t.path(), "public.people", "name");
    by_name.mode = SyncMode::Triggered;
    let out = db.sync(&by_name).unwrap();
    assert_eq!(out.mode.as_str(), "snapshot");
    assert!(out.reason.contains("primary key changed from (id) to (name)"), "{}", out.reason);
    assert_eq!(
        db.value("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'public.people'::regclass AND contype = 'p'"),
        "PRIMARY KEY (name)"
    );
    assert_eq!(db.rows("SELECT primary_key FROM lakesync.synced_tables"), ["({name})"]);
    assert_eq!(db.sync(&by_name).unwrap().mode.as_str(), "noop");
}

#[test]
fn changing_exclude_indexes_or_data_policies_does_what_the_change_implies() {
    let db = TestDb::new("options_change");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    req.shape.exclude = vec!["score".into()];
    req.indexes = vec![vec!["name".into()]];
    db.sync(&req).unwrap();
    let indexes = || db.rows("SELECT indexname FROM pg_indexes WHERE tablename = 'people' ORDER BY 1");
    assert_eq!(indexes(), ["(people_name_idx)", "(people_pkey)"]);
    let v = t.run(json!([{"op": "update", "predicate": "id = 1", "set": {"score": "10.0"}}]));

    // The column is no longer excluded: a snapshot backfills it (before, the feed would have
    // written rows without it); the index moves from name to score.
    req.shape.exclude.clear();
    req.indexes = vec![vec!["score".into()]];
    req.mode = SyncMode::Triggered;
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "snapshot");
    assert!(out.reason.contains("exclude option changed"), "{}", out.reason);
    assert_eq!(db.rows("SELECT id, score FROM public.people ORDER BY id"), ["(1,10)", "(2,2)"]);
    assert_eq!(indexes(), ["(people_pkey)", "(people_score_idx)"]);

    // Only the indexes change: built and dropped, no reload.
    req.indexes = vec![vec!["name".into(), "score".into()]];
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "noop");
    assert_eq!(indexes(), ["(people_name_score_idx)", "(people_pkey)"]);

    // Excluded again: the column goes (a snapshot applied in place), instead of going stale.
    req.shape.exclude = vec!["score".into()];
    req.indexes = vec![vec!["name".into()]];
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "snapshot");
    assert_eq!(db.rows("SELECT * FROM public.people ORDER BY id"), ["(1,a)", "(2,b)"]);
    assert_eq!(indexes(), ["(people_name_idx)", "(people_pkey)"]);
    assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables"), v.to_string());
}

#[test]
fn odd_identifiers_are_quoted_everywhere() {
    let db = TestDb::new("identifiers");
    let t = PyDelta::new();
    let schema = json!([["select", "pa.int64()"], ["a.b \"c\"", "pa.string()"], ["ünï cödé", "pa.string()"]]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [[1, "x", "y"]]}]));
    let req = db.request(&t.path(), "\"we.ird\".\"t\"\"; DROP TABLE x; --\"", "select");
    db.sync(&req).unwrap();
    t.run(json!([{"op": "update", "predicate": "\"select\" = 1", "set": {"`a.b \"c\"`": "'z'"}}]));
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT * FROM \"we.ird\".\"t\"\"; DROP TABLE x; --\""), ["(1,z,y)"]);
}

/// Syncs a Spark-written fixture version by version and checks every step against the Delta
/// snapshot at that version.
fn conformance(name: &str, key: &str, first: u64, last: u64) {
    conformance_with_fallbacks(name, key, first, last, &[]);
}

/// Like [`conformance`], where the versions in `fallbacks` must fall back to a snapshot
/// because their change feed disagrees with the table, with the reason containing the text.
fn conformance_with_fallbacks(name: &str, key: &str, first: u64, last: u64, fallbacks: &[(u64, &str)]) {
    let Some(path) = spark_fixture(name) else { return };
    let db = TestDb::new(&format!("spark_{name}"));
    let mut req = db.request(&path, "public.t", key);
    for v in first..=last {
        req.to_version = Some(v);
        let out = db.sync(&req).unwrap_or_else(|e| panic!("{name}: sync to version {v} failed: {e}"));
        assert_eq!(out.to_version, v);
        if v > first {
            match fallbacks.iter().find(|(fv, _)| *fv == v) {
                Some((_, why)) => {
                    assert_eq!(out.mode.as_str(), "snapshot", "{name}: version {v} should fall back to a snapshot");
                    assert!(out.reason.contains(why), "{name} v{v}: {}", out.reason);
                }
                None => assert_ne!(
                    out.mode.as_str(),
                    "snapshot",
                    "{name}: version {v} fell back to a snapshot: {}",
                    out.reason
                ),
            }
        }
        db.assert_matches_snapshot(&path, "public.t", key, v);
    }
}

#[test]
fn spark_cdc_ict_table_syncs_step_by_step() {
    conformance("cdc_ict_table", "name", 0, 3);
}

#[test]
fn spark_column_mapping_id_mode_syncs_step_by_step() {
    conformance("cdf-column-mapping-id-mode", "id", 0, 4);
}

#[test]
fn spark_column_mapping_name_mode_syncs_step_by_step() {
    conformance("cdf-column-mapping-name-mode", "id", 0, 4);
}

#[test]
fn spark_cdf_table_syncs_step_by_step() {
    conformance("cdf-table", "id", 0, 3);
}

#[test]
fn spark_backtick_column_names_sync_step_by_step() {
    conformance("cdf-table-backtick-column-names", "id.num", 0, 1);
}

#[test]
fn spark_optimize_commit_syncs_as_no_change() {
    conformance("cdf-table-data-change", "id", 0, 1);
}

#[test]
fn spark_delete_tables_sync_step_by_step() {
    conformance("cdf-table-delete-conditional-all-rows", "id", 0, 1);
    conformance("cdf-table-delete-conditional-two-rows", "id", 0, 1);
    conformance("cdf-table-delete-unconditional", "id", 0, 1);
}

#[test]
fn spark_non_partitioned_table_syncs_step_by_step() {
    conformance("cdf-table-non-partitioned", "name", 0, 4);
}

#[test]
fn spark_non_partitioned_table_with_a_repeating_key_fails_with_a_duplicate_key_error() {
    let Some(path) = spark_fixture("cdf-table-non-partitioned") else { return };
    let db = TestDb::new("spark_duplicate_id");
    let mut req = db.request(&path, "public.t", "id");
    for v in 0..=3 {
        req.to_version = Some(v);
        db.sync(&req).unwrap();
    }
    req.to_version = Some(4);
    let msg = db.sync(&req).unwrap_err().to_string();
    assert!(msg.contains("more than one row with primary key (id)=") && msg.contains("version 4"), "{msg}");
    assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables"), "3");
    db.assert_matches_snapshot(&path, "public.t", "id", 3);
}

#[test]
fn spark_partitioned_table_syncs_step_by_step() {
    conformance("cdf-table-partitioned", "part,id", 0, 2);
}

#[test]
fn spark_simple_table_with_cdc_syncs_step_by_step() {
    conformance("simple_table_with_cdc", "id", 0, 2);
}

/// These fixtures hold hand-made "Manual Update" commits: `cdc` files with no matching
/// add/remove, so the feed and the table disagree (and `update-ops` uses change types that do
/// not exist). The table is the truth: lakesync notices and loads a snapshot instead.
#[test]
fn spark_tables_whose_change_feed_disagrees_with_the_table_fall_back_to_a_snapshot() {
    conformance_with_fallbacks(
        "cdf-table-simple",
        "id",
        0,
        2,
        &[(2, "would hold 5 rows, but the Delta table holds 0")],
    );
    conformance_with_fallbacks(
        "cdf-table-update-ops",
        "id",
        0,
        2,
        &[(1, "unknown _change_type \"update_pre\""), (2, "unknown _change_type \"update_post\"")],
    );
}

#[test]
fn spark_table_with_cdc_files_and_deletion_vectors_syncs_step_by_step() {
    conformance("cdf-table-with-cdc-and-dvs", "id", 0, 25);
}

#[test]
fn spark_table_with_deletion_vectors_syncs_step_by_step() {
    conformance("cdf-table-with-dv", "value", 0, 6);
}

#[test]
fn spark_table_starting_at_a_checkpoint_syncs_step_by_step() {
    conformance("checkpoint-cdf-table", "id", 3, 5);
}

#[test]
fn spark_tables_synced_in_one_run_match_the_latest_snapshot() {
    // One triggered run across the whole range (the planner sees every version at once).
    for (name, key, first, last) in
        [("cdf-table-with-cdc-and-dvs", "id", 0, 25), ("checkpoint-cdf-table", "id", 3, 5), ("cdf-table", "id", 0, 3)]
    {
        let Some(path) = spark_fixture(name) else { return };
        let db = TestDb::new(&format!("spark_once_{name}"));
        let mut req = db.request(&path, "public.t", key);
        req.to_version = Some(first);
        db.sync(&req).unwrap();
        req.to_version = None;
        let out = db.sync(&req).unwrap();
        assert_eq!((out.mode.as_str(), out.to_version), ("triggered", last), "{name}");
        db.assert_matches_snapshot(&path, "public.t", key, last);
    }
}

/// The data files added by the commit at `version`, as paths under the table.
fn added_files(table: &std::path::Path, version: u64) -> Vec<std::path::PathBuf> {
    let log = std::fs::read_to_string(table.join(format!("_delta_log/{version:020}.json"))).unwrap();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|a| a["add"]["path"].as_str().map(|p| table.join(p)))
        .collect()
}

/// Broken sources fail with an error naming the table, and nothing is half applied: the
/// table keeps its rows and its synced version.
#[test]
fn missing_or_corrupt_data_files_and_a_truncated_commit_fail_clearly_and_change_nothing() {
    let db = TestDb::new("bad_input");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let before = db.rows("SELECT * FROM public.people ORDER BY id");
    let unchanged = |db: &TestDb| {
        assert_eq!(db.rows("SELECT * FROM public.people ORDER BY id"), before);
        assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables"), "0");
        assert_eq!(db.value("SELECT count(*) FROM pg_tables WHERE tablename LIKE '\\_lakesync%'"), "0");
    };
    let uri = t.path().display().to_string();

    // A data file deleted by hand.
    let v1 = t.run(json!([{"op": "append", "schema": people_schema(), "rows": [[3, "c", 3.0]]}]));
    let file = added_files(&t.path(), v1).pop().unwrap();
    let saved = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    let err = db.sync(&req).unwrap_err().to_string();
    assert!(err.contains(&uri) && err.contains("version 1"), "{err}");
    unchanged(&db);

    // The same file, corrupt.
    std::fs::write(&file, b"PAR1 this is not parquet PAR1").unwrap();
    let err = db.sync(&req).unwrap_err();
    assert!(err.to_string().contains(&uri), "{err}");
    assert_ne!(err.class(), ErrorClass::Transient, "retrying a corrupt file cannot help: {err}");
    unchanged(&db);
    std::fs::write(&file, saved).unwrap();

    // A commit file cut in half (a writer crashed mid-write on a store without atomic puts).
    let v2 = t.run(json!([{"op": "delete", "predicate": "id = 1"}]));
    let commit = t.path().join(format!("_delta_log/{v2:020}.json"));
    let text = std::fs::read_to_string(&commit).unwrap();
    std::fs::write(&commit, &text[..text.len() / 2]).unwrap();
    let err = db.sync(&req).unwrap_err().to_string();
    assert!(err.contains(&uri), "{err}");
    unchanged(&db);

    // Repaired, the next run applies both versions.
    std::fs::write(&commit, text).unwrap();
    let out = db.sync(&req).unwrap();
    assert_eq!(out.to_version, v2);
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v2);
}

/// Values at the edges: NaN and infinities, a 1 MB string, an empty table, a commit that only
/// deletes.
#[test]
fn edge_values_empty_tables_and_delete_only_commits_sync_exactly() {
    let db = TestDb::new("edge_values");
    let t = PyDelta::new();
    t.run(json!([people(json!([]))]));
    let req = db.request(&t.path(), "public.people", "id");
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.counts.inserted), ("snapshot", 0));
    assert_eq!(db.value("SELECT count(*) FROM public.people"), "0");

    let big = "x".repeat(1 << 20);
    let v = t.run(json!([{"op": "append", "schema": people_schema(), "rows": [
        [1, big, f64::MAX], [2, "nan", null], [3, "", 0.0], [4, "inf", 1e308]
    ]}, {"op": "update", "predicate": "id = 2", "set": {"score": "'NaN'"}},
        {"op": "update", "predicate": "id = 4", "set": {"score": "'Infinity'"}},
        {"op": "update", "predicate": "id = 3", "set": {"score": "'-Infinity'"}}]));
    db.sync(&req).unwrap();
    assert_eq!(
        db.rows("SELECT id, length(name), score FROM public.people ORDER BY id"),
        ["(1,1048576,1.7976931348623157e+308)", "(2,3,NaN)", "(3,0,-Infinity)", "(4,3,Infinity)"]
    );
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);

    let v = t.run(json!([{"op": "delete", "predicate": "id >= 2"}]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (0, 0, 3));
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

/// TLS: `sslmode` behaves as in libpq, with rustls. The server gets a certificate for
/// 127.0.0.1/localhost signed by a test CA; verification passes with that CA and fails with
/// another; a whole sync runs over a verified connection.
#[test]
fn tls_connections_follow_sslmode_and_verify_the_server_certificate() {
    use lakesync_postgres::cluster::LocalCluster;
    use lakesync_postgres::PgConfig;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = support::test_certificates(d);
    let cluster = support::StopOnDrop(LocalCluster::start(&d.join("pg"), support::test_port(4)).unwrap());
    let cluster = &cluster.0;
    std::fs::copy(&certs.cert, d.join("pg/data/server.pem")).unwrap();
    std::fs::copy(&certs.key, d.join("pg/data/server.key")).unwrap();
    let _ = std::process::Command::new("chown").args(["-R", "postgres:postgres"]).arg(d.join("pg/data")).status();
    let admin = cluster.connection_string("postgres");
    let plain = TestDb { conn: format!("{admin} sslmode=disable"), name: "postgres".into() };
    // ALTER SYSTEM cannot run inside the implicit transaction of a multi-statement batch.
    for sql in [
        "ALTER SYSTEM SET ssl = on",
        "ALTER SYSTEM SET ssl_cert_file = 'server.pem'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        "SELECT pg_reload_conf()",
    ] {
        plain.execute(sql);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));

    let ca = certs.ca.display().to_string();
    let other = certs.other_ca.display().to_string();
    let encrypted = |conn: &str| -> Result<bool, String> {
        support::block_on(async {
            let client =
                PgConfig::parse(conn).map_err(|e| e.to_string())?.connect().await.map_err(|e| e.to_string())?;
            let row = client
                .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok(row.get(0))
        })
    };
    assert_eq!(encrypted(&format!("{admin} sslmode=disable")), Ok(false));
    assert_eq!(encrypted(&admin), Ok(true), "prefer uses TLS when offered");
    assert_eq!(encrypted(&format!("{admin} sslmode=require")), Ok(true));
    assert_eq!(encrypted(&format!("{admin} sslmode=verify-full sslrootcert={ca}")), Ok(true));
    let localhost = admin.replace("host=127.0.0.1", "host=localhost");
    assert_eq!(encrypted(&format!("{localhost} sslmode=verify-full sslrootcert={ca}")), Ok(true));
    let err = encrypted(&format!("{admin} sslmode=verify-full sslrootcert={other}")).unwrap_err();
    assert!(err.contains("certificate") && err.contains("cannot connect to Postgres"), "{err}");
    assert!(encrypted(&format!("{admin} sslmode=verify-ca sslrootcert={other}")).is_err());
    assert_eq!(encrypted(&format!("{admin} sslmode=verify-ca sslrootcert={ca}")), Ok(true));
    // libpq: with a root certificate, require checks the chain (it is verify-ca).
    assert!(encrypted(&format!("{admin} sslmode=require sslrootcert={other}")).is_err());
    assert_eq!(encrypted(&format!("{admin} sslmode=require sslrootcert={ca}")), Ok(true));
    let err = PgConfig::parse(&format!("{admin} sslmode=verify-full sslrootcert={}/missing.pem", d.display()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("sslrootcert") && err.contains("missing.pem"), "{err}");

    // A whole sync over a verified connection.
    let db = TestDb { conn: format!("{admin} sslmode=verify-full sslrootcert={ca}"), name: "postgres".into() };
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let v = t.run(json!([{"op": "delete", "predicate": "id = 1"}]));
    db.sync(&req).unwrap();
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

/// Readers during a re-snapshot and incremental runs see the old table or the new one, never
/// a partial or empty one.
#[test]
fn a_reader_never_sees_a_partial_or_empty_table_during_a_resnapshot() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let db = TestDb::new("reader_loop");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers");
    let w = DeltaWriter::create(&path, &customer_schema(), &[("delta.enableChangeDataFeed", "true")]).unwrap();
    let (_, files) = w.append_files((0..4).map(|f| customers(f * 5_000..(f + 1) * 5_000, 0))).unwrap();
    let mut req = db.request(&path, "public.customers", "customer_id");
    db.sync(&req).unwrap();
    w.remove_files(|p| p == files[0]).unwrap(); // 15,000 rows
    w.append(&[customers(20_000..21_000, 0)]).unwrap(); // 16,000 rows

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, conn) = (stop.clone(), db.conn.clone());
        std::thread::spawn(move || {
            support::block_on(async {
                let client = lakesync_postgres::PgConfig::parse(&conn).unwrap().connect().await.unwrap();
                let mut seen = std::collections::BTreeMap::<i64, u64>::new();
                while !stop.load(Ordering::Relaxed) {
                    let n: i64 = client.query_one("SELECT count(*) FROM public.customers", &[]).await.unwrap().get(0);
                    *seen.entry(n).or_default() += 1;
                }
                seen
            })
        })
    };
    req.mode = SyncMode::Snapshot; // in place: delete gone keys, update, insert, one transaction
    db.sync(&req).unwrap();
    w.remove_files(|p| p == files[1]).unwrap(); // 11,000 rows
    req.mode = SyncMode::Auto;
    db.sync(&req).unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    let counts: Vec<i64> = seen.keys().copied().collect();
    assert!(counts.iter().all(|c| [20_000, 16_000, 11_000].contains(c)), "a reader saw {seen:?}");
    assert!(seen.values().sum::<u64>() > 10, "the reader should have run throughout: {seen:?}");
}

/// The feed switched off for a while mid-range (changes made meanwhile have no change rows):
/// the range cannot be served, so lakesync re-snapshots rather than miss them.
#[test]
fn a_change_feed_disabled_mid_range_falls_back_to_a_snapshot() {
    let db = TestDb::new("cdf_disabled_mid_range");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let v = t.run(json!([
        {"op": "set_properties", "properties": {"delta.enableChangeDataFeed": "false"}},
        {"op": "update", "predicate": "id = 1", "set": {"name": "'unseen by the feed'"}},
        {"op": "set_properties", "properties": {"delta.enableChangeDataFeed": "true"}},
        {"op": "append", "schema": people_schema(), "rows": [[3, "c", 3.0]]},
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "snapshot", "{}", out.reason);
    assert!(out.reason.contains("change data feed cannot serve"), "{}", out.reason);
    assert_eq!(
        db.rows("SELECT id, name FROM public.people ORDER BY id"),
        ["(1,\"unseen by the feed\")", "(2,b)", "(3,c)"]
    );
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

// ---- Production safety: ownership, compare-and-set, names, errors, history (issue 15) ----

fn oid(db: &TestDb, table: &str) -> String {
    db.value(&format!("SELECT '{table}'::regclass::oid"))
}

#[test]
fn a_table_lakesync_did_not_create_is_refused_and_adopted_only_on_purpose() {
    let db = TestDb::new("adopt");
    db.execute(
        "CREATE TABLE public.users (id bigint PRIMARY KEY, name text, score double precision, notes text); \
         INSERT INTO public.users VALUES (1, 'app-owned', 9.0, 'keep'), (99, 'only-in-app', 1.0, NULL);",
    );
    let before = oid(&db, "public.users");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "ada", 1.0], [2, "grace", 2.0]]))]));
    let mut req = db.request(&t.path(), "public.users", "id");

    // A typo'd --table: refused, naming the table and the way to adopt it; nothing changed.
    let err = db.sync(&req).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("public.users") && msg.contains("lakesync did not create") && msg.contains("--adopt"),
        "{msg}"
    );
    assert_eq!(err.class(), ErrorClass::Config);
    let unchanged = ["(1,app-owned,9,keep)", "(99,only-in-app,1,)"];
    assert_eq!(db.rows("SELECT * FROM public.users ORDER BY id"), unchanged);
    assert_eq!(db.value("SELECT count(*) FROM lakesync.synced_tables"), "0");

    // Adopting still never drops a column without --allow-drop-columns.
    req.adopt = true;
    let msg = db.sync(&req).unwrap_err().to_string();
    assert!(msg.contains("columns the source lacks (notes)") && msg.contains("--allow-drop-columns"), "{msg}");
    assert_eq!(db.rows("SELECT * FROM public.users ORDER BY id"), unchanged);

    // A table keyed differently, or with a column of another type, cannot be adopted.
    db.execute("CREATE TABLE public.by_name (id bigint, name text PRIMARY KEY, score double precision)");
    let mut other = db.request(&t.path(), "public.by_name", "id");
    other.adopt = true;
    let msg = db.sync(&other).unwrap_err().to_string();
    assert!(msg.contains("its primary key is (name), but the sync key is (id)"), "{msg}");
    db.execute("CREATE TABLE public.typed (id bigint PRIMARY KEY, name integer, score double precision)");
    let mut typed = db.request(&t.path(), "public.typed", "id");
    typed.adopt = true;
    let msg = db.sync(&typed).unwrap_err().to_string();
    assert!(msg.contains("column \"name\" is integer, but the source's column is text"), "{msg}");

    // On purpose: the table keeps its identity (OID) and now holds the Delta rows.
    req.allow_drop_columns = true;
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "snapshot");
    assert_eq!(db.rows("SELECT * FROM public.users ORDER BY id"), ["(1,ada,1)", "(2,grace,2)"]);
    assert_eq!(oid(&db, "public.users"), before);
    assert_eq!(db.value("SELECT table_oid FROM lakesync.synced_tables"), before);
    // From then on it is lakesync's: later runs need no --adopt.
    t.run(json!([{"op": "update", "predicate": "id = 2", "set": {"name": "'hopper'"}}]));
    let out = db.sync(&db.request(&t.path(), "public.users", "id")).unwrap();
    assert_eq!(out.mode.as_str(), "triggered");
    assert_eq!(db.rows("SELECT name FROM public.users ORDER BY id"), ["(ada)", "(hopper)"]);
}

#[test]
fn a_table_dropped_and_recreated_by_someone_else_is_not_lakesyncs() {
    let db = TestDb::new("recreated");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    db.execute(
        "DROP TABLE public.people; CREATE TABLE public.people (id bigint PRIMARY KEY, name text, score float8); \
         INSERT INTO public.people VALUES (7, 'theirs', 0);",
    );
    let msg = db.sync(&req).unwrap_err().to_string();
    assert!(msg.contains("was dropped and this one") && msg.contains("--adopt"), "{msg}");
    assert_eq!(db.rows("SELECT id, name FROM public.people"), ["(7,theirs)"]);
}

#[test]
fn a_table_dropped_by_hand_is_snapshotted_again_instead_of_reported_online() {
    let db = TestDb::new("dropped_by_hand");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    db.execute("DROP TABLE public.people");
    // Nothing new in Delta: before, this was a no-op reported ONLINE over a missing table.
    let out = db.sync(&req).unwrap();
    assert_eq!(out.mode.as_str(), "snapshot");
    assert!(out.reason.contains("target table is missing"), "{}", out.reason);
    assert_eq!(db.value("SELECT count(*) FROM public.people"), "2");
    assert_eq!(db.value("SELECT state FROM lakesync.synced_tables"), "ONLINE_NO_PENDING_UPDATE");
}

#[test]
fn purging_drops_only_the_table_lakesync_created_and_its_staging_leftovers() {
    use lakesync_postgres::state;
    let db = TestDb::new("purge_owned");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    let table = lakesync_core::TableName::new("public", "people");
    let prefix = lakesync_postgres::apply::staging_prefix(&table);
    let forget = || {
        support::block_on(async {
            let client = db.config().connect().await.unwrap();
            state::forget(&client, &table, std::time::Duration::from_secs(5)).await
        })
    };

    db.sync(&req).unwrap();
    // Someone replaced the table: a purge must not drop theirs, and changes nothing.
    db.execute("DROP TABLE public.people; CREATE TABLE public.people (id bigint PRIMARY KEY); INSERT INTO public.people VALUES (5)");
    let err = forget().unwrap_err();
    assert!(err.to_string().contains("refusing to drop it"), "{err}");
    assert_eq!(db.rows("SELECT id FROM public.people"), ["(5)"]);
    assert_eq!(db.value("SELECT count(*) FROM lakesync.synced_tables"), "1");

    // lakesync's own table goes, with what a crashed snapshot and a crashed apply left.
    db.execute("DROP TABLE public.people");
    db.sync(&req).unwrap();
    db.execute(&format!(
        "CREATE TABLE public._lakesync_stage_people (id bigint); CREATE UNLOGGED TABLE lakesync.{prefix}_0 (id bigint)"
    ));
    forget().unwrap();
    assert_eq!(db.value("SELECT to_regclass('public.people') IS NULL"), "true");
    assert_eq!(
        db.value(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE '\\_lakesync\\_stage%' OR tablename LIKE 'stage\\_%'"
        ),
        "0"
    );
    assert_eq!(db.value("SELECT count(*) FROM lakesync.synced_tables"), "0");
}

#[test]
fn a_run_that_lost_the_race_for_the_synced_version_rolls_back_and_changes_nothing() {
    use arrow_array::{Int64Array, RecordBatch};
    use lakesync_postgres::state::{self, Checkpoint, RunMode};
    use std::sync::Arc;
    let db = TestDb::new("compare_and_set");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    t.run(json!([{"op": "update", "predicate": "id = 1", "set": {"name": "'new'"}}]));
    t.run(json!([{"op": "update", "predicate": "id = 2", "set": {"name": "'newer'"}}]));
    let schema = lakesync_delta::DeltaTable::open(&t.path().display().to_string())
        .unwrap()
        .snapshot(None)
        .unwrap()
        .schema_without(&[])
        .unwrap();
    let key = vec!["id".to_string()];
    support::block_on(async {
        // Run A starts from version 0 and holds the table's lock ...
        let mut a = lakesync_postgres::Sink::open(
            &db.config(),
            &req.table,
            Default::default(),
            std::time::Duration::from_secs(5),
            Default::default(),
            None,
        )
        .await
        .unwrap();
        let run = state::start_run(a.client(), &req.table, RunMode::Triggered, "test", Some(0), 1).await.unwrap();
        // ... which a transaction-pooling proxy would not keep: run B gets past it and syncs to 2.
        state::unlock(a.client(), &req.table).await.unwrap();
        let b = lakesync_engine::sync(&req).await.unwrap();
        assert_eq!(b.to_version, 2);
        // A now applies its (older) change set of version 1, deleting id 2, and tries to
        // record version 1.
        let fields = vec![
            arrow_schema::Field::new("id", arrow_schema::DataType::Int64, false),
            arrow_schema::Field::new(lakesync_postgres::apply::VERSION_COLUMN, arrow_schema::DataType::Int64, false),
        ];
        let stale = RecordBatch::try_new(
            Arc::new(arrow_schema::Schema::new(fields)),
            vec![Arc::new(Int64Array::from(vec![2])), Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap();
        let mut apply = a.begin_changes(&schema, &key, (&[], &[]), 1).await.unwrap();
        apply.delete(&[stale]).await.unwrap();
        let err =
            apply.commit(run, 0, Checkpoint { version: 1, commit_timestamp_ms: None }, None, true).await.unwrap_err();
        assert!(err.to_string().contains("moved its synced version from 0 to 2"), "{err}");
        assert_eq!(err.class(), ErrorClass::Busy);
    });
    // Never backwards, never the older image.
    assert_eq!(db.value("SELECT synced_version FROM lakesync.synced_tables"), "2");
    assert_eq!(db.rows("SELECT id, name FROM public.people ORDER BY id"), ["(1,new)", "(2,newer)"]);
}

#[test]
fn tables_whose_names_join_to_the_same_text_take_different_locks() {
    let db = TestDb::new("lock_keys");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    db.execute("CREATE SCHEMA \"a.b\"; CREATE SCHEMA a;");
    let first = db.request(&t.path(), "\"a.b\".c", "id");
    let mut second = db.request(&t.path(), "a.\"b.c\"", "id");
    second.lock_wait = std::time::Duration::from_millis(200);
    support::block_on(async {
        // The first table's lock, held as a run of it would hold it.
        let holder = db.config().connect().await.unwrap();
        let key = lakesync_postgres::state::lock_key(&first.table);
        holder.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key]).await.unwrap();
        lakesync_engine::sync(&second).await.unwrap();
    });
    assert_eq!(db.value("SELECT count(*) FROM a.\"b.c\""), "1");
}

#[test]
fn indexes_whose_names_would_collide_get_names_of_their_own() {
    let db = TestDb::new("index_names");
    let t = PyDelta::new();
    let schema = json!([["id", "pa.int64()"], ["a", "pa.string()"], ["b", "pa.string()"], ["a_b", "pa.string()"]]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [[1, "x", "y", "z"]]}]));
    let mut req = db.request(&t.path(), "public.t", "id");
    req.indexes = vec![vec!["a_b".into()], vec!["a".into(), "b".into()]];
    db.sync(&req).unwrap();
    let defs =
        db.rows("SELECT indexdef FROM pg_indexes WHERE tablename = 't' AND indexname <> 't_pkey' ORDER BY indexdef");
    assert_eq!(defs.len(), 2, "{defs:?}");
    assert!(defs[0].contains("(a, b)") && defs[1].contains("(a_b)"), "{defs:?}");
    // A re-snapshot finds them by the same names and builds nothing twice.
    req.mode = SyncMode::Snapshot;
    db.sync(&req).unwrap();
    assert_eq!(db.value("SELECT count(*) FROM pg_indexes WHERE tablename = 't'"), "3");
}

#[test]
fn a_column_name_postgres_would_truncate_is_refused_naming_it() {
    let db = TestDb::new("long_names");
    let t = PyDelta::new();
    let long = format!("customer_lifetime_value_{}", "x".repeat(50));
    let schema = json!([["id", "pa.int64()"], [long.clone(), "pa.float64()"]]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [[1, 2.5]]}]));
    let mut req = db.request(&t.path(), "public.wide", "id");
    let err = db.sync(&req).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&long) && msg.contains("63 bytes") && msg.contains("--exclude"), "{msg}");
    assert_eq!(db.value("SELECT to_regclass('public.wide') IS NULL"), "true");
    req.shape.exclude = vec![long];
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT * FROM public.wide"), ["(1)"]);
}

#[test]
fn a_constraint_violation_never_puts_row_values_in_errors_or_state() {
    let db = TestDb::new("no_row_values");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    db.execute("ALTER TABLE public.people ADD CONSTRAINT score_is_small CHECK (score < 100)");
    t.run(json!([{"op": "update", "predicate": "id = 1", "set": {"name": "'secret-name-4711'", "score": "31337.0"}}]));
    let msg = db.sync(&req).unwrap_err().to_string();
    assert!(msg.contains("score_is_small") && msg.contains("23514"), "{msg}");
    for shown in [
        msg,
        db.value("SELECT last_error FROM lakesync.synced_tables"),
        db.value("SELECT string_agg(coalesce(error, ''), ' ') FROM lakesync.runs"),
    ] {
        assert!(!shown.contains("secret-name-4711") && !shown.contains("31337"), "row values leaked: {shown}");
        assert!(!shown.contains("Failing row"), "{shown}");
    }
}

#[test]
fn the_run_history_keeps_only_the_configured_number_of_runs() {
    let db = TestDb::new("history");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    req.history.max_runs = 3;
    for _ in 0..6 {
        db.sync(&req).unwrap();
    }
    // Each run trims before it starts: the 3 kept plus the last run.
    assert_eq!(db.value("SELECT count(*) FROM lakesync.runs"), "4");
    assert_eq!(db.value("SELECT min(run_id) FROM lakesync.runs"), "3");
    db.execute("UPDATE lakesync.runs SET started_at = now() - interval '40 days' WHERE run_id < 6");
    db.sync(&req).unwrap();
    assert_eq!(db.rows("SELECT run_id FROM lakesync.runs ORDER BY 1"), ["(6)", "(7)"]);
}

#[test]
fn a_panicking_run_is_recorded_as_failed_retried_with_backoff_and_the_other_tables_go_on() {
    use lakesync_engine::config::TableConfig;
    use lakesync_engine::daemon::PANIC_FAILPOINT;
    use std::time::{Duration, Instant};
    let db = TestDb::new("panic_supervision");
    let (a, b) = (PyDelta::new(), PyDelta::new());
    a.run(json!([people(json!([[1, "a", 1.0]]))]));
    b.run(json!([people(json!([[1, "b", 1.0]]))]));
    // Each test runs in a process of its own (nextest), so the variable reaches no other test.
    std::env::set_var(PANIC_FAILPOINT, "panicky");
    support::block_on(async {
        let daemon = lakesync_engine::Daemon::new(db.config());
        let mut panicky = TableConfig::new(a.path().display().to_string(), "public.a", &["id"], "continuous");
        panicky.name = Some("panicky".into());
        let steady = TableConfig::new(b.path().display().to_string(), "public.b", &["id"], "continuous");
        let panicky = daemon.add(panicky.validate().unwrap()).unwrap();
        let steady = daemon.add(steady.validate().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        // Two failed runs: the first, then a restart after the backoff.
        while panicky.metrics.runs_failed.load(std::sync::atomic::Ordering::Relaxed) < 2
            || steady.status().synced_version.is_none()
        {
            assert!(Instant::now() < deadline, "{:?} / {:?}", panicky.status(), steady.status());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = panicky.status();
        assert!(!status.running && status.parked.is_none() && status.retry_at.is_some(), "{status:?}");
        assert!(status.last_error.as_deref().unwrap_or_default().contains("panicked"), "{status:?}");
        assert_eq!(status.state(&panicky.spec.mode), "OFFLINE_FAILED");
        // Once the cause is gone, the retry syncs the table.
        std::env::remove_var(PANIC_FAILPOINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        while panicky.status().synced_version.is_none() {
            assert!(Instant::now() < deadline, "{:?}", panicky.status());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon.shutdown(Duration::from_secs(5)).await;
    });
    assert_eq!(db.value("SELECT count(*) FROM public.a"), "1");
    assert_eq!(db.value("SELECT count(*) FROM public.b"), "1");
}

#[test]
fn a_table_synced_by_a_build_that_did_not_record_oids_stays_lakesyncs() {
    let db = TestDb::new("legacy_owner");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    db.execute("UPDATE lakesync.synced_tables SET table_oid = NULL");
    t.run(json!([{"op": "delete", "predicate": "id = 1"}]));
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "triggered");
    assert_eq!(
        db.value("SELECT table_oid FROM lakesync.synced_tables WHERE target_table = 'people'"),
        oid(&db, "public.people")
    );
}

#[test]
fn int96_timestamps_outside_1677_to_2262_sync_exactly_by_snapshot_and_change_feed() {
    let db = TestDb::new("int96");
    let t = PyDelta::new();
    let schema =
        json!([["id", "pa.int64()"], ["valid_to", "pa.timestamp('us', tz='UTC')"], ["local", "pa.timestamp('us')"]]);
    // Spark's legacy encoding, with the sentinel "end of time" of slowly changing dimensions
    // and values before 1677 (both wrapped around through nanoseconds before).
    t.run(json!([{"op": "add_int96_file", "schema": schema, "rows": [
        [1, "9999-12-31T23:59:59.999999+00:00", "9999-12-31T23:59:59.999999"],
        [2, "1500-01-01T00:00:00+00:00", "0001-01-01T00:00:00"],
        [3, "2024-05-06T07:08:09.123456+00:00", "2024-05-06T07:08:09.123456"],
        [4, null, null]
    ]}]));
    let req = db.request(&t.path(), "public.dims", "id");
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "snapshot");
    let read = "SELECT id, to_char(valid_to AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), \
                to_char(local, 'YYYY-MM-DD HH24:MI:SS.US') FROM public.dims ORDER BY id";
    assert_eq!(
        db.rows(read),
        [
            "(1,\"9999-12-31 23:59:59.999999\",\"9999-12-31 23:59:59.999999\")",
            "(2,\"1500-01-01 00:00:00.000000\",\"0001-01-01 00:00:00.000000\")",
            "(3,\"2024-05-06 07:08:09.123456\",\"2024-05-06 07:08:09.123456\")",
            "(4,,)"
        ]
    );
    // The change data feed reads an appended INT96 file as inserts, through the same reader.
    t.run(json!([{"op": "add_int96_file", "schema": schema, "rows": [
        [5, "2262-04-12T00:00:00+00:00", "1677-09-21T00:00:00"],
        [6, "9999-12-31T00:00:00+00:00", "1066-10-14T09:00:00"]
    ]}]));
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "triggered");
    assert_eq!(
        db.rows(&format!("{read} OFFSET 4")),
        [
            "(5,\"2262-04-12 00:00:00.000000\",\"1677-09-21 00:00:00.000000\")",
            "(6,\"9999-12-31 00:00:00.000000\",\"1066-10-14 09:00:00.000000\")"
        ]
    );
    db.assert_matches_snapshot(&t.path(), "public.dims", "id", 1);
}

#[test]
fn metadata_only_schema_changes_neither_resnapshot_nor_break_triggered_mode() {
    let db = TestDb::new("metadata_only");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let mut req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let oid_before = oid(&db, "public.people");
    let v = t.run(json!([
        {"op": "update", "predicate": "id = 1", "set": {"name": "'x'"}},
        {"op": "set_column_metadata", "column": "name", "metadata": {"comment": "what people call them"}},
        {"op": "update", "predicate": "id = 2", "set": {"name": "'y'"}},
        {"op": "add_constraint", "constraints": {"score_positive": "score > 0"}},
        {"op": "delete", "predicate": "id = 1"}
    ]));
    req.mode = SyncMode::Triggered;
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v));
    assert_eq!(db.rows("SELECT id, name FROM public.people"), ["(2,y)"]);
    assert_eq!(oid(&db, "public.people"), oid_before);
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

#[test]
fn a_retyped_key_is_widened_in_place_or_rebuilt_never_parked() {
    let db = TestDb::new("key_retyped");
    let t = PyDelta::new();
    let narrow = json!([["id", "pa.int32()"], ["name", "pa.string()"]]);
    t.run(json!([{"op": "create", "schema": narrow, "rows": [[1, "a"], [2, "b"]]}]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    let first_oid = oid(&db, "public.people");
    // Spark's overwriteSchema with the key widened from int to bigint: a cast, in place.
    let wide = json!([["id", "pa.int64()"], ["name", "pa.string()"]]);
    let v = t.run(json!([{"op": "overwrite", "schema": wide, "schema_mode": "overwrite",
                          "rows": [[1, "a"], [2, "bb"], [3_000_000_000_i64, "big"]]}]));
    // The change feed goes on through a widening: ALTER .. TYPE with a cast, in the chunk.
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "triggered");
    assert_eq!(db.value("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'public.people'::regclass AND attname = 'id'"), "bigint");
    assert_eq!(oid(&db, "public.people"), first_oid, "widened in place");
    // A snapshot over the same widening casts in place too.
    let mut other = db.request(&t.path(), "public.people2", "id");
    other.to_version = Some(0);
    db.sync(&other).unwrap();
    let other_oid = oid(&db, "public.people2");
    other.to_version = None;
    other.mode = SyncMode::Snapshot;
    db.sync(&other).unwrap();
    assert_eq!(oid(&db, "public.people2"), other_oid);
    db.assert_matches_snapshot(&t.path(), "public.people2", "id", v);
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
    // The key retyped beyond any cast (bigint to string): rebuilt through the staging table.
    let text = json!([["id", "pa.string()"], ["name", "pa.string()"]]);
    let v = t.run(json!([{"op": "overwrite", "schema": text, "schema_mode": "overwrite",
                          "rows": [["x-1", "a"], ["x-2", "b"]]}]));
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "snapshot");
    assert_eq!(db.value("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'public.people'::regclass AND attname = 'id'"), "text");
    assert_eq!(
        db.value("SELECT table_oid FROM lakesync.synced_tables WHERE target_table = 'people'"),
        oid(&db, "public.people")
    );
    assert_eq!(
        db.rows("SELECT conname FROM pg_constraint WHERE conrelid = 'public.people'::regclass AND contype = 'p'"),
        ["(people_pkey)"]
    );
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
    // And the change feed goes on from there.
    let v = t.run(json!([{"op": "update", "predicate": "id = 'x-1'", "set": {"name": "'z'"}}]));
    assert_eq!(db.sync(&req).unwrap().mode.as_str(), "triggered");
    db.assert_matches_snapshot(&t.path(), "public.people", "id", v);
}

/// Delta type widening (the `typeWidening` table feature) leaves the files written before the
/// widening at their narrow physical types. The change feed goes on through the widening
/// commit, reads rows a later DELETE removes from such a file at the wide types, and a snapshot
/// of the widened table loads the old files' values exactly. The widening commit is written as
/// Spark writes it (`delta_writer.py`, op `widen`); delta-rs cannot write one.
#[test]
fn a_table_widened_in_place_syncs_through_the_change_feed_and_in_snapshots() {
    let db = TestDb::new("type_widening");
    let t = PyDelta::new();
    let narrow = json!([
        ["id", "pa.int32()"],
        ["small", "pa.int16()"],
        ["tiny", "pa.int8()"],
        ["f", "pa.float32()"],
        ["d", "pa.date32()"],
        ["m", "pa.decimal128(10, 2)"]
    ]);
    t.run(json!([{"op": "create", "schema": narrow,
                  "rows": [[1, 10, 1, 3.4, "2024-01-01", "1.25"], [2, 20, 2, 1.5, "1900-01-01", "2.50"]]}]));
    let narrow_row_version = t.run(json!([{"op": "append", "schema": narrow,
                                           "rows": [[3, 30, 3, 2.5, "2000-02-29", "3.75"]]}]));
    let mut req = db.request(&t.path(), "public.widened", "id");
    db.sync(&req).unwrap();
    let types = || {
        db.rows(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = 'public.widened'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        )
    };
    assert_eq!(
        types(),
        ["(id,integer)", "(small,smallint)", "(tiny,smallint)", "(f,real)", "(d,date)", "(m,\"numeric(10,2)\")"]
    );
    let before = oid(&db, "public.widened");

    // The key and five other columns widened; a row only the wide types hold; and a DELETE of
    // the narrow file's row.
    t.run(json!([{"op": "widen", "columns": {"id": "long", "small": "integer", "tiny": "double", "f": "double",
                                              "d": "timestamp_ntz", "m": "decimal(20,4)"}}]));
    let wide = json!([
        ["id", "pa.int64()"],
        ["small", "pa.int32()"],
        ["tiny", "pa.float64()"],
        ["f", "pa.float64()"],
        ["d", "pa.timestamp('us')"],
        ["m", "pa.decimal128(20, 4)"]
    ]);
    t.run(json!([{"op": "append_file", "schema": wide,
                  "rows": [[5_000_000_000_i64, 2_000_000_000, 1.5, 1.234567890123, "2024-09-09T12:34:56.123456",
                            "12345678901234.5678"]]}]));
    let v = t.run(json!([{"op": "remove_files_added_in", "version": narrow_row_version}]));

    req.mode = SyncMode::Triggered;
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v), "the feed goes on through the widening");
    assert_eq!(
        types(),
        [
            "(id,bigint)",
            "(small,integer)",
            "(tiny,\"double precision\")",
            "(f,\"double precision\")",
            "(d,\"timestamp without time zone\")",
            "(m,\"numeric(20,4)\")"
        ]
    );
    assert_eq!(oid(&db, "public.widened"), before, "widened in place, the key included");
    // The float written before the widening is the nearest double to the float 3.4, as Spark
    // reads it too.
    assert_eq!(
        db.rows("SELECT * FROM public.widened ORDER BY id"),
        [
            "(1,10,1,3.4000000953674316,\"2024-01-01 00:00:00\",1.2500)",
            "(2,20,2,1.5,\"1900-01-01 00:00:00\",2.5000)",
            "(5000000000,2000000000,1.5,1.234567890123,\"2024-09-09 12:34:56.123456\",12345678901234.5678)"
        ]
    );
    // A snapshot of the widened table reads the narrow file at the wide types: the same rows.
    db.assert_matches_snapshot(&t.path(), "public.widened", "id", v);
}

#[test]
fn edge_values_of_every_numeric_and_calendar_type_sync_exactly_from_real_files() {
    // The conversions on the read and COPY paths, each at its edges, from files the Python
    // writer made: integer extremes, decimals at full precision (38 digits) and scale, dates
    // and timestamps before 1970 and around the Gregorian switch (proleptic on both sides),
    // the far ends of Postgres' range, and negative zero and infinities in floats.
    let db = TestDb::new("edge_conversions");
    let t = PyDelta::new();
    let schema = json!([
        ["id", "pa.int32()"],
        ["i8", "pa.int8()"],
        ["i16", "pa.int16()"],
        ["i32", "pa.int32()"],
        ["i64", "pa.int64()"],
        ["dec", "pa.decimal128(38, 18)"],
        ["big", "pa.decimal128(38, 0)"],
        ["d", "pa.date32()"],
        ["ts", "pa.timestamp('us', tz='UTC')"],
        ["f32", "pa.float32()"],
        ["f64", "pa.float64()"]
    ]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [
        [1, -128, -32768, -2147483648i64, i64::MIN, "-99999999999999999999.999999999999999999",
         "-99999999999999999999999999999999999999", "0001-01-01", "0001-01-01T00:00:00+00:00", -0.0, "-inf"],
        [2, 127, 32767, 2147483647, i64::MAX, "99999999999999999999.999999999999999999",
         "99999999999999999999999999999999999999", "9999-12-31", "9999-12-31T23:59:59.999999+00:00", 3.4028235e38, "inf"],
        [3, 0, 0, 0, 0, "0.000000000000000001", "0", "1582-10-10", "1582-10-04T23:59:59.999999+00:00", 1.0e-45, 5e-324],
        [4, -1, -1, -1, -1, "-0.000000000000000001", "-1", "1969-12-31", "1969-12-31T23:59:59.999999+00:00", -1.5, -0.0]
    ]}]));
    let req = db.request(&t.path(), "public.edges", "id");
    db.sync(&req).unwrap();
    assert_eq!(
        db.rows(
            "SELECT id, i8, i16, i32, i64, dec, big, d, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), \
             f32, f64 FROM public.edges ORDER BY id"
        ),
        [
            "(1,-128,-32768,-2147483648,-9223372036854775808,-99999999999999999999.999999999999999999,-99999999999999999999999999999999999999,0001-01-01,\"0001-01-01 00:00:00.000000\",-0,-Infinity)",
            "(2,127,32767,2147483647,9223372036854775807,99999999999999999999.999999999999999999,99999999999999999999999999999999999999,9999-12-31,\"9999-12-31 23:59:59.999999\",3.4028235e+38,Infinity)",
            "(3,0,0,0,0,0.000000000000000001,0,1582-10-10,\"1582-10-04 23:59:59.999999\",1e-45,5e-324)",
            "(4,-1,-1,-1,-1,-0.000000000000000001,-1,1969-12-31,\"1969-12-31 23:59:59.999999\",-1.5,-0)"
        ]
    );
    // The same values through the change feed (an update rewrites every row).
    let v = t.run(
        json!([{"op": "update", "predicate": "id >= 1", "set": {"i8": "i8"}}, {"op": "delete", "predicate": "id = 4"}]),
    );
    db.sync(&req).unwrap();
    db.assert_matches_snapshot(&t.path(), "public.edges", "id", v);
    assert_eq!(db.value("SELECT count(*) FROM public.edges"), "3");
}

#[test]
fn a_synced_table_whose_source_directory_is_gone_records_the_failure_and_keeps_its_rows() {
    let db = TestDb::new("source_gone");
    let t = PyDelta::new();
    t.run(json!([people(json!([[1, "a", 1.0], [2, "b", 2.0]]))]));
    let req = db.request(&t.path(), "public.people", "id");
    db.sync(&req).unwrap();
    std::fs::remove_dir_all(t.path()).unwrap();
    let err = db.sync(&req).unwrap_err().to_string();
    assert!(err.contains(&t.path().display().to_string()), "{err}");
    let row = db.rows("SELECT state, runs_failed, last_error IS NOT NULL FROM lakesync.synced_tables");
    assert_eq!(row, ["(ONLINE_PIPELINE_FAILED,1,t)"]);
    assert_eq!(db.value("SELECT count(*) FROM public.people"), "2");
}
