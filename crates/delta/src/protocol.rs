//! Writing to the Delta tables users already have: what their protocol lets lakesync write,
//! and an explicit, minimal upgrade to table features when it does not.
//!
//! Every change-feed table Spark 3.x and delta-rs create is on a legacy protocol (writer
//! version 4; 5 with column mapping). A legacy writer version implies every feature of its
//! version, so writer 3–6 imply `checkConstraints` and `generatedColumns` (6 also
//! `identityColumns`), which delta_kernel cannot write, whether or not the table has any.
//! [`WriteAccess::of`] says which case a table is in:
//! - [`WriteAccess::Writable`]: the kernel writes it as it is.
//! - [`WriteAccess::NeedsUpgrade`]: the table uses none of the features the kernel cannot
//!   write. [`DeltaWriter::upgrade_protocol`] commits the protocol Spark writes when a table
//!   moves to table features: writer version 7 listing `appendOnly` and `invariants` (every
//!   legacy writer has them) and only the features the table uses (`changeDataFeed` when the
//!   feed is on, `columnMapping` when a mapping mode is set). The reader version is kept, so
//!   every reader that read the table reads it after; writers must support table features
//!   (Delta Lake 2.3+; delta-rs 1.x writes it, tested).
//! - [`WriteAccess::Refused`]: the table has a CHECK constraint, a generated or identity
//!   column, or a column invariant, which lakesync would have to enforce on every row it
//!   writes and does not. It never writes such a table, with or without an upgrade.
//!
//! Invariants: the upgrade is opt-in (callers pass the user's `--upgrade-protocol`), never
//! drops a feature the table uses, changes nothing but the protocol, and is one put-if-absent
//! commit, planned again if another writer commits first.

use std::fmt;

use delta_kernel::object_store::path::Path;
use delta_kernel::object_store::{PutMode, PutOptions, PutPayload};
use delta_kernel::schema::{DataType, StructType};
use delta_kernel::table_features::TableFeature;
use delta_kernel::Snapshot;
use lakesync_core::Version;

use crate::write::DeltaWriter;
use crate::DeltaError;

/// What lakesync may write to a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteAccess {
    Writable,
    /// Writable after this protocol upgrade (the user's consent first).
    NeedsUpgrade(Upgrade),
    /// Not writable by lakesync; why, naming the column or constraint.
    Refused(String),
}

/// A protocol upgrade from a legacy writer version to table features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The version whose protocol this upgrade replaces.
    pub version: Version,
    pub reader: i32,
    pub from_writer: i32,
    /// The writer features the new protocol lists.
    pub features: Vec<&'static str>,
}

impl fmt::Display for Upgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "protocol (reader {}, writer {}) to (reader {}, writer 7) with writer features [{}]",
            self.reader,
            self.from_writer,
            self.reader,
            self.features.join(", ")
        )
    }
}

/// Writer features the kernel cannot write, by the metadata that uses them.
const UNWRITABLE: [TableFeature; 3] =
    [TableFeature::CheckConstraints, TableFeature::GeneratedColumns, TableFeature::IdentityColumns];

impl WriteAccess {
    /// What `snapshot`'s protocol and metadata let lakesync write.
    pub fn of(snapshot: &Snapshot) -> Self {
        let config = snapshot.table_configuration();
        let protocol = config.protocol();
        let properties = config.metadata().configuration();
        let writer = protocol.min_writer_version();
        let mut uses = Vec::new();
        for (key, _) in properties.iter().filter(|(k, _)| k.starts_with("delta.constraints.")) {
            uses.push(format!("CHECK constraint {}", &key["delta.constraints.".len()..]));
        }
        column_uses(snapshot.schema().as_ref(), "", &mut uses);
        if !uses.is_empty() {
            uses.sort();
            return Self::Refused(format!(
                "the table has {}, which every writer must enforce on the rows it writes; lakesync does not \
                 enforce them, so it never writes this table (write it with Spark, or drop them first)",
                uses.join(", ")
            ));
        }
        if writer == 7 {
            let listed = protocol.writer_features().unwrap_or_default();
            if let Some(f) = UNWRITABLE.iter().find(|f| listed.contains(f)) {
                // Listed but unused: Spark's `ALTER TABLE ... DROP FEATURE` removes it.
                return Self::Refused(format!(
                    "the table's protocol lists the writer feature {f}, which delta_kernel cannot write (the table \
                     does not use it: ALTER TABLE ... DROP FEATURE {f} in Spark removes it)"
                ));
            }
            return Self::Writable;
        }
        if writer < 3 {
            return Self::Writable;
        }
        let on = |key: &str| properties.get(key).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let mut features = vec!["appendOnly", "invariants"];
        if writer >= 4 && on("delta.enableChangeDataFeed") {
            features.push("changeDataFeed");
        }
        if writer >= 5 && properties.get("delta.columnMapping.mode").is_some_and(|m| m != "none") {
            features.push("columnMapping");
        }
        Self::NeedsUpgrade(Upgrade {
            version: snapshot.version(),
            reader: protocol.min_reader_version(),
            from_writer: writer,
            features,
        })
    }
}

/// Adds the columns of `schema` (nested under `prefix`) that use a feature lakesync does not
/// enforce.
fn column_uses(schema: &StructType, prefix: &str, uses: &mut Vec<String>) {
    for field in schema.fields() {
        let name = format!("{prefix}{}", field.name);
        let meta = &field.metadata;
        if meta.contains_key("delta.generationExpression") {
            uses.push(format!("generated column {name}"));
        }
        if meta.keys().any(|k| k.starts_with("delta.identity.")) {
            uses.push(format!("identity column {name}"));
        }
        if meta.contains_key("delta.invariants") {
            uses.push(format!("an invariant on column {name}"));
        }
        nested_uses(&field.data_type, &format!("{name}."), uses);
    }
}

fn nested_uses(ty: &DataType, prefix: &str, uses: &mut Vec<String>) {
    match ty {
        DataType::Struct(s) => column_uses(s, prefix, uses),
        DataType::Array(a) => nested_uses(a.element_type(), prefix, uses),
        DataType::Map(m) => {
            nested_uses(m.key_type(), prefix, uses);
            nested_uses(m.value_type(), prefix, uses);
        }
        _ => {}
    }
}

/// The error that refuses to write a table on a legacy protocol without the user's consent:
/// names the flag, the upgrade and what it means for other writers.
pub fn upgrade_refusal(uri: &str, upgrade: &Upgrade, flag: &str) -> DeltaError {
    DeltaError::Unwritable {
        uri: uri.to_string(),
        message: format!(
            "its writer protocol version {} implies checkConstraints and generatedColumns, which delta_kernel \
             cannot write, although the table uses neither. {flag} upgrades the {upgrade} (as Spark does when a \
             table feature is enabled), in one commit that changes no data; every reader still reads the table, \
             and writers must support table features (Delta Lake 2.3+; delta-rs 1.x writes it). Nothing was changed",
            upgrade.from_writer
        ),
    }
}

/// Makes sure lakesync may write the table: upgrades its protocol when it needs it and
/// `upgrade` (the user's consent, given as `flag`) allows; refuses otherwise, changing nothing.
/// Returns the upgrade committed, if any.
pub fn ensure_writable(
    writer: &DeltaWriter,
    upgrade: bool,
    flag: &str,
) -> Result<Option<(Version, Upgrade)>, DeltaError> {
    match writer.write_access()? {
        WriteAccess::Writable => Ok(None),
        WriteAccess::Refused(message) => Err(DeltaError::Unwritable { uri: writer.uri().to_string(), message }),
        WriteAccess::NeedsUpgrade(u) if !upgrade => Err(upgrade_refusal(writer.uri(), &u, flag)),
        WriteAccess::NeedsUpgrade(_) => writer.upgrade_protocol(),
    }
}

impl DeltaWriter {
    /// What lakesync may write to the table at its latest version.
    pub fn write_access(&self) -> Result<WriteAccess, DeltaError> {
        Ok(WriteAccess::of(self.latest()?.as_ref()))
    }

    /// Makes the table writable: commits the protocol upgrade it needs, if any (planned again
    /// on the latest version when another writer commits first). Returns the upgrade's
    /// version, `None` when the table was writable already.
    pub fn upgrade_protocol(&self) -> Result<Option<(Version, Upgrade)>, DeltaError> {
        for _ in 0..100 {
            let upgrade = match self.write_access()? {
                WriteAccess::Writable => return Ok(None),
                WriteAccess::Refused(message) => {
                    return Err(DeltaError::Unwritable { uri: self.uri().to_string(), message })
                }
                WriteAccess::NeedsUpgrade(u) => u,
            };
            let version = upgrade.version + 1;
            let protocol = serde_json::json!({
                "minReaderVersion": upgrade.reader,
                "minWriterVersion": 7,
                "writerFeatures": upgrade.features,
            });
            let commit_info = serde_json::json!({
                "timestamp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                "operation": "UPGRADE PROTOCOL",
                "operationParameters": { "newProtocol": protocol.to_string() },
                "readVersion": upgrade.version,
                "isBlindAppend": true,
                "engineInfo": crate::write::ENGINE_INFO,
            });
            let body = format!(
                "{}\n{}\n",
                serde_json::json!({ "commitInfo": commit_info }),
                serde_json::json!({ "protocol": protocol })
            );
            let path = Path::from_url_path(format!("{}_delta_log/{version:020}.json", self.url().path()))
                .map_err(|e| self.shape(e.to_string()))?;
            let options = PutOptions { mode: PutMode::Create, ..Default::default() };
            let put = self.block_on(self.store().put_opts(&path, PutPayload::from(body), options));
            match put {
                Ok(_) => {
                    tracing::info!(table = self.uri(), version, %upgrade, "upgraded the table's protocol");
                    return Ok(Some((version, upgrade)));
                }
                // Another writer committed this version: look again.
                Err(delta_kernel::object_store::Error::AlreadyExists { .. }) => continue,
                Err(e) => return Err(self.err(delta_kernel::KernelError::ObjectStore(e))),
            }
        }
        Err(self.shape("the protocol upgrade lost the commit race 100 times in a row".into()))
    }
}
