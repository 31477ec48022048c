//! Credentials from a command (`credential_process`), cached until they expire.

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
    /// Credentials from `command`, run through `sh -c` when needed.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credential_process_output_is_read() {
        let ok = ProcessCredentials::new(
            r#"printf '{"Version":1,"AccessKeyId":"AK","SecretAccessKey":"SK","SessionToken":"T","Expiration":"2099-01-01T00:00:00Z"}'"#.into(),
        );
        let c = ok.get_credential().await.unwrap();
        assert_eq!((c.key_id.as_str(), c.token.as_deref()), ("AK", Some("T")));
        let failing = ProcessCredentials::new("echo nope >&2; exit 3".into());
        let e = failing.get_credential().await.unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn expiry_times_parse() {
        assert!(parse_expiry("2030-01-02T03:04:05Z").is_some());
        assert!(parse_expiry("2030-01-02T03:04:05+00:00").is_some());
        assert!(parse_expiry("tomorrow").is_none());
    }
}
