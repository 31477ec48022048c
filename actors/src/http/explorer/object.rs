//! The object page: what a narinfo says, who refers to the object, and whether its
//! signatures verify against the trusted keys.

use actix_web::HttpResponse;
use serde::Serialize;

use super::render;
use crate::catalog::Closure;
use crate::formats::{NarInfo, PublicKey};
use crate::http::CacheService;
use crate::lookup::ServedNarInfo;

/// A link to another object's page.
#[derive(Serialize)]
pub(super) struct Link {
    pub(super) digest: String,
    pub(super) base: String,
    pub(super) href: String,
}

/// One signature and its verdict.
#[derive(Serialize)]
pub(super) struct SigRow {
    pub(super) key: String,
    pub(super) value: String,
    /// `verified`, `invalid` (a trusted key's name, but the signature does not verify) or
    /// `unknown` (no trusted key of that name).
    pub(super) status: &'static str,
}

/// What `narinfo.html` shows.
#[derive(Serialize)]
pub(super) struct NarInfoPage<'a> {
    pub(super) root: &'a str,
    pub(super) title: String,
    pub(super) base: String,
    pub(super) store_path: String,
    pub(super) url: String,
    pub(super) nar_href: String,
    pub(super) compression: &'static str,
    pub(super) file_hash: Option<String>,
    pub(super) file_size: Option<u64>,
    pub(super) nar_hash: String,
    pub(super) nar_size: u64,
    pub(super) references: Vec<Link>,
    pub(super) referrers: Vec<Link>,
    pub(super) deriver: Option<String>,
    pub(super) system: Option<String>,
    pub(super) sigs: Vec<SigRow>,
    pub(super) ca: Option<String>,
    pub(super) extra: Vec<(String, String)>,
    pub(super) closure: Option<Closure>,
    pub(super) browse_href: String,
    pub(super) text_href: String,
    pub(super) listing_href: String,
    /// When a client last fetched this narinfo, from the access records.
    pub(super) last_served: Option<String>,
    /// Whether access records are kept at all.
    pub(super) records: bool,
}

/// Verdict on each signature of `info` against the trusted keys.
fn signatures(info: &NarInfo, trusted: &[PublicKey]) -> Vec<SigRow> {
    let fp = info.fingerprint();
    info.sigs
        .iter()
        .map(|s| {
            let keys: Vec<&PublicKey> = trusted.iter().filter(|k| k.name() == s.key_name).collect();
            let status = if keys.is_empty() {
                "unknown"
            } else if keys.iter().any(|k| k.verify(&fp, s)) {
                "verified"
            } else {
                "invalid"
            };
            SigRow {
                key: s.key_name.clone(),
                value: s.to_string(),
                status,
            }
        })
        .collect()
}

/// The HTML page of `/<digest>.narinfo` for browsers.
pub fn narinfo_page(svc: &CacheService, root: &str, served: &ServedNarInfo) -> HttpResponse {
    let info = &served.info;
    let digest = info.store_path.digest();
    let link = |d: &str, base: String| Link {
        digest: d.to_owned(),
        href: format!("{root}/{d}.narinfo"),
        base,
    };
    let ctx = NarInfoPage {
        root,
        title: info.store_path.name().to_owned(),
        base: info.store_path.to_string(),
        store_path: info.store_dir.display(&info.store_path),
        nar_href: format!("{root}/{}", info.url),
        url: info.url.clone(),
        compression: info.compression.name(),
        file_hash: info.file_hash.as_ref().map(|h| h.to_nix32()),
        file_size: info.file_size,
        nar_hash: info.nar_hash.to_nix32(),
        nar_size: info.nar_size,
        references: info
            .references
            .iter()
            .map(|r| link(r.digest(), r.to_string()))
            .collect(),
        referrers: svc
            .catalog
            .referrers(digest)
            .into_iter()
            .map(|(d, name)| link(&d, format!("{d}-{name}")))
            .collect(),
        deriver: info.deriver.clone(),
        system: info.system.clone(),
        sigs: signatures(info, &svc.trusted_keys),
        ca: info.ca.clone(),
        extra: info.extra.clone(),
        closure: svc.catalog.closure(digest),
        browse_href: format!("{root}/{digest}/browse/"),
        text_href: format!("{root}/{digest}.narinfo?format=text"),
        listing_href: format!("{root}/{digest}.ls"),
        records: svc.access.is_some(),
        last_served: svc
            .access
            .as_ref()
            .and_then(|a| a.last_served(digest))
            .map(|t| {
                let ago = std::time::SystemTime::now()
                    .duration_since(t)
                    .map(|d| {
                        humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
                            .to_string()
                    })
                    .unwrap_or_else(|_| "0s".into());
                format!("{} ({ago} ago)", humantime::format_rfc3339_seconds(t))
            }),
    };
    render(svc, "narinfo.html", &ctx)
}
