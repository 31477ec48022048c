//! Where this store may connect: only to the configured upstreams, and to the extra NAR hosts
//! an operator listed. Nothing a client sends, and nothing an upstream's narinfo or redirect
//! says, chooses another scheme, host or port.
//!
//! Three rules close that at its root:
//! - a NAR key a client asks for without a narinfo of ours naming it must have the shape
//!   caches give NAR files ([`is_nar_key`]), which cannot carry a scheme, a host, a query or
//!   a `..` step;
//! - every relative name is resolved with [`under`], which refuses any result that left the
//!   upstream's origin or its path;
//! - absolute URLs (a narinfo's `URL:`, a redirect's `Location:`) are followed only to an
//!   allowed host ([`Hosts::allows`]).

use url::Url;

/// Longest file name of a NAR key: a 52-character hash, a `-`, a second hash, `.nar` and an
/// extension fit with room to spare.
const MAX_NAR_NAME: usize = 160;

/// True when `key` has the shape binary caches give NAR files: `nar/NAME.nar` or
/// `nar/NAME.nar.EXT`, where NAME is lower-case letters, digits and `-` (Nix's
/// `nar/<filehash>.nar.xz`, nix-serve's `nar/<hash>-<narhash>.nar`) and EXT a compression's
/// extension of up to 8 lower-case letters or digits.
pub(super) fn is_nar_key(key: &str) -> bool {
    let Some(file) = key.strip_prefix("nar/") else {
        return false;
    };
    if file.len() > MAX_NAR_NAME {
        return false;
    }
    let (name, ext) = match file.split_once(".nar") {
        Some((name, rest)) => (name, rest),
        None => return false,
    };
    let ext_ok = ext.is_empty()
        || ext.strip_prefix('.').is_some_and(|e| {
            (1..=8).contains(&e.len())
                && e.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && ext_ok
}

/// `rel` resolved against `base` (a URL ending in `/`), or `None` when the result would leave
/// `base`: another scheme, host or port, a path outside `base`'s, or a query or fragment. The
/// check is on the result, so no spelling of `rel` (encoded, mixed case, backslashes,
/// protocol-relative, `..`) gets past it.
pub(super) fn under(base: &Url, rel: &str) -> Option<Url> {
    if rel.is_empty() || rel.contains(['\\', '?', '#', '%']) || rel.chars().any(char::is_control) {
        return None;
    }
    let url = base.join(rel).ok()?;
    let same_origin = url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port_or_known_default() == base.port_or_known_default();
    let inside = url.path().starts_with(base.path()) && url.path().len() > base.path().len();
    let plain = url.query().is_none() && url.fragment().is_none() && url.username().is_empty();
    (same_origin && inside && plain).then_some(url)
}

/// Hosts NARs may be fetched from: those of the upstreams, and those listed by the operator.
#[derive(Debug, Clone, Default)]
pub(super) struct Hosts {
    /// `(host, port)`; a port of `None` allows any port of that host.
    allowed: Vec<(String, Option<u16>)>,
}

impl Hosts {
    /// The hosts of `upstreams` (with their ports) and `extra` (`HOST` or `HOST:PORT`).
    pub(super) fn new(upstreams: &[Url], extra: &[String]) -> Hosts {
        let mut allowed: Vec<(String, Option<u16>)> = upstreams
            .iter()
            .filter_map(|u| Some((u.host_str()?.to_owned(), u.port_or_known_default())))
            .collect();
        for e in extra {
            allowed.push(parse_host(e));
        }
        Hosts { allowed }
    }

    /// True when `url` is http(s), carries no credentials, and names an allowed host.
    pub(super) fn allows(&self, url: &Url) -> bool {
        if !matches!(url.scheme(), "http" | "https") || !url.username().is_empty() {
            return false;
        }
        let (Some(host), port) = (url.host_str(), url.port_or_known_default()) else {
            return false;
        };
        self.allowed
            .iter()
            .any(|(h, p)| h.eq_ignore_ascii_case(host) && p.is_none_or(|p| Some(p) == port))
    }

    /// A redirect policy that follows at most 5 redirects, each only to an allowed host; a
    /// redirect elsewhere is not followed (its 3xx answer then counts as a failure).
    pub(super) fn redirect_policy(&self) -> reqwest::redirect::Policy {
        let hosts = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                attempt.error("more than 5 redirects")
            } else if hosts.allows(attempt.url()) {
                attempt.follow()
            } else {
                tracing::warn!(
                    "an upstream redirected to {}, which is not an upstream nor a listed \
                     NAR host; not following (add it with --upstream-nar-host if it serves \
                     that cache's files)",
                    attempt.url()
                );
                attempt.stop()
            }
        })
    }
}

/// `HOST` or `HOST:PORT` (IPv6 in brackets), lower-cased as URLs hold hosts.
fn parse_host(s: &str) -> (String, Option<u16>) {
    match Url::parse(&format!("http://{s}/")) {
        Ok(u) if u.host_str().is_some() => (
            u.host_str().unwrap_or_default().to_owned(),
            // `port()` is None for the default port 80 as well: a listed `HOST:80` allows
            // exactly port 80.
            u.port().or_else(|| s.ends_with(":80").then_some(80)),
        ),
        _ => (s.to_ascii_lowercase(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_keys_have_the_shapes_caches_use() {
        for k in [
            "nar/0wa9bpf3ab6lc6lbx5nkzxxh3b1x5y4v7c0abpnihxzvgfdcbw3s.nar.xz",
            "nar/0wa9bpf3ab6lc6lbx5nkzxxh3b1x5y4v.nar",
            "nar/abc-def.nar.zst",
            "nar/abc.nar.bz2",
        ] {
            assert!(is_nar_key(k), "{k}");
        }
        for k in [
            "https:127.0.0.1:9/nar/x.nar",
            "nar/https:127.0.0.1:9/x.nar",
            "nar//127.0.0.1:9/x.nar",
            "nar/../x.nar",
            "nar/x.nar/../../y",
            "nar/x.nar?y",
            "nar/X.nar",
            "nar/x%2f.nar",
            "nar/x\\y.nar",
            "nar/.nar",
            "nar/x.nar.",
            "nar/x.narx",
            "x.nar",
            "nar/x",
            "",
        ] {
            assert!(!is_nar_key(k), "{k}");
        }
    }

    #[test]
    fn nothing_resolves_outside_the_base() {
        let base = Url::parse("http://cache.example:8080/sub/").unwrap();
        assert_eq!(
            under(&base, "nar/x.nar.xz").unwrap().as_str(),
            "http://cache.example:8080/sub/nar/x.nar.xz"
        );
        for rel in [
            "https:127.0.0.1:9/x",
            "HTTPS:127.0.0.1:9/x",
            "http:127.0.0.1:9/x",
            "//127.0.0.1:9/x",
            "\\\\127.0.0.1:9/x",
            "/\\127.0.0.1/x",
            "/x",
            "../x",
            "nar/../../x",
            "%2e%2e/x",
            "nar/%2F%2Fevil/x",
            "http://cache.example:8080/sub/x",
            "http://127.0.0.1:9/sub/x",
            "x?y=1",
            "x#y",
            "",
            ".",
            "file:///etc/passwd",
            "user@evil/x",
        ] {
            let got = under(&base, rel);
            assert!(
                got.as_ref()
                    .is_none_or(|u| u.host_str() == Some("cache.example")
                        && u.port() == Some(8080)
                        && u.path().starts_with("/sub/")),
                "{rel:?} -> {got:?}"
            );
        }
        assert!(under(&base, "../x").is_none());
        assert!(under(&base, "https:127.0.0.1:9/x").is_none());
        assert!(under(&base, "//127.0.0.1:9/x").is_none());
    }

    #[test]
    fn only_upstream_and_listed_hosts_are_allowed() {
        let hosts = Hosts::new(
            &[Url::parse("https://cache.example/").unwrap()],
            &["cdn.example".into(), "mirror.example:8443".into()],
        );
        for ok in [
            "https://cache.example/nar/x",
            "https://CACHE.example/nar/x",
            "https://cdn.example:9999/x",
            "http://cdn.example/x",
            "https://mirror.example:8443/x",
        ] {
            assert!(hosts.allows(&Url::parse(ok).unwrap()), "{ok}");
        }
        for bad in [
            "http://cache.example/nar/x",
            "https://cache.example:444/nar/x",
            "https://evil.example/x",
            "https://mirror.example/x",
            "ftp://cdn.example/x",
            "https://user:pw@cdn.example/x",
            "https://127.0.0.1/x",
        ] {
            assert!(!hosts.allows(&Url::parse(bad).unwrap()), "{bad}");
        }
    }
}
