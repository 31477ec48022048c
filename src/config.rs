//! The config file (`--config FILE`, TOML): any number of served caches and upload pipelines
//! in one process, one actor system.
//!
//! ```toml
//! [server]                       # shared listeners for caches without their own
//! listen = ["127.0.0.1:38380"]
//! idle-timeout = "5m"            # drop a client that reads nothing of a response this long
//! state-dir = "/var/lib/nixcached"   # access records (when each path was last served) go
//! access-records = true          # under access/ in it, for `gc --access-records`
//! tls-cert = "/etc/nixcached/cert.pem"   # HTTPS for the shared listeners
//! tls-key = "/etc/nixcached/key.pem"
//!
//! [[cache]]                      # served at http://127.0.0.1:38380/
//! store = "/nix/store"
//! secret-key-files = ["/etc/nix/cache.sk"]
//! trusted-public-keys = ["cache.example.org-1:base64…"]   # verified on the explorer's object page
//! client = "/srv/nixcached-ui"   # templates/ and dist/ replacing the built-in explorer UI
//! max-list-frequency = "2m"      # least time between store listings for the explorer index
//! index-max-objects = 1000000    # most objects the explorer index holds
//!
//! [[cache]]                      # served at http://127.0.0.1:38380/team/
//! store = "file:///srv/team-cache"
//! prefix = "/team"
//! [[cache.credential]]           # private: reads need this (`nixcached credential new`)
//! token-hash = "sha256:…"        # or user = "ci" and password-hash = "sha256:…"
//! rights = ["read", "write"]
//! allow-push = true              # nix copy --to http://127.0.0.1:38380/team pushes into it
//! push-trusted-keys = ["team-1:base64…"]   # pushed narinfos must be signed by one (optional)
//!
//! [[cache]]                      # its own listener
//! store = "s3://bucket?region=eu-west-1"
//! listen = ["127.0.0.1:38381"]
//! upstreams = ["https://cache.nixos.org"]   # what the bucket lacks
//! netrc-file = "/etc/nixcached/netrc"        # Basic credentials for private upstreams
//! tls-cert = "/etc/nixcached/cert.pem"       # HTTPS and HTTP/2 on its own listener;
//! tls-key = "/etc/nixcached/key.pem"         # SIGHUP reloads both
//! trusted-public-keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
//!
//! [[upload]]
//! input = "/run/nixcached-upload"
//! dest = "file:///srv/team-cache"
//! ```
//! Unknown keys are errors that name their line, so a typo never silently does nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::cli::{de_duration, defaults, UploadArgs};
use nixcached_actors::http::auth::CredentialSpec;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Shared server settings.
    #[serde(default)]
    pub server: ServerSection,
    /// Served caches.
    #[serde(default, rename = "cache")]
    pub caches: Vec<CacheSection>,
    /// Upload pipelines: the settings of `upload`'s flags, with `input` and `dest` required.
    #[serde(default, rename = "upload")]
    pub uploads: Vec<UploadArgs>,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerSection {
    /// Shared listeners (default `localhost:38380`).
    pub listen: Vec<String>,
    /// Store operation timeout.
    #[serde(deserialize_with = "de_duration")]
    pub backend_timeout: Duration,
    /// Shutdown grace period.
    #[serde(deserialize_with = "de_duration")]
    pub grace: Duration,
    /// How long a client may read nothing of a response before it is dropped (0s: never).
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// HTTP workers per server (0: one per core).
    pub workers: usize,
    /// Folder for the access records (as `serve --state-dir`).
    pub state_dir: Option<PathBuf>,
    /// Whether to keep access records (default yes).
    pub access_records: bool,
    /// Certificate chain (PEM) of the shared listeners: HTTPS with HTTP/2.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: Vec::new(),
            backend_timeout: defaults::duration(defaults::BACKEND_TIMEOUT),
            grace: defaults::duration(defaults::GRACE),
            idle_timeout: defaults::duration(defaults::IDLE_TIMEOUT),
            workers: 0,
            state_dir: None,
            access_records: true,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// `[[cache]]`: `serve`'s per-cache settings, with the same defaults.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CacheSection {
    /// Store URL (required).
    pub store: String,
    /// Own listeners; without them the cache is on `[server]`'s under `prefix`.
    pub listen: Vec<String>,
    /// Path prefix on the listeners (`/team`); default the root.
    pub prefix: String,
    /// Signing keys.
    pub secret_key_files: Vec<PathBuf>,
    /// Advertised priority.
    pub priority: Option<u32>,
    /// Narinfo memory cache in MiB.
    pub cache_size_mib: u64,
    /// Positive TTL.
    #[serde(deserialize_with = "de_duration")]
    pub cache_ttl: Duration,
    /// Negative TTL.
    #[serde(deserialize_with = "de_duration")]
    pub negative_ttl: Duration,
    /// zstd-encode uncompressed NARs for clients that accept it.
    pub transparent_zstd: bool,
    /// Folder replacing the explorer's templates and static files (as `serve --client`).
    pub client: Option<PathBuf>,
    /// Least time between two listings of the store for the explorer index.
    #[serde(deserialize_with = "de_duration")]
    pub max_list_frequency: Duration,
    /// Most objects the explorer index holds (as `serve --index-max-objects`).
    pub index_max_objects: usize,
    /// Upstream binary caches behind the store, tried in order.
    pub upstreams: Vec<String>,
    /// Trusted keys (`NAME:BASE64`): upstream narinfos must be signed by one, and the explorer
    /// reports signatures by them as verified.
    pub trusted_public_keys: Vec<String>,
    /// Per-upstream timeout.
    #[serde(deserialize_with = "de_duration")]
    pub upstream_timeout: Duration,
    /// Folder of NARs fetched from upstreams.
    pub nar_cache_dir: Option<PathBuf>,
    /// Size bound of that folder in MiB (0 keeps none).
    pub nar_cache_size_mib: u64,
    /// Hosts besides the upstreams' own that NARs may come from (`--upstream-nar-host`).
    pub upstream_nar_hosts: Vec<String>,
    /// Metadata lookups at once (`--metadata-slots`).
    pub metadata_slots: usize,
    /// NAR opens at once (`--nar-slots`).
    pub nar_slots: usize,
    /// Explorer whole-NAR passes at once (`--explorer-slots`).
    pub explorer_slots: usize,
    /// netrc file with Basic credentials for private upstreams (`--netrc-file`).
    pub netrc_file: Option<PathBuf>,
    /// Who may read and write (`[[cache.credential]]`); none: public and read-only.
    pub credential: Vec<CredentialSpec>,
    /// A file of more `[[credential]]` entries (`--credentials`).
    pub credentials_file: Option<PathBuf>,
    /// Certificate chain (PEM) of the cache's own listeners.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Take pushes (`nix copy --to http://…`) into the store (`--allow-push`).
    pub allow_push: bool,
    /// With `allow-push`, keys one of which must sign a pushed narinfo (`--push-trusted-key`).
    pub push_trusted_keys: Vec<String>,
}

impl Default for CacheSection {
    /// `serve`'s flag defaults, with no store.
    fn default() -> Self {
        CacheSection {
            store: String::new(),
            listen: Vec::new(),
            prefix: String::new(),
            secret_key_files: Vec::new(),
            priority: None,
            cache_size_mib: defaults::CACHE_SIZE_MIB,
            cache_ttl: defaults::duration(defaults::CACHE_TTL),
            negative_ttl: defaults::duration(defaults::NEGATIVE_TTL),
            transparent_zstd: false,
            client: None,
            max_list_frequency: defaults::duration(defaults::MAX_LIST_FREQUENCY),
            index_max_objects: defaults::INDEX_MAX_OBJECTS,
            upstreams: Vec::new(),
            trusted_public_keys: Vec::new(),
            upstream_timeout: defaults::duration(defaults::UPSTREAM_TIMEOUT),
            nar_cache_dir: None,
            nar_cache_size_mib: defaults::NAR_CACHE_SIZE_MIB,
            upstream_nar_hosts: Vec::new(),
            metadata_slots: defaults::METADATA_SLOTS,
            nar_slots: defaults::NAR_SLOTS,
            explorer_slots: defaults::EXPLORER_SLOTS,
            netrc_file: None,
            credential: Vec::new(),
            credentials_file: None,
            tls_cert: None,
            tls_key: None,
            allow_push: false,
            push_trusted_keys: Vec::new(),
        }
    }
}

impl CacheSection {
    /// The upstream settings, as `serve`'s flags would give them.
    fn upstream_args(&self) -> crate::cli::UpstreamArgs {
        crate::cli::UpstreamArgs {
            upstreams: self.upstreams.clone(),
            trusted_public_keys: self.trusted_public_keys.clone(),
            upstream_timeout: self.upstream_timeout,
            nar_cache_dir: self.nar_cache_dir.clone(),
            nar_cache_size_mib: self.nar_cache_size_mib,
            upstream_nar_hosts: self.upstream_nar_hosts.clone(),
            netrc_file: self.netrc_file.clone(),
        }
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and checks a config file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Config> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("config {origin}: {e}"))?;
        if cfg.caches.is_empty() && cfg.uploads.is_empty() {
            bail!("config {origin}: no [[cache]] and no [[upload]]: nothing to run");
        }
        for u in &cfg.uploads {
            if u.input.is_none() || u.dest.is_empty() {
                bail!("config {origin}: every [[upload]] needs input (a FIFO or file) and dest (a cache URL)");
            }
            if u.jobs == 0 || u.queue_size == 0 {
                bail!(
                    "config {origin}: jobs and queue-size of [[upload]] {} must be at least 1",
                    u.dest
                );
            }
        }
        for c in &cfg.caches {
            if c.store.is_empty() {
                bail!("config {origin}: every [[cache]] needs store (a store URL)");
            }
            crate::serve::budget_sizes(c.metadata_slots, c.nar_slots, c.explorer_slots)
                .map_err(|e| anyhow::anyhow!("config {origin}: [[cache]] {}: {e}", c.store))?;
            if !c.prefix.is_empty() && (!c.prefix.starts_with('/') || c.prefix.ends_with('/')) {
                bail!(
                    "config {origin}: prefix {:?} must start with '/' and not end with one",
                    c.prefix
                );
            }
        }
        Ok(cfg)
    }
}

/// The realm a cache's 401 challenges name: its prefix, or `nixcached` at the root.
fn realm(prefix: &str) -> &str {
    match prefix.trim_matches('/') {
        "" => "nixcached",
        p => p,
    }
}

/// Runs every cache and pipeline of the file until a stop signal (or, for pipelines that do
/// not keep their input open, the end of their input).
pub fn run(cfg: Config) -> anyhow::Result<()> {
    use nixcached_actors::lookup::CacheSettings;
    use nixcached_actors::serve::{Listen, ServeOptions, ServerGroup};

    let backend_timeout = cfg.server.backend_timeout;
    let grace = cfg.server.grace;
    let idle_timeout = cfg.server.idle_timeout;
    let shared_listen: Vec<Listen> = if cfg.server.listen.is_empty() {
        vec![Listen::Tcp(format!(
            "{}:{}",
            defaults::HOST,
            defaults::PORT
        ))]
    } else {
        cfg.server.listen.iter().map(|l| Listen::parse(l)).collect()
    };
    let pipelines = cfg
        .uploads
        .iter()
        .map(crate::upload::prepare)
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Every cache's /metrics shows the pipelines of the process too.
    let upload_stats: Vec<_> = pipelines.iter().map(|p| p.pipeline.stats.clone()).collect();
    let mut shared = Vec::new();
    let mut own = Vec::new();
    for c in &cfg.caches {
        let push = crate::serve::push_options(c.allow_push, &c.push_trusted_keys, Some(&c.store))
            .with_context(|| format!("[[cache]] {}", c.store))?;
        let opts = ServeOptions {
            store: crate::serve::open_serve_store(Some(&c.store), &c.upstream_args())?,
            listen: c.listen.iter().map(|l| Listen::parse(l)).collect(),
            keys: crate::serve::read_keys(&c.secret_key_files)?,
            priority: c.priority,
            cache: CacheSettings {
                max_bytes: c.cache_size_mib * 1024 * 1024,
                ttl: c.cache_ttl,
                negative_ttl: c.negative_ttl,
                ..CacheSettings::default()
            },
            backend_timeout,
            grace,
            idle_timeout,
            workers: cfg.server.workers,
            transparent_zstd: c.transparent_zstd,
            ui: crate::serve::ui_options(
                c.client.clone(),
                &c.trusted_public_keys,
                c.max_list_frequency,
                c.index_max_objects,
            )?,
            budgets: crate::serve::budget_sizes(c.metadata_slots, c.nar_slots, c.explorer_slots)
                .with_context(|| format!("[[cache]] {}", c.store))?,
            upload_stats: upload_stats.clone(),
            access_records: cfg.server.access_records.then(|| {
                crate::serve::access_records_path(cfg.server.state_dir.as_deref(), &c.store)
            }),
            auth: crate::serve::access(
                realm(&c.prefix),
                c.credentials_file.as_deref(),
                &c.credential,
            )
            .with_context(|| format!("[[cache]] {}", c.store))?,
            tls: crate::serve::tls_files(c.tls_cert.as_ref(), c.tls_key.as_ref())
                .with_context(|| format!("[[cache]] {}", c.store))?,
            push,
        };
        if c.listen.is_empty() {
            if opts.tls.is_some() {
                bail!("[[cache]] {}: tls-cert and tls-key are for a cache with its own listen; the shared listeners take [server]'s", c.store);
            }
            shared.push((c.prefix.clone(), opts));
        } else {
            own.push(ServerGroup {
                tls: opts.tls.clone(),
                listen: opts.listen.clone(),
                caches: vec![(c.prefix.clone(), opts)],
                grace,
                idle_timeout,
                workers: cfg.server.workers,
            });
        }
    }
    let mut groups = own;
    if !shared.is_empty() {
        groups.push(ServerGroup {
            tls: crate::serve::tls_files(cfg.server.tls_cert.as_ref(), cfg.server.tls_key.as_ref())
                .context("[server]")?,
            listen: shared_listen,
            caches: shared,
            grace,
            idle_timeout,
            workers: cfg.server.workers,
        });
    }
    actix::System::new().block_on(async move {
        let serving = async {
            if groups.is_empty() {
                Ok(())
            } else {
                nixcached_actors::serve::run_groups(groups).await
            }
        };
        let uploading =
            futures::future::join_all(pipelines.into_iter().map(nixcached_actors::upload::run));
        let (served, uploaded) = futures::join!(serving, uploading);
        served?;
        for u in uploaded {
            let outcome = u?;
            if let Some(e) = outcome.input_error {
                bail!("{e}");
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_name_their_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(
            &p,
            "[[cache]]\nstore = \"/nix/store\"\nlisten = []\nprioriti = 3\n",
        )
        .unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 4"), "{e}");
        assert!(e.contains("prioriti"), "{e}");
    }

    #[test]
    fn slot_keys_size_the_budgets_and_zero_is_refused() {
        let cfg = Config::parse(
            "[[cache]]\nstore = \"/nix/store\"\nmetadata-slots = 7\nexplorer-slots = 1\n",
            "t",
        )
        .unwrap();
        let c = &cfg.caches[0];
        let sizes =
            crate::serve::budget_sizes(c.metadata_slots, c.nar_slots, c.explorer_slots).unwrap();
        assert_eq!(
            sizes,
            nixcached_actors::budget::BudgetSizes {
                metadata: 7,
                explorer: 1,
                ..Default::default()
            }
        );
        let e = Config::parse("[[cache]]\nstore = \"/nix/store\"\nnar-slots = 0\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nar-slots must be at least 1"), "{e}");
        assert!(e.contains("/nix/store"), "{e}");
    }

    #[test]
    fn push_keys_become_push_options_and_unwritable_stores_are_refused() {
        let key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
        let cfg = Config::parse(
            &format!(
                "[[cache]]\nstore = \"file:///srv/c\"\nallow-push = true\npush-trusted-keys = [\"{key}\"]\n"
            ),
            "t",
        )
        .unwrap();
        let c = &cfg.caches[0];
        let push = crate::serve::push_options(c.allow_push, &c.push_trusted_keys, Some(&c.store))
            .unwrap()
            .expect("pushes allowed");
        assert_eq!(push.trusted_keys[0].name(), "cache.nixos.org-1");
        // Read-only unless asked; trusted keys alone are a mistake worth saying.
        assert!(
            crate::serve::push_options(false, &[], Some("file:///srv/c"))
                .unwrap()
                .is_none()
        );
        let e =
            crate::serve::push_options(false, &[key.into()], Some("file:///srv/c")).unwrap_err();
        assert!(e.to_string().contains("--allow-push"), "{e}");
        for store in ["/nix/store", "https://cache.nixos.org"] {
            let e = crate::serve::push_options(true, &[], Some(store)).unwrap_err();
            assert!(e.to_string().contains("cannot take pushes"), "{store}: {e}");
        }
        let e = crate::serve::push_options(true, &["nonsense".into()], Some("s3://b")).unwrap_err();
        assert!(format!("{e:#}").contains("NAME:BASE64"), "{e:#}");
    }

    #[test]
    fn explorer_keys_become_ui_options() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("ui/templates")).unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(
            &p,
            format!(
                "[[cache]]\nstore = \"/nix/store\"\nclient = \"{}\"\nmax-list-frequency = \"5m\"\n\
                 trusted-public-keys = [\"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"]\n",
                d.path().join("ui").display()
            ),
        )
        .unwrap();
        let cfg = Config::load(&p).unwrap();
        let c = &cfg.caches[0];
        let ui = crate::serve::ui_options(
            c.client.clone(),
            &c.trusted_public_keys,
            c.max_list_frequency,
            c.index_max_objects,
        )
        .unwrap();
        assert_eq!(ui.max_list_frequency, Duration::from_secs(300));
        assert_eq!(ui.trusted_keys.len(), 1);
        assert_eq!(ui.trusted_keys[0].name(), "cache.nixos.org-1");
        let e =
            crate::serve::ui_options(None, &["nonsense".into()], Duration::ZERO, 1).unwrap_err();
        assert!(format!("{e:#}").contains("NAME:BASE64"), "{e:#}");
        let e = crate::serve::ui_options(Some(d.path().join("nope")), &[], Duration::ZERO, 1)
            .unwrap_err();
        assert!(e.to_string().contains("templates/"), "{e}");
    }

    #[test]
    fn credentials_and_tls_keys_parse_and_bad_entries_say_what_to_write() {
        let token_hash = nixcached_actors::http::auth::hash_secret("t");
        let cfg = Config::parse(
            &format!(
                "[server]\ntls-cert = \"/c.pem\"\ntls-key = \"/k.pem\"\n\
                 [[cache]]\nstore = \"/nix/store\"\nnetrc-file = \"/n\"\n\
                 [[cache.credential]]\ntoken-hash = \"{token_hash}\"\nrights = [\"read\"]\n\
                 [[cache.credential]]\nuser = \"ci\"\npassword-hash = \"{token_hash}\"\nrights = [\"write\"]\n"
            ),
            "t",
        )
        .unwrap();
        let c = &cfg.caches[0];
        let access = crate::serve::access("team", None, &c.credential).unwrap();
        assert!(access.is_private() && access.has_writer());
        assert_eq!(c.upstream_args().netrc_file, Some(PathBuf::from("/n")));
        assert!(
            crate::serve::tls_files(cfg.server.tls_cert.as_ref(), cfg.server.tls_key.as_ref())
                .unwrap()
                .is_some()
        );
        let e = crate::serve::tls_files(cfg.server.tls_cert.as_ref(), None).unwrap_err();
        assert!(e.to_string().contains("give both"), "{e}");
        let bad = [CredentialSpec {
            token_hash: Some("plain-token".into()),
            rights: vec!["read".into()],
            ..CredentialSpec::default()
        }];
        let e = crate::serve::access("x", None, &bad).unwrap_err();
        assert!(format!("{e:#}").contains("sha256:<64 hex digits>"), "{e:#}");
    }

    #[test]
    fn the_example_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/nixcached.example.toml");
        let cfg = Config::load(&p).unwrap();
        assert!(cfg.caches.len() >= 2);
        assert!(!cfg.uploads.is_empty());
        let mirror = cfg
            .caches
            .iter()
            .find(|c| !c.upstreams.is_empty())
            .expect("an example with upstreams");
        for k in &mirror.trusted_public_keys {
            nixcached_actors::formats::PublicKey::parse(k).unwrap();
        }
        assert_eq!(
            mirror.upstream_args().upstream_timeout,
            Duration::from_secs(5)
        );
    }
}
