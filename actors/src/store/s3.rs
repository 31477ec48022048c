//! `s3://BUCKET`: objects in an S3 bucket (AWS or any S3-compatible server), through the
//! `object_store` crate.
//!
//! Credentials follow the standard AWS chain: a profile named in the URL, then the
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` environment, then the shared config and
//! credentials files (`AWS_PROFILE` or `default`), then web identity, the ECS/EKS container
//! endpoints and the EC2 instance metadata service. `object_store` covers the environment and
//! the last three; [`profile`] covers the shared files, which `object_store` does not read.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsCredential};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, ClientOptions, GetOptions, GetRange,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayloadMut, RetryConfig,
    StaticCredentialProvider, WriteMultipart,
};

use super::blobs::{check_key, Blobs};
use super::{Blob, ByteRange, ByteStream, Result, StoreError};

/// Objects at least this big go up as a multipart upload, in parts of this size; smaller ones
/// in one `PUT`. Memory held per upload is bounded by about `PARTS_IN_FLIGHT + 1` parts.
const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts uploaded concurrently; more buys little on one connection and costs memory.
const PARTS_IN_FLIGHT: usize = 2;

/// How an S3 URL addresses its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Addressing {
    /// Virtual-hosted on AWS (path-style when the bucket name has dots, which breaks TLS
    /// wildcards), path-style on custom endpoints, which rarely have wildcard DNS.
    #[default]
    Auto,
    /// `https://endpoint/BUCKET/key`.
    Path,
    /// `https://BUCKET.endpoint/key`.
    Virtual,
}

/// Where an S3 bucket is and how to reach it, as a store URL says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct S3Options {
    /// The bucket name.
    pub bucket: String,
    /// Key prefix every object lives under, without leading or trailing `/` (empty: the root).
    pub prefix: String,
    /// The region; otherwise `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's, or us-east-1.
    pub region: Option<String>,
    /// A custom endpoint with its scheme (`http://127.0.0.1:9000`); `None` for AWS.
    pub endpoint: Option<String>,
    /// Speak plain HTTP to AWS itself (Nix's `scheme=http` without an endpoint).
    pub plain_http: bool,
    /// The shared-config profile to take credentials and region from.
    pub profile: Option<String>,
    /// Path-style or virtual-hosted requests.
    pub addressing: Addressing,
}

impl S3Options {
    /// `s3://bucket/prefix`, for logs and messages.
    pub fn describe(&self) -> String {
        let mut s = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(ep) = &self.endpoint {
            s.push_str(&format!(" (endpoint {ep})"));
        }
        s
    }
}

/// Objects in an S3 bucket.
#[derive(Debug)]
pub struct S3Blobs {
    store: AmazonS3,
    options: S3Options,
    /// The endpoint requests go to, for error messages.
    endpoint: String,
    /// The region requests are signed for, for error messages.
    region: String,
    /// Set once a listing proved the bucket exists; S3 answers a missing object and a missing
    /// bucket with the same bodiless 404 to `HEAD`, so a miss is only trusted after that.
    bucket_seen: AtomicBool,
}

impl S3Blobs {
    /// Prepares a client for the bucket; nothing is sent until the first request.
    pub fn open(options: &S3Options) -> Result<S3Blobs> {
        S3Blobs::open_in(options, &profile::Env::from_process())
    }

    /// [`S3Blobs::open`] with the AWS files and profile choice given.
    fn open_in(options: &S3Options, env: &profile::Env) -> Result<S3Blobs> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&options.bucket);

        let profile_name = options.profile.clone().or_else(|| env.profile.clone());
        let loaded = match &profile_name {
            Some(name) => profile::load(name, env)?,
            None => profile::load("default", env)?,
        };
        if let (Some(name), None) = (&options.profile, &loaded) {
            return Err(StoreError::Invalid(format!(
                "AWS profile {name:?} is in neither {} nor {}",
                env.credentials_file.display(),
                env.config_file.display()
            )));
        }
        if let (Some(name), None, None) = (&env.profile, &options.profile, &loaded) {
            return Err(StoreError::Invalid(format!(
                "AWS_PROFILE names profile {name:?}, which is in neither {} nor {}",
                env.credentials_file.display(),
                env.config_file.display()
            )));
        }

        // Credentials: a profile named in the URL beats the environment; the environment
        // beats an implicit profile (AWS_PROFILE or default), as in the AWS CLI and SDKs.
        let from_profile = match &loaded {
            Some(p) if options.profile.is_some() || !env.has_static_keys => p.credentials(),
            _ => None,
        };
        match (from_profile, &loaded) {
            (Some(creds), Some(p)) => {
                builder = apply_profile_credentials(builder, creds, &p.name)?;
            }
            (None, Some(p)) if options.profile.is_some() => {
                return Err(StoreError::Invalid(format!(
                    "AWS profile {:?} has no credentials (aws_access_key_id, credential_process, \
                     web_identity_token_file, role_arn or sso settings)",
                    p.name
                )))
            }
            _ => {}
        }

        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        } else if builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .is_none()
        {
            if let Some(region) = loaded.as_ref().and_then(|p| p.get("region")) {
                builder = builder.with_region(region);
            }
        }
        let region = builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".into());

        let env_endpoint = builder
            .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
            .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint));
        let custom = options.endpoint.clone().or(env_endpoint);
        let virtual_hosted = match options.addressing {
            Addressing::Path => false,
            Addressing::Virtual => true,
            Addressing::Auto => custom.is_none() && !options.bucket.contains('.'),
        };
        let base = match custom {
            Some(ep) => ep.trim_end_matches('/').to_owned(),
            None if options.plain_http => format!("http://s3.{region}.amazonaws.com"),
            None => format!("https://s3.{region}.amazonaws.com"),
        };
        let endpoint = if virtual_hosted {
            virtual_host(&base, &options.bucket)?
        } else {
            base
        };
        let allow_http = endpoint.starts_with("http://");
        builder = builder
            .with_endpoint(&endpoint)
            .with_virtual_hosted_style_request(virtual_hosted)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_connect_timeout(Duration::from_secs(5))
                    // A NAR of gigabytes takes as long as it takes; only a stalled
                    // connection is an error.
                    .with_timeout_disabled()
                    .with_read_timeout(Duration::from_secs(60)),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
            });
        let store = builder
            .build()
            .map_err(|e| StoreError::Invalid(format!("cannot use {}: {e}", options.describe())))?;
        Ok(S3Blobs {
            store,
            options: options.clone(),
            endpoint,
            region,
            bucket_seen: AtomicBool::new(false),
        })
    }

    fn path_of(&self, key: &str) -> Result<Path> {
        check_key(key)?;
        self.full_path(key)
    }

    fn full_path(&self, key: &str) -> Result<Path> {
        let full = if self.options.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.options.prefix)
        };
        Path::parse(&full).map_err(|e| StoreError::Invalid(format!("object key {key:?}: {e}")))
    }

    fn url_of(&self, key: &str) -> String {
        match self.options.prefix.as_str() {
            "" => format!("s3://{}/{key}", self.options.bucket),
            p => format!("s3://{}/{p}/{key}", self.options.bucket),
        }
    }

    /// Whether the bucket exists: `Some(false)` only when S3 said so.
    async fn bucket_exists(&self, probe: &Path) -> Option<bool> {
        if self.bucket_seen.load(Ordering::Relaxed) {
            return Some(true);
        }
        // Listing below the missing key is cheap (it matches nothing) and, unlike HEAD,
        // carries an error body that tells a missing bucket from a missing key.
        match self.store.list_with_delimiter(Some(probe)).await {
            Ok(_) => {
                self.bucket_seen.store(true, Ordering::Relaxed);
                Some(true)
            }
            Err(e) if is_no_bucket(&e) => Some(false),
            Err(_) => None,
        }
    }

    /// Turns an `object_store` error into what a user can act on.
    async fn fail(&self, doing: &str, key: &str, e: object_store::Error) -> StoreError {
        if is_no_bucket(&e) {
            return self.no_bucket(e);
        }
        if let object_store::Error::NotFound { .. } = e {
            let probe = self.full_path(key).unwrap_or_default();
            if self.bucket_exists(&probe).await == Some(false) {
                return self.no_bucket(e);
            }
            return StoreError::NotFound(key.into());
        }
        self.classify(doing, &self.url_of(key), e)
    }

    fn no_bucket(&self, e: object_store::Error) -> StoreError {
        StoreError::backend(
            format!(
                "S3 bucket {:?} does not exist at {} (create it, or check the s3:// URL's bucket, region and endpoint)",
                self.options.bucket, self.endpoint
            ),
            e,
        )
    }

    fn classify(&self, doing: &str, what: &str, e: object_store::Error) -> StoreError {
        let text = e.to_string();
        match &e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                let why = if [
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                    "ExpiredToken",
                    "InvalidToken",
                    "TokenRefreshRequired",
                ]
                .iter()
                .any(|code| text.contains(code))
                {
                    "S3 refused the credentials"
                } else {
                    "S3 denied access (the credentials lack permission, or the bucket belongs to someone else)"
                };
                return StoreError::backend(format!("{doing} {what}: {why}"), e);
            }
            _ => {}
        }
        // Requests to the credential endpoints fail when the chain reached its end without
        // finding credentials anywhere else.
        if text.contains("169.254.169.254") || text.contains("169.254.170.2") {
            return StoreError::backend(
                format!(
                    "{doing} {what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, add profile= or a default profile in ~/.aws, or run \
                     where the instance or container metadata service provides a role)"
                ),
                e,
            );
        }
        if let Some(kind) = http_error_kind(&e) {
            if matches!(kind, HttpErrorKind::Connect | HttpErrorKind::Timeout) {
                return StoreError::backend(
                    format!(
                        "{doing} {what}: cannot reach the S3 endpoint {}",
                        self.endpoint
                    ),
                    e,
                );
            }
        }
        if text.contains("PermanentRedirect")
            || text.contains("AuthorizationHeaderMalformed")
            || text.contains("incorrectly configured region")
        {
            return StoreError::backend(
                format!(
                    "{doing} {what}: the bucket is in another region than {:?}; set region= in the s3:// URL",
                    self.region
                ),
                e,
            );
        }
        StoreError::backend(format!("{doing} {what}"), e)
    }

    /// The error for a range that selects nothing, which needs the object's size.
    async fn unsatisfiable(&self, key: &str, range: ByteRange) -> StoreError {
        match self.head(key).await {
            Ok(Some(total)) if range.resolve(total).is_none() => {
                StoreError::RangeNotSatisfiable { total }
            }
            Ok(Some(_)) => StoreError::Invalid(format!("byte range {range:?} of {key}")),
            Ok(None) => StoreError::NotFound(key.into()),
            Err(e) => e,
        }
    }
}

/// S3 said the bucket does not exist. Listings report it in an error that `object_store`
/// does not classify, so the code in the body decides.
fn is_no_bucket(e: &object_store::Error) -> bool {
    e.to_string().contains("NoSuchBucket")
}

/// Puts the bucket in front of an endpoint's host, as virtual-hosted requests need.
fn virtual_host(endpoint: &str, bucket: &str) -> Result<String> {
    let mut url = url::Url::parse(endpoint)
        .map_err(|e| StoreError::Invalid(format!("S3 endpoint {endpoint:?}: {e}")))?;
    let host = url
        .host_str()
        .ok_or_else(|| StoreError::Invalid(format!("S3 endpoint {endpoint:?} has no host")))?;
    let host = format!("{bucket}.{host}");
    url.set_host(Some(&host))
        .map_err(|e| StoreError::Invalid(format!("S3 endpoint {endpoint:?}: {e}")))?;
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// The transport failure behind an error, if that is what it is.
fn http_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return Some(h.kind());
        }
        cur = err.source();
    }
    None
}

fn apply_profile_credentials(
    builder: AmazonS3Builder,
    creds: profile::Credentials,
    name: &str,
) -> Result<AmazonS3Builder> {
    Ok(match creds {
        profile::Credentials::Static {
            key_id,
            secret_key,
            token,
        } => builder.with_credentials(Arc::new(StaticCredentialProvider::new(AwsCredential {
            key_id,
            secret_key,
            token,
        }))),
        profile::Credentials::Process(command) => {
            builder.with_credentials(Arc::new(process::ProcessCredentials::new(command)))
        }
        profile::Credentials::WebIdentity {
            role_arn,
            token_file,
            session_name,
        } => {
            // object_store does web identity itself; it takes the two settings from the
            // environment, so hand them over the same way, before any static keys it saw.
            let mut b = builder
                .with_config(AmazonS3ConfigKey::WebIdentityTokenFile, token_file)
                .with_config(AmazonS3ConfigKey::RoleArn, role_arn);
            if let Some(s) = session_name {
                b = b.with_config(AmazonS3ConfigKey::RoleSessionName, s);
            }
            if b.get_config_value(&AmazonS3ConfigKey::AccessKeyId)
                .is_some()
            {
                return Err(StoreError::Invalid(format!(
                    "AWS profile {name:?} uses web identity, but AWS_ACCESS_KEY_ID is set too; unset one"
                )));
            }
            b
        }
        profile::Credentials::AwsCli => {
            // SSO and assumed roles need STS/SSO clients object_store lacks; the AWS CLI (v2)
            // does both and prints the result in credential_process format.
            builder.with_credentials(Arc::new(process::ProcessCredentials::new(format!(
                "aws configure export-credentials --format process --profile {}",
                shell_quote(name)
            ))))
        }
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Maps a request range to S3's; `None` when it cannot select anything whatever the size.
fn get_range(range: ByteRange) -> Option<GetRange> {
    match range {
        ByteRange::Span { start, end: None } => Some(GetRange::Offset(start)),
        ByteRange::Span {
            start,
            end: Some(end),
        } => (end > start).then_some(GetRange::Bounded(start..end)),
        ByteRange::Last(0) => None,
        ByteRange::Last(n) => Some(GetRange::Suffix(n)),
    }
}

#[async_trait]
impl Blobs for S3Blobs {
    fn describe(&self) -> String {
        self.options.describe()
    }

    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Blob> {
        let path = self.path_of(key)?;
        let range_s3 = match range {
            None => None,
            Some(r) => match get_range(r) {
                Some(g) => Some(g),
                None => return Err(self.unsatisfiable(key, r).await),
            },
        };
        let opts = GetOptions {
            range: range_s3,
            ..GetOptions::default()
        };
        match (self.store.get_opts(&path, opts).await, range) {
            (Ok(res), _) => {
                let total = res.meta.size;
                let span = (res.range.start, res.range.end);
                let stream = res.into_stream().map_err(io::Error::from);
                Ok(Blob {
                    stream: Box::pin(stream),
                    span,
                    total,
                })
            }
            // S3 answers 416 to a range past the end; the caller needs the size with it.
            (Err(e), Some(r)) if !matches!(e, object_store::Error::NotFound { .. }) => {
                match self.unsatisfiable(key, r).await {
                    err @ StoreError::RangeNotSatisfiable { .. } => Err(err),
                    _ => Err(self.fail("reading", key, e).await),
                }
            }
            (Err(e), _) => Err(self.fail("reading", key, e).await),
        }
    }

    async fn put(&self, key: &str, mut data: ByteStream, content_type: &str) -> Result<u64> {
        let path = self.path_of(key)?;
        let attributes: Attributes = [(
            Attribute::ContentType,
            AttributeValue::from(content_type.to_owned()),
        )]
        .into_iter()
        .collect();
        let receiving = |e: io::Error| StoreError::backend(format!("receiving data for {key}"), e);

        // Narinfos and listings are tiny: one PUT. Only what outgrows a part goes multipart.
        let mut first = PutPayloadMut::new();
        let mut n = 0u64;
        while first.content_length() < PART_SIZE {
            match data.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(receiving)?;
                    n += chunk.len() as u64;
                    first.push(chunk);
                }
                None => {
                    let opts = PutOptions {
                        attributes,
                        ..PutOptions::default()
                    };
                    return match self.store.put_opts(&path, first.freeze(), opts).await {
                        Ok(_) => Ok(n),
                        Err(e) => Err(self.fail("writing", key, e).await),
                    };
                }
            }
        }

        let opts = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        let upload = match self.store.put_multipart_opts(&path, opts).await {
            Ok(u) => u,
            Err(e) => return Err(self.fail("writing", key, e).await),
        };
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        for chunk in first.freeze() {
            writer.put(chunk);
        }
        while let Some(chunk) = data.next().await {
            // An error from the source (a failed hash check, a dropped connection) must not
            // leave a truncated object behind: abort, so S3 never assembles the parts.
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(receiving(e));
                }
            };
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(self.fail("writing", key, e).await);
            }
            n += chunk.len() as u64;
            writer.put(chunk);
        }
        match writer.finish().await {
            Ok(_) => Ok(n),
            Err(e) => Err(self.fail("writing", key, e).await),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path_of(key)?;
        match self.store.head(&path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) => match self.fail("checking", key, e).await {
                StoreError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let rel = prefix.trim_end_matches('/');
        if !rel.is_empty() {
            check_key(rel)?;
        }
        let full = match (self.options.prefix.as_str(), rel) {
            ("", r) => r.to_owned(),
            (p, "") => p.to_owned(),
            (p, r) => format!("{p}/{r}"),
        };
        let path = if full.is_empty() {
            None
        } else {
            Some(
                Path::parse(&full)
                    .map_err(|e| StoreError::Invalid(format!("prefix {prefix:?}: {e}")))?,
            )
        };
        let listed = match self.store.list_with_delimiter(path.as_ref()).await {
            Ok(l) => l,
            Err(e) => {
                let what = self.url_of(prefix);
                return Err(if is_no_bucket(&e) {
                    self.no_bucket(e)
                } else {
                    self.classify("listing", &what, e)
                });
            }
        };
        self.bucket_seen.store(true, Ordering::Relaxed);
        let strip = match self.options.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        Ok(listed
            .objects
            .into_iter()
            .filter_map(|m| m.location.as_ref().strip_prefix(&strip).map(str::to_owned))
            .collect())
    }
}

/// AWS shared config and credentials files (`~/.aws/config`, `~/.aws/credentials`).
mod profile {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use crate::store::{Result, StoreError};

    /// Where the files are and what the environment says, read once.
    #[derive(Debug, Clone)]
    pub struct Env {
        /// `AWS_PROFILE` (or the older `AWS_DEFAULT_PROFILE`).
        pub profile: Option<String>,
        /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` are both set.
        pub has_static_keys: bool,
        /// `AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`.
        pub credentials_file: PathBuf,
        /// `AWS_CONFIG_FILE` or `~/.aws/config`.
        pub config_file: PathBuf,
    }

    impl Env {
        pub fn from_process() -> Env {
            let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let home = var("HOME").map(PathBuf::from).unwrap_or_default();
            Env {
                profile: var("AWS_PROFILE").or_else(|| var("AWS_DEFAULT_PROFILE")),
                has_static_keys: var("AWS_ACCESS_KEY_ID").is_some()
                    && var("AWS_SECRET_ACCESS_KEY").is_some(),
                credentials_file: var("AWS_SHARED_CREDENTIALS_FILE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join(".aws/credentials")),
                config_file: var("AWS_CONFIG_FILE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join(".aws/config")),
            }
        }
    }

    /// How a profile obtains credentials.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Credentials {
        /// Keys written in the file.
        Static {
            key_id: String,
            secret_key: String,
            token: Option<String>,
        },
        /// A command that prints them as JSON.
        Process(String),
        /// A role assumed with a web identity token file.
        WebIdentity {
            role_arn: String,
            token_file: String,
            session_name: Option<String>,
        },
        /// SSO or a role assumed from another profile: delegated to the AWS CLI.
        AwsCli,
    }

    /// One profile, its settings merged from both files.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Profile {
        pub name: String,
        settings: BTreeMap<String, String>,
    }

    impl Profile {
        pub fn get(&self, key: &str) -> Option<&str> {
            self.settings
                .get(key)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        }

        /// What the profile says about credentials, if anything.
        pub fn credentials(&self) -> Option<Credentials> {
            if let (Some(id), Some(secret)) = (
                self.get("aws_access_key_id"),
                self.get("aws_secret_access_key"),
            ) {
                return Some(Credentials::Static {
                    key_id: id.into(),
                    secret_key: secret.into(),
                    token: self.get("aws_session_token").map(Into::into),
                });
            }
            if let Some(cmd) = self.get("credential_process") {
                return Some(Credentials::Process(cmd.into()));
            }
            if let (Some(role), Some(file)) =
                (self.get("role_arn"), self.get("web_identity_token_file"))
            {
                return Some(Credentials::WebIdentity {
                    role_arn: role.into(),
                    token_file: file.into(),
                    session_name: self.get("role_session_name").map(Into::into),
                });
            }
            let delegated = [
                "sso_session",
                "sso_start_url",
                "source_profile",
                "credential_source",
            ];
            if delegated.iter().any(|k| self.get(k).is_some()) {
                return Some(Credentials::AwsCli);
            }
            None
        }
    }

    /// Sections of an INI file as the AWS tools read it: `[name]` (credentials file) or
    /// `[profile name]` / `[default]` (config file), `key = value` lines, `#`/`;` comments;
    /// indented lines belong to a nested setting and are skipped.
    pub fn parse(text: &str, config_file: bool) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            if line.starts_with([' ', '\t']) {
                continue;
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with(['#', ';']) {
                continue;
            }
            if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                let section = section.trim();
                current = if !config_file || section == "default" {
                    Some(section.to_owned())
                } else {
                    section
                        .strip_prefix("profile")
                        .filter(|r| r.starts_with([' ', '\t']))
                        .map(|r| r.trim().to_owned())
                };
                continue;
            }
            let (Some(section), Some((k, v))) = (&current, line.split_once('=')) else {
                continue;
            };
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
        out
    }

    /// Merges a profile from both files (the credentials file wins), or `None` when neither
    /// has it. Missing files are fine: most machines have neither.
    pub fn merge(name: &str, credentials: &str, config: &str) -> Option<Profile> {
        let from_config = parse(config, true).remove(name);
        let from_credentials = parse(credentials, false).remove(name);
        if from_config.is_none() && from_credentials.is_none() {
            return None;
        }
        let mut settings = from_config.unwrap_or_default();
        settings.extend(from_credentials.unwrap_or_default());
        Some(Profile {
            name: name.to_owned(),
            settings,
        })
    }

    /// Reads a profile from the files `env` names.
    pub fn load(name: &str, env: &Env) -> Result<Option<Profile>> {
        let read = |p: &PathBuf| match std::fs::read_to_string(p) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(StoreError::backend(
                format!("reading AWS settings from {}", p.display()),
                e,
            )),
        };
        Ok(merge(
            name,
            &read(&env.credentials_file)?,
            &read(&env.config_file)?,
        ))
    }
}

/// Credentials from a command (`credential_process`), cached until they expire.
mod process {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use async_trait::async_trait;
    use object_store::aws::AwsCredential;
    use object_store::CredentialProvider;
    use serde::Deserialize;
    use thiserror::Error;
    use tokio::sync::Mutex;

    /// Refresh this long before the stated expiry, so no request goes out with stale keys.
    const MARGIN: Duration = Duration::from_secs(5 * 60);
    /// How long keys without a readable expiry are reused.
    const UNDATED: Duration = Duration::from_secs(15 * 60);

    #[derive(Debug, Error)]
    enum ProcessError {
        #[error("running credential_process {command:?}: {source}")]
        Spawn {
            command: String,
            source: std::io::Error,
        },
        #[error("credential_process {command:?} failed ({status}): {stderr}")]
        Failed {
            command: String,
            status: std::process::ExitStatus,
            stderr: String,
        },
        #[error("credential_process {command:?} printed unusable JSON: {source}")]
        Json {
            command: String,
            source: serde_json::Error,
        },
        #[error("credential_process {command:?} did not finish within a minute")]
        Timeout { command: String },
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Output {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
        expiration: Option<String>,
    }

    /// Runs the command when there are no fresh credentials.
    #[derive(Debug)]
    pub struct ProcessCredentials {
        command: String,
        cache: Mutex<Option<(Arc<AwsCredential>, SystemTime)>>,
    }

    impl ProcessCredentials {
        pub fn new(command: String) -> ProcessCredentials {
            ProcessCredentials {
                command,
                cache: Mutex::new(None),
            }
        }

        async fn run(&self) -> Result<(AwsCredential, SystemTime), ProcessError> {
            let command = self.command.clone();
            let child = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(Duration::from_secs(60), child)
                .await
                .map_err(|_| ProcessError::Timeout {
                    command: command.clone(),
                })?
                .map_err(|source| ProcessError::Spawn {
                    command: command.clone(),
                    source,
                })?;
            if !out.status.success() {
                return Err(ProcessError::Failed {
                    command,
                    status: out.status,
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            let parsed: Output = serde_json::from_slice(&out.stdout)
                .map_err(|source| ProcessError::Json { command, source })?;
            let now = SystemTime::now();
            let refresh = parsed
                .expiration
                .as_deref()
                .and_then(parse_expiry)
                .map(|t| t.checked_sub(MARGIN).unwrap_or(now))
                .unwrap_or(now + UNDATED);
            Ok((
                AwsCredential {
                    key_id: parsed.access_key_id,
                    secret_key: parsed.secret_access_key,
                    token: parsed.session_token,
                },
                refresh,
            ))
        }
    }

    /// An ISO 8601 UTC time as the AWS tools print it (`Z` or `+00:00`).
    pub fn parse_expiry(s: &str) -> Option<SystemTime> {
        let s = s.trim();
        let s = s
            .strip_suffix("+00:00")
            .map_or_else(|| s.to_owned(), |b| format!("{b}Z"));
        humantime::parse_rfc3339_weak(&s).ok()
    }

    #[async_trait]
    impl CredentialProvider for ProcessCredentials {
        type Credential = AwsCredential;

        async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
            let mut cache = self.cache.lock().await;
            if let Some((cred, refresh)) = &*cache {
                if SystemTime::now() < *refresh {
                    return Ok(cred.clone());
                }
            }
            let (cred, refresh) = self.run().await.map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
            let cred = Arc::new(cred);
            *cache = Some((cred.clone(), refresh));
            Ok(cred)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_merge_both_files() {
        let credentials = "[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n\n[work]\n# comment\naws_access_key_id = W1\naws_secret_access_key = W2\naws_session_token = W3\n";
        let config = "[default]\nregion = eu-west-1\n[profile work]\nregion=us-west-2\ns3 =\n  addressing_style = path\n[profile proc]\ncredential_process = /bin/echo {}\n[profile sso]\nsso_session = corp\n[profile web]\nrole_arn = arn:aws:iam::1:role/r\nweb_identity_token_file = /t\n[sso-session corp]\nsso_region = x\n";
        let d = profile::merge("default", credentials, config).unwrap();
        assert_eq!(d.get("region"), Some("eu-west-1"));
        assert_eq!(
            d.credentials(),
            Some(profile::Credentials::Static {
                key_id: "AK".into(),
                secret_key: "SK".into(),
                token: None
            })
        );
        let w = profile::merge("work", credentials, config).unwrap();
        assert_eq!(w.get("region"), Some("us-west-2"));
        assert!(matches!(
            w.credentials(),
            Some(profile::Credentials::Static { token: Some(t), .. }) if t == "W3"
        ));
        assert_eq!(
            w.get("addressing_style"),
            None,
            "nested settings are skipped"
        );
        assert_eq!(
            profile::merge("proc", credentials, config)
                .unwrap()
                .credentials(),
            Some(profile::Credentials::Process("/bin/echo {}".into()))
        );
        assert_eq!(
            profile::merge("sso", credentials, config)
                .unwrap()
                .credentials(),
            Some(profile::Credentials::AwsCli)
        );
        assert!(matches!(
            profile::merge("web", credentials, config).unwrap().credentials(),
            Some(profile::Credentials::WebIdentity { token_file, .. }) if token_file == "/t"
        ));
        assert!(profile::merge("corp", credentials, config).is_none());
        assert!(profile::merge("nope", credentials, config).is_none());
    }

    #[tokio::test]
    async fn credential_process_output_is_read() {
        use object_store::CredentialProvider;
        let ok = process::ProcessCredentials::new(
            r#"printf '{"Version":1,"AccessKeyId":"AK","SecretAccessKey":"SK","SessionToken":"T","Expiration":"2099-01-01T00:00:00Z"}'"#.into(),
        );
        let c = ok.get_credential().await.unwrap();
        assert_eq!((c.key_id.as_str(), c.token.as_deref()), ("AK", Some("T")));
        let failing = process::ProcessCredentials::new("echo nope >&2; exit 3".into());
        let e = failing.get_credential().await.unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn expiry_times_parse() {
        assert!(process::parse_expiry("2030-01-02T03:04:05Z").is_some());
        assert!(process::parse_expiry("2030-01-02T03:04:05+00:00").is_some());
        assert!(process::parse_expiry("tomorrow").is_none());
    }

    #[test]
    fn ranges_map_to_s3() {
        assert_eq!(
            get_range(ByteRange::span(5, None)),
            Some(GetRange::Offset(5))
        );
        assert_eq!(
            get_range(ByteRange::span(5, Some(9))),
            Some(GetRange::Bounded(5..9))
        );
        assert_eq!(get_range(ByteRange::span(5, Some(5))), None);
        assert_eq!(get_range(ByteRange::Last(3)), Some(GetRange::Suffix(3)));
        assert_eq!(get_range(ByteRange::Last(0)), None);
    }

    fn local(bucket: &str) -> S3Options {
        S3Options {
            bucket: bucket.into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            ..S3Options::default()
        }
    }

    fn files(credentials: &str, config: &str) -> (tempfile::TempDir, profile::Env) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("credentials"), credentials).unwrap();
        std::fs::write(dir.path().join("config"), config).unwrap();
        let env = profile::Env {
            profile: None,
            has_static_keys: false,
            credentials_file: dir.path().join("credentials"),
            config_file: dir.path().join("config"),
        };
        (dir, env)
    }

    #[test]
    fn profiles_are_found_or_named_in_the_error() {
        let (_dir, env) = files(
            "[work]\naws_access_key_id = A\naws_secret_access_key = S\n",
            "[profile bare]\nregion = eu-west-3\n",
        );
        let with = |p: &str| S3Options {
            profile: Some(p.into()),
            region: None,
            ..local("b")
        };
        assert!(S3Blobs::open_in(&with("work"), &env).is_ok());
        let e = S3Blobs::open_in(&with("absent"), &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"absent\"") && e.contains("credentials"), "{e}");
        let e = S3Blobs::open_in(&with("bare"), &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no credentials"), "{e}");
        let env = profile::Env {
            profile: Some("gone".into()),
            ..env
        };
        let e = S3Blobs::open_in(&local("b"), &env).unwrap_err().to_string();
        assert!(e.contains("AWS_PROFILE"), "{e}");
    }

    #[test]
    fn regions_come_from_the_url_then_the_profile() {
        let (_dir, env) = files(
            "",
            "[default]\nregion = eu-west-3\naws_access_key_id = A\naws_secret_access_key = S\n",
        );
        // The process environment may set a region (scripts/test does); the URL beats it.
        let b = S3Blobs::open_in(&local("b"), &env).unwrap();
        assert_eq!(b.region, "us-east-1");
        let b = S3Blobs::open_in(
            &S3Options {
                region: None,
                endpoint: None,
                ..local("b")
            },
            &env,
        )
        .unwrap();
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            assert_eq!(b.region, "eu-west-3");
        }
        assert_eq!(
            b.endpoint,
            format!("https://b.s3.{}.amazonaws.com", b.region)
        );
        let dotted = S3Blobs::open_in(
            &S3Options {
                endpoint: None,
                ..local("my.bucket")
            },
            &env,
        )
        .unwrap();
        assert_eq!(
            dotted.endpoint, "https://s3.us-east-1.amazonaws.com",
            "path-style"
        );
    }

    #[test]
    fn errors_name_their_cause() {
        let (_dir, env) = files("", "");
        let b = S3Blobs::open_in(&local("b"), &env).unwrap();
        let denied = |body: &str| object_store::Error::PermissionDenied {
            path: "k".into(),
            source: body.to_owned().into(),
        };
        let generic = |body: &str| object_store::Error::Generic {
            store: "S3",
            source: body.to_owned().into(),
        };
        let say = |e| b.classify("reading", "s3://b/k", e).to_string();
        let e = say(denied("<Code>InvalidAccessKeyId</Code>"));
        assert!(e.contains("S3 refused the credentials"), "{e}");
        let e = say(denied("<Code>SignatureDoesNotMatch</Code>"));
        assert!(e.contains("S3 refused the credentials"), "{e}");
        let e = say(denied("<Code>AccessDenied</Code>"));
        assert!(e.contains("S3 denied access"), "{e}");
        let e = say(generic(
            "Error performing PUT http://169.254.169.254/latest/api/token",
        ));
        assert!(e.contains("no AWS credentials found"), "{e}");
        let e = say(generic("<Code>PermanentRedirect</Code>"));
        assert!(e.contains("another region"), "{e}");
        let e = say(generic("<Code>NoSuchBucket</Code>"));
        assert!(e.contains("reading s3://b/k"), "{e}");
        assert!(is_no_bucket(&generic("<Code>NoSuchBucket</Code>")));
    }

    #[test]
    fn virtual_hosts_prefix_the_bucket() {
        assert_eq!(
            virtual_host("https://minio.example.com:9000/", "cache").unwrap(),
            "https://cache.minio.example.com:9000"
        );
        // An IP address has no subdomains: say so instead of sending requests nowhere.
        assert!(virtual_host("http://127.0.0.1:9000", "b").is_err());
    }
}
