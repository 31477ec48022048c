//! `nixcached serve`: turns flags into [`ServeOptions`] and runs the server.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use nixcached_actors::formats::{PublicKey, SecretKey, StoreDir};
use nixcached_actors::http::auth::{Access, Credential, CredentialSpec};
use nixcached_actors::http::push::PushOptions;
use nixcached_actors::lookup::CacheSettings;
use nixcached_actors::serve::{Listen, ServeOptions, UiOptions};
use nixcached_actors::store::binary_cache::BinaryCache;
use nixcached_actors::store::file::FileBlobs;
use nixcached_actors::store::guarded::GuardedStore;
use nixcached_actors::store::layered::LayeredStore;
use nixcached_actors::store::upstream::{UpstreamOptions, UpstreamStore};
use nixcached_actors::store::url::StoreUrl;
use nixcached_actors::store::Store;
use nixcached_actors::tls::TlsFiles;

use crate::cli::{ServeArgs, UpstreamArgs};

/// Reads `nix-store --generate-binary-cache-key` secret key files.
pub fn read_keys(files: &[PathBuf]) -> anyhow::Result<Vec<SecretKey>> {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading secret key file {}", f.display()))?;
            SecretKey::parse(&text).with_context(|| format!("secret key file {}", f.display()))
        })
        .collect()
}

/// Parses public keys given as `NAME:BASE64`; `what` names them in errors.
fn public_keys(keys: &[String], what: &str) -> anyhow::Result<Vec<PublicKey>> {
    keys.iter()
        .map(|k| {
            PublicKey::parse(k.trim()).with_context(|| {
                format!(
                    "{what} {k:?}: give it as NAME:BASE64, as in nix.conf's trusted-public-keys"
                )
            })
        })
        .collect()
}

/// The explorer settings from `--client`, `--trusted-public-key`, `--max-list-frequency` and
/// `--index-max-objects` (or their config-file keys).
pub fn ui_options(
    client: Option<PathBuf>,
    trusted: &[String],
    max_list_frequency: std::time::Duration,
    index_max_objects: usize,
) -> anyhow::Result<UiOptions> {
    let trusted_keys = public_keys(trusted, "trusted public key")?;
    if let Some(dir) = &client {
        if !dir.join("templates").is_dir() {
            bail!(
                "--client {}: no templates/ folder there; give a folder with templates/ (base.html, index.html, narinfo.html) and dist/ (style.css)",
                dir.display()
            );
        }
    }
    Ok(UiOptions {
        client,
        trusted_keys,
        max_list_frequency,
        catalog_max_objects: index_max_objects,
        ..UiOptions::default()
    })
}

/// The store served when none is named: the local Nix store when its database is there,
/// else a cache folder under the user's cache directory (created, and empty at first).
fn default_store() -> anyhow::Result<Arc<dyn Store>> {
    if std::path::Path::new("/nix/var/nix/db/db.sqlite").is_file() {
        if let Ok(s) = StoreUrl::parse("/nix/store").and_then(|u| u.open()) {
            return Ok(s);
        }
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("nixcached/cache");
    let cache = BinaryCache::new(Arc::new(FileBlobs::open(&dir, true)?));
    block_on(cache.ensure_cache_info(&StoreDir::default()))?;
    tracing::info!(
        "no local Nix store found; serving the cache folder {} (give a store URL to serve another)",
        dir.display()
    );
    Ok(Arc::new(cache))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Opens a store by URL, or the default store.
pub fn open_store(url: Option<&str>) -> anyhow::Result<Arc<dyn Store>> {
    match url {
        Some(url) => StoreUrl::parse(url)
            .and_then(|u| u.open())
            .with_context(|| format!("opening store {url}")),
        None => default_store(),
    }
}

/// The default NAR cache folder: `$XDG_CACHE_HOME/nixcached/upstream-nars`.
fn default_nar_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("nixcached/upstream-nars")
}

/// Opens the store to serve with its upstreams: an `http(s)://` store and every `--upstream`
/// form one upstream store; another store with upstreams is layered in front of them.
pub fn open_serve_store(url: Option<&str>, up: &UpstreamArgs) -> anyhow::Result<Arc<dyn Store>> {
    let http_store = match url.map(StoreUrl::parse).transpose() {
        Ok(Some(StoreUrl::Http(u))) => Some(u),
        Ok(_) => None,
        Err(e) => return Err(e).with_context(|| format!("opening store {}", url.unwrap_or(""))),
    };
    if http_store.is_none() && up.upstreams.is_empty() {
        return open_store(url);
    }
    let mut urls: Vec<_> = http_store.into_iter().collect();
    for u in &up.upstreams {
        match StoreUrl::parse(u) {
            Ok(StoreUrl::Http(parsed)) => urls.push(parsed),
            _ => bail!(
                "upstream {u:?} is not an http:// or https:// URL; write for example https://cache.nixos.org"
            ),
        }
    }
    let trusted_keys = up
        .trusted_public_keys
        .iter()
        .map(|k| {
            PublicKey::parse(k).with_context(|| {
                format!(
                    "trusted public key {k:?}; write NAME:BASE64 as in Nix's trusted-public-keys"
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut options = UpstreamOptions::new(urls);
    options.trusted_keys = trusted_keys;
    options.timeout = up.upstream_timeout;
    options.nar_hosts = up.upstream_nar_hosts.clone();
    options.netrc_file = up.netrc_file.clone();
    if up.nar_cache_size_mib > 0 {
        options.nar_cache = Some((
            up.nar_cache_dir
                .clone()
                .unwrap_or_else(default_nar_cache_dir),
            up.nar_cache_size_mib * 1024 * 1024,
        ));
    }
    let upstream: Arc<dyn Store> =
        Arc::new(UpstreamStore::open(options).context("opening the upstream caches")?);
    match url {
        Some(u) if StoreUrl::parse(u).is_ok_and(|p| !matches!(p, StoreUrl::Http(_))) => {
            // Only the front store is watched: while it is down, requests go straight to the
            // upstreams instead of waiting on it first.
            let primary: Arc<dyn Store> = Arc::new(GuardedStore::new(open_store(Some(u))?));
            Ok(Arc::new(LayeredStore::new(primary, upstream)))
        }
        _ => Ok(upstream),
    }
}

/// The budgets' sizes from flags or config keys, each at least 1 (a budget of none would make
/// every request of its kind wait forever).
pub fn budget_sizes(
    metadata: usize,
    nar_opens: usize,
    explorer: usize,
) -> anyhow::Result<nixcached_actors::budget::BudgetSizes> {
    for (name, n) in [
        ("metadata-slots", metadata),
        ("nar-slots", nar_opens),
        ("explorer-slots", explorer),
    ] {
        if n == 0 {
            bail!("{name} must be at least 1 (it is how many requests of that kind run at once)");
        }
    }
    Ok(nixcached_actors::budget::BudgetSizes {
        metadata,
        nar_opens,
        explorer,
    })
}

/// Where `serve` keeps the access records of the store `url`: `access/<url as a file name>.log`
/// in the state folder.
pub fn access_records_path(state_dir: Option<&std::path::Path>, url: &str) -> PathBuf {
    state_dir
        .map(PathBuf::from)
        .unwrap_or_else(crate::upload::default_state_dir)
        .join("access")
        .join(nixcached_actors::access::file_name_for(url))
}

/// The access rules of a cache: the entries of a `--credentials` file and of the config's
/// `[[cache.credential]]`; `realm` names the cache in 401 challenges.
pub fn access(
    realm: &str,
    file: Option<&std::path::Path>,
    specs: &[CredentialSpec],
) -> anyhow::Result<Access> {
    let mut credentials = match file {
        Some(f) => Credential::read_file(f)?,
        None => Vec::new(),
    };
    for (i, spec) in specs.iter().enumerate() {
        credentials
            .push(Credential::from_spec(spec).with_context(|| format!("credential {}", i + 1))?);
    }
    Ok(Access::new(realm, credentials))
}

/// `--tls-cert` and `--tls-key` (clap or the config check that both or neither are given).
pub fn tls_files(
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
) -> anyhow::Result<Option<TlsFiles>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })),
        (None, None) => Ok(None),
        _ => bail!("tls-cert and tls-key go together: give both (PEM certificate chain and its private key) or neither"),
    }
}

/// The push settings from `--allow-push` and `--push-trusted-key` (or the config keys
/// `allow-push` and `push-trusted-keys`), for the store `url` (`None`: the default store).
/// Refuses a store that cannot be written: the local Nix store, or upstreams alone.
pub fn push_options(
    allow: bool,
    trusted: &[String],
    url: Option<&str>,
) -> anyhow::Result<Option<PushOptions>> {
    if !allow {
        if !trusted.is_empty() {
            bail!("push-trusted-keys are given but pushing is not allowed; add --allow-push (allow-push = true) or drop them");
        }
        return Ok(None);
    }
    let unwritable = match url.map(StoreUrl::parse).transpose() {
        Ok(Some(StoreUrl::Local(_))) => Some("the local Nix store"),
        Ok(Some(StoreUrl::Http(_))) => Some("an http(s):// cache"),
        Ok(None) if std::path::Path::new("/nix/var/nix/db/db.sqlite").is_file() => {
            Some("the local Nix store (served by default)")
        }
        _ => None,
    };
    if let Some(what) = unwritable {
        bail!(
            "--allow-push: {what} cannot take pushes over HTTP; serve a file://, s3://, gs:// or ssh:// store to push into (nix copy --to it directly for a local store)"
        );
    }
    Ok(Some(PushOptions {
        trusted_keys: public_keys(trusted, "push trusted key")?,
    }))
}

/// Runs `serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let push = push_options(
        args.allow_push,
        &args.push_trusted_keys,
        args.store.as_deref(),
    )?;
    let store = open_serve_store(args.store.as_deref(), &args.upstream)?;
    let mut listen: Vec<Listen> = args.listen.iter().map(|l| Listen::parse(l)).collect();
    if args.systemd {
        if !listen.is_empty() {
            bail!("--systemd and --listen exclude each other");
        }
        listen.push(Listen::Systemd);
    }
    if listen.is_empty() {
        listen.push(Listen::Tcp(format!("{}:{}", args.host, args.port)));
    }
    let opts = ServeOptions {
        store,
        listen,
        keys: read_keys(&args.secret_key_files)?,
        priority: args.priority,
        cache: CacheSettings {
            max_bytes: args.cache_size_mib * 1024 * 1024,
            ttl: args.cache_ttl,
            negative_ttl: args.negative_ttl,
            ..CacheSettings::default()
        },
        backend_timeout: args.backend_timeout,
        grace: args.grace,
        idle_timeout: args.idle_timeout,
        workers: args.workers,
        transparent_zstd: args.transparent_zstd,
        ui: ui_options(
            args.client.clone(),
            &args.upstream.trusted_public_keys,
            args.max_list_frequency,
            args.index_max_objects,
        )?,
        budgets: budget_sizes(args.metadata_slots, args.nar_slots, args.explorer_slots)
            .context("serve")?,
        upload_stats: Vec::new(),
        access_records: (!args.no_access_records).then(|| {
            access_records_path(
                args.state_dir.as_deref(),
                args.store.as_deref().unwrap_or("default"),
            )
        }),
        auth: access("nixcached", args.credentials.as_deref(), &[])?,
        tls: tls_files(args.tls_cert.as_ref(), args.tls_key.as_ref())?,
        push,
    };
    actix_web::rt::System::new().block_on(nixcached_actors::serve::run(opts))?;
    tracing::info!("stopped");
    Ok(())
}
