//! Credentials for private upstreams from a netrc file (the format Nix's `netrc-file` and
//! curl read): `machine HOST login USER password SECRET`, entries separated by whitespace.
//!
//! Only `machine` entries are used: a `default` entry would hand its credentials to any
//! host, which is exactly what must not happen, so it is ignored (with a warning). `macdef`
//! bodies are skipped up to their blank line, as the format says.

use std::path::Path;

use crate::store::StoreError;

/// A login for one host.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// The user name (`login`).
    pub user: String,
    /// The password (`password`).
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password, whatever ends up formatting this.
        write!(f, "Login({}, <password>)", self.user)
    }
}

/// The `machine` entries of a netrc file, in order.
#[derive(Clone, Default)]
pub struct Netrc {
    machines: Vec<(String, Login)>,
}

impl std::fmt::Debug for Netrc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<_> = self.machines.iter().map(|(h, _)| h.as_str()).collect();
        write!(f, "Netrc({hosts:?})")
    }
}

impl Netrc {
    /// Reads a netrc file; the error names it.
    pub fn read(path: &Path) -> Result<Netrc, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            StoreError::Invalid(format!(
                "netrc file {}: {e}; give a readable file with lines like `machine HOST login USER password SECRET`",
                path.display()
            ))
        })?;
        Ok(Netrc::parse(&text))
    }

    /// Parses netrc text (never fails: unknown tokens are skipped, as curl does).
    pub fn parse(text: &str) -> Netrc {
        let mut machines = Vec::new();
        let mut current: Option<(String, Login)> = None;
        let mut lines = text.lines();
        let mut in_default = false;
        while let Some(line) = lines.next() {
            let mut words = line.split_whitespace();
            while let Some(word) = words.next() {
                match word {
                    "machine" | "default" => {
                        if let Some(done) = current.take() {
                            machines.push(done);
                        }
                        in_default = word == "default";
                        if in_default {
                            tracing::warn!(
                                "netrc: ignoring the `default` entry (credentials go only to the `machine` they name)"
                            );
                        } else if let Some(host) = words.next() {
                            current = Some((
                                host.to_ascii_lowercase(),
                                Login {
                                    user: String::new(),
                                    password: String::new(),
                                },
                            ));
                        }
                    }
                    "login" | "password" | "account" => {
                        let value = words.next().unwrap_or("").to_owned();
                        if let (Some((_, login)), false) = (current.as_mut(), in_default) {
                            match word {
                                "login" => login.user = value,
                                "password" => login.password = value,
                                _ => {}
                            }
                        }
                    }
                    "macdef" => {
                        // The macro's body runs to the next blank line.
                        for body in lines.by_ref() {
                            if body.trim().is_empty() {
                                break;
                            }
                        }
                        break;
                    }
                    _ => {}
                }
            }
        }
        if let Some(done) = current.take() {
            machines.push(done);
        }
        Netrc { machines }
    }

    /// The login for `host` (the first entry naming it), if any.
    pub fn login_for(&self, host: &str) -> Option<&Login> {
        let host = host.to_ascii_lowercase();
        self.machines
            .iter()
            .find(|(h, _)| *h == host)
            .map(|(_, l)| l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_and_not_default() {
        let n = Netrc::parse(
            "machine cache.example.org login alice password s3cret\n\
             default login anyone password leaked\n\
             macdef init\ncd /\n\n\
             machine 127.0.0.1\n  login nixcached\n  password tok\n",
        );
        let l = n.login_for("Cache.Example.org").unwrap();
        assert_eq!((l.user.as_str(), l.password.as_str()), ("alice", "s3cret"));
        let l = n.login_for("127.0.0.1").unwrap();
        assert_eq!((l.user.as_str(), l.password.as_str()), ("nixcached", "tok"));
        assert!(n.login_for("other.example.org").is_none());
        assert!(!format!("{n:?} {l:?}").contains("tok"));
    }
}
