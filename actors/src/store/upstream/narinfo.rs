//! Which upstream narinfos are handed out: those that describe the object asked for, parse,
//! carry a trusted signature, and name a NAR the same upstream has, so this store never
//! offers a narinfo whose NAR it cannot deliver.

use std::sync::Arc;

use url::Url;

use super::confine::under;
use super::disk_cache::Expected;
use super::request::{Answer, UpstreamError};
use super::{Inner, NarSource};
use crate::formats::NarInfo;
use crate::store::blobs::check_key;

impl Inner {
    /// The narinfo from upstream `i`, when it is there, trusted, and its NAR is there too.
    pub(super) async fn narinfo_from(
        &self,
        i: usize,
        digest: &str,
    ) -> std::result::Result<Option<NarInfo>, UpstreamError> {
        let base = &self.upstreams[i].base;
        let url = base
            .join(&format!("{digest}.narinfo"))
            .expect("digest is a valid path");
        let resp = match self.ask(i, url.clone(), false, None).await? {
            Answer::Found(r) => r,
            Answer::Missing => return Ok(None),
        };
        let text = match Self::text(
            resp,
            &format!("{digest}.narinfo"),
            crate::formats::narinfo::MAX_NARINFO_BYTES,
        )
        .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("{url}: {e}");
                return Ok(None);
            }
        };
        let info = match NarInfo::parse(&text) {
            Ok(info) if info.store_path.digest() == digest => info,
            Ok(info) => {
                tracing::warn!(
                    "{url} describes {}, another object; ignoring it",
                    info.store_path
                );
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!("{url} does not parse ({e}); ignoring it");
                return Ok(None);
            }
        };
        let keys = &self.options.trusted_keys;
        if !keys.is_empty() && info.verified_by(keys).is_empty() {
            tracing::warn!(
                "{url} is not signed by a trusted key (trusted: {}; signed by: {}); refusing it \
                 (add the upstream's key with --trusted-public-key if it is trustworthy)",
                keys.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
                info.sigs
                    .iter()
                    .map(|s| s.key_name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(None);
        }
        // A relative URL stays inside this upstream; an absolute one may only lead to an
        // upstream or a listed NAR host, never to a host the narinfo's author picked.
        let (nar_url, relative) = match Url::parse(&info.url) {
            Ok(abs) if self.hosts.allows(&abs) => (abs, false),
            Ok(abs) => {
                tracing::warn!(
                    "{url} names its NAR at {abs}, a host that is not an upstream nor a listed \
                     NAR host; ignoring it (add the host with --upstream-nar-host if it serves \
                     this cache's files)"
                );
                return Ok(None);
            }
            Err(_) => match under(base, &info.url).filter(|_| check_key(&info.url).is_ok()) {
                Some(u) => (u, true),
                None => {
                    tracing::warn!(
                        "{url}: URL {:?} does not name a file inside the cache; ignoring it",
                        info.url
                    );
                    return Ok(None);
                }
            },
        };
        let served_url = if relative {
            info.url.clone()
        } else {
            // An absolute URL is served under a name of ours; the NAR still comes from where
            // the upstream said.
            match &info.file_hash {
                Some(h) => format!("nar/{}.nar{}", h.to_nix32(), info.compression.extension()),
                None => format!("nar/{digest}-upstream.nar{}", info.compression.extension()),
            }
        };
        let cached = match &self.disk {
            Some(d) => d.contains(&served_url).await,
            None => false,
        };
        if !cached {
            match self.ask(i, nar_url.clone(), true, None).await? {
                Answer::Found(_) => {}
                Answer::Missing => {
                    tracing::warn!(
                        "{url} names {nar_url}, which the upstream does not have; ignoring it"
                    );
                    return Ok(None);
                }
            }
        }
        self.sources
            .insert(
                served_url.clone(),
                Arc::new(NarSource {
                    upstream: i,
                    url: nar_url,
                    relative: relative.then(|| info.url.clone()),
                    expected: Expected {
                        size: info.file_size,
                        hash: info.file_hash.clone(),
                    },
                }),
            )
            .await;
        let mut info = info;
        info.url = served_url;
        Ok(Some(info))
    }
}
