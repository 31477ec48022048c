//! AWS shared config and credentials files (`~/.aws/config`, `~/.aws/credentials`).

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
    /// Every `AWS_*` variable (keys, region, endpoint…), handed to the S3 client as its
    /// settings: kept here rather than read by the client itself, so that tests can give
    /// a whole environment and the process's own cannot leak into them.
    pub vars: BTreeMap<String, String>,
}

impl Env {
    /// Reads the environment of this process.
    pub fn from_process() -> Env {
        Env::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Reads an environment given as (name, value) pairs; names that are not `AWS_*` or
    /// `HOME` are ignored.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Env {
        let mut aws = BTreeMap::new();
        let mut home = None;
        for (k, v) in vars {
            if k == "HOME" {
                home = Some(v);
            } else if k.starts_with("AWS_") {
                aws.insert(k, v);
            }
        }
        let var = |k: &str| aws.get(k).filter(|v| !v.is_empty()).cloned();
        let home = home
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_default();
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
            vars: aws,
        }
    }
}

/// How a profile obtains credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Keys written in the file.
    Static {
        /// `aws_access_key_id`.
        key_id: String,
        /// `aws_secret_access_key`.
        secret_key: String,
        /// `aws_session_token`, for temporary keys.
        token: Option<String>,
    },
    /// A command that prints them as JSON.
    Process(String),
    /// A role assumed with a web identity token file.
    WebIdentity {
        /// `role_arn`.
        role_arn: String,
        /// `web_identity_token_file`.
        token_file: String,
        /// `role_session_name`, if set.
        session_name: Option<String>,
    },
    /// SSO or a role assumed from another profile: delegated to the AWS CLI.
    AwsCli,
}

/// One profile, its settings merged from both files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The profile's name, without the config file's `profile ` prefix.
    pub name: String,
    settings: BTreeMap<String, String>,
}

impl Profile {
    /// A setting (keys are lower case), `None` when absent or empty.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_merge_both_files() {
        let credentials = "[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n\n[work]\n# comment\naws_access_key_id = W1\naws_secret_access_key = W2\naws_session_token = W3\n";
        let config = "[default]\nregion = eu-west-1\n[profile work]\nregion=us-west-2\ns3 =\n  addressing_style = path\n[profile proc]\ncredential_process = /bin/echo {}\n[profile sso]\nsso_session = corp\n[profile web]\nrole_arn = arn:aws:iam::1:role/r\nweb_identity_token_file = /t\n[sso-session corp]\nsso_region = x\n";
        let d = merge("default", credentials, config).unwrap();
        assert_eq!(d.get("region"), Some("eu-west-1"));
        assert_eq!(
            d.credentials(),
            Some(Credentials::Static {
                key_id: "AK".into(),
                secret_key: "SK".into(),
                token: None
            })
        );
        let w = merge("work", credentials, config).unwrap();
        assert_eq!(w.get("region"), Some("us-west-2"));
        assert!(matches!(
            w.credentials(),
            Some(Credentials::Static { token: Some(t), .. }) if t == "W3"
        ));
        assert_eq!(
            w.get("addressing_style"),
            None,
            "nested settings are skipped"
        );
        assert_eq!(
            merge("proc", credentials, config).unwrap().credentials(),
            Some(Credentials::Process("/bin/echo {}".into()))
        );
        assert_eq!(
            merge("sso", credentials, config).unwrap().credentials(),
            Some(Credentials::AwsCli)
        );
        assert!(matches!(
            merge("web", credentials, config).unwrap().credentials(),
            Some(Credentials::WebIdentity { token_file, .. }) if token_file == "/t"
        ));
        assert!(merge("corp", credentials, config).is_none());
        assert!(merge("nope", credentials, config).is_none());
    }
}
