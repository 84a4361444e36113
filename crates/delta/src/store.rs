//! Object stores: the store behind a table URI, configured the way each cloud's own tools are.
//!
//! Where a setting comes from, lowest precedence first:
//! 1. the cloud's standard environment variables (`AWS_*`, `AZURE_*`, `GOOGLE_*`), read through
//!    the `object_store` builders' `from_env` (the kernel's `store_from_url_opts` ignores the
//!    environment);
//! 2. for S3 without keys in the environment or the options: the shared AWS files
//!    (`~/.aws/credentials`, `~/.aws/config`, profile `AWS_PROFILE` or `default`), static keys,
//!    region and endpoint only; web identity, container and instance credentials come after,
//!    from `object_store` itself;
//! 3. the table's `storage_options` (TOML, `--storage-option`, `POST`), whose `*_env` keys name
//!    an environment variable holding the value.
//!
//! Invariants: a secret is never taken from a config file or a command line (the options
//! refuse secret keys given inline), never printed (`Debug` shows keys only) and never part of
//! an error; unknown option keys are refused, not dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use delta_kernel::object_store;
use delta_kernel::object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use delta_kernel::object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use delta_kernel::object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use delta_kernel::object_store::DynObjectStore;
use url::Url;

use crate::DeltaError;

/// The kinds of store a table URI can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A local path or `file://` URI.
    Local,
    /// `s3://` or `s3a://` (AWS S3 and S3-compatible stores).
    S3,
    /// `abfss://`, `abfs://`, `az://`, `azure://`, `adl://` (Azure Blob Storage / ADLS Gen2).
    Azure,
    /// `gs://` (Google Cloud Storage).
    Gcs,
}

impl StoreKind {
    /// The store a table URL names, or an error naming the scheme.
    pub fn of(url: &Url) -> Result<Self, String> {
        match url.scheme() {
            "file" => Ok(StoreKind::Local),
            "s3" | "s3a" => Ok(StoreKind::S3),
            "abfss" | "abfs" | "az" | "azure" | "adl" => Ok(StoreKind::Azure),
            "gs" => Ok(StoreKind::Gcs),
            other => Err(format!(
                "unsupported URI scheme {other:?}: expected a local path, file://, s3://, s3a://, abfss://, az:// or gs://"
            )),
        }
    }

    /// The store a table location names: a path (or `file://`) is local; one letter before
    /// `:` is a Windows drive, not a scheme.
    pub fn of_location(uri: &str) -> Result<Self, String> {
        match Url::parse(uri) {
            Ok(url) if url.scheme().len() > 1 => Self::of(&url),
            _ => Ok(StoreKind::Local),
        }
    }

    /// The environment-variable prefix its credentials are read from.
    fn env_prefix(self) -> &'static str {
        match self {
            StoreKind::Local => "",
            StoreKind::S3 => "AWS_",
            StoreKind::Azure => "AZURE_",
            StoreKind::Gcs => "GOOGLE_",
        }
    }
}

/// Resolved per-table store options (`*_env` indirections already read). Values may be
/// secrets: `Debug` prints the keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StorageOptions(BTreeMap<String, String>);

impl std::fmt::Debug for StorageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl StorageOptions {
    /// Checks and resolves the options of the table at `uri` as written in a config file, on
    /// a command line or in an API call: each key must be one the table's store knows; a key
    /// ending in `_env` names the environment variable that holds the value of the key
    /// without the suffix; secret keys are accepted only that way.
    pub fn resolve(
        uri: &str,
        written: &BTreeMap<String, String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        if written.is_empty() {
            return Ok(Self::default());
        }
        let kind = StoreKind::of_location(uri)?;
        if kind == StoreKind::Local {
            return Err(
                "storage_options apply to object-store sources (s3://, abfss://, gs://), not local paths".into()
            );
        }
        let mut resolved = BTreeMap::new();
        for (key, value) in written {
            let (name, value, from_env) = match key.strip_suffix("_env") {
                Some(name) => {
                    let value = env(value).ok_or_else(|| {
                        format!("storage option {key} names {value}, which is not set in the environment")
                    })?;
                    (name, value, true)
                }
                None => (key.as_str(), value.clone(), false),
            };
            // Also validates the key for this store.
            if is_secret(kind, name)? && !from_env {
                return Err(format!(
                    "storage option {key} is a secret and cannot be written in the configuration: \
                     set {key}_env = \"VARIABLE\" (the variable holding it), or the store's standard \
                     environment variable ({}...)",
                    kind.env_prefix()
                ));
            }
            resolved.insert(name.to_string(), value);
        }
        Ok(Self(resolved))
    }

    /// Options from already-resolved pairs (tests, benchmarks).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    pub(crate) fn pairs(&self) -> Vec<(String, String)> {
        self.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Whether no option is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a storage option does, for deciding who may set it (see the engine's API policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionUse {
    /// A plain setting of the store (region, bucket, checksums, timeouts, `allow_http`).
    Setting,
    /// A credential the store signs or authenticates with (a key id, a secret, a token).
    Credential,
    /// Where requests go: the store's endpoint (`aws_endpoint`, `azure_storage_endpoint`,
    /// `google_base_url`).
    Endpoint,
    /// Reaches beyond the table: a credential provider (container or instance metadata
    /// endpoints, web identity, STS, Azure CLI or MSI), a local file (token files, service
    /// account files), a proxy, or TLS verification switched off.
    Host,
}

/// What option `key` (without any `_env` suffix) does for the table at `uri`; an error
/// names a key the store does not know. Every key not known to be a plain setting, a
/// credential or an endpoint is [`OptionUse::Host`], so a key a newer `object_store` adds is
/// refused where only plain settings are allowed.
pub fn option_use(uri: &str, key: &str) -> Result<OptionUse, String> {
    let kind = StoreKind::of_location(uri)?;
    let canonical = canonical_key(kind, key)?;
    if is_secret(kind, key)? {
        return Ok(OptionUse::Credential);
    }
    Ok(match canonical.as_str() {
        "aws_access_key_id" | "azure_storage_client_id" | "azure_storage_tenant_id" => OptionUse::Credential,
        "aws_endpoint" | "aws_endpoint_url_s3" | "azure_storage_endpoint" | "google_base_url" => OptionUse::Endpoint,
        "aws_region"
        | "aws_default_region"
        | "aws_bucket"
        | "aws_virtual_hosted_style_request"
        | "aws_s3_express"
        | "aws_unsigned_payload"
        | "aws_checksum_algorithm"
        | "aws_skip_signature"
        | "aws_copy_if_not_exists"
        | "aws_conditional_put"
        | "aws_disable_tagging"
        | "aws_disable_bulk_delete"
        | "aws_request_payer"
        | "aws_server_side_encryption"
        | "aws_sse_kms_key_id"
        | "aws_sse_bucket_key_enabled"
        | "azure_storage_account_name"
        | "azure_container_name"
        | "azure_use_fabric_endpoint"
        | "azure_skip_signature"
        | "azure_disable_tagging"
        | "google_bucket"
        | "google_skip_signature"
        | "allow_http"
        | "connect_timeout"
        | "timeout"
        | "read_timeout"
        | "pool_idle_timeout"
        | "pool_max_idle_per_host"
        | "http1_only"
        | "http2_only"
        | "http2_keep_alive_interval"
        | "http2_keep_alive_timeout"
        | "http2_keep_alive_while_idle"
        | "http2_max_frame_size"
        | "randomize_addresses"
        | "user_agent"
        | "default_content_type" => OptionUse::Setting,
        _ => OptionUse::Host,
    })
}

/// The name the store's builder knows `key` by (`aws_endpoint_url` is `aws_endpoint`); an
/// error names a key the store does not know.
fn canonical_key(kind: StoreKind, key: &str) -> Result<String, String> {
    let unknown = |_| format!("unknown storage option {key:?} for {kind:?} sources");
    Ok(match kind {
        StoreKind::Local => return Err(format!("unknown storage option {key:?} for local paths")),
        StoreKind::S3 => key.parse::<AmazonS3ConfigKey>().map_err(unknown)?.as_ref().to_string(),
        StoreKind::Azure => key.parse::<AzureConfigKey>().map_err(unknown)?.as_ref().to_string(),
        StoreKind::Gcs => key.parse::<GoogleConfigKey>().map_err(unknown)?.as_ref().to_string(),
    })
}

/// Whether `key` names a secret for this store; an error names a key the store does not know.
fn is_secret(kind: StoreKind, key: &str) -> Result<bool, String> {
    let canonical = canonical_key(kind, key)?;
    Ok(matches!(
        canonical.as_str(),
        "aws_secret_access_key"
            | "aws_session_token"
            | "aws_sse_customer_key_base64"
            | "azure_storage_account_key"
            | "azure_storage_sas_key"
            | "azure_storage_client_secret"
            | "azure_storage_token"
            | "azure_storage_encryption_key"
            | "azure_fabric_session_token"
            | "google_service_account_key"
            | "google_bearer_token"
    ))
}

/// Whether `store` refuses a second create-if-absent write of `path` (a probe object, deleted
/// after): Delta commits are exclusive only through it. `Err` when the probe itself could not
/// write (no permission, store down): inconclusive.
pub(crate) async fn honours_create(
    store: &dyn object_store::ObjectStore,
    path: &object_store::path::Path,
) -> Result<bool, object_store::Error> {
    use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
    let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
    store.put_opts(path, PutPayload::from_static(b"1"), create()).await?;
    let second = store.put_opts(path, PutPayload::from_static(b"2"), create()).await;
    let _ = store.delete(path).await;
    match second {
        Err(object_store::Error::AlreadyExists { .. }) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The table URL of a path or URI, as a directory (ending in `/`, so log paths join under
/// it). `s3a://` is kept: the store builders read it.
pub fn table_url(uri: &str) -> Result<Url, DeltaError> {
    let mut url =
        delta_kernel::try_parse_uri(uri).map_err(|source| DeltaError::Open { uri: uri.to_string(), source })?;
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Builds the object store for the table at `url`.
pub fn build_store(uri: &str, url: &Url, options: &StorageOptions) -> Result<Arc<DynObjectStore>, DeltaError> {
    let env: Vec<(String, String)> =
        std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect();
    build_store_with(uri, url, options, &env, &shared_aws_files)
}

/// [`build_store`] with the environment and the shared AWS files given (tests).
fn build_store_with(
    uri: &str,
    url: &Url,
    options: &StorageOptions,
    env: &[(String, String)],
    aws_files: &dyn Fn(Env<'_>) -> AwsProfile,
) -> Result<Arc<DynObjectStore>, DeltaError> {
    let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let bad = |message: String| DeltaError::Store { uri: uri.to_string(), message };
    let kind = StoreKind::of(url).map_err(bad)?;
    let store: Arc<DynObjectStore> = match kind {
        StoreKind::Local => {
            if !options.is_empty() {
                return Err(bad("storage_options apply to object-store sources, not local paths".into()));
            }
            delta_kernel_default_engine::storage::store_from_url(url)
                .map_err(|source| DeltaError::Open { uri: uri.to_string(), source })?
        }
        StoreKind::S3 => {
            let with = |b: AmazonS3Builder, k: AmazonS3ConfigKey, v: String| b.with_config(k, v);
            let mut builder = configure(AmazonS3Builder::new(), with, env_pairs(env, "AWS_"), false).map_err(bad)?;
            let has = |key: &str| var(&key.to_ascii_uppercase()).is_some() || options.0.contains_key(key);
            let profile = aws_files(&var);
            if !has("aws_access_key_id") {
                for (key, value) in profile.credentials {
                    builder =
                        builder.with_config(key.parse().map_err(|_| bad(format!("AWS profile key {key}")))?, value);
                }
            }
            if !has("aws_region") && !has("aws_default_region") {
                if let Some(region) = profile.region {
                    builder = builder.with_config(AmazonS3ConfigKey::Region, region);
                }
            }
            if !has("aws_endpoint_url") && !has("aws_endpoint") {
                if let Some(endpoint) = profile.endpoint {
                    builder = builder.with_config(AmazonS3ConfigKey::Endpoint, endpoint);
                }
            }
            let builder = configure(builder, with, options.pairs(), true).map_err(bad)?;
            Arc::new(builder.with_url(url.as_str()).build().map_err(|e| bad(e.to_string()))?)
        }
        StoreKind::Azure => {
            let with = |b: MicrosoftAzureBuilder, k: AzureConfigKey, v: String| b.with_config(k, v);
            let builder =
                configure(MicrosoftAzureBuilder::new(), with, env_pairs(env, "AZURE_"), false).map_err(bad)?;
            let builder = configure(builder, with, options.pairs(), true).map_err(bad)?;
            Arc::new(builder.with_url(url.as_str()).build().map_err(|e| bad(e.to_string()))?)
        }
        StoreKind::Gcs => {
            let with = |b: GoogleCloudStorageBuilder, k: GoogleConfigKey, v: String| b.with_config(k, v);
            let builder =
                configure(GoogleCloudStorageBuilder::new(), with, env_pairs(env, "GOOGLE_"), false).map_err(bad)?;
            let builder = configure(builder, with, options.pairs(), true).map_err(bad)?;
            Arc::new(builder.with_url(url.as_str()).build().map_err(|e| bad(e.to_string()))?)
        }
    };
    Ok(store)
}

/// The environment variables with `prefix`, as lower-case option keys (what the builders'
/// `from_env` does).
/// Gives `pairs` to a store builder through its `with_config`: keys it does not know are
/// skipped (`strict = false`: the environment holds other tools' variables too) or refused
/// (the table's options).
fn configure<B, K: std::str::FromStr>(
    builder: B,
    with_config: impl Fn(B, K, String) -> B,
    pairs: Vec<(String, String)>,
    strict: bool,
) -> Result<B, String> {
    let mut builder = builder;
    for (key, value) in pairs {
        match key.parse() {
            Ok(k) => builder = with_config(builder, k, value),
            Err(_) if strict => return Err(format!("unknown storage option {key}")),
            Err(_) => {}
        }
    }
    Ok(builder)
}

fn env_pairs(env: &[(String, String)], prefix: &str) -> Vec<(String, String)> {
    env.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect()
}

/// Reads one environment variable (the process's, or a test's).
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// What the shared AWS files say for the active profile.
#[derive(Debug, Default, PartialEq)]
struct AwsProfile {
    /// `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`.
    credentials: Vec<(String, String)>,
    region: Option<String>,
    endpoint: Option<String>,
}

/// Reads `~/.aws/credentials` and `~/.aws/config` (or `AWS_SHARED_CREDENTIALS_FILE` and
/// `AWS_CONFIG_FILE`) for the profile `AWS_PROFILE` (default `default`).
fn shared_aws_files(env: Env<'_>) -> AwsProfile {
    let home = env("HOME").unwrap_or_default();
    let read = |var: &str, default: &str| {
        let path = env(var).unwrap_or_else(|| format!("{home}/.aws/{default}"));
        std::fs::read_to_string(path).unwrap_or_default()
    };
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    parse_aws_files(&read("AWS_SHARED_CREDENTIALS_FILE", "credentials"), &read("AWS_CONFIG_FILE", "config"), &profile)
}

/// The profile's settings from the two files' text. In `credentials` sections are named
/// `[name]`; in `config`, `[profile name]` (and `[default]`).
fn parse_aws_files(credentials: &str, config: &str, profile: &str) -> AwsProfile {
    let section = |text: &str, names: &[String]| -> BTreeMap<String, String> {
        let mut inside = false;
        let mut found = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = names.iter().any(|n| n == name.trim());
                continue;
            }
            if let (true, Some((k, v))) = (inside, line.split_once('=')) {
                found.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        found
    };
    let creds = section(credentials, &[profile.to_string()]);
    let mut conf = section(config, &[format!("profile {profile}")]);
    if profile == "default" {
        conf.extend(section(config, &["default".to_string()]));
    }
    // Keys may also be in the config file; the credentials file wins.
    let mut keys = conf.clone();
    keys.extend(creds);
    let mut result = AwsProfile::default();
    if keys.contains_key("aws_access_key_id") && keys.contains_key("aws_secret_access_key") {
        for k in ["aws_access_key_id", "aws_secret_access_key", "aws_session_token"] {
            if let Some(v) = keys.get(k) {
                result.credentials.push((k.to_string(), v.clone()));
            }
        }
    }
    result.region = conf.get("region").cloned();
    result.endpoint = conf.get("endpoint_url").cloned();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
        PutMultipartOptions, PutOptions, PutPayload, PutResult,
    };

    /// An S3-compatible store that ignores `If-None-Match` (some MinIO/Ceph setups): every
    /// create-if-absent write overwrites. (No S3 server installable here behaves so.)
    #[derive(Debug, Default)]
    struct IgnoresCreate(InMemory);

    impl std::fmt::Display for IgnoresCreate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("IgnoresCreate")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for IgnoresCreate {
        async fn put_opts(&self, l: &Path, p: PutPayload, mut o: PutOptions) -> object_store::Result<PutResult> {
            if o.mode == PutMode::Create {
                o.mode = PutMode::Overwrite;
            }
            self.0.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(
            &self,
            l: &Path,
            o: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.0.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &Path, o: GetOptions) -> object_store::Result<GetResult> {
            self.0.get_opts(l, o).await
        }
        fn delete_stream(
            &self,
            l: futures_util::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<Path>> {
            self.0.delete_stream(l)
        }
        fn list(&self, p: Option<&Path>) -> futures_util::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.0.list(p)
        }
        async fn list_with_delimiter(&self, p: Option<&Path>) -> object_store::Result<ListResult> {
            self.0.list_with_delimiter(p).await
        }
        async fn copy_opts(&self, f: &Path, t: &Path, o: CopyOptions) -> object_store::Result<()> {
            self.0.copy_opts(f, t, o).await
        }
    }

    #[tokio::test]
    async fn a_store_that_ignores_create_if_absent_is_found_and_the_probe_leaves_nothing() {
        let path = Path::from("table/_lakesync_put_probe_x");
        let honest = InMemory::new();
        assert!(honours_create(&honest, &path).await.unwrap());
        let lax = IgnoresCreate::default();
        assert!(!honours_create(&lax, &path).await.unwrap());
        use futures_util::TryStreamExt;
        for store in [&honest as &dyn ObjectStore, &lax] {
            let left: Vec<ObjectMeta> = store.list(None).try_collect().await.unwrap();
            assert!(left.is_empty(), "{left:?}");
        }
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    fn written(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn secrets_written_inline_are_refused_and_env_indirection_reads_them() {
        let env = env_of(&[("LAKE_SECRET", "s3cr3t")]);
        let inline = StorageOptions::resolve("s3://lake/t", &written(&[("aws_secret_access_key", "x")]), &env);
        let message = inline.unwrap_err();
        assert!(message.contains("aws_secret_access_key_env"), "{message}");
        assert!(!message.contains('x') || !message.contains("\"x\""), "{message}");
        let resolved =
            StorageOptions::resolve("s3://lake/t", &written(&[("aws_secret_access_key_env", "LAKE_SECRET")]), &env)
                .unwrap();
        assert_eq!(resolved, StorageOptions::from_pairs([("aws_secret_access_key", "s3cr3t")]));
        assert_eq!(format!("{resolved:?}"), "{\"aws_secret_access_key\"}");
        let missing = StorageOptions::resolve("s3://lake/t", &written(&[("aws_session_token_env", "NOPE")]), &env);
        assert!(missing.unwrap_err().contains("NOPE, which is not set"));
    }

    #[test]
    fn unknown_keys_and_options_on_local_paths_are_refused() {
        let env = env_of(&[]);
        let typo = StorageOptions::resolve("s3://lake/t", &written(&[("aws_endpont", "http://x")]), &env);
        assert!(typo.unwrap_err().contains("unknown storage option \"aws_endpont\""));
        let azure_key_on_s3 =
            StorageOptions::resolve("s3://lake/t", &written(&[("azure_storage_account_name", "a")]), &env);
        assert!(azure_key_on_s3.is_err());
        let local = StorageOptions::resolve("/lake/t", &written(&[("aws_region", "eu-west-1")]), &env);
        assert!(local.unwrap_err().contains("not local paths"));
        let scheme = StorageOptions::resolve("hdfs://nn/t", &written(&[("region", "x")]), &env);
        assert!(scheme.unwrap_err().contains("unsupported URI scheme \"hdfs\""));
        for (uri, key) in [
            ("gs://bucket/t", "google_service_account"),
            ("abfss://c@acct.dfs.core.windows.net/t", "azure_storage_account_name"),
            ("az://c/t", "use_emulator"),
            ("s3a://bucket/t", "aws_allow_http"),
        ] {
            StorageOptions::resolve(uri, &written(&[(key, "true")]), &env).unwrap();
        }
        let gcs_secret = StorageOptions::resolve("gs://b/t", &written(&[("google_service_account_key", "{}")]), &env);
        assert!(gcs_secret.unwrap_err().contains("is a secret"));
    }

    #[test]
    fn options_that_reach_beyond_the_table_are_told_apart_from_settings_credentials_and_endpoints() {
        for (uri, key, expected) in [
            ("s3://b/t", "aws_region", OptionUse::Setting),
            ("s3://b/t", "aws_allow_http", OptionUse::Setting),
            ("s3://b/t", "aws_access_key_id", OptionUse::Credential),
            ("s3://b/t", "aws_secret_access_key", OptionUse::Credential),
            ("s3://b/t", "aws_endpoint", OptionUse::Endpoint),
            ("s3://b/t", "aws_endpoint_url", OptionUse::Endpoint),
            ("s3://b/t", "aws_container_credentials_full_uri", OptionUse::Host),
            ("s3://b/t", "aws_container_authorization_token_file", OptionUse::Host),
            ("s3://b/t", "aws_web_identity_token_file", OptionUse::Host),
            ("s3://b/t", "aws_endpoint_url_sts", OptionUse::Host),
            ("s3://b/t", "aws_metadata_endpoint", OptionUse::Host),
            ("s3://b/t", "allow_invalid_certificates", OptionUse::Host),
            ("s3://b/t", "aws_proxy_url", OptionUse::Host),
            ("az://c/t", "azure_storage_account_key", OptionUse::Credential),
            ("az://c/t", "azure_storage_endpoint", OptionUse::Endpoint),
            ("az://c/t", "azure_federated_token_file", OptionUse::Host),
            ("az://c/t", "azure_use_azure_cli", OptionUse::Host),
            ("az://c/t", "use_emulator", OptionUse::Host),
            ("gs://b/t", "google_service_account", OptionUse::Host),
            ("gs://b/t", "google_service_account_key", OptionUse::Credential),
        ] {
            assert_eq!(option_use(uri, key), Ok(expected), "{uri} {key}");
        }
        assert!(option_use("s3://b/t", "aws_endpont").unwrap_err().contains("unknown storage option"));
        assert!(option_use("/lake/t", "aws_region").is_err());
    }

    #[test]
    fn every_supported_scheme_builds_its_store_without_network() {
        let env = [("AWS_REGION", "eu-west-1"), ("AZURE_STORAGE_ACCOUNT_NAME", "acct")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let no_files = |_: Env<'_>| AwsProfile::default();
        for uri in [
            "s3://bucket/path/t",
            "s3a://bucket/path/t",
            "abfss://container@acct.dfs.core.windows.net/path/t",
            "az://container/path/t",
            "gs://bucket/path/t",
        ] {
            let url = table_url(uri).unwrap();
            assert!(url.join("_delta_log/").unwrap().path().ends_with("/path/t/_delta_log/"), "{url}");
            let store = build_store_with(uri, &url, &StorageOptions::default(), &env, &no_files)
                .unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert!(!store.to_string().is_empty());
        }
        let gcs_with_bad_credentials = StorageOptions::from_pairs([("google_service_account", "/nonexistent.json")]);
        let url = table_url("gs://bucket/t").unwrap();
        let err = build_store_with("gs://bucket/t", &url, &gcs_with_bad_credentials, &env, &no_files).unwrap_err();
        assert!(matches!(err, DeltaError::Store { .. }), "{err}");
    }

    #[test]
    fn the_shared_aws_files_give_the_profile_keys_region_and_endpoint() {
        let credentials = "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = sd\n\n[lake]\naws_access_key_id=AKLAKE\naws_secret_access_key=sl\naws_session_token=tok\n";
        let config = "[default]\nregion = us-east-1\n[profile lake]\nregion = eu-central-1\nendpoint_url = http://127.0.0.1:9000\n";
        let lake = parse_aws_files(credentials, config, "lake");
        assert_eq!(
            lake.credentials,
            vec![
                ("aws_access_key_id".into(), "AKLAKE".into()),
                ("aws_secret_access_key".into(), "sl".into()),
                ("aws_session_token".into(), "tok".into())
            ]
        );
        assert_eq!(lake.region.as_deref(), Some("eu-central-1"));
        assert_eq!(lake.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        let default = parse_aws_files(credentials, config, "default");
        assert_eq!(default.credentials[0].1, "AKDEFAULT");
        assert_eq!(default.region.as_deref(), Some("us-east-1"));
        assert_eq!(parse_aws_files("", "", "missing"), AwsProfile::default());
    }
}
