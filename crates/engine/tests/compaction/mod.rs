//! Compaction (`lakesync_delta::compact`): small files rewritten into large ones in a commit
//! that changes no data, on tables written by the real `deltalake` writer and by Spark, read
//! back by lakesync's own sync.

use std::path::Path;

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use lakesync_delta::compact::{compact, CompactOptions, CompactReport};
use lakesync_delta::write::DeltaWriter;
use lakesync_delta::StorageOptions;
use serde_json::json;

use crate::support::{copy_tree, spark_fixture, PyDelta, TestDb};

/// `people` rows (id, name, score) as a batch.
fn people_batch(ids: std::ops::Range<i64>, name: &str) -> RecordBatch {
    let n = ids.end - ids.start;
    RecordBatch::try_from_iter([
        ("id", Arc::new(Int64Array::from_iter_values(ids.clone())) as ArrayRef),
        ("name", Arc::new(StringArray::from_iter_values((0..n).map(|_| name))) as _),
        ("score", Arc::new(Float64Array::from_iter_values(ids.map(|i| i as f64))) as _),
    ])
    .unwrap()
}

/// A table as an ingest writes it (the kernel's writer, change data feed on): one file per
/// commit, `commits` commits of `rows` rows each. Returns the writer and the last version.
fn streamed_table(path: &Path, commits: i64, rows: i64) -> (DeltaWriter, u64) {
    let schema = people_batch(0..1, "").schema();
    let w = DeltaWriter::create(path, &schema, &[("delta.enableChangeDataFeed", "true")]).unwrap();
    let mut v = 0;
    for c in 0..commits {
        v = w.append(&[people_batch(c * rows..(c + 1) * rows, "n")]).unwrap();
    }
    (w, v)
}

fn compact_path(path: &Path, options: &CompactOptions) -> CompactReport {
    compact(&path.display().to_string(), &StorageOptions::default(), options).unwrap()
}

#[test]
fn compaction_rewrites_small_files_in_one_commit_the_change_feed_ignores() {
    let db = TestDb::new("compaction");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events");
    // Thirteen small files, as a streaming writer leaves them.
    let (w, v) = streamed_table(&path, 13, 100);
    let req = db.request(&path, "public.people", "id");
    db.sync(&req).unwrap();
    assert_eq!(w.files().unwrap().len(), 13);

    let report = compact_path(&path, &CompactOptions::default());
    assert_eq!((report.read_version, report.version), (v, Some(v + 1)), "{report:?}");
    assert_eq!((report.files_removed, report.files_added, report.rows), (13, 1, 1300), "{report:?}");
    assert!(report.bytes_added < report.bytes_removed, "{report:?}");
    assert_eq!(w.files().unwrap().len(), 1);
    // The streamed file carries the statistics readers skip files by.
    let commit = std::fs::read_to_string(path.join(format!("_delta_log/{:020}.json", v + 1))).unwrap();
    assert!(commit.contains(r#"\"numRecords\":1300"#) && commit.contains(r#"\"minValues\":{\"id\":0"#), "{commit}");
    // Fifteen commits since the start and no checkpoint yet: one is due.
    assert_eq!(report.checkpoint, Some(v + 1));
    assert!(path.join("_delta_log/_last_checkpoint").exists());

    // The sync follows the feed through the commit and finds nothing changed.
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v + 1), "{}", out.reason);
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (0, 0, 0));
    db.assert_matches_snapshot(&path, "public.people", "id", v + 1);
    // Writes after the compaction (by another writer) go on as before.
    let t = PyDelta::at(&path.display().to_string());
    let v2 = t.run(json!([
        {"op": "update", "predicate": "id = 2", "set": {"name": "'z'"}},
        {"op": "delete", "predicate": "id < 10"}
    ]));
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", v2));
    db.assert_matches_snapshot(&path, "public.people", "id", v2);

    // Too few small files: nothing to do, nothing committed.
    let again = compact_path(&path, &CompactOptions { min_files: 100, ..Default::default() });
    assert_eq!((again.version, again.read_version), (None, v2));
}

#[test]
fn spark_tables_with_deletion_vectors_and_cdc_files_compact_to_the_same_rows() {
    let db = TestDb::new("compaction_spark");
    let dir = tempfile::tempdir().unwrap();
    // Deletion vectors and cdc files; Spark's update commits.
    for (name, key) in [("cdf-table-with-cdc-and-dvs", "id"), ("cdf-table-update-ops", "id")] {
        let Some(fixture) = spark_fixture(name) else { return };
        let path = dir.path().join(name);
        copy_tree(&fixture, &path);
        let table = name.replace('-', "_");
        let synced = db.request(&path, &format!("synced.{table}"), key);
        let before = db.sync(&synced).unwrap_or_else(|e| panic!("{name}: {e}"));
        let files_before = DeltaWriter::open(&path).unwrap().files().unwrap().len();

        let report = compact_path(&path, &CompactOptions::default());
        let Some(version) = report.version else {
            panic!("{name}: nothing compacted from {files_before} files: {report:?}")
        };
        assert_eq!(report.read_version, before.to_version, "{name}");
        let files_after = DeltaWriter::open(&path).unwrap().files().unwrap().len();
        assert_eq!(files_after, files_before - report.files_removed + report.files_added, "{name}: {report:?}");
        assert!(files_after < files_before, "{name}: {report:?}");

        // A fresh snapshot of the compacted version holds exactly the rows of the one before.
        let fresh = db.request(&path, &format!("fresh.{table}"), key);
        assert_eq!(db.sync(&fresh).unwrap().to_version, version, "{name}");
        db.assert_same_rows(&format!("synced.{table}"), &format!("fresh.{table}"));
        // And the table synced before follows the feed through the commit, changing nothing.
        let out = db.sync(&synced).unwrap();
        assert_eq!((out.mode.as_str(), out.to_version), ("triggered", version), "{name}: {}", out.reason);
        assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (0, 0, 0), "{name}");
        db.assert_same_rows(&format!("synced.{table}"), &format!("fresh.{table}"));
    }
}

#[test]
fn a_partitioned_table_is_compacted_partition_by_partition() {
    let db = TestDb::new("compaction_partitions");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events");
    let schema = arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("id", arrow_schema::DataType::Int64, true),
        arrow_schema::Field::new("name", arrow_schema::DataType::Utf8, true),
        arrow_schema::Field::new("score", arrow_schema::DataType::Float64, true),
        arrow_schema::Field::new("region", arrow_schema::DataType::Utf8, true),
    ]);
    let w = DeltaWriter::create_partitioned(&path, &schema, &["region"], &[("delta.enableChangeDataFeed", "true")])
        .unwrap();
    // Four small files in "eu", three in "us", one in "ap" (left alone: nothing to merge it with).
    for (i, region) in ["eu", "us", "eu", "us", "eu", "us", "eu", "ap"].iter().enumerate() {
        let i = i as i64 * 10;
        w.append_partition(&[("region", region)], people_batch(i..i + 10, region)).unwrap();
    }
    let req = db.request(&path, "public.events", "id");
    let before = db.sync(&req).unwrap();

    let report = compact_path(&path, &CompactOptions::default());
    assert_eq!((report.files_removed, report.files_added, report.rows), (7, 2, 70), "{report:?}");
    let files = w.files().unwrap();
    assert_eq!(files.len(), 3, "{files:?}");
    for region in ["eu", "us", "ap"] {
        assert_eq!(files.iter().filter(|f| f.starts_with(&format!("region={region}/"))).count(), 1, "{files:?}");
    }
    let out = db.sync(&req).unwrap();
    assert_eq!((out.mode.as_str(), out.to_version), ("triggered", before.to_version + 1), "{}", out.reason);
    assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (0, 0, 0));
    db.assert_matches_snapshot(&path, "public.events", "id", before.to_version + 1);
    assert_eq!(db.value("SELECT count(*) FROM public.events WHERE region = name"), "80");
}

fn log_len(path: &Path) -> usize {
    std::fs::read_dir(path.join("_delta_log")).unwrap().count()
}

/// Spark's legacy change-feed tables (writer 4; 5 with column mapping, reader 2): refused
/// without `--upgrade-protocol`, naming it and changing nothing; with it, upgraded to table
/// features listing only what each uses, compacted to the same rows, and a sync made before
/// follows the feed through both commits.
#[test]
fn spark_change_feed_tables_on_legacy_protocols_compact_only_with_the_upgrade_flag() {
    let db = TestDb::new("compaction_upgrade");
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("cdf-table", "id", "[appendOnly, invariants, changeDataFeed]", 1),
        ("cdf-column-mapping-name-mode", "id", "[appendOnly, invariants, changeDataFeed, columnMapping]", 2),
        ("cdf-column-mapping-id-mode", "id", "[appendOnly, invariants, changeDataFeed, columnMapping]", 2),
        ("checkpoint-cdf-table", "id", "[appendOnly, invariants, changeDataFeed]", 1),
    ];
    for (name, key, features, reader) in cases {
        let Some(fixture) = spark_fixture(name) else { return };
        let path = dir.path().join(name);
        copy_tree(&fixture, &path);
        let uri = path.display().to_string();
        let table = name.replace('-', "_");
        let synced = db.request(&path, &format!("synced.{table}"), key);
        let before = db.sync(&synced).unwrap_or_else(|e| panic!("{name}: {e}"));

        let options = CompactOptions { min_files: 1, ..Default::default() };
        let log_before = log_len(&path);
        let err = compact(&uri, &StorageOptions::default(), &options).unwrap_err().to_string();
        assert!(err.contains(&uri) && err.contains("--upgrade-protocol") && err.contains(features), "{name}: {err}");
        assert!(err.contains("Nothing was changed"), "{err}");
        assert_eq!(log_len(&path), log_before, "{name}: refused, yet the log changed");

        let report = compact(&uri, &StorageOptions::default(), &CompactOptions { upgrade_protocol: true, ..options })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (upgraded_at, upgrade) = report.upgraded.clone().unwrap_or_else(|| panic!("{name}: {report:?}"));
        assert_eq!((upgraded_at, upgrade.reader), (before.to_version + 1, reader), "{name}");
        assert_eq!(format!("[{}]", upgrade.features.join(", ")), features, "{name}");
        let version = report.version.unwrap_or_else(|| panic!("{name}: nothing compacted: {report:?}"));
        assert_eq!(version, upgraded_at + 1, "{name}");
        let commit = std::fs::read_to_string(path.join(format!("_delta_log/{upgraded_at:020}.json"))).unwrap();
        assert!(commit.contains(r#""minWriterVersion":7"#) && commit.contains("UPGRADE PROTOCOL"), "{commit}");
        // Writable now: a second run needs no flag.
        compact(&uri, &StorageOptions::default(), &CompactOptions::default()).unwrap();

        let fresh = db.request(&path, &format!("fresh.{table}"), key);
        assert_eq!(db.sync(&fresh).unwrap().to_version, version, "{name}");
        let out = db.sync(&synced).unwrap();
        assert_eq!((out.mode.as_str(), out.to_version), ("triggered", version), "{name}: {}", out.reason);
        assert_eq!((out.counts.inserted, out.counts.updated, out.counts.deleted), (0, 0, 0), "{name}");
        db.assert_same_rows(&format!("synced.{table}"), &format!("fresh.{table}"));
    }
}

/// A table with a CHECK constraint (delta-rs `add_constraint`, protocol writer 3): lakesync
/// would have to enforce it on every row and does not, so it is refused even with the flag,
/// naming the constraint, and nothing changes.
#[test]
fn a_table_with_a_check_constraint_is_never_written_even_with_the_upgrade_flag() {
    let t = PyDelta::new();
    t.run(json!([
        {"op": "create", "schema": [["id", "pa.int64()"]], "rows": [[1], [2]]},
        {"op": "append", "schema": [["id", "pa.int64()"]], "rows": [[3]]},
        {"op": "add_constraint", "constraints": {"id_positive": "id > 0"}}
    ]));
    let path = t.path();
    let log_before = log_len(&path);
    for upgrade_protocol in [false, true] {
        let options = CompactOptions { min_files: 1, upgrade_protocol, ..Default::default() };
        let err = compact(&path.display().to_string(), &StorageOptions::default(), &options).unwrap_err().to_string();
        assert!(err.contains("CHECK constraint id_positive") && err.contains("never writes this table"), "{err}");
        assert_eq!(log_len(&path), log_before);
    }
}

#[test]
fn appends_racing_a_compaction_are_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events");
    streamed_table(&path, 20, 1);
    // A writer appends while compactions run, again and again.
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            let w = DeltaWriter::open(&path).unwrap();
            for i in 20..60i64 {
                // A lost race is the writer's to retry, as any Delta writer does.
                let mut tries = 0;
                while let Err(e) = w.append(&[people_batch(i..i + 1, "y")]) {
                    tries += 1;
                    assert!(tries < 100, "{e}");
                }
            }
        })
    };
    let mut compactions = 0;
    while !writer.is_finished() {
        if compact_path(&path, &CompactOptions { checkpoint_every: 0, ..Default::default() }).version.is_some() {
            compactions += 1;
        }
    }
    writer.join().unwrap();
    assert!(compactions >= 1, "no compaction ran beside the writer");
    let db = TestDb::new("compaction_race");
    let out = db.sync(&db.request(&path, "public.people", "id")).unwrap();
    assert_eq!(db.value("SELECT count(*) FROM public.people"), "60");
    assert_eq!(db.value("SELECT count(DISTINCT id) FROM public.people"), "60");
    db.assert_matches_snapshot(&path, "public.people", "id", out.to_version);
}
