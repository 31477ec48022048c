//! Wiring of `serve`: a store behind a fetcher actor, shared lookup caches, and an actix-web
//! server whose workers each run an ingress with their own lookup actor.

use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::{App, HttpServer};

use crate::access::AccessLog;
use crate::budget::{BudgetSizes, Budgets};
use crate::catalog::{Catalog, Discovery};
use crate::fetcher::Fetcher;
use crate::formats::{PublicKey, SecretKey};
use crate::http::auth::Access;
use crate::http::templates::Templates;
use crate::http::{self, CacheService, Ingress};
use crate::lookup::{CacheSettings, LookupShared};
use crate::metrics::Metrics;
use crate::nar_files::NarFiles;
use crate::shutdown::{Signal, StopSignals};
use crate::store::guarded::GuardedStore;
use crate::store::Store;
use crate::tls::{ReloadableCert, TlsFiles};

/// Where to accept connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address, `host:port` (port 0 picks a free one).
    Tcp(String),
    /// A unix socket path (created; an existing socket file is replaced).
    Unix(PathBuf),
    /// The socket systemd passed (socket activation).
    Systemd,
}

impl Listen {
    /// Parses `--listen`: `unix:/path`, an absolute path, or `host:port`.
    pub fn parse(s: &str) -> Listen {
        if let Some(p) = s.strip_prefix("unix:") {
            Listen::Unix(p.into())
        } else if s.starts_with('/') {
            Listen::Unix(s.into())
        } else {
            Listen::Tcp(s.into())
        }
    }
}

/// Everything `serve` needs.
pub struct ServeOptions {
    /// The store to serve.
    pub store: Arc<dyn Store>,
    /// Listening sockets.
    pub listen: Vec<Listen>,
    /// Keys to sign narinfos that lack their signature.
    pub keys: Vec<SecretKey>,
    /// `Priority` advertised in `nix-cache-info` (the store's own when `None`).
    pub priority: Option<u32>,
    /// Lookup cache sizing.
    pub cache: CacheSettings,
    /// Longest a store operation (or a probe of whether the store is up) may take before the
    /// client gets a 404 (or the store counts as down).
    pub backend_timeout: Duration,
    /// How long in-flight responses may run after a stop signal.
    pub grace: Duration,
    /// How long a client may read nothing of a response before it is dropped (0: never).
    pub idle_timeout: Duration,
    /// HTTP worker threads (0: one per core).
    pub workers: usize,
    /// Compress uncompressed NARs (`Compression: none`) on the fly with zstd for clients that
    /// send `Accept-Encoding: zstd`.
    pub transparent_zstd: bool,
    /// The explorer UI.
    pub ui: UiOptions,
    /// How much of each kind of store work runs at once.
    pub budgets: BudgetSizes,
    /// Upload pipelines of the same process, whose counters `/metrics` shows too.
    pub upload_stats: Vec<Arc<crate::upload::stats::UploadStats>>,
    /// Where to keep the access records (when each path was last served, for `gc --max-age`
    /// and the explorer); `None` keeps none.
    pub access_records: Option<PathBuf>,
    /// Who may read and write (public and read-only when it has no credential).
    pub auth: Access,
    /// Certificate and key when the cache's own listeners speak TLS (HTTPS and HTTP/2).
    pub tls: Option<TlsFiles>,
    /// Take pushes (`PUT`, as `nix copy --to http://…` sends them) into the store; `None`
    /// keeps the cache read-only over HTTP.
    pub push: Option<crate::http::push::PushOptions>,
}

/// Settings of the explorer UI.
#[derive(Debug, Clone)]
pub struct UiOptions {
    /// A folder whose `templates/` and `dist/` replace the embedded ones (`--client`).
    pub client: Option<PathBuf>,
    /// Keys whose signatures the object page reports as verified (the public halves of
    /// `keys` count too).
    pub trusted_keys: Vec<PublicKey>,
    /// Least time between the end of one store listing and the start of the next.
    pub max_list_frequency: Duration,
    /// Memory for NAR file trees kept for the browser.
    pub tree_cache_bytes: u64,
    /// Objects the explorer index holds at most (beyond, objects are served but not listed).
    pub catalog_max_objects: usize,
}

impl Default for UiOptions {
    fn default() -> Self {
        UiOptions {
            client: None,
            trusted_keys: Vec::new(),
            max_list_frequency: Duration::from_secs(120),
            tree_cache_bytes: 32 * 1024 * 1024,
            catalog_max_objects: crate::catalog::DEFAULT_MAX_OBJECTS,
        }
    }
}

/// How long start-up waits at most for a store's first answer; a store silent by then starts out
/// degraded (answering 404) and is served as soon as it answers.
pub const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// A started cache service: what the HTTP layer needs, and its counters.
///
/// A store that does not answer does not stop it: the service starts degraded, answers 404
/// to what Nix asks, says why on `/healthz` and in the log, and serves once the store
/// answers ([`crate::store::guarded`]).
pub async fn start_service(opts: &ServeOptions) -> io::Result<Arc<CacheService>> {
    // Nothing writable without a write credential: a push could otherwise come from anyone.
    if opts.push.is_some() && !opts.auth.has_writer() {
        return Err(io::Error::other(format!(
            "{}: the cache accepts uploads but has no credential with the write right; add one \
             (`nixcached credential new --rights write`) or do not make it writable",
            opts.store.describe()
        )));
    }
    let metrics = Arc::new(Metrics::default());
    metrics.watch_uploads(&opts.upload_stats);
    // A store in front of upstreams comes guarded already (its front store is the one
    // watched, so the upstreams still answer while it is down); any other is guarded here.
    let (store, health) = match opts.store.health() {
        Some(health) => (opts.store.clone(), health),
        None => {
            let guarded = GuardedStore::new(opts.store.clone());
            let health = guarded.health().clone();
            (Arc::new(guarded) as Arc<dyn Store>, health)
        }
    };
    health.start(opts.backend_timeout);
    health
        .first_verdict(FIRST_ANSWER_WAIT.min(opts.backend_timeout))
        .await;
    let budgets = Budgets::start(opts.budgets);
    let fetcher = Fetcher::new(
        store.clone(),
        opts.backend_timeout,
        metrics.clone(),
        budgets.clone(),
    )
    .start();
    let lookups = LookupShared::new(
        fetcher.clone(),
        &opts.cache,
        opts.keys.clone(),
        metrics.clone(),
    );
    let templates = Templates::new(opts.ui.client.clone()).map_err(io::Error::other)?;
    let catalog = Catalog::new(opts.ui.catalog_max_objects);
    let discovery =
        Discovery::new(catalog.clone(), fetcher.clone(), opts.ui.max_list_frequency).start();
    let access = match &opts.access_records {
        Some(path) => {
            // Up to a million lines read back: off the async threads.
            let path = path.clone();
            let log = tokio::task::spawn_blocking(move || {
                AccessLog::open(&path, crate::access::DEFAULT_MAX_PATHS)
            })
            .await
            .map_err(io::Error::other)??;
            let log = Arc::new(log);
            let flushed = log.clone();
            actix_web::rt::spawn(async move {
                let mut every = tokio::time::interval(crate::access::FLUSH_EVERY);
                every.tick().await;
                loop {
                    every.tick().await;
                    flush_access(&flushed).await;
                }
            });
            Some(log)
        }
        None => None,
    };
    let mut trusted_keys = opts.ui.trusted_keys.clone();
    for k in &opts.keys {
        let public = k.public();
        if !trusted_keys.contains(&public) {
            trusted_keys.push(public);
        }
    }
    Ok(Arc::new(CacheService {
        description: store.describe(),
        store,
        backend_timeout: opts.backend_timeout,
        transparent_zstd: opts.transparent_zstd,
        nar_files: NarFiles::new(
            fetcher.clone(),
            opts.ui.tree_cache_bytes,
            budgets.explorer.clone(),
        ),
        budgets,
        lookups,
        health,
        priority: opts.priority,
        metrics,
        negative_ttl_secs: opts.cache.negative_ttl.as_secs(),
        templates,
        catalog,
        discovery,
        trusted_keys,
        access,
        signing_keys: opts.keys.iter().map(|k| k.public()).collect(),
        auth: Arc::new(opts.auth.clone()),
        push: opts
            .push
            .as_ref()
            .map(|p| Arc::new(crate::http::push::Pusher::new(p, opts.keys.clone()))),
    }))
}

/// Writes out access records off the async threads; a failure is logged, and what it did not
/// write goes out with the next flush.
async fn flush_access(log: &Arc<AccessLog>) {
    let log = log.clone();
    match tokio::task::spawn_blocking(move || log.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("{e}; retrying at the next flush"),
        Err(e) => tracing::warn!("writing access records: {e}"),
    }
}

fn systemd_listener() -> io::Result<Either> {
    let pid: u32 = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            io::Error::other(
                "--systemd: LISTEN_PID is not set; start nixcached from a systemd .socket unit",
            )
        })?;
    if pid != std::process::id() {
        return Err(io::Error::other(
            "--systemd: LISTEN_PID names another process",
        ));
    }
    let fds: u32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    if fds != 1 {
        return Err(io::Error::other(format!(
            "systemd passed in {fds} sockets (want 1)"
        )));
    }
    // SAFETY: systemd's protocol hands us fd 3, open and owned by this process, exactly once.
    let tcp = unsafe { std::net::TcpListener::from_raw_fd(3) };
    if tcp.local_addr().is_ok() {
        return Ok(Either::Tcp(tcp));
    }
    let fd = std::os::fd::IntoRawFd::into_raw_fd(tcp);
    // SAFETY: the same fd, re-wrapped as the unix listener it turned out to be.
    Ok(Either::Unix(unsafe {
        std::os::unix::net::UnixListener::from_raw_fd(fd)
    }))
}

enum Either {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Binds every listener; returns them with the URLs to log.
fn bind(listen: &[Listen]) -> io::Result<Vec<(Either, String)>> {
    let mut out = Vec::new();
    for l in listen {
        match l {
            Listen::Tcp(addr) => {
                let addrs: Vec<_> = addr
                    .to_socket_addrs()
                    .map_err(|e| io::Error::other(format!("--listen {addr}: {e}; give host:port")))?
                    .collect();
                let first = addrs.first().ok_or_else(|| {
                    io::Error::other(format!("--listen {addr}: resolves to nothing"))
                })?;
                let tcp = std::net::TcpListener::bind(first)
                    .map_err(|e| io::Error::other(format!("listening on {first}: {e}")))?;
                let local = tcp.local_addr()?;
                out.push((Either::Tcp(tcp), format!("http://{local}/")));
            }
            Listen::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(path)?;
                }
                let u = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
                    io::Error::other(format!("listening on {}: {e}", path.display()))
                })?;
                out.push((Either::Unix(u), format!("unix:{}", path.display())));
            }
            Listen::Systemd => {
                let l = systemd_listener()?;
                let url = match &l {
                    Either::Tcp(t) => format!("http://{}/ (systemd)", t.local_addr()?),
                    Either::Unix(_) => "systemd unix socket".to_owned(),
                };
                out.push((l, url));
            }
        }
    }
    Ok(out)
}

/// Several caches behind one set of listeners, each under its own path prefix (`""` for
/// the root): the unit a config file describes.
pub struct ServerGroup {
    /// Where to accept connections.
    pub listen: Vec<Listen>,
    /// `(prefix, cache)`; the caches' own `listen`, `grace` and `workers` are not used here.
    pub caches: Vec<(String, ServeOptions)>,
    /// How long in-flight responses may run after a stop signal.
    pub grace: Duration,
    /// How long a client may read nothing of a response before it is dropped (0: never).
    pub idle_timeout: Duration,
    /// HTTP worker threads (0: one per core).
    pub workers: usize,
    /// Certificate and key: the group's TCP listeners speak TLS (HTTPS, HTTP/2 by ALPN);
    /// unix sockets stay plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// Serves until a stop signal, then lets in-flight responses finish within the grace period.
/// Must run inside an actix system.
pub async fn run(opts: ServeOptions) -> io::Result<()> {
    let group = ServerGroup {
        listen: opts.listen.clone(),
        grace: opts.grace,
        idle_timeout: opts.idle_timeout,
        workers: opts.workers,
        tls: opts.tls.clone(),
        caches: vec![(String::new(), opts)],
    };
    run_groups(vec![group]).await
}

/// Reads every certificate and key again (SIGHUP); one that fails keeps serving its old pair.
fn reload_certs(certs: &[Arc<ReloadableCert>]) {
    for c in certs {
        match c.reload() {
            Ok(()) => tracing::info!(
                "SIGHUP: reloaded TLS certificate {}; new connections use it",
                c.cert_path().display()
            ),
            Err(e) => tracing::error!("SIGHUP: {e}; still serving the previous certificate"),
        }
    }
}

/// Runs every group (each its own HTTP server) in this actix system until a stop signal.
pub async fn run_groups(groups: Vec<ServerGroup>) -> io::Result<()> {
    let mut signals = StopSignals::install()?;
    // Certificates first: a wrong file is a start-up error before any store is contacted.
    let certs = groups
        .iter()
        .map(|g| g.tls.clone().map(ReloadableCert::open).transpose())
        .collect::<Result<Vec<_>, _>>()
        .map_err(io::Error::other)?;
    // Every cache at once: start-up then waits for the slowest store, not for their sum.
    let started = futures::future::join_all(groups.iter().map(|group| {
        futures::future::try_join_all(group.caches.iter().map(|(prefix, opts)| async move {
            let prefix = prefix.trim_end_matches('/').to_owned();
            Ok::<_, io::Error>((prefix, start_service(opts).await?))
        }))
    }))
    .await;
    let mut servers = Vec::new();
    let mut all_services = Vec::new();
    for ((group, services), cert) in groups.into_iter().zip(started).zip(certs.iter()) {
        let services: Vec<(String, Arc<CacheService>)> = services?;
        let tls = cert
            .as_ref()
            .map(|c| c.server_config())
            .transpose()
            .map_err(io::Error::other)?;
        all_services.extend(services.iter().map(|(_, s)| s.clone()));
        let listeners = bind(&group.listen)?;
        let svcs = services.clone();
        let mut server = HttpServer::new(move || {
            // `/healthz` at the root reports every cache of this listener; below a cache's
            // prefix it reports that cache alone.
            let everyone = svcs.clone();
            let mut app = App::new().service(http::group_health(everyone));
            let mut root = None;
            for (prefix, svc) in &svcs {
                // Each worker gets its own lookup actor per cache, on the worker's thread.
                let ingress = Ingress::start(svc.clone());
                if prefix.is_empty() {
                    root = Some(ingress);
                } else {
                    app = app.service(http::scope(prefix, ingress));
                }
            }
            app.configure(move |cfg| {
                if let Some(ingress) = root {
                    http::configure(cfg, ingress)
                }
            })
        })
        .on_connect(http::idle::on_connect(group.idle_timeout))
        .disable_signals()
        // Small responses (narinfos, the last chunk of a NAR) must not wait for a delayed ACK.
        .tcp_nodelay(true)
        .shutdown_timeout(group.grace.as_secs().max(1))
        .client_request_timeout(Duration::from_secs(30));
        if group.workers > 0 {
            server = server.workers(group.workers);
        }
        for (l, mut url) in listeners {
            server = match (l, &tls) {
                (Either::Tcp(t), Some(config)) => {
                    url = url.replacen("http://", "https://", 1);
                    server.listen_rustls_0_23(t, config.clone())?
                }
                (Either::Tcp(t), None) => server.listen(t)?,
                (Either::Unix(u), _) => server.listen_uds(u)?,
            };
            for (prefix, svc) in &services {
                tracing::info!(
                    "Listening on {}{prefix}/ serving {}",
                    url.trim_end_matches('/'),
                    svc.description
                );
            }
        }
        servers.push(server.run());
    }
    let handles: Vec<_> = servers.iter().map(|s| s.handle()).collect();
    let certs: Vec<Arc<ReloadableCert>> = certs.into_iter().flatten().collect();
    actix_web::rt::spawn(async move {
        let sig = loop {
            let sig = signals.recv().await;
            // With TLS, SIGHUP is the usual "certificate renewed" signal: reload, keep serving.
            if sig != Signal::Hup || certs.is_empty() {
                break sig;
            }
            reload_certs(&certs);
        };
        tracing::info!("{sig}: shutting down (finishing in-flight responses)");
        futures::future::join_all(handles.iter().map(|h| h.stop(true))).await;
    });
    let results = futures::future::join_all(servers).await;
    // What was served since the last flush is not lost with the process.
    for svc in &all_services {
        if let Some(log) = &svc.access {
            flush_access(log).await;
        }
    }
    for r in results {
        r?;
    }
    Ok(())
}
