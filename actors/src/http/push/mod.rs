//! The write side of the binary cache protocol, as Nix's `nix copy --to http://…` uses it:
//! `PUT` of NARs, `.ls` listings, build logs, `nix-cache-info` and, last, narinfos.
//!
//! Only a cache served with pushing allowed takes writes; every other gets 405 as before.
//! A NAR is streamed into the store (never held whole), hashed as it arrives and decompressed
//! on the side to hash the NAR inside, and what it hashed to is remembered for a while. A
//! narinfo is stored only when its NAR is there and hashes to what it says, when the
//! narinfos of its references are there, and (with trusted keys) when one of them signed it.
//! What is refused gets a 4xx with one line saying what to do, and nothing is stored.

pub mod checks;
pub mod ingest;

use std::time::Duration;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use moka::future::Cache;

use super::{CacheService, Ingress, Route};
use crate::formats::cache_info::MAX_CACHE_INFO_BYTES;
use crate::formats::nar::Listing;
use crate::formats::nar::MAX_LISTING_BYTES;
use crate::formats::narinfo::MAX_NARINFO_BYTES;
use crate::formats::{CacheInfo, Digest, NarInfo, PublicKey, SecretKey};
use crate::store::{StoreError, MAX_LOG_BYTES};
use checks::{NarRecord, Refusal};
use ingest::Stop;

/// NAR records kept at most: one per NAR pushed and not yet followed by its narinfo (about
/// 300 bytes each). One that is gone is computed again by reading the NAR back.
const MAX_RECORDS: u64 = 100_000;

/// How long what a NAR hashed to is remembered; a narinfo arriving later makes the server
/// read the NAR back instead.
const RECORD_TTL: Duration = Duration::from_secs(24 * 3600);

/// References looked for at once when a narinfo arrives.
const REFERENCE_LOOKUPS: usize = 8;

/// Settings of a cache that takes pushes.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// When not empty, a narinfo must carry a valid signature by one of these keys.
    pub trusted_keys: Vec<PublicKey>,
}

/// The state of pushing into one served cache.
pub struct Pusher {
    trusted_keys: Vec<PublicKey>,
    /// This server's keys: narinfos stored get its signature (it checked their NARs).
    keys: Vec<SecretKey>,
    /// What each pushed NAR hashed to, by URL.
    records: Cache<String, NarRecord>,
    /// Set once the store has been readied for writes (its `nix-cache-info` written or
    /// checked to be for this store directory).
    prepared: tokio::sync::OnceCell<()>,
}

impl Pusher {
    /// Pushing with `options`, signing with `keys`.
    pub fn new(options: &PushOptions, keys: Vec<SecretKey>) -> Pusher {
        Pusher {
            trusted_keys: options.trusted_keys.clone(),
            keys,
            records: Cache::builder()
                .max_capacity(MAX_RECORDS)
                .time_to_live(RECORD_TTL)
                .build(),
            prepared: tokio::sync::OnceCell::new(),
        }
    }
}

/// Why a push failed.
enum Failed {
    Refused(Refusal),
    Store(String, StoreError),
}

impl From<Refusal> for Failed {
    fn from(r: Refusal) -> Failed {
        Failed::Refused(r)
    }
}

fn store_failed(what: impl Into<String>) -> impl FnOnce(StoreError) -> Failed {
    let what = what.into();
    move |e| Failed::Store(what, e)
}

impl Failed {
    fn of(stop: Stop, what: &str) -> Failed {
        match stop {
            Stop::Refused(r) => Failed::Refused(r),
            Stop::Store(e) => Failed::Store(what.to_owned(), e),
        }
    }
}

/// A one-line text response.
fn line(status: StatusCode, message: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(format!(
            "{} {}: {message}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("error").to_lowercase()
        ))
}

fn respond(svc: &CacheService, rel: &str, result: Result<(), Failed>) -> HttpResponse {
    match result {
        Ok(()) => line(StatusCode::OK, "stored"),
        Err(Failed::Refused(r)) => {
            tracing::info!("push of {rel} refused: {}", r.message);
            line(r.status, &r.message)
        }
        Err(Failed::Store(what, e)) => {
            // The store's own words stay in the log; the pusher learns what it can do.
            tracing::warn!("push of {rel} into {}: {what}: {e}", svc.description);
            let (status, msg) = match &e {
                StoreError::Invalid(m) | StoreError::Unsupported(m) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, format!("{what}: {m}"))
                }
                _ if e.is_transient() => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{what}: the store did not take the write (the server log says why); push again"),
                ),
                _ => (
                    StatusCode::BAD_GATEWAY,
                    format!("{what}: the store refused the write (the server log says why); fix the store and push again"),
                ),
            };
            line(status, &msg)
        }
    }
}

/// The announced body length, when there is one.
fn declared_length(req: &HttpRequest) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Handles a `PUT`: refused with 405 unless the cache takes pushes.
pub(super) async fn put(
    req: &HttpRequest,
    ing: &Ingress,
    route: Route<'_>,
    rel: &str,
    body: web::Payload,
) -> HttpResponse {
    let svc = &*ing.service;
    let Some(pusher) = svc.push.as_deref() else {
        return super::read_only();
    };
    let encoded = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
    if encoded {
        return line(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bodies must be sent as they are stored, without Content-Encoding; leave narinfo-compression, ls-compression and log-compression unset",
        );
    }
    if let Err(f) = prepare(svc, pusher).await {
        return respond(svc, rel, Err(f));
    }
    let declared = declared_length(req);
    let result = match route {
        Route::Nar(url) => put_nar(svc, pusher, url, body).await,
        Route::NarInfo(digest) => put_narinfo(svc, pusher, digest, declared, body).await,
        Route::Listing(digest) => put_listing(svc, digest, declared, body).await,
        Route::Log(drv) => put_log(svc, drv, body).await,
        Route::Realisation(id) => put_realisation(svc, id, declared, body).await,
        Route::CacheInfo => put_cache_info(svc, declared, body).await,
        Route::BadDigest => Err(Refusal::bad(format!(
            "{rel} does not name a store path digest; push <32-character digest>.narinfo"
        ))
        .into()),
        _ => {
            return HttpResponse::MethodNotAllowed()
                .insert_header((header::ALLOW, "GET, HEAD, OPTIONS"))
                .content_type("text/plain; charset=utf-8")
                .body("405 method not allowed: only nix-cache-info, <digest>.narinfo, <digest>.ls, nar/… and log/… can be pushed\n")
        }
    };
    respond(svc, rel, result)
}

/// Readies the store for writes once: a binary cache gets its `nix-cache-info`, and one made
/// for another store directory is refused before anything is written into it.
async fn prepare(svc: &CacheService, pusher: &Pusher) -> Result<(), Failed> {
    let store_dir = svc.health.store_dir();
    pusher
        .prepared
        .get_or_try_init(|| svc.store.prepare_for_upload(&store_dir))
        .await
        .map(|_| ())
        .map_err(store_failed("readying the store for pushes"))
}

async fn put_nar(
    svc: &CacheService,
    pusher: &Pusher,
    url: &str,
    body: web::Payload,
) -> Result<(), Failed> {
    let (stem, compression) = checks::nar_url(url)?;
    // Its name is its content, so a NAR already there holds these very bytes: they are only
    // checked and hashed, not written again.
    let exists = svc
        .store
        .exists(url)
        .await
        .map_err(store_failed(format!("looking for {url}")))?;
    let accept = |r: &NarRecord| checks::name_is_content(stem, r);
    let store = svc.store.clone();
    let record = if exists {
        let drain = |s| async move {
            crate::publish::drain(s)
                .await
                .map_err(|e| StoreError::backend("hashing", e))
        };
        ingest::ingest_nar(body, url, compression, accept, drain).await
    } else {
        let owned = url.to_owned();
        let write = |s| async move { store.put_nar(&owned, s).await };
        ingest::ingest_nar(body, url, compression, accept, write).await
    }
    .map_err(|s| Failed::of(s, &format!("writing {url}")))?;
    tracing::debug!(
        "pushed {url}: {} bytes, NAR {} ({} bytes)",
        record.file_size,
        record.nar_hash,
        record.nar_size
    );
    pusher.records.insert(url.to_owned(), record).await;
    Ok(())
}

/// What the NAR at `url` hashes to: as remembered from its push, else read back.
async fn nar_record(
    svc: &CacheService,
    pusher: &Pusher,
    info: &NarInfo,
) -> Result<NarRecord, Failed> {
    if let Some(r) = pusher.records.get(&info.url).await {
        return Ok(r);
    }
    let url = &info.url;
    let missing = || {
        Refusal::conflict(format!(
            "no NAR at {url} for {}; push the NAR first, then its narinfo (nix copy does)",
            info.store_path
        ))
    };
    let blob = match svc.store.nar(url, None).await {
        Ok(b) => b,
        Err(StoreError::NotFound(_)) => return Err(missing().into()),
        Err(e) => return Err(Failed::Store(format!("reading back {url}"), e)),
    };
    let record = ingest::rehash(blob.stream, url, info.compression)
        .await
        .map_err(|s| match s {
            Stop::Refused(r) => Refusal::conflict(format!(
                "the NAR at {url} does not read back as a {} NAR ({}); push the NAR again",
                info.compression, r.message
            ))
            .into(),
            Stop::Store(e) => Failed::Store(format!("reading back {url}"), e),
        })?;
    pusher.records.insert(url.clone(), record.clone()).await;
    Ok(record)
}

async fn put_narinfo(
    svc: &CacheService,
    pusher: &Pusher,
    digest: Digest,
    declared: Option<u64>,
    body: web::Payload,
) -> Result<(), Failed> {
    let name = format!("{digest}.narinfo");
    let text = ingest::small_text(body, &name, declared, MAX_NARINFO_BYTES).await?;
    let mut info = NarInfo::parse(&text)
        .map_err(|e| Refusal::bad(format!("{name}: {e}; push the narinfo nix copy writes")))?;
    if info.store_path.digest() != &digest {
        return Err(Refusal::bad(format!(
            "{name} describes {}, another store path; push it as {}.narinfo",
            info.store_path,
            info.store_path.digest()
        ))
        .into());
    }
    let store_dir = svc.store_dir();
    if info.store_dir.as_str() != store_dir {
        return Err(Refusal::unprocessable(format!(
            "{name} is for store directory {}, but this cache holds paths of {store_dir}; push it to a cache for {}",
            info.store_dir, info.store_dir
        ))
        .into());
    }
    checks::nar_url(&info.url)?;
    if !pusher.trusted_keys.is_empty() && info.verified_by(&pusher.trusted_keys).is_empty() {
        let names: Vec<&str> = pusher.trusted_keys.iter().map(|k| k.name()).collect();
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} carries no valid signature by a key this cache trusts for pushes ({}); sign it with one (nix store sign -k) and push again",
                info.store_path,
                names.join(", ")
            ),
        )
        .into());
    }
    let record = nar_record(svc, pusher, &info).await?;
    checks::matches_record(&mut info, &record)?;
    missing_references(svc, &info).await?;
    for key in &pusher.keys {
        info.sign(key);
    }
    svc.store
        .put_narinfo(&info)
        .await
        .map_err(store_failed(format!("writing {name}")))?;
    // Seen at once: not a miss remembered from before, nor an older narinfo.
    svc.lookups.forget(&digest).await;
    svc.catalog.learn(&info);
    tracing::info!("pushed {}", store_dir_path(&info));
    Ok(())
}

fn store_dir_path(info: &NarInfo) -> String {
    info.store_dir.display(&info.store_path)
}

/// Refuses a narinfo whose references (itself aside) have no narinfo in the cache.
async fn missing_references(svc: &CacheService, info: &NarInfo) -> Result<(), Failed> {
    let others = info
        .references
        .iter()
        .filter(|r| r.digest() != info.store_path.digest());
    let mut looked = futures::stream::iter(others)
        .map(|r| async move {
            if let Some(Ok(_)) = svc.lookups.remembered(r.digest()).await {
                return (r, Ok(true));
            }
            (
                r,
                svc.store.exists(&format!("{}.narinfo", r.digest())).await,
            )
        })
        .buffer_unordered(REFERENCE_LOOKUPS);
    let mut missing = Vec::new();
    while let Some((r, found)) = looked.next().await {
        match found {
            Ok(true) => {}
            Ok(false) => missing.push(r.to_string()),
            Err(e) => return Err(Failed::Store(format!("looking for reference {r}"), e)),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    missing.sort();
    Err(Refusal::conflict(format!(
        "{} references {} which this cache does not hold; push references first (nix copy does)",
        info.store_path,
        missing.join(", ")
    ))
    .into())
}

async fn put_listing(
    svc: &CacheService,
    digest: Digest,
    declared: Option<u64>,
    body: web::Payload,
) -> Result<(), Failed> {
    let name = format!("{digest}.ls");
    let json = ingest::small_text(body, &name, declared, MAX_LISTING_BYTES).await?;
    Listing::from_json(&json).map_err(|e| {
        Refusal::bad(format!(
            "{name} is not a NAR listing ({e}); push the listing nix copy writes"
        ))
    })?;
    svc.store
        .put_listing(&digest, &json)
        .await
        .map_err(store_failed(format!("writing {name}")))
}

async fn put_log(svc: &CacheService, drv: &str, body: web::Payload) -> Result<(), Failed> {
    crate::formats::StorePath::from_base_name(drv).map_err(|e| {
        Refusal::bad(format!(
            "log/{drv}: {e}; push logs as log/<derivation base name>"
        ))
    })?;
    let what = format!("log/{drv}");
    let store = svc.store.clone();
    let write = |s| async move { store.put_log(drv, s).await };
    ingest::ingest(body, &what, MAX_LOG_BYTES, write)
        .await
        .map_err(|s| Failed::of(s, &format!("writing {what}")))
}

/// A realisation, stored once its output's narinfo is in the cache (as a narinfo waits for
/// its references): a client that reads it can then substitute the output.
async fn put_realisation(
    svc: &CacheService,
    id: &str,
    declared: Option<u64>,
    body: web::Payload,
) -> Result<(), Failed> {
    use crate::store::realisation::{check_id, check_text, key, MAX_REALISATION_BYTES};
    check_id(id).map_err(|e| Refusal::bad(e.to_string()))?;
    let name = key(id);
    let json = ingest::small_text(body, &name, declared, MAX_REALISATION_BYTES).await?;
    let out = check_text(id, &json)
        .map_err(|e| Refusal::bad(format!("{e}; push the realisation nix copy writes")))?;
    let narinfo = format!("{}.narinfo", out.digest());
    let present = svc
        .store
        .exists(&narinfo)
        .await
        .map_err(|e| Failed::Store(format!("looking for {narinfo}"), e))?;
    if !present {
        return Err(Refusal::conflict(format!(
            "{name} names {out}, which this cache does not hold; push the path first (nix copy does)"
        ))
        .into());
    }
    svc.store
        .put_realisation(id, &json)
        .await
        .map_err(store_failed(format!("writing {name}")))
}

async fn put_cache_info(
    svc: &CacheService,
    declared: Option<u64>,
    body: web::Payload,
) -> Result<(), Failed> {
    let text = ingest::small_text(body, "nix-cache-info", declared, MAX_CACHE_INFO_BYTES).await?;
    let info = CacheInfo::parse(&text).map_err(|e| Refusal::bad(format!("nix-cache-info: {e}")))?;
    let ours = svc.store_dir();
    if info.store_dir.as_str() != ours {
        return Err(Refusal::unprocessable(format!(
            "this cache holds paths of {ours}, not {}; push to a cache for that store directory",
            info.store_dir
        ))
        .into());
    }
    // The cache's own nix-cache-info stays: it was written (or checked) when the first push
    // readied the store, and what is served is this server's.
    Ok(())
}
