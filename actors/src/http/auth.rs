//! Who may read and write a cache: credentials (bearer tokens and HTTP Basic users) with
//! read and/or write rights, stored as hashes.
//!
//! Policy, checked at the top of every request before anything else looks at it:
//! - a cache with any read credential is private: every route but `/healthz` needs one;
//!   a cache without one is public for reads;
//! - every method that is not a read (`PUT`, `POST`, `DELETE`, …) needs a write credential
//!   as soon as the cache has any credential; a cache with none cannot be written over HTTP
//!   at all, and such requests go on to the ordinary `405`;
//! - no or unknown credentials are `401` with a `Basic` and a `Bearer` challenge (curl and
//!   so Nix send netrc credentials on a challenge); a known credential without the right
//!   is `403`.
//!
//! Secrets are kept as SHA-256 hashes. Tokens made by `nixcached credential new` are 256
//! random bits, which no fast hash makes guessable; a human-chosen password is only as
//! strong as its entropy, which the README says. The presented secret's hash is compared
//! with every stored hash in constant time ([`subtle`]), so neither which credential
//! matched nor how much of a hash did shows in the timing. Nothing of the `Authorization`
//! header is ever logged.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::{HttpRequest, HttpResponse};
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// A credential entry that cannot be used.
#[derive(Debug, Error)]
pub enum CredentialError {
    /// A hash that is not `sha256:` and 64 hex digits.
    #[error("{field} {value:?} is not a hash: write sha256:<64 hex digits>, as `nixcached credential new` prints")]
    BadHash {
        /// The key holding it.
        field: &'static str,
        /// What was written (a hash, never a secret).
        value: String,
    },
    /// Neither `token-hash` nor `user` with `password-hash`, or both.
    #[error("a credential needs either token-hash, or user and password-hash (run `nixcached credential new` for one)")]
    Shape,
    /// `rights` empty or naming something else.
    #[error("rights {0:?}: give a non-empty list of \"read\" and \"write\"")]
    Rights(Vec<String>),
    /// A credentials file that cannot be read or parsed.
    #[error("credentials file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// One credential as written in a config file (`[[cache.credential]]`) or a `--credentials`
/// file (`[[credential]]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CredentialSpec {
    /// `sha256:<hex>` of a bearer token.
    pub token_hash: Option<String>,
    /// A Basic user name.
    pub user: Option<String>,
    /// `sha256:<hex>` of that user's password.
    pub password_hash: Option<String>,
    /// `read`, `write` or both.
    pub rights: Vec<String>,
}

/// What a credential allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rights {
    /// Reading every route.
    pub read: bool,
    /// Methods other than reads (the uploads of `--allow-push`).
    pub write: bool,
}

impl Rights {
    fn union(self, other: Rights) -> Rights {
        Rights {
            read: self.read || other.read,
            write: self.write || other.write,
        }
    }
}

/// A checked credential.
#[derive(Clone)]
pub struct Credential {
    /// `None` for a token; the user for a Basic user.
    user: Option<String>,
    hash: [u8; 32],
    rights: Rights,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash is not a secret, but there is no reason to spread it through logs either.
        f.debug_struct("Credential")
            .field("user", &self.user)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

/// `sha256:<hex>` of a secret: the form stored in configs.
pub fn hash_secret(secret: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes())))
}

fn parse_hash(field: &'static str, value: &str) -> Result<[u8; 32], CredentialError> {
    let bad = || CredentialError::BadHash {
        field,
        value: value.to_owned(),
    };
    let hex_part = value.strip_prefix("sha256:").ok_or_else(bad)?;
    let bytes = hex::decode(hex_part).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

impl Credential {
    /// Checks one written entry.
    pub fn from_spec(spec: &CredentialSpec) -> Result<Credential, CredentialError> {
        let mut rights = Rights::default();
        for r in &spec.rights {
            match r.as_str() {
                "read" => rights.read = true,
                "write" => rights.write = true,
                _ => return Err(CredentialError::Rights(spec.rights.clone())),
            }
        }
        if rights == Rights::default() {
            return Err(CredentialError::Rights(spec.rights.clone()));
        }
        match (&spec.token_hash, &spec.user, &spec.password_hash) {
            (Some(t), None, None) => Ok(Credential {
                user: None,
                hash: parse_hash("token-hash", t)?,
                rights,
            }),
            (None, Some(u), Some(p)) if !u.is_empty() => Ok(Credential {
                user: Some(u.clone()),
                hash: parse_hash("password-hash", p)?,
                rights,
            }),
            _ => Err(CredentialError::Shape),
        }
    }

    /// Reads a `--credentials` file: TOML with `[[credential]]` entries.
    pub fn read_file(path: &std::path::Path) -> Result<Vec<Credential>, CredentialError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            credential: Vec<CredentialSpec>,
        }
        let file_err = |reason: String| CredentialError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let parsed: File = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        if parsed.credential.is_empty() {
            return Err(file_err(
                "no [[credential]] entries; paste what `nixcached credential new` prints".into(),
            ));
        }
        parsed
            .credential
            .iter()
            .map(Credential::from_spec)
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(e.to_string()))
    }
}

/// The credentials of one cache and the decisions made with them.
#[derive(Debug, Clone, Default)]
pub struct Access {
    credentials: Vec<Credential>,
    realm: String,
}

/// What a request's `Authorization` header presented.
enum Presented<'a> {
    None,
    /// Malformed, or a scheme we do not take.
    Unusable,
    Bearer(&'a str),
    Basic(String, String),
}

fn presented(req: &HttpRequest) -> Presented<'_> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Presented::None;
    };
    let Ok(value) = value.to_str() else {
        return Presented::Unusable;
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Presented::Bearer(rest);
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        if let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
            return Presented::Basic(user.to_owned(), password.to_owned());
        }
    }
    Presented::Unusable
}

/// The response refusing a request (boxed: a response is large, and the allowed path, which
/// is by far the most common, should not pay for moving one around).
pub type Refused = Box<HttpResponse>;

/// Whether `a` and `b` are equal, taking the same time wherever they differ.
pub fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

impl Access {
    /// A cache with these credentials; `realm` names it in challenges.
    pub fn new(realm: impl Into<String>, credentials: Vec<Credential>) -> Access {
        Access {
            credentials,
            realm: realm.into(),
        }
    }

    /// Whether reads need a credential.
    pub fn is_private(&self) -> bool {
        self.credentials.iter().any(|c| c.rights.read)
    }

    /// Whether some credential may write.
    pub fn has_writer(&self) -> bool {
        self.credentials.iter().any(|c| c.rights.write)
    }

    /// The rights of what the request presents: `None` when it presents nothing usable.
    ///
    /// Every stored credential is compared (no early exit), so the time taken does not say
    /// which one matched. A Basic password may also be a token (any user name), so a netrc
    /// line can carry a token.
    fn rights_of(&self, req: &HttpRequest) -> Option<Rights> {
        let (user, secret) = match presented(req) {
            Presented::None | Presented::Unusable => return None,
            Presented::Bearer(t) => (None, t.to_owned()),
            Presented::Basic(u, p) => (Some(u), p),
        };
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut rights: Option<Rights> = None;
        for c in &self.credentials {
            let user_ok = match (&c.user, &user) {
                (None, _) => true,
                (Some(want), Some(got)) => want == got,
                (Some(_), None) => false,
            };
            if same_hash(&c.hash, &hash) && user_ok {
                rights = Some(rights.unwrap_or_default().union(c.rights));
            }
        }
        rights
    }

    fn challenge(&self) -> HttpResponse {
        let realm = self.realm.replace(['"', '\\'], "");
        let mut b = HttpResponse::Unauthorized();
        for scheme in ["Basic", "Bearer"] {
            if let Ok(v) = HeaderValue::from_str(&format!("{scheme} realm=\"{realm}\"")) {
                b.append_header((header::WWW_AUTHENTICATE, v));
            }
        }
        b.insert_header((header::CACHE_CONTROL, "no-store"))
            .content_type("text/plain; charset=utf-8")
            .body("401 unauthorized: this cache needs a credential; send Authorization: Bearer TOKEN, or give Nix a netrc-file with the login and password for this host\n")
    }

    fn forbidden(what: &str) -> HttpResponse {
        HttpResponse::Forbidden()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .content_type("text/plain; charset=utf-8")
            .body(format!(
                "403 forbidden: this credential may not {what}; ask for one with that right\n"
            ))
    }

    /// `Ok` when the request may read, else the response to send (401 or 403).
    pub fn may_read(&self, req: &HttpRequest) -> Result<(), Refused> {
        if !self.is_private() {
            return Ok(());
        }
        match self.rights_of(req) {
            None => Err(Box::new(self.challenge())),
            Some(r) if r.read => Ok(()),
            Some(_) => Err(Box::new(Self::forbidden("read this cache"))),
        }
    }

    /// `Ok` when the request may write, else the response to send (401 or 403); what
    /// [`Access::check`] asks of every non-read method once the cache has a credential (and a
    /// cache taking pushes always has one: `serve` refuses to start it otherwise).
    pub fn may_write(&self, req: &HttpRequest) -> Result<(), Refused> {
        match self.rights_of(req) {
            None => Err(Box::new(self.challenge())),
            Some(r) if r.write => Ok(()),
            Some(_) => Err(Box::new(Self::forbidden("write to this cache"))),
        }
    }

    /// The check at the top of `dispatch`: reads need what [`Access::may_read`] says; other
    /// methods need [`Access::may_write`] once the cache has any credential (without any, they
    /// go on to the handlers, which refuse what the cache does not accept). `open` routes
    /// (`/healthz`) pass.
    pub fn check(&self, req: &HttpRequest, open: bool) -> Result<(), Refused> {
        let read = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        if read {
            if open {
                return Ok(());
            }
            return self.may_read(req);
        }
        if self.credentials.is_empty() {
            return Ok(());
        }
        self.may_write(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn spec(token: &str, rights: &[&str]) -> CredentialSpec {
        CredentialSpec {
            token_hash: Some(hash_secret(token)),
            rights: rights.iter().map(|s| s.to_string()).collect(),
            ..CredentialSpec::default()
        }
    }

    fn access() -> Access {
        let user = CredentialSpec {
            user: Some("alice".into()),
            password_hash: Some(hash_secret("pw")),
            rights: vec!["read".into(), "write".into()],
            ..CredentialSpec::default()
        };
        Access::new(
            "team",
            vec![
                Credential::from_spec(&spec("reader", &["read"])).unwrap(),
                Credential::from_spec(&user).unwrap(),
            ],
        )
    }

    fn basic(u: &str, p: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    }

    #[test]
    fn constant_time_comparer_agrees_with_equality() {
        let a: [u8; 32] = Sha256::digest(b"x").into();
        let mut b = a;
        assert!(same_hash(&a, &b));
        for i in [0, 17, 31] {
            b = a;
            b[i] ^= 1;
            assert!(!same_hash(&a, &b), "byte {i}");
        }
    }

    #[test]
    fn decisions() {
        let a = access();
        let get = |auth: Option<&str>| {
            let mut r = TestRequest::get();
            if let Some(v) = auth {
                r = r.insert_header((header::AUTHORIZATION, v));
            }
            r.to_http_request()
        };
        let status = |r: Result<(), Refused>| r.err().map(|e| e.status().as_u16());
        assert_eq!(status(a.check(&get(None), false)), Some(401));
        assert_eq!(status(a.check(&get(None), true)), None);
        assert_eq!(
            status(a.check(&get(Some("Bearer wrong")), false)),
            Some(401)
        );
        assert_eq!(status(a.check(&get(Some("Bearer reader")), false)), None);
        assert_eq!(
            status(a.check(&get(Some(&basic("x", "reader"))), false)),
            None
        );
        assert_eq!(
            status(a.check(&get(Some(&basic("alice", "pw"))), false)),
            None
        );
        assert_eq!(
            status(a.check(&get(Some(&basic("bob", "pw"))), false)),
            Some(401)
        );
        assert_eq!(status(a.check(&get(Some("Bearer pw")), false)), Some(401));
        let put = |auth: &str| {
            TestRequest::put()
                .insert_header((header::AUTHORIZATION, auth))
                .to_http_request()
        };
        assert_eq!(status(a.check(&put("Bearer reader"), false)), Some(403));
        assert_eq!(status(a.check(&put(&basic("alice", "pw")), false)), None);
        let challenge = a.check(&get(None), false).unwrap_err();
        let schemes: Vec<_> = challenge
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(schemes, ["Basic realm=\"team\"", "Bearer realm=\"team\""]);
        // No credential at all: public, and writes go on to the handlers' own refusal.
        let public = Access::default();
        assert_eq!(status(public.check(&get(None), false)), None);
        assert_eq!(status(public.check(&put("Bearer x"), false)), None);
    }

    #[test]
    fn bad_entries_are_refused_with_what_to_write() {
        let mut s = spec("t", &["read"]);
        s.token_hash = Some("sha256:abc".into());
        let e = Credential::from_spec(&s).unwrap_err().to_string();
        assert!(e.contains("sha256:<64 hex digits>"), "{e}");
        let e = Credential::from_spec(&spec("t", &["admin"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"read\" and \"write\""), "{e}");
        let e = Credential::from_spec(&spec("t", &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-empty"), "{e}");
        let mut both = spec("t", &["read"]);
        both.user = Some("u".into());
        assert!(matches!(
            Credential::from_spec(&both),
            Err(CredentialError::Shape)
        ));
    }
}
