"""Test-only Delta writer for lakesync's integration tests, built on the Python `deltalake`
package (delta-rs): it writes real UPDATE/DELETE/MERGE commits with `_change_data` files.

Usage: python delta_writer.py <table path or URI> '<json list of operations>' (or - to read them from stdin)
For s3:// and abfss:// URIs the store's settings come from the AWS_* / AZURE_* environment.
Each operation is an object with "op" and its arguments; see apply() below. Prints the table
version after each operation, one per line.
"""
import base64
import datetime as dt
import decimal
import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable as _DeltaTable, Schema
from deltalake import write_deltalake as _write_deltalake
from deltalake.transaction import AddAction, create_table_with_add_actions


def arrow_type(expr):
    return eval(expr, {"pa": pa})  # test-only: types are written by our own tests


def convert(value, t):
    if value is None:
        return None
    if pa.types.is_floating(t) and isinstance(value, str):
        return float(value)  # "inf", "-inf", "nan": JSON has no literal for them
    if pa.types.is_timestamp(t):
        return dt.datetime.fromisoformat(value)
    if pa.types.is_date(t):
        return dt.date.fromisoformat(value)
    if pa.types.is_decimal(t):
        return decimal.Decimal(value)
    if pa.types.is_binary(t):
        return base64.b64decode(value)
    if pa.types.is_map(t):
        return [tuple(kv) for kv in value]
    return value


def table(schema, rows):
    fields = [(name, arrow_type(expr)) for name, expr in schema]
    arrays = [pa.array([convert(r[i], t) for r in rows], type=t) for i, (_, t) in enumerate(fields)]
    return pa.Table.from_arrays(arrays, schema=pa.schema([pa.field(n, t) for n, t in fields]))


def store_options(path):
    """The object-store settings for a URI, from the environment (delta-rs takes them as options)."""
    if "://" not in path:
        return None
    prefix = "AZURE_" if path.startswith(("abfs", "az://")) else "AWS_"
    return {k: v for k, v in os.environ.items() if k.startswith(prefix)}


def DeltaTable(path):  # noqa: N802 - shadows the class with one that knows the store
    return _DeltaTable(path, storage_options=store_options(path))


def write_deltalake(path, data, **kwargs):
    _write_deltalake(path, data, storage_options=store_options(path), **kwargs)


# The features a legacy writer version implies, for the upgrade to table features.
LEGACY_WRITER_FEATURES = {
    1: [],
    2: ["appendOnly", "invariants"],
    3: ["appendOnly", "invariants", "checkConstraints"],
    4: ["appendOnly", "invariants", "checkConstraints", "changeDataFeed", "generatedColumns"],
    5: ["appendOnly", "invariants", "checkConstraints", "changeDataFeed", "generatedColumns", "columnMapping"],
    6: ["appendOnly", "invariants", "checkConstraints", "changeDataFeed", "generatedColumns", "columnMapping",
        "identityColumns"],
}


def log_file(path, version):
    return os.path.join(path, "_delta_log", f"{version:020}.json")


def latest_version(path):
    return max(int(n[:20]) for n in os.listdir(os.path.join(path, "_delta_log")) if n.endswith(".json"))


def latest_metadata_and_protocol(path):
    """The table's metaData and protocol actions, replayed from its JSON commits (a local table
    without checkpoints, as the hand-written commits below are only used on those)."""
    assert "://" not in path, "hand-written commits are for local tables"
    meta = protocol = None
    for version in range(latest_version(path) + 1):
        with open(log_file(path, version)) as f:
            for line in f:
                action = json.loads(line)
                meta = action.get("metaData", meta)
                protocol = action.get("protocol", protocol)
    return meta, protocol


def commit_by_hand(path, operation, actions):
    """Writes the next commit, put-if-absent as Delta writers do on a local file system."""
    version = latest_version(path) + 1
    info = {"commitInfo": {"timestamp": int(time.time() * 1000), "operation": operation,
                           "operationParameters": {}, "engineInfo": "lakesync-tests delta_writer.py"}}
    with open(log_file(path, version), "x") as f:
        for action in [info, *actions]:
            f.write(json.dumps(action) + "\n")
    return version


def apply(path, op):
    kind = op["op"]
    if kind == "create":
        config = {"delta.enableChangeDataFeed": "true"} if op.get("cdf", True) else {}
        config.update(op.get("properties", {}))
        write_deltalake(path, table(op["schema"], op.get("rows", [])), mode="error",
                        configuration=config, partition_by=op.get("partition_by"))
    elif kind == "append":
        write_deltalake(path, table(op["schema"], op["rows"]), mode="append",
                        schema_mode=op.get("schema_mode"))
    elif kind == "overwrite":
        write_deltalake(path, table(op["schema"], op["rows"]), mode="overwrite",
                        schema_mode=op.get("schema_mode"))
    elif kind == "update":
        DeltaTable(path).update(updates=op["set"], predicate=op.get("predicate"))
    elif kind == "delete":
        DeltaTable(path).delete(op.get("predicate"))
    elif kind == "merge":
        (DeltaTable(path)
         .merge(table(op["schema"], op["rows"]), predicate=op["on"], source_alias="s", target_alias="t")
         .when_matched_update_all()
         .when_not_matched_insert_all()
         .execute())
    elif kind == "add_int96_file":
        # A data file with timestamps stored as Parquet INT96, as Spark writes by default
        # (spark.sql.parquet.outputTimestampType=INT96), added to the table (created if missing)
        # as Spark's own commit would: the Delta schema says timestamp, the file says INT96.
        data = table(op["schema"], op["rows"])
        os.makedirs(path, exist_ok=True)
        name = f"part-int96-{len(os.listdir(path)):05d}.parquet"
        pq.write_table(data, os.path.join(path, name), use_deprecated_int96_timestamps=True)
        add = AddAction(name, os.path.getsize(os.path.join(path, name)), {},
                        int(os.path.getmtime(os.path.join(path, name)) * 1000), True,
                        json.dumps({"numRecords": data.num_rows}))
        if os.path.isdir(os.path.join(path, "_delta_log")):
            DeltaTable(path).create_write_transaction([add], mode="append", schema=data.schema)
        else:
            create_table_with_add_actions(path, Schema.from_arrow(data.schema), [add],
                                          configuration={"delta.enableChangeDataFeed": "true"})
    elif kind == "widen":
        # Delta type widening, as Spark's `ALTER TABLE .. ALTER COLUMN .. TYPE` commits it on a
        # table with `delta.enableTypeWidening` (delta-rs cannot): one metaData action with the
        # wider types, each change recorded in the field's `delta.typeChanges`, and the protocol
        # upgraded to table features with `typeWidening`. No data file is rewritten, so the
        # files written before keep their narrow physical types.
        meta, protocol = latest_metadata_and_protocol(path)
        schema = json.loads(meta["schemaString"])
        for field in schema["fields"]:
            if field["name"] in op["columns"]:
                to = op["columns"][field["name"]]
                changes = field.setdefault("metadata", {}).setdefault("delta.typeChanges", [])
                changes.append({"fromType": field["type"], "toType": to})
                field["type"] = to
        meta["schemaString"] = json.dumps(schema)
        meta.setdefault("configuration", {})["delta.enableTypeWidening"] = "true"
        features = {"typeWidening"}
        if "timestamp_ntz" in op["columns"].values():
            features.add("timestampNtz")
        reader = set(protocol.get("readerFeatures") or (["columnMapping"] if protocol["minReaderVersion"] >= 2 else []))
        writer = set(protocol.get("writerFeatures") or LEGACY_WRITER_FEATURES[protocol["minWriterVersion"]])
        protocol = {"minReaderVersion": 3, "minWriterVersion": 7,
                    "readerFeatures": sorted(reader | features), "writerFeatures": sorted(writer | features)}
        return commit_by_hand(path, "CHANGE COLUMN", [{"metaData": meta}, {"protocol": protocol}])
    elif kind == "append_file":
        # One data file written with pyarrow and committed by hand: appends to a table that
        # delta-rs cannot write (a widened one), at the types the rows are given in.
        data = table(op["schema"], op["rows"])
        name = f"part-hand-{len(os.listdir(path)):05d}.parquet"
        pq.write_table(data, os.path.join(path, name))
        add = {"path": name, "partitionValues": {}, "size": os.path.getsize(os.path.join(path, name)),
               "modificationTime": int(time.time() * 1000), "dataChange": True,
               "stats": json.dumps({"numRecords": data.num_rows})}
        return commit_by_hand(path, "WRITE", [{"add": add}])
    elif kind == "remove_files_added_in":
        # Removes every data file one commit added, as a DELETE of whole files commits it: remove
        # actions only, no change files, so the change feed reads the removed rows from the files.
        removes = []
        with open(log_file(path, op["version"])) as f:
            for line in f:
                add = json.loads(line).get("add")
                if add:
                    removes.append({"remove": {"path": add["path"], "deletionTimestamp": int(time.time() * 1000),
                                               "dataChange": True, "extendedFileMetadata": True,
                                               "partitionValues": add["partitionValues"], "size": add["size"]}})
        return commit_by_hand(path, "DELETE", removes)
    elif kind == "checkpoint":
        DeltaTable(path).create_checkpoint()
    elif kind == "set_column_metadata":
        DeltaTable(path).alter.set_column_metadata(op["column"], op["metadata"])
    elif kind == "add_constraint":
        DeltaTable(path).alter.add_constraint(op["constraints"])
    elif kind == "set_properties":
        DeltaTable(path).alter.set_table_properties(op["properties"])
    else:
        raise SystemExit(f"unknown op {kind}")
    return DeltaTable(path).version()


def main():
    path = sys.argv[1]
    ops = json.loads(sys.stdin.read() if sys.argv[2] == "-" else sys.argv[2])
    for op in ops:
        print(apply(path, op), flush=True)
    sys.stdout.flush()
    # The deltalake extension sometimes aborts during interpreter teardown; the work is done.
    os._exit(0)


if __name__ == "__main__":
    main()
