//! What an `s3://` URL says about a bucket, and the `object_store` client made from it and
//! the AWS environment: region, endpoint, addressing style and credentials.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsCredential};
use object_store::{BackoffConfig, ClientOptions, RetryConfig, StaticCredentialProvider};

use super::credential_process::ProcessCredentials;
use super::error::Target;
use super::profile;
use crate::store::blobs::DEFAULT_STALL_TIMEOUT;
use crate::store::{Result, StoreError};

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
    /// How long a connection may move no byte before a request is abandoned (and retried);
    /// `None` for the default, 60 s.
    pub stall_timeout: Option<Duration>,
}

/// A client for one bucket, and where its requests go.
#[derive(Debug)]
pub(super) struct Client {
    /// Sends the requests.
    pub store: AmazonS3,
    /// The bucket, endpoint and region, for error messages.
    pub target: Target,
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

    /// Prepares a client for the bucket, with the AWS files and profile choice `env` gives;
    /// nothing is sent until the first request.
    pub(super) fn client_in(&self, env: &profile::Env) -> Result<Client> {
        // The settings object_store's `from_env` would read, but from `env`.
        let mut builder = AmazonS3Builder::new();
        for (key, value) in &env.vars {
            if let Ok(config_key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                builder = builder.with_config(config_key, value);
            }
        }
        let mut builder = builder.with_bucket_name(&self.bucket);

        let profile_name = self.profile.clone().or_else(|| env.profile.clone());
        let loaded = match &profile_name {
            Some(name) => profile::load(name, env)?,
            None => profile::load("default", env)?,
        };
        if let (Some(name), None) = (&self.profile, &loaded) {
            return Err(StoreError::Invalid(format!(
                "AWS profile {name:?} is in neither {} nor {}",
                env.credentials_file.display(),
                env.config_file.display()
            )));
        }
        if let (Some(name), None, None) = (&env.profile, &self.profile, &loaded) {
            return Err(StoreError::Invalid(format!(
                "AWS_PROFILE names profile {name:?}, which is in neither {} nor {}",
                env.credentials_file.display(),
                env.config_file.display()
            )));
        }

        // Credentials: a profile named in the URL beats the environment; the environment
        // beats an implicit profile (AWS_PROFILE or default), as in the AWS CLI and SDKs.
        let from_profile = match &loaded {
            Some(p) if self.profile.is_some() || !env.has_static_keys => p.credentials(),
            _ => None,
        };
        match (from_profile, &loaded) {
            (Some(creds), Some(p)) => {
                builder = apply_profile_credentials(builder, creds, &p.name)?;
            }
            (None, Some(p)) if self.profile.is_some() => {
                return Err(StoreError::Invalid(format!(
                    "AWS profile {:?} has no credentials (aws_access_key_id, credential_process, \
                     web_identity_token_file, role_arn or sso settings)",
                    p.name
                )))
            }
            _ => {}
        }

        if let Some(region) = &self.region {
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
        let custom = self.endpoint.clone().or(env_endpoint);
        let virtual_hosted = match self.addressing {
            Addressing::Path => false,
            Addressing::Virtual => true,
            Addressing::Auto => custom.is_none() && !self.bucket.contains('.'),
        };
        let base = match custom {
            Some(ep) => ep.trim_end_matches('/').to_owned(),
            None if self.plain_http => format!("http://s3.{region}.amazonaws.com"),
            None => format!("https://s3.{region}.amazonaws.com"),
        };
        let endpoint = if virtual_hosted {
            virtual_host(&base, &self.bucket)?
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
                    .with_read_timeout(self.stall_timeout.unwrap_or(DEFAULT_STALL_TIMEOUT)),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
            });
        let store = builder
            .build()
            .map_err(|e| StoreError::Invalid(format!("cannot use {}: {e}", self.describe())))?;
        Ok(Client {
            store,
            target: Target {
                bucket: self.bucket.clone(),
                endpoint,
                region,
            },
        })
    }
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

/// Hands a profile's credentials to the builder, in the form `object_store` takes them.
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
            builder.with_credentials(Arc::new(ProcessCredentials::new(command)))
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
            builder.with_credentials(Arc::new(ProcessCredentials::new(format!(
                "aws configure export-credentials --format process --profile {}",
                shell_quote(name)
            ))))
        }
    })
}

/// Quotes a profile name for `sh -c`, since profile names are free text.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(bucket: &str) -> S3Options {
        S3Options {
            bucket: bucket.into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            ..S3Options::default()
        }
    }

    /// AWS files with this content, and an environment that points at them plus `vars`.
    fn files_with(
        credentials: &str,
        config: &str,
        vars: &[(&str, &str)],
    ) -> (tempfile::TempDir, profile::Env) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("credentials"), credentials).unwrap();
        std::fs::write(dir.path().join("config"), config).unwrap();
        let path = |f: &str| dir.path().join(f).display().to_string();
        let mut all = vec![
            (
                "AWS_SHARED_CREDENTIALS_FILE".to_owned(),
                path("credentials"),
            ),
            ("AWS_CONFIG_FILE".to_owned(), path("config")),
        ];
        all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let env = profile::Env::from_vars(all);
        (dir, env)
    }

    fn files(credentials: &str, config: &str) -> (tempfile::TempDir, profile::Env) {
        files_with(credentials, config, &[])
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
        assert!(with("work").client_in(&env).is_ok());
        let e = with("absent").client_in(&env).unwrap_err().to_string();
        assert!(e.contains("\"absent\"") && e.contains("credentials"), "{e}");
        let e = with("bare").client_in(&env).unwrap_err().to_string();
        assert!(e.contains("has no credentials"), "{e}");
        let env = profile::Env {
            profile: Some("gone".into()),
            ..env
        };
        let e = local("b").client_in(&env).unwrap_err().to_string();
        assert!(e.contains("AWS_PROFILE"), "{e}");
    }

    /// The region a client made from `options` in `env` signs for.
    fn region(options: &S3Options, env: &profile::Env) -> String {
        options.client_in(env).unwrap().target.region
    }

    #[test]
    fn regions_come_from_the_url_then_the_environment_then_the_profile() {
        let profile_region =
            "[default]\nregion = eu-west-3\naws_access_key_id = A\naws_secret_access_key = S\n";
        let no_region = S3Options {
            region: None,
            endpoint: None,
            ..local("b")
        };
        for vars in [
            &[("AWS_REGION", "ap-south-1")][..],
            &[("AWS_DEFAULT_REGION", "ap-south-1")],
            &[
                ("AWS_REGION", "ap-south-1"),
                ("AWS_DEFAULT_REGION", "sa-east-1"),
            ],
        ] {
            let (_dir, env) = files_with("", profile_region, vars);
            assert_eq!(
                region(&local("b"), &env),
                "us-east-1",
                "the URL wins: {vars:?}"
            );
            assert_eq!(
                region(&no_region, &env),
                "ap-south-1",
                "then the environment: {vars:?}"
            );
        }
        let (_dir, env) = files("", profile_region);
        assert_eq!(region(&no_region, &env), "eu-west-3", "then the profile");
        let b = no_region.client_in(&env).unwrap().target;
        assert_eq!(b.endpoint, "https://b.s3.eu-west-3.amazonaws.com");
        let (_dir, env) = files(
            "[default]\naws_access_key_id = A\naws_secret_access_key = S\n",
            "",
        );
        assert_eq!(region(&no_region, &env), "us-east-1", "then the default");

        let dotted = S3Options {
            endpoint: None,
            ..local("my.bucket")
        }
        .client_in(&env)
        .unwrap()
        .target;
        assert_eq!(
            dotted.endpoint, "https://s3.us-east-1.amazonaws.com",
            "path-style"
        );
    }

    /// The access key id a client made from `options` in `env` signs its requests with,
    /// seen by a one-shot HTTP server that answers 404.
    fn signing_key_id(options: &S3Options, env: &profile::Env) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let options = S3Options {
            endpoint: Some(format!("http://{}", listener.local_addr().unwrap())),
            region: Some("us-east-1".into()),
            addressing: Addressing::Path,
            ..options.clone()
        };
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early");
                head.extend_from_slice(&buf[..n]);
            }
            conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
            String::from_utf8(head).unwrap()
        });
        let client = options.client_in(env).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let res = rt.block_on(async {
            use object_store::ObjectStoreExt;
            client
                .store
                .head(&object_store::path::Path::from("probe"))
                .await
        });
        assert!(
            matches!(res, Err(object_store::Error::NotFound { .. })),
            "{res:?}"
        );
        let head = server.join().unwrap();
        let auth = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            })
            .unwrap_or_else(|| panic!("unsigned request:\n{head}"))
            .1;
        auth.split("Credential=")
            .nth(1)
            .and_then(|c| c.split('/').next())
            .unwrap_or_else(|| panic!("no Credential= in {auth:?}"))
            .to_owned()
    }

    #[test]
    fn environment_keys_beat_an_implicit_profile_and_lose_to_a_named_one() {
        let creds = "[default]\naws_access_key_id = DEFAULTKEY\naws_secret_access_key = S\n\
                     [work]\naws_access_key_id = WORKKEY\naws_secret_access_key = S\n";
        let keys = [
            ("AWS_ACCESS_KEY_ID", "ENVKEY"),
            ("AWS_SECRET_ACCESS_KEY", "ENVSECRET"),
        ];
        let named = |p: &str| S3Options {
            profile: Some(p.into()),
            ..local("b")
        };

        let (_dir, env) = files(creds, "");
        assert_eq!(signing_key_id(&local("b"), &env), "DEFAULTKEY");

        let (_dir, env) = files_with(creds, "", &keys);
        assert_eq!(
            signing_key_id(&local("b"), &env),
            "ENVKEY",
            "over [default]"
        );
        assert_eq!(
            signing_key_id(&named("work"), &env),
            "WORKKEY",
            "?profile=work"
        );
        assert_eq!(
            signing_key_id(&named("default"), &env),
            "DEFAULTKEY",
            "?profile=default"
        );

        let mut with_profile = keys.to_vec();
        with_profile.push(("AWS_PROFILE", "work"));
        let (_dir, env) = files_with(creds, "", &with_profile);
        assert_eq!(
            signing_key_id(&local("b"), &env),
            "ENVKEY",
            "over AWS_PROFILE"
        );
        let (_dir, env) = files_with(creds, "", &[("AWS_PROFILE", "work")]);
        assert_eq!(
            signing_key_id(&local("b"), &env),
            "WORKKEY",
            "AWS_PROFILE alone"
        );
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
