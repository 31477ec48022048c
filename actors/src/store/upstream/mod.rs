//! Upstream binary caches (`http://`, `https://`, such as cache.nixos.org) as a read-only store.
//!
//! Upstreams are tried in the order given: a 404 from one sends the request to the next, and
//! so does a failure (connection error, timeout before the first byte, 5xx), which also counts
//! towards skipping that upstream for a while ([`health`]; `request.rs` holds the rule for
//! which answers are failures). Narinfos are accepted only when one of the configured trusted
//! keys signed them, and only when their upstream also has the NAR they name (a `HEAD`
//! request), so this store never hands out a narinfo whose NAR it cannot deliver
//! (`narinfo.rs`). NARs go through a size-bounded folder ([`disk_cache`]) when one is
//! configured, else they are proxied straight through.
//!
//! Requests go only to the upstreams' own hosts and to NAR hosts the operator listed
//! ([`confine`]): client-supplied keys are shape-checked and resolved under an upstream's
//! base, absolute narinfo URLs and redirects to other hosts are refused. A NAR download is
//! capped at the size its narinfo gives, and enters the NAR folder only when its size and
//! hash match.

mod confine;
pub mod disk_cache;
pub mod health;
mod narinfo;
pub mod netrc;
mod request;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use moka::future::Cache;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE};
use reqwest::StatusCode;
use url::Url;

use self::confine::{is_nar_key, under, Hosts};
use self::disk_cache::{Expected, NarDiskCache, StartDownload};
use self::health::Health;
pub use self::request::UpstreamError;
use self::request::{not_found_or, Answer};
use super::blobs::check_key;
use super::{Blob, ByteRange, ByteStream, Result, Store, StoreError, Vouched};
use crate::formats::cache_info::MAX_CACHE_INFO_BYTES;
use crate::formats::nar::MAX_LISTING_BYTES;
use crate::formats::{Algo, CacheInfo, Digest, Hash, NarInfo, PublicKey};

/// How to reach and trust the upstreams.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// Base URLs, in order of preference.
    pub urls: Vec<Url>,
    /// Keys a narinfo must be signed by (any one of them); empty accepts every narinfo.
    pub trusted_keys: Vec<PublicKey>,
    /// Longest wait for an upstream to connect and send its response headers.
    pub timeout: Duration,
    /// Failures in a row after which an upstream is skipped (0: never skip).
    pub failures_before_skip: u32,
    /// How long a failing upstream is skipped.
    pub skip_for: Duration,
    /// Folder and size bound (bytes) of the NAR cache; `None` proxies NARs without keeping them.
    pub nar_cache: Option<(PathBuf, u64)>,
    /// Hosts besides the upstreams' own (`HOST` or `HOST:PORT`) that NARs may be fetched
    /// from: where an upstream's narinfos point with absolute URLs, or its redirects lead
    /// (a CDN in front of a bucket). Nothing else is ever contacted.
    pub nar_hosts: Vec<String>,
    /// A netrc file whose `machine` entries give upstreams Basic credentials; they go only
    /// to the upstream's own scheme, host and port, never to a NAR host or redirect target.
    pub netrc_file: Option<PathBuf>,
}

impl UpstreamOptions {
    /// Defaults for these upstreams: 5 s timeout, skipped for 30 s after 3 failures in a row,
    /// no trusted keys, no NAR cache.
    pub fn new(urls: Vec<Url>) -> UpstreamOptions {
        UpstreamOptions {
            urls,
            trusted_keys: Vec::new(),
            timeout: Duration::from_secs(5),
            failures_before_skip: 3,
            skip_for: Duration::from_secs(30),
            nar_cache: None,
            nar_hosts: Vec::new(),
            netrc_file: None,
        }
    }
}

/// Where a NAR this store handed out a narinfo for can be fetched.
#[derive(Debug)]
struct NarSource {
    /// The upstream whose narinfo named it.
    upstream: usize,
    /// Its URL there.
    url: Url,
    /// The narinfo's `URL:` when relative, so other upstreams can be asked too.
    relative: Option<String>,
    expected: Expected,
}

struct Upstream {
    base: Url,
    health: Health,
    /// Basic credentials for requests to `base`'s origin (from the netrc file).
    login: Option<netrc::Login>,
}

struct Inner {
    upstreams: Vec<Upstream>,
    http: reqwest::Client,
    options: UpstreamOptions,
    /// NAR URL served → where it comes from, filled by narinfo lookups.
    sources: Cache<String, Arc<NarSource>>,
    disk: Option<Arc<NarDiskCache>>,
    /// Where NARs may come from.
    hosts: Hosts,
}

/// A read-only store over an ordered list of upstream binary caches.
#[derive(Clone)]
pub struct UpstreamStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for UpstreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamStore({})", self.describe())
    }
}

/// `base` with a trailing `/`, so that joining keeps its path (`https://h/cache` + `x`).
fn as_base(mut url: Url) -> Url {
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    url.set_query(None);
    url.set_fragment(None);
    url
}

impl UpstreamStore {
    /// Prepares clients for the upstreams (nothing is sent yet) and the NAR cache folder.
    pub fn open(options: UpstreamOptions) -> Result<UpstreamStore> {
        if options.urls.is_empty() {
            return Err(StoreError::Invalid(
                "no upstream URL given; name at least one http(s):// binary cache".into(),
            ));
        }
        for u in &options.urls {
            if !matches!(u.scheme(), "http" | "https") {
                return Err(StoreError::Invalid(format!(
                    "upstream {u} is not an http:// or https:// URL"
                )));
            }
        }
        let upstream_bases: Vec<Url> = options.urls.iter().cloned().map(as_base).collect();
        let hosts = Hosts::new(&upstream_bases, &options.nar_hosts);
        let http = reqwest::Client::builder()
            .user_agent(concat!("nixcached/", env!("CARGO_PKG_VERSION")))
            .redirect(hosts.redirect_policy())
            .connect_timeout(options.timeout)
            // A large NAR takes as long as it takes; only a stalled transfer fails.
            .read_timeout(options.timeout.max(Duration::from_secs(30)))
            .build()
            .map_err(|e| StoreError::backend("setting up the HTTP client for upstreams", e))?;
        let netrc = match &options.netrc_file {
            Some(path) => Some(netrc::Netrc::read(path)?),
            None => None,
        };
        if let (Some(n), Some(path)) = (&netrc, &options.netrc_file) {
            for base in &upstream_bases {
                if n.login_for(base.host_str().unwrap_or("")).is_none() {
                    tracing::warn!(
                        "netrc file {} has no `machine {}` entry: upstream {base} gets no credentials",
                        path.display(),
                        base.host_str().unwrap_or("")
                    );
                }
            }
        }
        let upstreams = upstream_bases
            .into_iter()
            .map(|base| Upstream {
                login: netrc
                    .as_ref()
                    .and_then(|n| n.login_for(base.host_str().unwrap_or("")))
                    .cloned(),
                health: Health::new(
                    base.to_string(),
                    options.failures_before_skip,
                    options.skip_for,
                ),
                base,
            })
            .collect();
        let disk = match &options.nar_cache {
            Some((dir, max)) if *max > 0 => Some(NarDiskCache::open(dir, *max)?),
            _ => None,
        };
        if options.trusted_keys.is_empty() {
            tracing::warn!(
                "no trusted public keys for upstreams {}: their narinfos are served unverified \
                 and never signed by this server's keys (give --trusted-public-key NAME:KEY, \
                 for cache.nixos.org \
                 cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=)",
                options
                    .urls
                    .iter()
                    .map(Url::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(UpstreamStore {
            inner: Arc::new(Inner {
                upstreams,
                http,
                sources: Cache::builder().max_capacity(200_000).build(),
                disk,
                options,
                hosts,
            }),
        })
    }

    /// The NAR cache, when there is one.
    pub fn disk_cache(&self) -> Option<&Arc<NarDiskCache>> {
        self.inner.disk.as_ref()
    }
}

impl Inner {
    /// The upstreams to try, in order, skipping those in their cool-down.
    fn order(&self, first: Option<usize>) -> Vec<usize> {
        let mut v: Vec<usize> = first.into_iter().collect();
        v.extend((0..self.upstreams.len()).filter(|i| Some(*i) != first));
        v.retain(|&i| self.upstreams[i].health.available());
        v
    }

    /// `GET` (or `HEAD`) of `path` from the first upstream that has it, in order.
    async fn first_found(&self, path: &str, head: bool) -> Result<(usize, reqwest::Response)> {
        let order = self.order(None);
        if order.is_empty() {
            return Err(UpstreamError::AllSkipped.into_store_error(path));
        }
        let mut last_err = None;
        for i in order {
            let Some(url) = under(&self.upstreams[i].base, path) else {
                return Err(StoreError::Invalid(format!(
                    "{path:?} is not a name inside a binary cache"
                )));
            };
            match self.ask(i, url, head, None).await {
                Ok(Answer::Found(r)) => return Ok((i, r)),
                Ok(Answer::Missing) => {}
                Err(e) => last_err = Some(e),
            }
        }
        Err(not_found_or(path, last_err))
    }

    /// Reads a small text answer (narinfo, listing, nix-cache-info), refusing one longer
    /// than `max` bytes by its `Content-Length` or as it arrives: an upstream cannot make the
    /// daemon hold more than `max` bytes for it.
    async fn text(mut resp: reqwest::Response, what: &str, max: usize) -> Result<String> {
        let too_large = || {
            StoreError::Corrupt(format!(
                "{what} from upstream is larger than the {max} bytes a real one ever takes; the upstream serves a corrupt or hostile object"
            ))
        };
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        let encoding = content_encoding(&resp);
        let mut bytes = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| StoreError::backend(format!("reading {what} from upstream"), e))?
        {
            if bytes.len() + chunk.len() > max {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        // Stored with `narinfo-compression` or `ls-compression` (cache.nixos.org's listings
        // are brotli): decoded as Nix's own client does.
        let bytes = super::encoded::decode_small(bytes, encoding, max, what).await?;
        String::from_utf8(bytes)
            .map_err(|_| StoreError::Corrupt(format!("{what} from upstream is not UTF-8 text")))
    }

    /// Where to try a NAR from, in order, and what it must match. A URL from a narinfo this
    /// store served comes with that narinfo's promises; any other must have the shape of a
    /// cache's NAR file ([`is_nar_key`]), and is then only checked against the hash its name
    /// carries, when it carries one.
    async fn nar_candidates(&self, url: &str) -> Result<(Vec<(usize, Url)>, Expected)> {
        let src = self.sources.get(url).await;
        let mut out = Vec::new();
        let (first, relative, expected) = match &src {
            Some(s) => {
                out.push((s.upstream, s.url.clone()));
                (Some(s.upstream), s.relative.clone(), s.expected.clone())
            }
            None if is_nar_key(url) => (None, Some(url.to_owned()), expected_from_name(url)),
            None => {
                return Err(StoreError::NotFound(format!(
                    "{url} (not a NAR file name of a binary cache, nor named by a narinfo \
                     served here)"
                )))
            }
        };
        if let Some(rel) = relative {
            for i in 0..self.upstreams.len() {
                if Some(i) != first {
                    if let Some(u) = under(&self.upstreams[i].base, &rel) {
                        out.push((i, u));
                    }
                }
            }
        }
        out.retain(|(i, _)| self.upstreams[*i].health.available());
        Ok((out, expected))
    }

    /// Opens a NAR (or a range of it) from the first upstream that has it.
    async fn fetch_nar(
        &self,
        url: &str,
        candidates: Vec<(usize, Url)>,
        range: Option<(u64, u64)>,
    ) -> Result<reqwest::Response> {
        if candidates.is_empty() {
            return Err(UpstreamError::AllSkipped.into_store_error(url));
        }
        let mut last_err = None;
        for (i, u) in candidates {
            match self.ask(i, u, false, range).await {
                Ok(Answer::Found(r)) => return Ok(r),
                Ok(Answer::Missing) => {}
                Err(e) => last_err = Some(e),
            }
        }
        Err(not_found_or(url, last_err))
    }
}

fn body(resp: reqwest::Response) -> ByteStream {
    Box::pin(resp.bytes_stream().map_err(std::io::Error::other))
}

/// What the name of a NAR file promises: Nix names NAR files by the nixbase32 SHA-256 of
/// their bytes (`nar/<hash>.nar.xz`), so such a file must hash to its name.
fn expected_from_name(key: &str) -> Expected {
    let hash = key
        .strip_prefix("nar/")
        .and_then(|f| f.split_once(".nar"))
        .map(|(name, _)| name)
        // 52 characters is the nixbase32 form; a name in another encoding is not a hash.
        .filter(|name| name.len() == 52)
        .and_then(|name| Hash::from_digest_text(Algo::Sha256, name).ok());
    Expected { size: None, hash }
}

/// `stream`, failing once it has sent more than `cap` bytes: an upstream cannot make a NAR
/// longer than its narinfo says.
fn capped(stream: ByteStream, cap: u64, what: String) -> ByteStream {
    use futures::StreamExt;
    let mut sent = 0u64;
    Box::pin(stream.map(move |chunk| {
        let chunk = chunk?;
        sent = sent.saturating_add(chunk.len() as u64);
        if sent > cap {
            return Err(std::io::Error::other(format!(
                "{what}: the upstream sent more than the {cap} bytes its narinfo gives"
            )));
        }
        Ok(chunk)
    }))
}

/// The compression an answer's `Content-Encoding` names, if any.
fn content_encoding(resp: &reqwest::Response) -> Option<crate::formats::Compression> {
    resp.headers()
        .get(reqwest::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .and_then(super::encoded::from_header)
}

/// The total size an answer declares: from `Content-Range` of a 206, else `Content-Length`.
fn declared_total(resp: &reqwest::Response) -> Option<u64> {
    if resp.status() == StatusCode::PARTIAL_CONTENT {
        resp.headers()
            .get(CONTENT_RANGE)?
            .to_str()
            .ok()?
            .rsplit('/')
            .next()?
            .parse()
            .ok()
    } else {
        resp.headers()
            .get(CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }
}

#[async_trait]
impl Store for UpstreamStore {
    fn describe(&self) -> String {
        self.inner
            .upstreams
            .iter()
            .map(|u| u.base.as_str().trim_end_matches('/'))
            .collect::<Vec<_>>()
            .join(" then ")
    }

    async fn cache_info(&self) -> Result<CacheInfo> {
        match self.inner.first_found("nix-cache-info", false).await {
            Ok((_, resp)) => {
                let text = Inner::text(resp, "nix-cache-info", MAX_CACHE_INFO_BYTES).await?;
                CacheInfo::parse(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
            }
            Err(e) => {
                // Serving must not depend on an upstream being up at start-up.
                tracing::warn!("no upstream answered nix-cache-info ({e}); assuming /nix/store");
                Ok(CacheInfo::default())
            }
        }
    }

    async fn narinfo(&self, digest: &Digest) -> Result<NarInfo> {
        let order = self.inner.order(None);
        if order.is_empty() {
            return Err(UpstreamError::AllSkipped.into_store_error(format!("{digest}.narinfo")));
        }
        let mut last_err = None;
        for i in order {
            match self.inner.narinfo_from(i, digest).await {
                Ok(Some(info)) => return Ok(info),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
        }
        Err(not_found_or(&format!("{digest}.narinfo"), last_err))
    }

    async fn narinfo_vouched(&self, digest: &Digest) -> Result<Vouched<NarInfo>> {
        let info = self.narinfo(digest).await?;
        // With trusted keys, every narinfo handed out carries a verified signature by one.
        let vouched = !self.inner.options.trusted_keys.is_empty();
        if !vouched {
            tracing::info!(
                "{digest}.narinfo from {} passes through unverified and unsigned by this \
                 server (no --trusted-public-key to check it with)",
                self.describe()
            );
        }
        Ok(Vouched {
            value: info,
            vouched,
        })
    }

    async fn nar(&self, url: &str, range: Option<ByteRange>) -> Result<Blob> {
        check_key(url)?;
        let (candidates, expected) = self.inner.nar_candidates(url).await?;
        // Only a file with a hash to check is kept: the folder never holds unverified bytes.
        if let Some(disk) = self.inner.disk.as_ref().filter(|_| expected.hash.is_some()) {
            let inner = self.inner.clone();
            let key = url.to_owned();
            let size = expected.size;
            return disk
                .get(url, range, expected, move || {
                    let start: StartDownload = Box::pin(async move {
                        let resp = inner.fetch_nar(&key, candidates, None).await?;
                        let len = declared_total(&resp).or(size);
                        Ok((body(resp), len))
                    });
                    start
                })
                .await;
        }
        // Without a NAR cache: proxy, passing the range on when the size is known.
        let wanted = match (range, expected.size) {
            (Some(r), Some(size)) => Some(ByteRange::resolve_or_err(Some(r), size)?),
            _ => None,
        };
        let resp = self.inner.fetch_nar(url, candidates, wanted).await?;
        let declared = declared_total(&resp);
        expected.check_announced(declared, url)?;
        let total = declared.or(expected.size).ok_or_else(|| {
            StoreError::backend(
                format!("fetching {url}"),
                "the upstream sent no Content-Length; configure a NAR cache (--nar-cache-dir)",
            )
        })?;
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            // An upstream may answer 206 unasked; a panic here would take the worker down.
            let Some((s, e)) = wanted else {
                return Err(StoreError::Corrupt(format!(
                    "{url}: the upstream answered 206 Partial Content to a request for the whole NAR"
                )));
            };
            return Ok(Blob {
                stream: capped(body(resp), e - s, url.to_owned()),
                span: (s, e),
                encoding: None,
                total,
            });
        }
        let span = ByteRange::resolve_or_err(range, total)?;
        Ok(Blob::of_span(
            capped(body(resp), total, url.to_owned()),
            span,
            total,
        ))
    }

    async fn listing(&self, digest: &Digest) -> Result<String> {
        let what = format!("{digest}.ls");
        let (_, resp) = self.inner.first_found(&what, false).await?;
        let text = Inner::text(resp, &what, MAX_LISTING_BYTES).await?;
        // Only JSON is passed on: a listing in an encoding we cannot read is one we lack.
        if serde_json::from_str::<serde_json::Value>(&text).is_err() {
            return Err(StoreError::NotFound(what));
        }
        Ok(text)
    }

    async fn realisation(&self, id: &str) -> Result<String> {
        super::realisation::check_id(id)?;
        let key = super::realisation::key(id);
        let (_, resp) = self.inner.first_found(&key, false).await?;
        let text = Inner::text(resp, &key, super::realisation::MAX_REALISATION_BYTES).await?;
        super::realisation::check_text(id, &text)?;
        Ok(text)
    }

    async fn log(&self, drv: &str) -> Result<Blob> {
        crate::formats::StorePath::from_base_name(drv)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let key = format!("log/{drv}");
        let (_, resp) = self.inner.first_found(&key, false).await?;
        let encoding = content_encoding(&resp);
        // A plain log goes out as it comes and needs its length; an encoded one is decoded
        // into a file first, which measures it.
        let total = match (declared_total(&resp), encoding) {
            (Some(n), _) => n,
            (None, Some(_)) => 0,
            (None, None) => {
                return Err(StoreError::backend(
                    format!("fetching {key}"),
                    "the upstream sent no Content-Length",
                ))
            }
        };
        let blob = Blob {
            stream: capped(body(resp), super::MAX_LOG_BYTES, key.clone()),
            span: (0, total),
            encoding,
            total,
        };
        // Stored with `log-compression` (brotli on cache.nixos.org), or plain.
        super::encoded::decode_whole(blob, super::MAX_LOG_BYTES, &key).await
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        Err(StoreError::Unsupported(format!(
            "{} cannot be listed: binary caches over HTTP have no index",
            self.describe()
        )))
    }

    async fn put_nar(&self, _url: &str, _data: ByteStream) -> Result<u64> {
        Err(read_only(self))
    }

    async fn put_narinfo(&self, _info: &NarInfo) -> Result<()> {
        Err(read_only(self))
    }

    async fn put_listing(&self, _digest: &Digest, _json: &str) -> Result<()> {
        Err(read_only(self))
    }

    async fn put_log(&self, _drv: &str, _data: ByteStream) -> Result<()> {
        Err(read_only(self))
    }

    async fn exists(&self, url: &str) -> Result<bool> {
        if let Some(digest) = url.strip_suffix(".narinfo") {
            let digest = Digest::parse(digest).map_err(|e| StoreError::Invalid(e.to_string()))?;
            return match self.narinfo(&digest).await {
                Ok(_) => Ok(true),
                Err(StoreError::NotFound(_)) => Ok(false),
                Err(e) => Err(e),
            };
        }
        check_key(url)?;
        match self.inner.first_found(url, true).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn prepare_for_upload(&self, _store_dir: &crate::formats::StoreDir) -> Result<()> {
        Err(read_only(self))
    }
}

fn read_only(s: &UpstreamStore) -> StoreError {
    StoreError::Unsupported(format!(
        "{} is a read-only upstream cache; upload to a file://, s3://, gs:// or ssh:// store instead",
        s.describe()
    ))
}
