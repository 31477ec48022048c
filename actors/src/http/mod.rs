//! HTTP ingress: actix-web handlers that speak the Nix binary cache protocol.
//!
//! Handlers turn requests into typed messages for the lookup actor (narinfos) and the fetcher
//! actor (NARs, listings, logs), and turn the replies into responses. NAR bytes are never
//! carried by a message: the fetcher hands back a stream, which the response body polls.
//!
//! Error policy, because Nix stops using a substituter that answers 5xx: anything the store
//! lacks, and any store failure or timeout, is a 404 (logged on our side); malformed requests
//! are 400; wrong methods are 405 with `Allow`. Response bodies never carry internal detail.

pub mod auth;
pub mod error;
pub mod explorer;
pub mod idle;
pub mod nar_path;
pub mod negotiate;
pub mod push;
pub mod range;
pub mod templates;

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use bytes::Bytes;
use futures::StreamExt;

use crate::catalog::{Catalog, Discovery};
use crate::fetcher::{FetchListing, FetchLog, Fetcher, OpenNar};
use crate::formats::{Compression, Digest, PublicKey};
use crate::lookup::{Lookup, LookupActor, LookupShared, ServedNarInfo};
use crate::metrics::Metrics;
use crate::nar_files::NarFiles;
use crate::store::guarded::{Condition, StoreHealth};
use crate::store::{Blob, Store, StoreError};
use error::{respond, text, Failure, Mode};

/// Everything one served cache needs, shared by all HTTP workers.
pub struct CacheService {
    /// The store served.
    pub store: Arc<dyn Store>,
    /// Longest a store operation may take before it counts as a miss.
    pub backend_timeout: Duration,
    /// Whether uncompressed NARs go out zstd-encoded to clients that accept it.
    pub transparent_zstd: bool,
    /// The shared narinfo caches.
    pub lookups: Arc<LookupShared>,
    /// The watch on the store: whether it is up, and its `nix-cache-info`.
    pub health: Arc<StoreHealth>,
    /// `Priority` advertised in `nix-cache-info` (the store's own when `None`).
    pub priority: Option<u32>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Seconds clients and CDNs may cache a 404.
    pub negative_ttl_secs: u64,
    /// What is served, for logs.
    pub description: String,
    /// The explorer's templates and static files.
    pub templates: templates::Templates,
    /// What the explorer index knows about the store's objects.
    pub catalog: Arc<Catalog>,
    /// The background discovery that fills the catalog.
    pub discovery: Addr<Discovery>,
    /// Files inside NARs, for the NAR browser.
    pub nar_files: NarFiles,
    /// Keys whose signatures the object page reports as verified.
    pub trusted_keys: Vec<PublicKey>,
    /// How much of each kind of store work runs at once, shared by every worker's fetcher.
    pub budgets: crate::budget::Budgets,
    /// When each path was last served, when records are kept.
    pub access: Option<Arc<crate::access::AccessLog>>,
    /// The public halves of the keys this server signs with, for the landing page.
    pub signing_keys: Vec<PublicKey>,
    /// Who may read and write ([`auth`]); checked before any route is handled.
    pub auth: Arc<auth::Access>,
    /// Pushes (`PUT`) into the store, when the cache takes them (`--allow-push`).
    pub push: Option<Arc<push::Pusher>>,
}

impl CacheService {
    /// The `nix-cache-info` served: the store's as last read (Nix's default while the store
    /// has not answered), with `WantMassQuery` on and the configured priority.
    pub fn cache_info_text(&self) -> String {
        let mut info = self.health.cache_info();
        info.want_mass_query = true;
        if self.priority.is_some() {
            info.priority = self.priority;
        }
        info.render()
    }

    /// The store directory the objects belong to (`/nix/store`).
    pub fn store_dir(&self) -> String {
        self.health.store_dir().as_str().to_owned()
    }
}

/// Per-worker state: the shared service plus this worker's lookup and fetcher actors.
pub struct Ingress {
    service: Arc<CacheService>,
    lookup: Addr<LookupActor>,
    /// Opens NARs, listings and logs on this worker's own thread: a NAR served through a
    /// fetcher on another thread paid two cross-thread wake-ups per request, which measurably
    /// slowed one-connection NAR throughput.
    fetcher: Addr<Fetcher>,
}

impl Ingress {
    /// Starts this worker's lookup and fetcher actors; call from inside the HTTP server's app
    /// factory so the actors live on the worker's own thread.
    pub fn start(service: Arc<CacheService>) -> Ingress {
        let lookup = LookupActor::new(service.lookups.clone()).start();
        let fetcher = Fetcher::new(
            service.store.clone(),
            service.backend_timeout,
            service.metrics.clone(),
            service.budgets.clone(),
        )
        .start();
        Ingress {
            service,
            lookup,
            fetcher,
        }
    }
}

/// Registers the cache's routes at the root of an app.
pub fn configure(cfg: &mut web::ServiceConfig, ingress: Ingress) {
    cfg.app_data(web::Data::new(ingress))
        .default_service(web::to(dispatch));
}

/// The cache's routes below a path prefix (`/team-a`), for several caches on one listener.
pub fn scope(prefix: &str, ingress: Ingress) -> actix_web::Scope {
    web::scope(prefix)
        .app_data(web::Data::new(ingress))
        .default_service(web::to(dispatch))
}

/// `/healthz` at the root of a listener: every cache served there.
pub fn group_health(caches: Vec<(String, Arc<CacheService>)>) -> actix_web::Resource {
    let caches = Arc::new(caches);
    let report = move || {
        let caches = caches.clone();
        async move { health_report(&caches) }
    };
    web::resource("/healthz")
        .route(web::get().to(report.clone()))
        .route(web::head().to(report))
}

/// The health of `caches` (`(prefix, cache)`): `200` with `ok` on the first line when every
/// store answers, else `503` with `degraded`; then one line per cache, `ok` or `degraded`,
/// its prefix and store, and for a degraded one why, since when and when it is tried next.
/// A degraded cache still serves (404s) and recovers by itself: the 503 is for alerting,
/// not a reason to restart the process.
fn health_report(caches: &[(String, Arc<CacheService>)]) -> HttpResponse {
    use std::fmt::Write;
    let mut lines = String::new();
    let mut all_up = true;
    for (prefix, svc) in caches {
        match svc.health.condition() {
            Condition::Unknown | Condition::Up => {
                let _ = writeln!(lines, "ok {prefix}/ {}", svc.description);
            }
            Condition::Down {
                reason,
                since,
                next_probe,
            } => {
                all_up = false;
                let now = std::time::Instant::now();
                let _ = writeln!(
                    lines,
                    "degraded {prefix}/ {}: {reason} (down for {}s, next check in {}s)",
                    svc.description,
                    now.duration_since(since).as_secs(),
                    next_probe.saturating_duration_since(now).as_secs()
                );
            }
        }
    }
    let (status, first) = if all_up {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "degraded")
    };
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(format!("{first}\n{lines}"))
}

const NARINFO_MAX_AGE: &str = "public, max-age=300";
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Which resource a path names, with the names in it parsed: a handler never sees a digest
/// that is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route<'a> {
    Index,
    CacheInfo,
    Health,
    Metrics,
    NarInfo(Digest),
    Listing(Digest),
    /// `<digest>.narinfo` or `<digest>.ls` whose digest is malformed.
    BadDigest,
    Log(&'a str),
    /// `realisations/<id>.doi`: what a content-addressed derivation's output realised to.
    Realisation(&'a str),
    Nar(&'a str),
    Static(&'a str),
    Browse(Digest, &'a str),
    File(Digest, &'a str),
}

impl<'a> Route<'a> {
    fn name(&self) -> &'static str {
        match self {
            Route::Index => "index",
            Route::CacheInfo => "nix-cache-info",
            Route::Health => "healthz",
            Route::Metrics => "metrics",
            Route::NarInfo(_) => "narinfo",
            Route::Listing(_) => "ls",
            Route::BadDigest => "bad-digest",
            Route::Log(_) => "log",
            Route::Realisation(_) => "realisation",
            Route::Nar(_) => "nar",
            Route::Static(_) => "static",
            Route::Browse(..) => "browse",
            Route::File(..) => "file",
        }
    }

    fn of(rel: &'a str) -> Route<'a> {
        fn digest_route<'a>(name: &str, make: fn(Digest) -> Route<'a>) -> Route<'a> {
            match Digest::parse(name) {
                Ok(d) => make(d),
                Err(_) => Route::BadDigest,
            }
        }
        // `<32 chars>.narinfo` / `.ls`: the shapes of a digest route, checked by parsing.
        let digest_shaped = |stem: &str| stem.len() == 32 && !stem.contains('/');
        match rel {
            "" => Route::Index,
            "nix-cache-info" => Route::CacheInfo,
            "healthz" => Route::Health,
            "metrics" => Route::Metrics,
            r => {
                if let Some(stem) = r.strip_suffix(".narinfo").filter(|s| digest_shaped(s)) {
                    return digest_route(stem, Route::NarInfo);
                }
                if let Some(stem) = r.strip_suffix(".ls").filter(|s| digest_shaped(s)) {
                    return digest_route(stem, Route::Listing);
                }
                if let Some(drv) = r.strip_prefix("log/") {
                    return Route::Log(drv);
                }
                if let Some(id) = r
                    .strip_prefix("realisations/")
                    .and_then(|r| r.strip_suffix(".doi"))
                {
                    return Route::Realisation(id);
                }
                if let Some(name) = r.strip_prefix("_/") {
                    return Route::Static(name);
                }
                match explorer::parse_view(r) {
                    Some((d, explorer::View::Browse, tail)) => Route::Browse(d, tail),
                    Some((d, explorer::View::File, tail)) => Route::File(d, tail),
                    None => Route::Nar(r),
                }
            }
        }
    }
}

fn if_none_match(req: &HttpRequest, etag: &str) -> bool {
    req.headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

/// Browsers get HTML; Nix (no Accept), curl (`*/*`) and ties get the narinfo text.
fn wants_html(req: &HttpRequest) -> bool {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    negotiate::accept_quality(accept, "text/html")
        > negotiate::accept_quality(accept, "text/x-nix-narinfo")
}

fn nar_content_type(url: &str) -> &'static str {
    let ext = url.rsplit('.').next().unwrap_or("");
    match ext {
        "nar" => "application/x-nix-nar",
        "xz" => "application/x-xz",
        "zst" => "application/zstd",
        "bz2" => "application/x-bzip2",
        "gz" => "application/gzip",
        "br" => "application/x-brotli",
        _ => "application/octet-stream",
    }
}

/// The answer to a method this cache does not take, such as `PUT` without `--allow-push`.
fn read_only() -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header((header::ALLOW, "GET, HEAD, OPTIONS"))
        .content_type("text/plain; charset=utf-8")
        .body("405 method not allowed: this cache is read-only over HTTP (serve it with --allow-push to take nix copy --to)\n")
}

async fn dispatch(req: HttpRequest, ing: web::Data<Ingress>, body: web::Payload) -> HttpResponse {
    let svc = &ing.service;
    // Below a scope (a cache served under a path prefix) only the rest of the path counts.
    let rest = req.match_info().unprocessed();
    let full = req.match_info().as_str();
    // The scope's prefix (`/team`, or empty), for links in pages.
    let root = full[..full.len() - rest.len()]
        .trim_end_matches('/')
        .to_owned();
    let rel = rest.strip_prefix('/').unwrap_or(rest).to_owned();
    let route = Route::of(&rel);
    let name = route.name();
    // Before anything looks at the request: only `/healthz` (no content) is open.
    if let Err(refused) = svc.auth.check(&req, route == Route::Health) {
        svc.metrics.request(name, refused.status().as_u16());
        return *refused;
    }
    let resp = match *req.method() {
        Method::GET | Method::HEAD => handle(&req, &ing, route, &rel, &root).await,
        Method::OPTIONS => HttpResponse::Ok()
            .insert_header((
                header::ALLOW,
                if svc.push.is_some() {
                    "GET, HEAD, OPTIONS, PUT"
                } else {
                    "GET, HEAD, OPTIONS"
                },
            ))
            .finish(),
        Method::PUT => push::put(&req, &ing, route, &rel, body).await,
        _ => read_only(),
    };
    svc.metrics.request(name, resp.status().as_u16());
    resp
}

async fn handle(
    req: &HttpRequest,
    ing: &Ingress,
    route: Route<'_>,
    rel: &str,
    root: &str,
) -> HttpResponse {
    let svc = &*ing.service;
    match route {
        Route::Index => explorer::index(req, svc, root),
        Route::Static(name) => explorer::static_file(svc, root, name),
        Route::Browse(digest, tail) => explorer::browse(ing, root, &digest, tail).await,
        Route::File(digest, tail) => explorer::file(req, ing, root, &digest, tail).await,
        Route::CacheInfo => HttpResponse::Ok()
            .content_type("text/x-nix-cache-info")
            .insert_header((header::CACHE_CONTROL, NARINFO_MAX_AGE))
            .body(svc.cache_info_text()),
        Route::Health => health_report(&[(root.to_owned(), ing.service.clone())]),
        Route::Metrics => {
            // The store's state is not a counter the metrics own; it is read when asked.
            let up = u8::from(svc.health.down_reason().is_none());
            HttpResponse::Ok()
                .content_type("text/plain; version=0.0.4; charset=utf-8")
                .body(format!(
                    "{}{}{}{}# HELP nixcached_store_up Whether the store answers (0: degraded, see /healthz).\n# TYPE nixcached_store_up gauge\nnixcached_store_up {up}\n",
                    svc.metrics.render(),
                    svc.catalog.render_metrics(),
                    svc.lookups.render_metrics(),
                    svc.budgets.render_metrics(),
                ))
        }
        Route::BadDigest => {
            tracing::debug!("refused {rel}: not a store-path digest");
            text(
                StatusCode::BAD_REQUEST,
                "400 bad request: not a store path digest\n",
            )
        }
        Route::NarInfo(digest) => narinfo(req, ing, digest, root).await,
        Route::Listing(digest) => match ing.fetcher.send(FetchListing(digest)).await {
            Ok(Ok(json)) => HttpResponse::Ok()
                .content_type("application/json")
                .insert_header((header::CACHE_CONTROL, IMMUTABLE))
                .body(json),
            Ok(Err(e)) => respond(svc, Mode::Protocol, rel, e.into()),
            Err(e) => respond(svc, Mode::Protocol, rel, e.into()),
        },
        Route::Log(drv) => match ing.fetcher.send(FetchLog(drv.to_owned())).await {
            Ok(Ok(blob)) => HttpResponse::Ok()
                .content_type("text/plain; charset=utf-8")
                .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                .insert_header((header::CONTENT_SECURITY_POLICY, "default-src 'none'"))
                .body(SizedStream::new(
                    blob.span.1 - blob.span.0,
                    idle::guard(req, blob.stream),
                )),
            Ok(Err(e)) => respond(svc, Mode::Protocol, rel, e.into()),
            Err(e) => respond(svc, Mode::Protocol, rel, e.into()),
        },
        Route::Realisation(id) => realisation(svc, rel, id).await,
        Route::Nar(key) => nar(req, ing, key).await,
    }
}

/// A realisation, from the store (a cache's `realisations/` folder, the local store's
/// database, or an upstream), checked to be the one asked for.
async fn realisation(svc: &CacheService, rel: &str, id: &str) -> HttpResponse {
    if let Err(e) = crate::store::realisation::check_id(id) {
        return respond(svc, Mode::Protocol, rel, e.into());
    }
    match tokio::time::timeout(svc.backend_timeout, svc.store.realisation(id)).await {
        Ok(Ok(json)) => HttpResponse::Ok()
            .content_type("application/json")
            .insert_header((header::CACHE_CONTROL, NARINFO_MAX_AGE))
            .body(json),
        Ok(Err(e)) => respond(svc, Mode::Protocol, rel, e.into()),
        Err(_) => respond(
            svc,
            Mode::Protocol,
            rel,
            crate::store::StoreError::backend(
                format!("reading {rel}"),
                "the store did not answer within --backend-timeout",
            )
            .into(),
        ),
    }
}

/// Tells the explorer's index about a looked-up narinfo, once per cached narinfo: narinfo
/// requests are the hottest path, and the catalog is one lock shared by every worker.
fn learn(svc: &CacheService, served: &ServedNarInfo) {
    if !served
        .cataloged
        .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        svc.catalog.learn(&served.info);
    }
}

async fn narinfo(req: &HttpRequest, ing: &Ingress, digest: Digest, root: &str) -> HttpResponse {
    let svc = &*ing.service;
    // What the lookup cache remembers is not handed out while the store is down: Nix would
    // then ask for a NAR that cannot be fetched, and fail where a miss lets it build.
    if let Some(reason) = svc.health.down_reason() {
        let e = StoreError::Unavailable(format!("{} is down: {reason}", svc.description));
        return respond(svc, Mode::Protocol, &format!("{digest}.narinfo"), e.into());
    }
    // The name for the log is formatted only on failure: this is the hottest path.
    let looked_up = match svc.lookups.remembered(&digest).await {
        Some(known) => known.map_err(Failure::from),
        None => match ing.lookup.send(Lookup(digest)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(Failure::from(e)),
            Err(e) => Err(Failure::Mailbox(e)),
        },
    };
    let served = match looked_up {
        Ok(s) => s,
        Err(f) => return respond(svc, Mode::Protocol, &format!("{digest}.narinfo"), f),
    };
    learn(svc, &served);
    if wants_html(req) && !req.query_string().contains("format=text") {
        return explorer::narinfo_page(svc, root, &served);
    }
    // Clients fetching the narinfo (not browsers looking at it, nor HEAD probes of writers)
    // count as use for `gc --max-age`.
    if req.method() == actix_web::http::Method::GET {
        if let Some(log) = &svc.access {
            if served.due_for_access_record() {
                log.served(&digest);
            }
        }
    }
    let mut b = HttpResponse::Ok();
    b.insert_header((header::ETAG, served.etag.as_str()))
        .insert_header((header::CACHE_CONTROL, NARINFO_MAX_AGE))
        .insert_header((header::VARY, "Accept"));
    if if_none_match(req, &served.etag) {
        return b.status(StatusCode::NOT_MODIFIED).finish();
    }
    b.content_type("text/x-nix-narinfo")
        .body(served.text.clone())
}

async fn nar(req: &HttpRequest, ing: &Ingress, key: &str) -> HttpResponse {
    let svc = &*ing.service;
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(range::parse);
    let etag = format!(
        "\"{}\"",
        key.rsplit('/').next().unwrap_or(key).replace('"', "")
    );
    let blob: Blob = match ing
        .fetcher
        .send(OpenNar {
            url: key.to_owned(),
            range,
        })
        .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return respond(svc, Mode::Protocol, key, e.into()),
        Err(e) => return respond(svc, Mode::Protocol, key, e.into()),
    };
    let mut b: HttpResponseBuilder = HttpResponse::Ok();
    b.insert_header((header::ETAG, etag.as_str()))
        .insert_header((header::CACHE_CONTROL, IMMUTABLE))
        .insert_header((header::ACCEPT_RANGES, "bytes"));
    if if_none_match(req, &etag) {
        return b.status(StatusCode::NOT_MODIFIED).finish();
    }
    let (start, end) = blob.span;
    if range.is_some() {
        b.status(StatusCode::PARTIAL_CONTENT).insert_header((
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", end.saturating_sub(1), blob.total),
        ));
    }
    b.insert_header((
        header::CONTENT_TYPE,
        HeaderValue::from_static(nar_content_type(key)),
    ));
    let len = end - start;
    if req.method() == Method::HEAD {
        // Dropping the stream stops whatever produces it (for the local store, the dump);
        // an empty body that declares the size gives HEAD its Content-Length.
        drop(blob.stream);
        return b.body(SizedStream::new(
            len,
            futures::stream::empty::<Result<Bytes, std::io::Error>>(),
        ));
    }
    let metrics = svc.metrics.clone();
    let stream = blob.stream.inspect(move |c| {
        if let Ok(c) = c {
            Metrics::add(&metrics.nar_bytes_served, c.len() as u64);
        }
    });
    if svc.transparent_zstd && key.ends_with(".nar") {
        // Caches in front of us must keep the two encodings apart.
        b.insert_header((header::VARY, "Accept-Encoding"));
        if range.is_none() && accepts_zstd(req) {
            Metrics::add(&svc.metrics.nar_zstd_encoded, 1);
            let reader = tokio_util::io::StreamReader::new(stream);
            let encoded = Compression::Zstd.compress_reader(reader, Some(ZSTD_LEVEL));
            return b
                .insert_header((header::CONTENT_ENCODING, "zstd"))
                .insert_header((header::ETAG, format!("{}-zstd\"", &etag[..etag.len() - 1])))
                .streaming(idle::guard(
                    req,
                    tokio_util::io::ReaderStream::with_capacity(encoded, 256 * 1024),
                ));
        }
    }
    b.body(SizedStream::new(len, idle::guard(req, stream)))
}

/// zstd level of transparently encoded NARs: level 1 keeps up with a fast network on one
/// core and still roughly halves typical NARs.
const ZSTD_LEVEL: i32 = 1;

/// Whether the request's `Accept-Encoding` headers list zstd with a non-zero quality.
fn accepts_zstd(req: &HttpRequest) -> bool {
    negotiate::accepts_zstd(
        req.headers()
            .get_all(header::ACCEPT_ENCODING)
            .filter_map(|v| v.to_str().ok()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::of(""), Route::Index);
        let d = Digest::parse("0123456789abcdfghijklmnpqrsvwxyz").unwrap();
        assert_eq!(
            Route::of("0123456789abcdfghijklmnpqrsvwxyz.narinfo"),
            Route::NarInfo(d)
        );
        assert_eq!(
            Route::of("0123456789abcdfghijklmnpqrsvwxyz.ls"),
            Route::Listing(d)
        );
        // 'e', 'o', 'u', 't' are not in Nix's base-32 alphabet.
        assert_eq!(
            Route::of("eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo"),
            Route::BadDigest
        );
        assert_eq!(Route::of("nar/x.nar.xz"), Route::Nar("nar/x.nar.xz"));
        assert_eq!(Route::of("log/x.drv"), Route::Log("x.drv"));
        assert_eq!(Route::of("_/style.css"), Route::Static("style.css"));
        assert_eq!(
            Route::of("0123456789abcdfghijklmnpqrsvwxyz/browse/a%3Cb"),
            Route::Browse(d, "a%3Cb")
        );
        assert_eq!(
            Route::of("0123456789abcdfghijklmnpqrsvwxyz/file/bin/x"),
            Route::File(d, "bin/x")
        );
    }
}
