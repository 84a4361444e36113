//! The daemon's configuration: one TOML file, parsed strictly (`deny_unknown_fields`), then
//! validated into domain types. Secrets are never in the file: it names the environment
//! variables that hold them, and nothing here prints their values.
//!
//! ```toml
//! [postgres]
//! url = "host=127.0.0.1 user=lakesync dbname=app"  # or LAKESYNC_POSTGRES
//! password_env = "LAKESYNC_PG_PASSWORD"
//!
//! [api]
//! listen = "127.0.0.1:8080"
//! token_env = "LAKESYNC_API_TOKEN"
//!
//! [[tables]]
//! source = "/lake/customers"
//! target = "crm.customers"
//! primary_key = ["customer_id"]
//! mode = "continuous"          # snapshot | triggered | continuous
//! poll_interval = "250ms"      # continuous only
//! # schedule = "15m" or "*/5 * * * *" (snapshot and triggered)
//! indexes = [["email"]]
//!
//! [[tables]]
//! source = "s3://lake/orders"   # credentials from AWS_* / ~/.aws, like the aws CLI
//! target = "crm.orders"
//! primary_key = ["order_id"]
//! mode = "triggered"
//! storage_options = { aws_region = "eu-west-1", aws_secret_access_key_env = "LAKE_SECRET" }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use lakesync_core::SyncMode;
use lakesync_core::{
    parse_duration, parse_size, Classify, ColumnChoice, DataPolicy, DeleteMode, ErrorClass, NulBytePolicy, PrimaryKey,
    RowFilter, Schedule, Shape, TableName, Version,
};
use lakesync_delta::StorageOptions;
use lakesync_ingest::kafka::{Sasl, SaslMechanism, Security};
use lakesync_ingest::{BadRecords, IngestSpec, KafkaColumn, StartFrom};
use lakesync_postgres::{PgConfig, RunRetention};
use serde::{Deserialize, Serialize};

use crate::SyncRequest;

/// Environment variable with the Postgres connection string when the file has none.
pub const POSTGRES_ENV: &str = "LAKESYNC_POSTGRES";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// A value is invalid; `scope` says where (`table crm.customers`, `[api]`).
    #[error("config {scope}: {message}")]
    Invalid { scope: String, message: String },
    /// A spec from the management API asks for what `[api.policy]` does not allow: `field`
    /// names the setting, `rule` why (see [`crate::policy`]). Nothing was read or contacted.
    #[error("config {scope}: {field}: refused by [api.policy]: {rule}")]
    Refused { scope: String, field: String, rule: String },
}

impl Classify for ConfigError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Config
    }
}

fn invalid(scope: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { scope: scope.into(), message: message.into() }
}

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Where the synced tables live.
    #[serde(default)]
    pub postgres: PostgresSection,
    /// The HTTP API.
    #[serde(default)]
    pub api: ApiSection,
    /// The synced tables.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// Kafka topics ingested into Delta tables.
    #[serde(default)]
    pub ingest: Vec<IngestConfig>,
    /// Replicas of `lakesync serve` sharing one Postgres.
    #[serde(default)]
    pub fleet: FleetSection,
}

/// `[fleet]`: how this `lakesync serve` takes part in a fleet of replicas (one replica is a
/// fleet of one). See README, "Several replicas".
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// This replica's id (default: `LAKESYNC_REPLICA_ID`, else `<hostname>-<pid>`).
    pub replica_id: Option<String>,
    /// A replica whose heartbeat is older than this is ended and its tables taken over
    /// (default `10s`).
    pub lease: Option<String>,
    /// How often a replica renews its heartbeat and rebalances (default `1s`).
    pub heartbeat: Option<String>,
    /// Which wins when this file and the registry in Postgres disagree: `"file"` (default:
    /// the file is declarative for its entries) or `"registry"` (the file only seeds).
    pub on_conflict: Option<String>,
    /// Sync runs in flight at once in this process (default 8).
    pub max_concurrent_runs: Option<usize>,
}

/// The validated `[fleet]` section.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// This replica's id.
    pub replica_id: String,
    /// Heartbeat age after which a replica is ended and its tables taken over.
    pub lease: Duration,
    /// Heartbeat and rebalancing interval.
    pub heartbeat: Duration,
    /// Which wins when the file and the registry disagree.
    pub file_policy: lakesync_postgres::fleet::FilePolicy,
    /// Runs in flight at once.
    pub max_concurrent_runs: usize,
}

/// The environment variable naming this replica (wins over `[fleet] replica_id`).
pub const REPLICA_ENV: &str = "LAKESYNC_REPLICA_ID";

impl FleetSection {
    /// Validates the section; `env` looks up environment variables.
    pub fn validate(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<FleetConfig, ConfigError> {
        let scope = "[fleet]";
        let replica_id = match env(REPLICA_ENV).filter(|s| !s.is_empty()).or_else(|| self.replica_id.clone()) {
            Some(id) => id,
            None => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .or_else(|| env("HOSTNAME"))
                    .map(|h| h.trim().chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).collect())
                    .filter(|h: &String| !h.is_empty())
                    .unwrap_or_else(|| "lakesync".into());
                let pid = std::process::id().to_string();
                format!("{}-{pid}", &host[..host.len().min(62 - pid.len())])
            }
        };
        lakesync_postgres::fleet::valid_replica_id(&replica_id).map_err(|e| invalid(scope, e))?;
        let duration = |what: &str, v: &Option<String>, default: Duration| match v {
            Some(t) => parse_duration(t).map_err(|e| invalid(scope, format!("{what}: {e}"))),
            None => Ok(default),
        };
        let lease = duration("lease", &self.lease, Duration::from_secs(10))?;
        let heartbeat = duration("heartbeat", &self.heartbeat, Duration::from_secs(1))?;
        if heartbeat.is_zero() || heartbeat * 3 > lease {
            return Err(invalid(scope, "heartbeat must be above zero and at most a third of lease"));
        }
        let file_policy = match self.on_conflict.as_deref() {
            None | Some("file") => lakesync_postgres::fleet::FilePolicy::FileWins,
            Some("registry") => lakesync_postgres::fleet::FilePolicy::RegistryWins,
            Some(other) => {
                return Err(invalid(scope, format!("on_conflict {other:?}: expected \"file\" or \"registry\"")))
            }
        };
        let max_concurrent_runs = self.max_concurrent_runs.unwrap_or(crate::daemon::DEFAULT_MAX_CONCURRENT_RUNS);
        if !(1..=1024).contains(&max_concurrent_runs) {
            return Err(invalid(scope, "max_concurrent_runs must be 1 to 1024"));
        }
        Ok(FleetConfig { replica_id, lease, heartbeat, file_policy, max_concurrent_runs })
    }
}

/// `[postgres]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// libpq connection string or URI, without the password (default: `LAKESYNC_POSTGRES`).
    pub url: Option<String>,
    /// Name of the environment variable holding the password.
    pub password_env: Option<String>,
}

/// `[api]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Address to listen on (default `127.0.0.1:8080`).
    pub listen: Option<String>,
    /// Name of the environment variable holding the bearer token for mutating calls; without
    /// it those calls are refused.
    pub token_env: Option<String>,
    /// Largest `limit` the rows endpoint accepts (default 1000).
    pub max_page_size: Option<u32>,
    /// Data queries running longer are cancelled (default `5s`).
    pub statement_timeout: Option<String>,
    /// Postgres connections serving the API (default 8).
    pub pool_size: Option<usize>,
    /// Who may read rows, table status, runs and the OpenAPI document: `"open"` (default:
    /// anyone who reaches the port), `"token"` (the bearer token of `token_env`) or
    /// `"read_token"` (the bearer token of `read_token_env`, or the `token_env` one).
    /// `/healthz` and `/metrics` stay open.
    pub read_auth: Option<String>,
    /// Name of the environment variable holding the read token (`read_auth = "read_token"`).
    pub read_token_env: Option<String>,
    /// Connection string of the role the data API reads with (default: `[postgres]`'s), so
    /// that read-only is a privilege of the role, not only a session setting.
    pub postgres_url: Option<String>,
    /// Name of the environment variable holding that role's password.
    pub postgres_password_env: Option<String>,
    /// PEM file of the certificate chain to serve HTTPS with (with `tls_key`).
    pub tls_cert: Option<String>,
    /// PEM file of the private key for `tls_cert`.
    pub tls_key: Option<String>,
    /// What specs posted to the API may reach (see [`crate::policy`]).
    #[serde(default)]
    pub policy: crate::policy::PolicySection,
    /// Name of the environment variable holding the HS256 secret of the JWTs `/rest/v1`
    /// accepts (PostgREST's `jwt-secret`; Supabase's JWT secret). With it, a request's token
    /// (`Authorization: Bearer` or `apikey`) decides the Postgres role its query runs as.
    pub jwt_secret_env: Option<String>,
    /// The role of `/rest/v1` requests without a JWT (PostgREST's `db-anon-role`); without
    /// it such requests are refused once `jwt_secret_env` is set.
    pub anon_role: Option<String>,
}

/// One `[[tables]]` entry; also the body of `POST /api/v1/synced-tables`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Name in the API and metrics (default: the target, `schema.table`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Delta table path or URI.
    pub source: String,
    /// Postgres table, `schema.table`.
    pub target: String,
    /// Primary-key columns, in key order.
    pub primary_key: Vec<String>,
    /// `snapshot`, `triggered` or `continuous`.
    pub mode: String,
    /// snapshot/triggered: an interval (`15m`) or a cron expression (`*/5 * * * *`, UTC);
    /// without one the table syncs at start and on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// continuous: how often to look for new commits (default `500ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
    /// Secondary indexes (column lists) built after snapshot loads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indexes: Vec<Vec<String>>,
    /// Parallel COPY connections for snapshots (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<usize>,
    /// `error` (default) or `strip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nul_bytes: Option<String>,
    /// Keep the row with the greatest value of this column when a key repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_by: Option<String>,
    /// Source columns not to sync.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Only the source rows this SQL predicate is true for (`region = 'eu' AND score > 10`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Only these source columns, each `C` or `C AS NEW` (renamed in Postgres).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// `hard` (default), `soft` (`_lakesync_deleted_at` is set) or `ignore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_mode: Option<String>,
    /// Adds `_lakesync_version` and `_lakesync_commit_timestamp` (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lineage: bool,
    /// At most this many versions per incremental transaction (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions_per_transaction: Option<Version>,
    /// Take over an existing Postgres table lakesync did not create (default false: refused).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
    /// When adopting, drop the table's columns the source lacks (default false: refused).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_drop_columns: bool,
    /// Runs kept in the table's history (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_runs: Option<u64>,
    /// Days of run history kept (default 30; 0 keeps runs of any age).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_runs_days: Option<u64>,
    /// Object-store settings (`aws_region`, `aws_endpoint`, `azure_storage_account_name`,
    /// ...); a key ending in `_env` names the environment variable holding the value, the
    /// only way secrets are accepted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub storage_options: BTreeMap<String, OptionValue>,
}

/// A storage option's value as written: TOML and JSON users write `true` and `8` as often as
/// `"true"` and `"8"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OptionValue {
    /// A string.
    Text(String),
    /// A boolean, passed on as `true` / `false`.
    Flag(bool),
    /// A number, passed on in decimal.
    Number(i64),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::Text(s) => f.write_str(s),
            OptionValue::Flag(b) => write!(f, "{b}"),
            OptionValue::Number(n) => write!(f, "{n}"),
        }
    }
}

/// How the daemon keeps a table in sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableMode {
    /// A full snapshot at start, on request and on the schedule.
    Snapshot { schedule: Option<Schedule> },
    /// The change data feed at start, on request and on the schedule.
    Triggered { schedule: Option<Schedule> },
    /// The change data feed as soon as new commits land.
    Continuous { poll: Duration },
}

impl TableMode {
    /// `snapshot`, `triggered` or `continuous`.
    pub fn as_str(&self) -> &'static str {
        match self {
            TableMode::Snapshot { .. } => "snapshot",
            TableMode::Triggered { .. } => "triggered",
            TableMode::Continuous { .. } => "continuous",
        }
    }
}

/// A validated synced table.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// Name in the API and metrics.
    pub name: String,
    /// Delta table path or URI.
    pub source: String,
    /// Postgres table.
    pub target: TableName,
    /// Primary key.
    pub primary_key: PrimaryKey,
    /// How it is kept in sync.
    pub mode: TableMode,
    /// Secondary indexes.
    pub indexes: Vec<Vec<String>>,
    /// Data policies.
    pub policy: DataPolicy,
    /// COPY connections.
    pub parallelism: usize,
    /// Versions per incremental transaction.
    pub versions_per_transaction: Version,
    /// What of the source the table holds.
    pub shape: Shape,
    /// Take over an existing table lakesync did not create.
    pub adopt: bool,
    /// When adopting, drop the table's columns the source lacks.
    pub allow_drop_columns: bool,
    /// Run history kept.
    pub history: RunRetention,
    /// Object-store options, resolved (may hold secrets read from the environment; never
    /// printed).
    pub storage: StorageOptions,
    /// The entry as written, echoed by the API.
    pub config: TableConfig,
}

impl TableSpec {
    /// The sync run this table's spec asks for: the one place a [`SyncRequest`] is built
    /// from validated settings (the CLI's `sync`, the daemon's workers).
    pub fn request(
        &self,
        postgres: &PgConfig,
        mode: SyncMode,
        to_version: Option<Version>,
        lock_wait: Duration,
    ) -> SyncRequest {
        SyncRequest {
            source: self.source.clone(),
            storage: self.storage.clone(),
            postgres: postgres.clone(),
            table: self.target.clone(),
            primary_key: self.primary_key.clone(),
            mode,
            to_version,
            parallelism: self.parallelism,
            indexes: self.indexes.clone(),
            policy: self.policy.clone(),
            versions_per_transaction: self.versions_per_transaction,
            shape: self.shape.clone(),
            lock_wait,
            adopt: self.adopt,
            allow_drop_columns: self.allow_drop_columns,
            history: self.history,
            progress: Default::default(),
            fence: None,
            dry_run: false,
        }
    }
}

impl TableConfig {
    /// An entry with the required fields and every optional one at its default.
    pub fn new(source: impl Into<String>, target: impl Into<String>, primary_key: &[&str], mode: &str) -> Self {
        Self {
            name: None,
            source: source.into(),
            target: target.into(),
            primary_key: primary_key.iter().map(|c| c.to_string()).collect(),
            mode: mode.into(),
            schedule: None,
            poll_interval: None,
            indexes: Vec::new(),
            parallelism: None,
            nul_bytes: None,
            dedup_by: None,
            exclude: Vec::new(),
            filter: None,
            columns: Vec::new(),
            delete_mode: None,
            lineage: false,
            versions_per_transaction: None,
            adopt: false,
            allow_drop_columns: false,
            keep_runs: None,
            keep_runs_days: None,
            storage_options: BTreeMap::new(),
        }
    }

    /// Validates one table entry, reading `*_env` storage options from the process
    /// environment.
    pub fn validate(&self) -> Result<TableSpec, ConfigError> {
        self.validate_with(&|name| std::env::var(name).ok())
    }

    /// Validates one table entry; `env` looks up environment variables.
    pub fn validate_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<TableSpec, ConfigError> {
        let target =
            TableName::parse(&self.target).map_err(|e| invalid(format!("table {}", self.target), e.to_string()))?;
        let name = self.name.clone().unwrap_or_else(|| target.to_string());
        let scope = format!("table {name}");
        // lakesync's own state (the registry, the fence's view of it) and Postgres's catalogs
        // are never a sync target, adopted or not.
        if target.schema == "lakesync" || target.schema == "information_schema" || target.schema.starts_with("pg_") {
            return Err(invalid(
                &scope,
                format!("target {target}: schema {} is reserved (lakesync's state or Postgres's catalog); sync into another schema", target.schema),
            ));
        }
        if name.is_empty() || name.contains(['/', '?', '#', ' ']) || name.chars().any(char::is_control) {
            return Err(invalid(scope, "name must be non-empty without '/', '?', '#', spaces or control characters"));
        }
        let primary_key = PrimaryKey::new(self.primary_key.clone()).map_err(|e| invalid(&scope, e.to_string()))?;
        let schedule = match &self.schedule {
            Some(s) => Some(Schedule::parse(s).map_err(|e| invalid(&scope, format!("schedule: {e}")))?),
            None => None,
        };
        let mode = match self.mode.as_str() {
            "snapshot" | "triggered" if self.poll_interval.is_some() => {
                return Err(invalid(&scope, "poll_interval applies to mode = \"continuous\" only; use schedule"))
            }
            "snapshot" => TableMode::Snapshot { schedule },
            "triggered" => TableMode::Triggered { schedule },
            "continuous" if schedule.is_some() => {
                return Err(invalid(&scope, "schedule does not apply to mode = \"continuous\"; use poll_interval"))
            }
            "continuous" => TableMode::Continuous {
                poll: match &self.poll_interval {
                    Some(p) => parse_duration(p).map_err(|e| invalid(&scope, format!("poll_interval: {e}")))?,
                    None => Duration::from_millis(500),
                },
            },
            other => {
                return Err(invalid(
                    &scope,
                    format!("mode {other:?}: expected \"snapshot\", \"triggered\" or \"continuous\""),
                ))
            }
        };
        let parallelism = self.parallelism.unwrap_or(4);
        if !(1..=16).contains(&parallelism) {
            return Err(invalid(&scope, format!("parallelism {parallelism}: expected 1 to 16")));
        }
        let versions_per_transaction = self.versions_per_transaction.unwrap_or(100);
        if versions_per_transaction == 0 {
            return Err(invalid(&scope, "versions_per_transaction must be at least 1"));
        }
        let nul_bytes = match self.nul_bytes.as_deref() {
            None | Some("error") => NulBytePolicy::Error,
            Some("strip") => NulBytePolicy::Strip,
            Some(other) => {
                return Err(invalid(&scope, format!("nul_bytes {other:?}: expected \"error\" or \"strip\"")))
            }
        };
        if self.source.trim().is_empty() {
            return Err(invalid(&scope, "source is empty"));
        }
        if let Some(i) = self.indexes.iter().find(|i| i.is_empty() || i.iter().any(|c| c.trim().is_empty())) {
            return Err(invalid(&scope, format!("indexes: an index needs at least one column, none empty ({i:?})")));
        }
        let written: BTreeMap<String, String> =
            self.storage_options.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
        let storage = StorageOptions::resolve(&self.source, &written, env)
            .map_err(|e| invalid(&scope, format!("source: {e}")))?;
        if self.allow_drop_columns && !self.adopt {
            return Err(invalid(&scope, "allow_drop_columns applies only with adopt = true"));
        }
        let shape = Shape {
            filter: match &self.filter {
                Some(f) => Some(RowFilter::parse(f).map_err(|e| invalid(&scope, e.to_string()))?),
                None => None,
            },
            columns: self
                .columns
                .iter()
                .map(|c| ColumnChoice::parse(c))
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(&scope, e.to_string()))?,
            exclude: self.exclude.clone(),
            delete_mode: match &self.delete_mode {
                Some(m) => DeleteMode::parse(m).map_err(|e| invalid(&scope, e.to_string()))?,
                None => DeleteMode::Hard,
            },
            lineage: self.lineage,
        };
        shape.check(primary_key.columns()).map_err(|e| invalid(&scope, e.to_string()))?;
        if let Some(order) = self
            .dedup_by
            .as_ref()
            .filter(|d| !shape.columns.is_empty() && !shape.columns.iter().any(|c| &c.target == *d))
        {
            return Err(invalid(
                &scope,
                format!("dedup_by {order:?} must be among the synced columns (named as in Postgres)"),
            ));
        }
        let history = RunRetention {
            max_runs: match self.keep_runs {
                Some(0) => return Err(invalid(&scope, "keep_runs must be at least 1")),
                Some(n) => n,
                None => RunRetention::default().max_runs,
            },
            max_age: match self.keep_runs_days {
                Some(0) => None,
                Some(d) => Some(Duration::from_secs(d.saturating_mul(86_400))),
                None => RunRetention::default().max_age,
            },
        };
        Ok(TableSpec {
            name,
            source: self.source.clone(),
            target,
            primary_key,
            mode,
            indexes: self.indexes.clone(),
            policy: DataPolicy { nul_bytes, dedup_by: self.dedup_by.clone() },
            parallelism,
            versions_per_transaction,
            shape,
            adopt: self.adopt,
            allow_drop_columns: self.allow_drop_columns,
            history,
            storage,
            config: self.clone(),
        })
    }
}

/// One `[[ingest]]` entry: a Kafka topic into a Delta table, exactly once.
///
/// ```toml
/// [[ingest]]
/// name = "events-ingest"
/// brokers = ["kafka-1:9092", "kafka-2:9092"]
/// topic = "events"
/// table = "s3://lake/events"            # created (change data feed on) when missing
/// schema = "/etc/lakesync/events.json"  # a Delta schema (JSON); needed to create the table
/// kafka_columns = ["partition", "offset", "timestamp"]
/// flush_interval = "1s"
/// on_bad_record = "dead_letter"
/// dead_letter_table = "s3://lake/events_dead_letters"
/// security_protocol = "SASL_SSL"          # PLAINTEXT (default), SSL, SASL_PLAINTEXT, SASL_SSL
/// sasl_mechanism = "SCRAM-SHA-512"        # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
/// sasl_username = "lakesync"
/// sasl_password_env = "KAFKA_PASSWORD"    # the password's environment variable
/// ssl_ca_location = "/etc/lakesync/kafka-ca.pem"  # default: the system's roots
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Name in the API, metrics and the table's `txn` application ids (default: the topic).
    /// Renaming an ingest makes it start over: its positions are recorded under its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    pub topic: String,
    /// The Delta table: a local path or an object-store URI.
    pub table: String,
    /// A file holding the message fields' schema as Delta schema JSON; required to create the
    /// table, checked against an existing one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Partition columns of a table the ingest creates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partition_by: Vec<String>,
    /// Kafka metadata columns (`topic`, `partition`, `offset`, `timestamp`, `key`), stored as
    /// `_kafka_<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kafka_columns: Vec<String>,
    /// Commit after this many messages (default 100000)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_rows: Option<usize>,
    /// ...or when the oldest held message has waited this long (default `1s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_interval: Option<String>,
    /// `fail` (default) or `dead_letter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_bad_record: Option<String>,
    /// The Delta table bad messages go to with `on_bad_record = "dead_letter"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_table: Option<String>,
    /// `earliest` (default) or `latest`: where partitions the table has no position for start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_from: Option<String>,
    /// Write a checkpoint when this many commits follow the last one (default 10; 0: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
    /// Compact small files every this many ingest commits (default 100; 0: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compact_every: Option<u64>,
    /// Compaction's target file size (default `128MB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_file_size: Option<String>,
    /// Object-store settings, as for `[[tables]]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub storage_options: BTreeMap<String, OptionValue>,
    /// How to reach the brokers, as Kafka clients' `security.protocol`: `PLAINTEXT`
    /// (default), `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (default), with a `SASL_*` protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username: Option<String>,
    /// The environment variable holding the SASL password (never the password itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password_env: Option<String>,
    /// A PEM file of the CA certificates to trust for the brokers' TLS (default: the system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_ca_location: Option<String>,
    /// Upgrade an existing table on a legacy Delta protocol (writer versions 3-6: Spark's and
    /// delta-rs's change-feed tables) to table features before writing (default false: such
    /// a table is refused, naming this option).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upgrade_protocol: bool,
    /// How long one request to the brokers may go unanswered before the ingest reconnects
    /// (default `30s`; Kafka clients' `request.timeout.ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
}

impl IngestConfig {
    /// An entry with the required fields and every optional one at its default.
    pub fn new(brokers: Vec<String>, topic: impl Into<String>, table: impl Into<String>) -> Self {
        Self {
            name: None,
            brokers,
            topic: topic.into(),
            table: table.into(),
            schema: None,
            partition_by: Vec::new(),
            kafka_columns: Vec::new(),
            flush_rows: None,
            flush_interval: None,
            on_bad_record: None,
            dead_letter_table: None,
            start_from: None,
            checkpoint_every: None,
            compact_every: None,
            target_file_size: None,
            storage_options: BTreeMap::new(),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password_env: None,
            ssl_ca_location: None,
            upgrade_protocol: false,
            request_timeout: None,
        }
    }

    /// Validates the entry, reading the schema file and `*_env` options; `env` looks up
    /// environment variables.
    pub fn validate_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<IngestSpec, ConfigError> {
        let name = self.name.clone().unwrap_or_else(|| self.topic.clone());
        let scope = format!("ingest {name}");
        if name.is_empty() || name.contains(['/', '?', '#', ' ']) || name.chars().any(char::is_control) {
            return Err(invalid(scope, "name must be non-empty without '/', '?', '#', spaces or control characters"));
        }
        if self.topic.is_empty() || !self.topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(invalid(
                &scope,
                format!("topic {:?}: a Kafka topic name is letters, digits, '.', '_' and '-'", self.topic),
            ));
        }
        let brokers = self.checked_brokers(&scope)?;
        if self.table.trim().is_empty() {
            return Err(invalid(&scope, "table is empty"));
        }
        let written: BTreeMap<String, String> =
            self.storage_options.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
        let storage =
            StorageOptions::resolve(&self.table, &written, env).map_err(|e| invalid(&scope, format!("table: {e}")))?;
        let mut spec = IngestSpec::new(&name, brokers, &self.topic, &self.table);
        spec.storage = storage;
        spec.security = self.security(&scope, env)?;
        if let Some(path) = &self.schema {
            let text =
                std::fs::read_to_string(path).map_err(|e| invalid(&scope, format!("schema file {path}: {e}")))?;
            let schema = lakesync_delta::schema::arrow_schema_from_json(&format!("schema file {path}"), &text)
                .map_err(|e| invalid(&scope, e))?;
            spec.schema = Some(std::sync::Arc::new(schema));
        }
        spec.partition_by = self.partition_by.clone();
        if let Some(schema) = &spec.schema {
            if let Some(c) = spec.partition_by.iter().find(|c| schema.field_with_name(c).is_err()) {
                return Err(invalid(&scope, format!("partition_by: {c} is not a column of the schema")));
            }
        }
        for column in &self.kafka_columns {
            let c = KafkaColumn::parse(column).map_err(|e| invalid(&scope, format!("kafka_columns: {e}")))?;
            if !spec.kafka_columns.contains(&c) {
                spec.kafka_columns.push(c);
            }
        }
        if let Some(n) = self.flush_rows {
            if n == 0 {
                return Err(invalid(&scope, "flush_rows must be at least 1"));
            }
            spec.flush_rows = n;
        }
        if let Some(t) = &self.flush_interval {
            spec.flush_interval = parse_duration(t).map_err(|e| invalid(&scope, format!("flush_interval: {e}")))?;
        }
        spec.bad_records = match (self.on_bad_record.as_deref(), &self.dead_letter_table) {
            (None | Some("fail"), None) => BadRecords::Fail,
            (Some("dead_letter"), Some(table)) if table != &self.table => BadRecords::DeadLetter(table.clone()),
            (Some("dead_letter"), Some(_)) => return Err(invalid(&scope, "dead_letter_table must differ from table")),
            (Some("dead_letter"), None) => {
                return Err(invalid(&scope, "on_bad_record = \"dead_letter\" needs dead_letter_table"))
            }
            (None | Some("fail"), Some(_)) => {
                return Err(invalid(&scope, "dead_letter_table applies only with on_bad_record = \"dead_letter\""))
            }
            (Some(other), _) => {
                return Err(invalid(&scope, format!("on_bad_record {other:?}: expected \"fail\" or \"dead_letter\"")))
            }
        };
        if let Some(from) = &self.start_from {
            spec.start = StartFrom::parse(from).map_err(|e| invalid(&scope, format!("start_from {e}")))?;
        }
        if let Some(n) = self.checkpoint_every {
            spec.checkpoint_every = n;
        }
        if let Some(n) = self.compact_every {
            spec.compact_every = n;
        }
        if let Some(size) = &self.target_file_size {
            spec.target_file_size = parse_size(size).map_err(|e| invalid(&scope, format!("target_file_size: {e}")))?;
        }
        spec.upgrade_protocol = self.upgrade_protocol;
        if let Some(t) = &self.request_timeout {
            spec.request_timeout = parse_duration(t).map_err(|e| invalid(&scope, format!("request_timeout: {e}")))?;
            if spec.request_timeout < std::time::Duration::from_millis(100) {
                return Err(invalid(&scope, "request_timeout must be at least 100ms"));
            }
        }
        Ok(spec)
    }
}

impl IngestConfig {
    /// The brokers, trimmed, or an error unless each is `host:port` (and there is one).
    pub(crate) fn checked_brokers(&self, scope: &str) -> Result<Vec<String>, ConfigError> {
        let brokers: Vec<String> = self.brokers.iter().map(|b| b.trim().to_string()).collect();
        if brokers.is_empty()
            || brokers.iter().any(|b| b.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()))
        {
            return Err(invalid(scope, format!("brokers {brokers:?}: expected host:port entries")));
        }
        Ok(brokers)
    }

    /// TLS and SASL to the brokers, from `security_protocol` and the settings it needs.
    fn security(&self, scope: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Security, ConfigError> {
        let protocol = self.security_protocol.as_deref().unwrap_or("PLAINTEXT");
        let (tls, sasl) = match protocol {
            "PLAINTEXT" => (false, false),
            "SSL" => (true, false),
            "SASL_PLAINTEXT" => (false, true),
            "SASL_SSL" => (true, true),
            other => {
                return Err(invalid(
                    scope,
                    format!("security_protocol {other:?}: expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
                ))
            }
        };
        let sasl_settings = [
            ("sasl_mechanism", self.sasl_mechanism.is_some()),
            ("sasl_username", self.sasl_username.is_some()),
            ("sasl_password_env", self.sasl_password_env.is_some()),
        ];
        if let (false, Some((name, _))) = (sasl, sasl_settings.iter().find(|(_, set)| *set)) {
            return Err(invalid(
                scope,
                format!("{name} applies only with security_protocol SASL_PLAINTEXT or SASL_SSL"),
            ));
        }
        if !tls && self.ssl_ca_location.is_some() {
            return Err(invalid(scope, "ssl_ca_location applies only with security_protocol SSL or SASL_SSL"));
        }
        let mut security = Security::default();
        if tls {
            let ca = self.ssl_ca_location.as_deref().map(std::path::Path::new);
            security.tls = Some(lakesync_ingest::kafka::tls_config(ca).map_err(|e| invalid(scope, e))?);
        }
        if sasl {
            let mechanism = SaslMechanism::parse(self.sasl_mechanism.as_deref().unwrap_or("SCRAM-SHA-512"))
                .map_err(|e| invalid(scope, format!("sasl_mechanism {e}")))?;
            let username = self
                .sasl_username
                .clone()
                .filter(|u| !u.is_empty())
                .ok_or_else(|| invalid(scope, format!("security_protocol {protocol} needs sasl_username")))?;
            let var = self
                .sasl_password_env
                .as_deref()
                .ok_or_else(|| invalid(scope, format!("security_protocol {protocol} needs sasl_password_env")))?;
            let password = env(var)
                .ok_or_else(|| invalid(scope, format!("sasl_password_env: environment variable {var} is not set")))?;
            security.sasl = Some(Sasl { mechanism, username, password });
        }
        Ok(security)
    }
}

/// API settings.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Bearer token for mutating calls; `None` turns them off.
    pub token: Option<Secret>,
    /// Largest page.
    pub max_page_size: u32,
    /// Per-query time limit.
    pub statement_timeout: Duration,
    /// Pool size.
    pub pool_size: usize,
    /// Who may read.
    pub read_auth: ReadAuth,
    /// The data API's Postgres connection, when it differs from the syncing one.
    pub postgres: Option<PgConfig>,
    /// HTTPS certificate chain and key files.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// What specs posted to the API may reach.
    pub policy: crate::policy::ApiPolicy,
    /// JWTs for `/rest/v1` (`jwt_secret_env`, `anon_role`).
    pub jwt: Option<JwtSettings>,
}

/// How `/rest/v1` authenticates with JWTs, as PostgREST does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    /// The HS256 secret.
    pub secret: Secret,
    /// The role of requests without a token.
    pub anon_role: Option<String>,
}

/// Who may call the API's reading routes (rows, table status, runs, OpenAPI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAuth {
    /// Anyone who reaches the port.
    Open,
    /// A bearer token: any of these (the read token and the management token).
    Tokens(Vec<Secret>),
}

/// A secret value that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Postgres connection (password included, never printed).
    pub postgres: PgConfig,
    /// HTTP API.
    pub api: ApiSettings,
    /// Synced tables.
    pub tables: Vec<TableSpec>,
    /// Kafka topics ingested into Delta tables.
    pub ingests: Vec<IngestSpec>,
    /// The `[[ingest]]` entries as written, in the order of `ingests` (the registry keeps them).
    pub ingest_configs: Vec<IngestConfig>,
    /// `[fleet]`.
    pub fleet: FleetConfig,
}

impl Config {
    /// Reads, parses and validates `path`, taking secrets from the process environment.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        Self::from_toml(&shown, &text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates TOML text; `env` looks up environment variables.
    pub fn from_toml(path: &str, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_string(), message: e.to_string() })?;
        file.validate(env)
    }
}

impl ConfigFile {
    /// Validates every section; `env` looks up environment variables.
    pub fn validate(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let url = match &self.postgres.url {
            Some(url) => url.clone(),
            None => env(POSTGRES_ENV).ok_or_else(|| {
                invalid(
                    "[postgres]",
                    format!("no connection: set url in [postgres] or the {POSTGRES_ENV} environment variable"),
                )
            })?,
        };
        let mut postgres = PgConfig::parse(&url).map_err(|e| invalid("[postgres]", e.to_string()))?;
        if let Some(var) = &self.postgres.password_env {
            let password = env(var).ok_or_else(|| {
                invalid("[postgres]", format!("password_env names {var}, which is not set in the environment"))
            })?;
            postgres = postgres.with_password(&password);
        }
        let api = &self.api;
        let listen = api.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| invalid("[api]", format!("listen {listen:?}: expected host:port, e.g. 127.0.0.1:8080")))?;
        let token = match &api.token_env {
            Some(var) => match env(var) {
                Some(t) if !t.is_empty() => Some(Secret::new(t)),
                _ => {
                    return Err(invalid("[api]", format!("token_env names {var}, which is not set in the environment")))
                }
            },
            None => None,
        };
        let statement_timeout = match &api.statement_timeout {
            Some(t) => parse_duration(t).map_err(|e| invalid("[api]", format!("statement_timeout: {e}")))?,
            None => Duration::from_secs(5),
        };
        let max_page_size = api.max_page_size.unwrap_or(1000);
        let pool_size = api.pool_size.unwrap_or(8);
        if max_page_size == 0 || !(1..=256).contains(&pool_size) {
            return Err(invalid("[api]", "max_page_size must be at least 1 and pool_size 1 to 256"));
        }
        let secret = |what: &str, var: &str| match env(var) {
            Some(t) if !t.is_empty() => Ok(Secret::new(t)),
            _ => Err(invalid("[api]", format!("{what} names {var}, which is not set in the environment"))),
        };
        let read_auth = match api.read_auth.as_deref() {
            None | Some("open") => ReadAuth::Open,
            Some("token") => match &token {
                Some(t) => ReadAuth::Tokens(vec![t.clone()]),
                None => return Err(invalid("[api]", "read_auth = \"token\" needs token_env")),
            },
            Some("read_token") => {
                let var = api
                    .read_token_env
                    .as_deref()
                    .ok_or_else(|| invalid("[api]", "read_auth = \"read_token\" needs read_token_env"))?;
                ReadAuth::Tokens(std::iter::once(secret("read_token_env", var)?).chain(token.clone()).collect())
            }
            Some(other) => {
                return Err(invalid(
                    "[api]",
                    format!("read_auth {other:?}: expected \"open\", \"token\" or \"read_token\""),
                ))
            }
        };
        if api.read_token_env.is_some() && api.read_auth.as_deref() != Some("read_token") {
            return Err(invalid("[api]", "read_token_env applies only with read_auth = \"read_token\""));
        }
        let api_postgres = match &api.postgres_url {
            Some(url) => {
                let mut config = PgConfig::parse(url).map_err(|e| invalid("[api]", format!("postgres_url: {e}")))?;
                if let Some(var) = &api.postgres_password_env {
                    config = config.with_password(secret("postgres_password_env", var)?.expose());
                }
                Some(config)
            }
            None if api.postgres_password_env.is_some() => {
                return Err(invalid("[api]", "postgres_password_env applies only with postgres_url"))
            }
            None => None,
        };
        let tls = match (&api.tls_cert, &api.tls_key) {
            (Some(cert), Some(key)) => Some((cert.into(), key.into())),
            (None, None) => None,
            _ => return Err(invalid("[api]", "tls_cert and tls_key go together")),
        };
        let jwt = match (&api.jwt_secret_env, &api.anon_role) {
            (Some(var), anon_role) => {
                let secret = secret("jwt_secret_env", var)?;
                if secret.expose().len() < 32 {
                    return Err(invalid(
                        "[api]",
                        format!("jwt_secret_env: the secret in {var} must be at least 32 bytes"),
                    ));
                }
                if let Some(role) = anon_role {
                    if role.is_empty() || role.chars().any(char::is_control) {
                        return Err(invalid("[api]", "anon_role must be a role name"));
                    }
                }
                Some(JwtSettings { secret, anon_role: anon_role.clone() })
            }
            (None, Some(_)) => return Err(invalid("[api]", "anon_role applies only with jwt_secret_env")),
            (None, None) => None,
        };
        let tables = self.tables.iter().map(|t| t.validate_with(env)).collect::<Result<Vec<_>, _>>()?;
        check_unique(&tables)?;
        let ingests = self.ingest.iter().map(|i| i.validate_with(env)).collect::<Result<Vec<_>, _>>()?;
        // The variables holding the daemon's own secrets: no API spec may name them.
        let reserved = [
            &self.postgres.password_env,
            &api.token_env,
            &api.read_token_env,
            &api.postgres_password_env,
            &api.jwt_secret_env,
        ]
        .into_iter()
        .flatten()
        .cloned();
        let policy = api.policy.validate(&self.tables, &self.ingest, reserved)?;
        let mut names = BTreeSet::new();
        for i in &ingests {
            if !names.insert(&i.name) {
                return Err(invalid(format!("ingest {}", i.name), "the name is used by two ingests"));
            }
        }
        Ok(Config {
            postgres,
            api: ApiSettings {
                listen,
                token,
                max_page_size,
                statement_timeout,
                pool_size,
                read_auth,
                postgres: api_postgres,
                tls,
                policy,
                jwt,
            },
            tables,
            ingests,
            ingest_configs: self.ingest.clone(),
            fleet: self.fleet.validate(env)?,
        })
    }
}

/// Names and targets must be unique: two entries writing one table would fight over it.
pub fn check_unique(tables: &[TableSpec]) -> Result<(), ConfigError> {
    let (mut names, mut targets) = (BTreeSet::new(), BTreeSet::new());
    for t in tables {
        if !names.insert(&t.name) {
            return Err(invalid(format!("table {}", t.name), "the name is used by two tables"));
        }
        if !targets.insert(&t.target) {
            return Err(invalid(format!("table {}", t.name), format!("target {} is synced by two entries", t.target)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [postgres]
        url = "host=127.0.0.1 user=app dbname=crm"
        password_env = "PGPASS_FOR_TEST"

        [api]
        listen = "127.0.0.1:9000"
        token_env = "TOKEN_FOR_TEST"

        [[tables]]
        source = "/lake/customers"
        target = "crm.customers"
        primary_key = ["customer_id"]
        mode = "continuous"
        poll_interval = "250ms"
        indexes = [["email"]]

        [[tables]]
        name = "orders"
        source = "s3://lake/orders"
        target = "crm.orders"
        primary_key = ["region", "order_id"]
        mode = "triggered"
        schedule = "*/5 * * * *"
        nul_bytes = "strip"
    "#;

    fn env(name: &str) -> Option<String> {
        match name {
            "PGPASS_FOR_TEST" => Some("s3cret-pg".into()),
            "TOKEN_FOR_TEST" => Some("s3cret-token".into()),
            _ => None,
        }
    }

    fn error(text: &str) -> String {
        Config::from_toml("lakesync.toml", text, &env).unwrap_err().to_string()
    }

    #[test]
    fn a_table_entry_choosing_what_to_sync_is_validated_with_names_and_positions() {
        let entry = |extra: &str| {
            format!(
                "[postgres]\nurl = \"host=db\"\n\n[[tables]]\nsource = \"/lake/t\"\ntarget = \"app.t\"\nprimary_key = [\"id\"]\nmode = \"triggered\"\n{extra}\n"
            )
        };
        let ok = Config::from_toml(
            "lakesync.toml",
            &entry("filter = \"region = 'eu'\"\ncolumns = [\"id\", \"amount AS total\"]\ndelete_mode = \"soft\"\nlineage = true"),
            &env,
        )
        .unwrap();
        let shape = &ok.tables[0].shape;
        assert_eq!(shape.filter.as_ref().map(|f| f.text()), Some("region = 'eu'"));
        assert_eq!((shape.columns[1].source.as_str(), shape.columns[1].target.as_str()), ("amount", "total"));
        assert_eq!((shape.delete_mode, shape.lineage), (DeleteMode::Soft, true));
        assert!(error(&entry("filter = \"region = \"")).contains("invalid filter"));
        assert!(error(&entry("filter = \"f(x) = 1\"")).contains("line 1, column 1"));
        assert!(error(&entry("columns = [\"amount\"]")).contains("primary key column must be among the synced columns"));
        assert!(error(&entry("columns = [\"id\"]\nexclude = [\"x\"]")).contains("alternatives"));
        assert!(error(&entry("delete_mode = \"sometimes\"")).contains("hard, soft or ignore"));
        assert!(error(&entry("columns = [\"id\"]\ndedup_by = \"seq\"")).contains("dedup_by \"seq\" must be among"));
    }

    #[test]
    fn a_config_file_becomes_validated_tables_without_showing_secrets() {
        let config = Config::from_toml("lakesync.toml", GOOD, &env).unwrap();
        assert_eq!(config.api.listen.to_string(), "127.0.0.1:9000");
        let [customers, orders] = &config.tables[..] else { panic!("two tables") };
        assert_eq!(customers.name, "crm.customers");
        assert_eq!(customers.mode, TableMode::Continuous { poll: Duration::from_millis(250) });
        assert_eq!(customers.indexes, vec![vec!["email".to_string()]]);
        assert_eq!(orders.name, "orders");
        assert_eq!(orders.primary_key.columns(), ["region", "order_id"]);
        assert!(matches!(orders.mode, TableMode::Triggered { schedule: Some(Schedule::Cron(_)) }));
        assert_eq!(orders.policy.nul_bytes, NulBytePolicy::Strip);
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn lakesyncs_own_schema_and_the_catalogs_are_never_a_target() {
        for target in ["lakesync.registry", "pg_catalog.pg_authid", "information_schema.tables", "pg_temp.t"] {
            let mut t = TableConfig::new("/lake/t", target, &["id"], "triggered");
            t.adopt = true;
            let err = t.validate_with(&|_| None).unwrap_err().to_string();
            assert!(err.contains("is reserved"), "{target}: {err}");
        }
        TableConfig::new("/lake/t", "lakesync_app.t", &["id"], "triggered").validate_with(&|_| None).unwrap();
    }

    #[test]
    fn storage_options_come_from_toml_and_json_with_secrets_only_through_variables() {
        let env = |name: &str| match name {
            "LAKE_SECRET" => Some("s3cret-lake".to_string()),
            _ => env(name),
        };
        // The README's S3-compatible example, as TOML.
        let toml = GOOD.replace(
            "nul_bytes = \"strip\"",
            "nul_bytes = \"strip\"\nstorage_options = { aws_endpoint = \"http://minio.internal:9000\", \
             aws_allow_http = true, aws_region = \"us-east-1\", aws_access_key_id = \"lakesync\", \
             aws_secret_access_key_env = \"LAKE_SECRET\" }",
        );
        let config = Config::from_toml("lakesync.toml", &toml, &env).unwrap();
        let shown = format!("{:?}", config.tables[1].storage);
        assert!(shown.contains("aws_secret_access_key") && shown.contains("aws_allow_http"), "{shown}");
        assert!(!format!("{config:?}").contains("s3cret-lake"));

        // The same entry as a POST body (JSON) resolves the same way.
        let body = serde_json::json!({
            "source": "s3://lake/orders", "target": "crm.orders", "primary_key": ["order_id"], "mode": "triggered",
            "storage_options": {"aws_region": "us-east-1", "aws_allow_http": true, "aws_secret_access_key_env": "LAKE_SECRET"}
        });
        let entry: TableConfig = serde_json::from_value(body).unwrap();
        assert!(entry.validate_with(&env).is_ok());

        // A secret written inline, an unknown key, a missing variable and options on a local
        // path are refused, naming the table and the key, never showing the value.
        let refused = |options: &str, source: &str| {
            let toml = GOOD
                .replace("source = \"s3://lake/orders\"", &format!("source = \"{source}\""))
                .replace("nul_bytes = \"strip\"", &format!("nul_bytes = \"strip\"\nstorage_options = {{ {options} }}"));
            Config::from_toml("lakesync.toml", &toml, &env).unwrap_err().to_string()
        };
        let inline = refused("aws_secret_access_key = \"plain-secret-value\"", "s3://lake/orders");
        assert!(inline.contains("orders") && inline.contains("aws_secret_access_key_env"), "{inline}");
        assert!(!inline.contains("plain-secret-value"), "{inline}");
        let typo = refused("aws_regoin = \"eu\"", "s3://lake/orders");
        assert!(typo.contains("unknown storage option \"aws_regoin\""), "{typo}");
        let unset = refused("aws_secret_access_key_env = \"NOT_SET_ANYWHERE\"", "s3://lake/orders");
        assert!(unset.contains("NOT_SET_ANYWHERE") && unset.contains("not set"), "{unset}");
        let local = refused("aws_region = \"eu\"", "/lake/orders");
        assert!(local.contains("not local paths"), "{local}");
    }

    #[test]
    fn unknown_fields_are_errors_that_name_the_field_and_line() {
        let err = error(&GOOD.replace("poll_interval", "poll_intervall"));
        assert!(err.contains("poll_intervall") && err.contains("line"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_table_and_the_setting() {
        let err = error(&GOOD.replace("mode = \"continuous\"", "mode = \"streaming\""));
        assert!(err.contains("table crm.customers") && err.contains("\"streaming\""), "{err}");
        let err = error(&GOOD.replace("*/5 * * * *", "*/5 * *"));
        assert!(err.contains("table orders") && err.contains("schedule"), "{err}");
        let err = error(&GOOD.replace("\"250ms\"", "\"fast\""));
        assert!(err.contains("poll_interval"), "{err}");
        let err = error(&GOOD.replace("crm.orders", "crm.customers"));
        assert!(err.contains("synced by two entries"), "{err}");
        let err = error(&GOOD.replace("TOKEN_FOR_TEST", "MISSING_TOKEN"));
        assert!(err.contains("MISSING_TOKEN") && err.contains("not set"), "{err}");
        let err = error(&GOOD.replace("[\"region\", \"order_id\"]", "[]"));
        assert!(err.contains("table orders") && err.contains("primary key"), "{err}");
        let api = |extra: &str| {
            error(&GOOD.replace("token_env = \"TOKEN_FOR_TEST\"", &format!("token_env = \"TOKEN_FOR_TEST\"\n{extra}")))
        };
        assert!(api("read_auth = \"everyone\"").contains("read_auth \"everyone\""));
        assert!(api("read_auth = \"read_token\"").contains("needs read_token_env"));
        assert!(api("read_auth = \"read_token\"\nread_token_env = \"NOPE\"").contains("NOPE"));
        assert!(api("tls_cert = \"/c.pem\"").contains("tls_cert and tls_key go together"));
        assert!(api("postgres_password_env = \"P\"").contains("only with postgres_url"));
    }

    #[test]
    fn reads_can_need_the_management_token_or_a_read_token() {
        let with = |extra: &str| {
            let text =
                GOOD.replace("token_env = \"TOKEN_FOR_TEST\"", &format!("token_env = \"TOKEN_FOR_TEST\"\n{extra}"));
            Config::from_toml("f", &text, &env).unwrap().api.read_auth
        };
        assert_eq!(with(""), ReadAuth::Open);
        assert_eq!(with("read_auth = \"token\""), ReadAuth::Tokens(vec![Secret::new("s3cret-token".into())]));
        let ReadAuth::Tokens(tokens) = with("read_auth = \"read_token\"\nread_token_env = \"TOKEN_FOR_TEST\"") else {
            panic!("read tokens expected")
        };
        assert_eq!(tokens.len(), 2);
    }

    #[test]
    fn the_connection_comes_from_the_environment_when_the_file_has_none() {
        let text = "[[tables]]\nsource = \"/t\"\ntarget = \"public.t\"\nprimary_key = [\"id\"]\nmode = \"snapshot\"\n";
        let err = Config::from_toml("f", text, &|_| None).unwrap_err().to_string();
        assert!(err.contains(POSTGRES_ENV), "{err}");
        let config = Config::from_toml("f", text, &|n| (n == POSTGRES_ENV).then(|| "host=db user=u".into())).unwrap();
        assert_eq!(config.postgres.target(), "u@db:5432/u");
        assert!(config.api.token.is_none());
    }
}
