//! What a spec that comes through the management API may reach: `[api.policy]`.
//!
//! The config file belongs to the operator and stays as powerful as it is: it may name any
//! environment variable, endpoint, broker or file. A spec posted to the API (a synced table,
//! an ingest) is written by whoever holds the management token, so it is confined, default
//! closed, before anything is read, resolved or contacted:
//! - environment variables (`*_env` storage options, `sasl_password_env`): only names the
//!   policy's `env` lists (a name, or a prefix ending in `*`); never `LAKESYNC_*` nor a variable
//!   the file uses for the daemon's own secrets;
//! - object-store locations (sources, ingest and dead-letter tables): under a prefix of
//!   `locations` or a bucket the file's own tables use;
//! - local paths (tables, schema files, CA files): under a directory of `local_roots` (none by
//!   default), absolute, without `..`;
//! - endpoints (`aws_endpoint`, `azure_storage_endpoint`, `google_base_url`): listed in
//!   `endpoints` or used by the file;
//! - brokers: listed in `brokers` or used by the file's ingests;
//! - never options that reach beyond the table: credential providers (container and instance
//!   metadata, web identity, STS, Azure CLI or MSI), token or key files, proxies, TLS
//!   verification off ([`lakesync_delta::OptionUse::Host`]);
//! - SASL PLAIN without TLS only with `sasl_plain_without_tls = true`.
//!
//! A refusal names the field and the rule ([`ConfigError::Refused`]).

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use lakesync_delta::OptionUse;
use serde::Deserialize;
use url::Url;

use crate::config::{ConfigError, IngestConfig, OptionValue, TableConfig};

/// `[api.policy]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Environment variables an API spec may name: `NAME`, or `PREFIX*`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Object-store URI prefixes an API spec may read or write (`s3://lake/`,
    /// `abfss://c@acct.dfs.core.windows.net/raw/`), besides the buckets the file uses.
    #[serde(default)]
    pub locations: Vec<String>,
    /// Local directories under which an API spec may name tables and files.
    #[serde(default)]
    pub local_roots: Vec<String>,
    /// Object-store endpoints an API spec may set, besides those the file uses.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Kafka brokers (`host:port`) an API ingest may connect to, besides the file's.
    #[serde(default)]
    pub brokers: Vec<String>,
    /// Whether an API ingest may send a SASL PLAIN password without TLS.
    #[serde(default)]
    pub sasl_plain_without_tls: bool,
}

/// The validated policy for API-submitted specs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiPolicy {
    env: Vec<String>,
    /// Variables never allowed (the daemon's own secrets).
    reserved_env: BTreeSet<String>,
    locations: Vec<String>,
    local_roots: Vec<PathBuf>,
    endpoints: BTreeSet<String>,
    brokers: BTreeSet<String>,
    sasl_plain_without_tls: bool,
}

fn refused(scope: &str, field: impl Into<String>, rule: impl Into<String>) -> ConfigError {
    ConfigError::Refused { scope: scope.to_string(), field: field.into(), rule: rule.into() }
}

/// An endpoint as compared: without a trailing `/`, lower case.
fn endpoint_key(e: &str) -> String {
    e.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// The store a URI names, as a prefix ending in `/` (`s3://bucket/`), or `None` for a
/// local path.
fn bucket_of(uri: &str) -> Option<String> {
    let url = Url::parse(uri).ok().filter(|u| u.scheme().len() > 1 && u.scheme() != "file")?;
    Some(format!("{}://{}/", url.scheme(), url.authority()))
}

/// A URI as a prefix-comparable string ending in `/`.
fn with_slash(uri: &str) -> String {
    let uri = uri.trim();
    if uri.ends_with('/') {
        uri.to_string()
    } else {
        format!("{uri}/")
    }
}

/// An absolute local path without `.`/`..`, or why not.
fn local_path(written: &str) -> Result<PathBuf, String> {
    let path = match written.strip_prefix("file://") {
        Some(rest) => rest,
        None => written,
    };
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err("a local path must be absolute".into());
    }
    if path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err("a local path must not contain '.' or '..'".into());
    }
    Ok(path.components().collect())
}

impl PolicySection {
    /// Validates the section; the file's own tables and ingests add the buckets, endpoints
    /// and brokers they use, and `reserved_env` the variables holding the daemon's secrets.
    pub fn validate(
        &self,
        tables: &[TableConfig],
        ingests: &[IngestConfig],
        reserved_env: impl IntoIterator<Item = String>,
    ) -> Result<ApiPolicy, ConfigError> {
        let scope = "[api.policy]";
        let bad = |m: String| ConfigError::Invalid { scope: scope.into(), message: m };
        if let Some(e) = self.env.iter().find(|e| e.trim_end_matches('*').is_empty()) {
            return Err(bad(format!("env {e:?}: name a variable or a prefix (\"LAKE_*\"), not every variable")));
        }
        let mut locations = Vec::new();
        for l in &self.locations {
            if bucket_of(l).is_none() {
                return Err(bad(format!("locations {l:?}: expected an object-store URI prefix (s3://bucket/...); local directories go in local_roots")));
            }
            locations.push(with_slash(l));
        }
        let mut local_roots = Vec::new();
        for r in &self.local_roots {
            local_roots.push(local_path(r).map_err(|e| bad(format!("local_roots {r:?}: {e}")))?);
        }
        let mut endpoints: BTreeSet<String> = self.endpoints.iter().map(|e| endpoint_key(e)).collect();
        let mut brokers: BTreeSet<String> = self.brokers.iter().map(|b| b.trim().to_ascii_lowercase()).collect();
        let file_options =
            |uri: &str, options: &std::collections::BTreeMap<String, OptionValue>, out: &mut BTreeSet<String>| {
                for (key, value) in options {
                    if key.ends_with("_env") {
                        continue;
                    }
                    if let Ok(OptionUse::Endpoint) = lakesync_delta::store::option_use(uri, key) {
                        out.insert(endpoint_key(&value.to_string()));
                    }
                }
            };
        for t in tables {
            locations.extend(bucket_of(&t.source));
            file_options(&t.source, &t.storage_options, &mut endpoints);
        }
        for i in ingests {
            locations.extend(bucket_of(&i.table));
            locations.extend(i.dead_letter_table.as_deref().and_then(bucket_of));
            file_options(&i.table, &i.storage_options, &mut endpoints);
            brokers.extend(i.brokers.iter().map(|b| b.trim().to_ascii_lowercase()));
        }
        locations.sort();
        locations.dedup();
        Ok(ApiPolicy {
            env: self.env.clone(),
            reserved_env: reserved_env.into_iter().collect(),
            locations,
            local_roots,
            endpoints,
            brokers,
            sasl_plain_without_tls: self.sasl_plain_without_tls,
        })
    }
}

impl std::fmt::Display for ApiPolicy {
    /// What the policy allows, for `check-config`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |items: Vec<String>| if items.is_empty() { "none".to_string() } else { items.join(", ") };
        write!(
            f,
            "variables {}; locations {}; local roots {}; endpoints {}; brokers {}; SASL PLAIN without TLS {}",
            list(self.env.clone()),
            list(self.locations.clone()),
            list(self.local_roots.iter().map(|p| p.display().to_string()).collect()),
            list(self.endpoints.iter().cloned().collect()),
            list(self.brokers.iter().cloned().collect()),
            if self.sasl_plain_without_tls { "allowed" } else { "refused" },
        )
    }
}

impl ApiPolicy {
    fn check_env(&self, scope: &str, field: &str, var: &str) -> Result<(), ConfigError> {
        if var.starts_with("LAKESYNC_") || self.reserved_env.contains(var) {
            return Err(refused(
                scope,
                field,
                format!("{var} holds one of the daemon's own settings or secrets; no API spec may name it"),
            ));
        }
        let allowed = self.env.iter().any(|e| match e.strip_suffix('*') {
            Some(prefix) => var.starts_with(prefix),
            None => e == var,
        });
        if allowed {
            Ok(())
        } else {
            Err(refused(
                scope,
                field,
                format!("{var} is not among the variables [api.policy] env allows API specs to name"),
            ))
        }
    }

    fn check_location(&self, scope: &str, field: &str, uri: &str) -> Result<(), ConfigError> {
        if bucket_of(uri).is_some() {
            let uri = with_slash(uri);
            if self.locations.iter().any(|l| uri.starts_with(l.as_str())) {
                return Ok(());
            }
            return Err(refused(
                scope,
                field,
                "the location is not under [api.policy] locations nor in a bucket the config file uses",
            ));
        }
        self.check_local(scope, field, uri)
    }

    fn check_local(&self, scope: &str, field: &str, written: &str) -> Result<(), ConfigError> {
        let path = local_path(written).map_err(|e| refused(scope, field, e))?;
        if self.local_roots.iter().any(|root| path.starts_with(root)) {
            Ok(())
        } else {
            Err(refused(scope, field, "local paths from the API must be under a directory of [api.policy] local_roots"))
        }
    }

    fn check_storage_options(
        &self,
        scope: &str,
        uri: &str,
        options: &std::collections::BTreeMap<String, OptionValue>,
    ) -> Result<(), ConfigError> {
        for (key, value) in options {
            let field = format!("storage_options.{key}");
            let (name, var) = match key.strip_suffix("_env") {
                Some(name) => (name, Some(value.to_string())),
                None => (key.as_str(), None),
            };
            let used = lakesync_delta::store::option_use(uri, name)
                .map_err(|e| ConfigError::Invalid { scope: scope.to_string(), message: e })?;
            match used {
                OptionUse::Host => return Err(refused(
                    scope,
                    field,
                    "credential providers, local files, proxies and TLS settings may only be set in the config file",
                )),
                OptionUse::Endpoint if var.is_some() => {
                    return Err(refused(
                        scope,
                        field,
                        "an endpoint from the API is written inline, not read from a variable",
                    ))
                }
                OptionUse::Endpoint if !self.endpoints.contains(&endpoint_key(&value.to_string())) => {
                    return Err(refused(
                        scope,
                        field,
                        "the endpoint is not among [api.policy] endpoints nor used by the config file",
                    ))
                }
                _ => {}
            }
            if let Some(var) = var {
                self.check_env(scope, &field, &var)?;
            }
        }
        Ok(())
    }

    /// Checks a synced table posted to the API.
    pub fn check_table(&self, t: &TableConfig) -> Result<(), ConfigError> {
        let scope = format!("table {}", t.name.as_deref().unwrap_or(&t.target));
        self.check_location(&scope, "source", &t.source)?;
        self.check_storage_options(&scope, &t.source, &t.storage_options)
    }

    /// Checks an ingest posted to the API.
    pub fn check_ingest(&self, i: &IngestConfig) -> Result<(), ConfigError> {
        let scope = format!("ingest {}", i.name.as_deref().unwrap_or(&i.topic));
        // A malformed list is a plain mistake, told as validation tells it.
        for b in i.checked_brokers(&scope)? {
            if !self.brokers.contains(&b.to_ascii_lowercase()) {
                return Err(refused(
                    &scope,
                    "brokers",
                    format!("{b} is not among [api.policy] brokers nor used by the config file's ingests"),
                ));
            }
        }
        self.check_location(&scope, "table", &i.table)?;
        if let Some(dl) = &i.dead_letter_table {
            self.check_location(&scope, "dead_letter_table", dl)?;
        }
        self.check_storage_options(&scope, &i.table, &i.storage_options)?;
        if let Some(path) = &i.schema {
            self.check_local(&scope, "schema", path)?;
        }
        if let Some(path) = &i.ssl_ca_location {
            self.check_local(&scope, "ssl_ca_location", path)?;
        }
        if let Some(var) = &i.sasl_password_env {
            self.check_env(&scope, "sasl_password_env", var)?;
        }
        let protocol = i.security_protocol.as_deref().unwrap_or("PLAINTEXT");
        if protocol == "SASL_PLAINTEXT"
            && i.sasl_mechanism.as_deref().unwrap_or("SCRAM-SHA-512") == "PLAIN"
            && !self.sasl_plain_without_tls
        {
            return Err(refused(
                &scope,
                "security_protocol",
                "SASL PLAIN sends the password in the clear without TLS; use SASL_SSL, or allow it with [api.policy] sasl_plain_without_tls = true",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_text: &str, tables: &[TableConfig], ingests: &[IngestConfig]) -> ApiPolicy {
        let section: PolicySection = toml::from_str(toml_text).unwrap();
        section.validate(tables, ingests, ["PG_PASSWORD_FOR_DAEMON".to_string()]).unwrap()
    }

    fn table(source: &str, options: &[(&str, &str)]) -> TableConfig {
        let mut t = TableConfig::new(source, "public.t", &["id"], "triggered");
        t.storage_options = options.iter().map(|(k, v)| (k.to_string(), OptionValue::Text(v.to_string()))).collect();
        t
    }

    fn rule(r: Result<(), ConfigError>) -> (String, String) {
        match r {
            Err(ConfigError::Refused { field, rule, .. }) => (field, rule),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_policy_refuses_variables_files_and_endpoints_but_allows_the_files_buckets() {
        let file_table = table("s3://lake/orders", &[("aws_endpoint", "http://minio.internal:9000/")]);
        let p = policy("", &[file_table], &[]);
        p.check_table(&table("s3://lake/customers", &[("aws_endpoint", "http://MINIO.internal:9000")])).unwrap();
        let (field, why) = rule(p.check_table(&table(
            "s3://lake/customers",
            &[("aws_endpoint", "http://minio.internal:9000"), ("aws_access_key_id_env", "LAKESYNC_PG_PASSWORD")],
        )));
        assert_eq!(field, "storage_options.aws_access_key_id_env");
        assert!(why.contains("daemon's own"), "{why}");
        let (field, _) = rule(p.check_table(&table("s3://lake/c", &[("aws_secret_access_key_env", "HOME")])));
        assert_eq!(field, "storage_options.aws_secret_access_key_env");
        let (field, why) = rule(p.check_table(&table("s3://lake/c", &[("aws_endpoint", "http://attacker:80")])));
        assert_eq!(field, "storage_options.aws_endpoint");
        assert!(why.contains("endpoints"), "{why}");
        let (field, _) = rule(p.check_table(&table("s3://other-bucket/c", &[])));
        assert_eq!(field, "source");
        let (field, _) = rule(p.check_table(&table("/var/lib/anything", &[])));
        assert_eq!(field, "source");
        for key in [
            "aws_container_credentials_full_uri",
            "aws_container_authorization_token_file",
            "aws_web_identity_token_file",
            "aws_endpoint_url_sts",
            "aws_allow_invalid_certificates",
            "aws_proxy_url",
        ] {
            let (field, why) = rule(p.check_table(&table("s3://lake/c", &[(key, "x")])));
            assert_eq!(field, format!("storage_options.{key}"));
            assert!(why.contains("config file"), "{why}");
        }
    }

    #[test]
    fn a_policy_names_variables_prefixes_locations_and_local_roots() {
        let p = policy(
            "env = [\"LAKE_*\", \"ONE\"]\nlocations = [\"s3://shared/raw\"]\nlocal_roots = [\"/data/delta\"]\n\
             endpoints = [\"http://127.0.0.1:9000\"]",
            &[],
            &[],
        );
        p.check_table(&table(
            "s3://shared/raw/t",
            &[("aws_endpoint", "http://127.0.0.1:9000"), ("aws_secret_access_key_env", "LAKE_SECRET")],
        ))
        .unwrap();
        p.check_table(&table("s3://shared/raw/t", &[("aws_access_key_id_env", "ONE")])).unwrap();
        rule(p.check_table(&table("s3://shared/raw/t", &[("aws_access_key_id_env", "ONE_MORE")])));
        rule(p.check_table(&table("s3://shared/rawer/t", &[])));
        rule(p.check_table(&table("s3://shared/raw/t", &[("aws_access_key_id_env", "PG_PASSWORD_FOR_DAEMON")])));
        p.check_table(&table("/data/delta/orders", &[])).unwrap();
        p.check_table(&table("file:///data/delta/orders", &[])).unwrap();
        rule(p.check_table(&table("/data/delta/../../etc", &[])));
        rule(p.check_table(&table("/data/deltas/orders", &[])));
        rule(p.check_table(&table("data/delta/orders", &[])));
    }

    #[test]
    fn an_ingest_reaches_only_allowed_brokers_files_and_variables_and_never_sends_plain_passwords_in_clear() {
        let mut file_ingest = IngestConfig::new(vec!["kafka-1:9092".into()], "events", "s3://lake/events");
        file_ingest.sasl_password_env = Some("KAFKA_PASSWORD".into());
        let p = policy("env = [\"KAFKA_PASSWORD\"]\nlocal_roots = [\"/etc/lakesync\"]", &[], &[file_ingest]);
        let mut i = IngestConfig::new(vec!["kafka-1:9092".into()], "clicks", "s3://lake/clicks");
        p.check_ingest(&i).unwrap();
        i.brokers = vec!["evil:9092".into()];
        assert_eq!(rule(p.check_ingest(&i)).0, "brokers");
        i.brokers = vec!["KAFKA-1:9092".into()];
        i.schema = Some("/root/.ssh/id_rsa".into());
        assert_eq!(rule(p.check_ingest(&i)).0, "schema");
        i.schema = Some("/etc/lakesync/clicks.json".into());
        i.ssl_ca_location = Some("/var/run/secrets/kubernetes.io/serviceaccount/token".into());
        assert_eq!(rule(p.check_ingest(&i)).0, "ssl_ca_location");
        i.ssl_ca_location = None;
        i.security_protocol = Some("SASL_PLAINTEXT".into());
        i.sasl_mechanism = Some("PLAIN".into());
        i.sasl_password_env = Some("KAFKA_PASSWORD".into());
        let (field, why) = rule(p.check_ingest(&i));
        assert_eq!(field, "security_protocol");
        assert!(why.contains("sasl_plain_without_tls"), "{why}");
        i.security_protocol = Some("SASL_SSL".into());
        p.check_ingest(&i).unwrap();
        i.sasl_password_env = Some("AWS_SECRET_ACCESS_KEY".into());
        assert_eq!(rule(p.check_ingest(&i)).0, "sasl_password_env");
    }
}
