//! Serving two stores from one process, each as its own binary cache on its own listener.
//!
//! `nixcached serve` serves one store. Here the same pieces are wired by hand for two:
//!
//! ```text
//!  listener A ─► HttpServer A ─► Ingress (per worker) ─► lookup actor ─► fetcher A ─► store A (any URL)
//!  listener B ─► HttpServer B ─► Ingress (per worker) ─► lookup actor ─► fetcher B ─► store B (in memory)
//! ```
//!
//! - [`start_service`] starts a store's fetcher actor and its shared narinfo caches, and
//!   reads the store's `nix-cache-info`: one `CacheService` per store.
//! - Each HTTP worker thread runs the app factory once; [`Ingress::start`] called there gives
//!   the worker its own lookup actor, so lookups never queue behind another thread.
//! - [`http::configure`] mounts the binary cache protocol at the root of the app.
//!
//! Store B lives in memory: a [`BinaryCache`] over [`MemoryBlobs`], seeded at start with one
//! store object built here from a small file tree, exactly as `nix-store --add` would
//! store that tree. It shows how a program can publish objects into any store it holds.
//!
//! Usage (all arguments optional):
//!
//! ```sh
//! cargo run --example serve_two_stores -- \
//!     --store-a file:///srv/cache --listen-a 127.0.0.1:38381 --listen-b 127.0.0.1:38382
//! ```
//!
//! Port 0 picks a free port; the real addresses are printed. SIGINT or SIGTERM stops both
//! servers after their in-flight responses. `tests/examples.rs` runs it against the real Nix.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer};
use bytes::Bytes;
use clap::Parser;
use nixcached_actors::formats::{nar, nixbase32, Compression, Hash, NarInfo, StoreDir, StorePath};
use nixcached_actors::http::{self, CacheService, Ingress};
use nixcached_actors::lookup::CacheSettings;
use nixcached_actors::serve::{start_service, ServeOptions};
use nixcached_actors::shutdown::StopSignals;
use nixcached_actors::store::binary_cache::BinaryCache;
use nixcached_actors::store::memory::MemoryBlobs;
use nixcached_actors::store::url::StoreUrl;
use nixcached_actors::store::Store;

/// Serve a store of your choice and a seeded in-memory cache on two listeners.
#[derive(Debug, Parser)]
struct Args {
    /// Store A: any store URL `nixcached serve` takes (/nix/store, file:///DIR, …). Default:
    /// a cache folder under the temporary directory, created when missing.
    #[arg(long)]
    store_a: Option<String>,
    /// Where store A is served (host:port).
    #[arg(long, default_value = "127.0.0.1:38381")]
    listen_a: String,
    /// Where the in-memory store B is served (host:port).
    #[arg(long, default_value = "127.0.0.1:38382")]
    listen_b: String,
}

/// Name and content of the object store B is seeded with.
const SEED_NAME: &str = "nixcached-example";
const SEED_FILE: (&str, &str) = ("hello.txt", "Hello from an in-memory nixcached store.\n");

fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Actors and actix-web servers need a running actix system.
    actix_web::rt::System::new().block_on(run(args))
}

async fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let url_a = args.store_a.clone().unwrap_or_else(|| {
        let dir = std::env::temp_dir().join("nixcached-example-cache");
        format!("file://{}?create_dir=1", dir.display())
    });
    let store_a = StoreUrl::parse(&url_a)?.open()?;

    let memory = BinaryCache::new(Arc::new(MemoryBlobs::new()));
    let seeded = seed(&memory).await?;
    let store_b: Arc<dyn Store> = Arc::new(memory);

    let service_a = start_service(&options(store_a)).await?;
    let service_b = start_service(&options(store_b)).await?;

    // Caught from here on, so a signal during start-up is a clean stop, not a kill.
    let mut signals = StopSignals::install()?;
    let (server_a, addr_a) = http_server(service_a, &args.listen_a)?;
    let (server_b, addr_b) = http_server(service_b, &args.listen_b)?;

    println!("store A: http://{addr_a}/ serves {url_a}");
    println!("store B: http://{addr_b}/ serves memory://");
    let digest = &seeded[StoreDir::default().as_str().len() + 1..][..32];
    println!("store B holds {seeded}; try:");
    println!("  curl http://{addr_b}/{digest}.narinfo");
    // No --no-check-sigs: a content-addressed object is checked against its content instead.
    println!("  nix copy --from http://{addr_b} --to /tmp/some-store {seeded}");

    // One signal stops both servers; each lets its in-flight responses finish.
    let (handle_a, handle_b) = (server_a.handle(), server_b.handle());
    actix_web::rt::spawn(async move {
        let sig = signals.recv().await;
        eprintln!("{sig}: stopping both servers");
        futures::join!(handle_a.stop(true), handle_b.stop(true));
    });
    futures::try_join!(server_a, server_b)?;
    Ok(())
}

/// What [`start_service`] needs for one store. The listening, grace, idle-timeout and worker
/// fields are for `serve::run`, which binds its own server; this program binds its servers
/// itself.
fn options(store: Arc<dyn Store>) -> ServeOptions {
    ServeOptions {
        store,
        listen: Vec::new(),
        keys: Vec::new(),
        priority: None,
        cache: CacheSettings::default(),
        backend_timeout: Duration::from_secs(20),
        grace: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
        workers: 0,
        transparent_zstd: false,
        ui: Default::default(),
        budgets: Default::default(),
        upload_stats: Vec::new(),
        access_records: None,
        auth: Default::default(),
        tls: None,
        push: None,
    }
}

/// An HTTP server for one cache service, bound to `addr`; returns it with its real address.
fn http_server(
    service: Arc<CacheService>,
    addr: &str,
) -> Result<(Server, std::net::SocketAddr), Box<dyn Error>> {
    let server = HttpServer::new(move || {
        // Runs once per worker thread: the lookup actor started here belongs to that worker.
        let ingress = Ingress::start(service.clone());
        App::new().configure(move |cfg| http::configure(cfg, ingress))
    })
    // Signals are handled above, once for both servers.
    .disable_signals()
    .shutdown_timeout(10)
    .bind(addr)
    .map_err(|e| format!("listening on {addr}: {e}"))?;
    let bound = *server.addrs().first().ok_or("bound to no address")?;
    Ok((server.run(), bound))
}

/// Puts one store object into `cache` and returns its store path.
///
/// The object is a folder holding one file, archived to a NAR here, and given the store path
/// that `nix-store --add` gives that folder, so Nix accepts it as what it claims to be.
async fn seed(cache: &BinaryCache) -> Result<String, Box<dyn Error>> {
    let store_dir = StoreDir::default();
    // A binary cache declares which store directory its paths belong to.
    cache.ensure_cache_info(&store_dir).await?;

    let scratch = tempfile::tempdir()?;
    let tree = scratch.path().join(SEED_NAME);
    std::fs::create_dir(&tree)?;
    std::fs::write(tree.join(SEED_FILE.0), SEED_FILE.1)?;
    let mut nar_bytes = Vec::new();
    nar::dump(&tree, &mut nar_bytes)?;
    let nar_hash = Hash::sha256_of(&nar_bytes);
    let nar_size = nar_bytes.len() as u64;

    let store_path = StorePath::from_base_name(&format!(
        "{}-{SEED_NAME}",
        added_path_digest(&nar_hash, &store_dir, SEED_NAME)
    ))?;
    // The NAR first, then the narinfo that points at it: a reader must never find a narinfo
    // whose NAR is not there yet.
    let url = format!("nar/{}.nar", nixbase32::encode(nar_hash.digest()));
    let body = Bytes::from(nar_bytes);
    cache
        .put_nar(&url, Box::pin(futures::stream::once(async { Ok(body) })))
        .await?;
    let info = NarInfo {
        store_dir: store_dir.clone(),
        store_path,
        url,
        compression: Compression::None,
        file_hash: Some(nar_hash.clone()),
        file_size: Some(nar_size),
        nar_size,
        references: Vec::new(),
        deriver: None,
        system: None,
        sigs: Vec::new(),
        // Content-addressed: clients can check the path against the content, so the object
        // needs no signature to be trusted.
        ca: Some(format!("fixed:r:{}", nar_hash.to_nix32())),
        nar_hash,
        extra: Vec::new(),
    };
    cache.put_narinfo(&info).await?;
    Ok(store_dir.display(&info.store_path))
}

/// The digest of the store path `nix-store --add` gives a folder named `name` whose NAR has
/// hash `nar_hash`: Nix hashes `source:sha256:<hex>:<store dir>:<name>` and folds the
/// SHA-256 into 20 bytes by XOR before encoding it in nixbase32.
fn added_path_digest(nar_hash: &Hash, store_dir: &StoreDir, name: &str) -> String {
    let description = format!("source:{}:{store_dir}:{name}", nar_hash.to_base16());
    let full = Hash::sha256_of(description.as_bytes());
    let mut folded = [0u8; 20];
    for (i, b) in full.digest().iter().enumerate() {
        folded[i % 20] ^= b;
    }
    nixbase32::encode(&folded)
}
