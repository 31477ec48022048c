//! Command-line interface, compatible with the Go nixcached's flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

/// Every default of a flag or config key, written once: clap's `default_value`s and the
/// config file's `Default` impls both read these.
pub mod defaults {
    /// `serve --host`.
    pub const HOST: &str = "localhost";
    /// `serve --port`.
    pub const PORT: u16 = 38380;
    /// `serve --max-list-frequency`, `max-list-frequency`.
    pub const MAX_LIST_FREQUENCY: &str = "2m";
    /// `serve --index-max-objects`, `index-max-objects`.
    pub const INDEX_MAX_OBJECTS: usize = nixcached_actors::catalog::DEFAULT_MAX_OBJECTS;
    /// `serve --cache-size-mib`, `cache-size-mib`.
    pub const CACHE_SIZE_MIB: u64 = 64;
    /// `serve --cache-ttl`, `cache-ttl`.
    pub const CACHE_TTL: &str = "1h";
    /// `serve --negative-ttl`, `negative-ttl`.
    pub const NEGATIVE_TTL: &str = "30s";
    /// `serve --backend-timeout`, `[server] backend-timeout`.
    pub const BACKEND_TIMEOUT: &str = "20s";
    /// `serve --grace`, `[server] grace`.
    pub const GRACE: &str = "30s";
    /// `serve --idle-timeout`, `[server] idle-timeout`.
    pub const IDLE_TIMEOUT: &str = "5m";
    /// `serve --upstream-timeout`, `upstream-timeout`.
    pub const UPSTREAM_TIMEOUT: &str = "5s";
    /// `serve --nar-cache-size-mib`, `nar-cache-size-mib`.
    pub const NAR_CACHE_SIZE_MIB: u64 = 10240;
    /// `serve --metadata-slots`, `metadata-slots`.
    pub const METADATA_SLOTS: usize = nixcached_actors::budget::DEFAULT_SLOTS;
    /// `serve --nar-slots`, `nar-slots`.
    pub const NAR_SLOTS: usize = nixcached_actors::budget::DEFAULT_SLOTS;
    /// `serve --explorer-slots`, `explorer-slots`.
    pub const EXPLORER_SLOTS: usize = nixcached_actors::budget::DEFAULT_EXPLORER_SLOTS;
    /// `upload --compression`, `compression`.
    pub const COMPRESSION: &str = "zstd";
    /// `upload --jobs`, `jobs`.
    pub const JOBS: u32 = 2;
    /// `upload --queue-size`, `queue-size`.
    pub const QUEUE_SIZE: u32 = 10_000;
    /// `upload --progress-interval`, `progress-interval`.
    pub const PROGRESS_INTERVAL: &str = "10s";
    /// `upload --from`, `from`.
    pub const FROM: &str = "/nix/store";

    /// A default duration above as a [`Duration`](std::time::Duration).
    pub fn duration(text: &str) -> std::time::Duration {
        super::parse_duration(text).expect("the defaults above parse")
    }
}

/// Reads a duration config value written as the flags take it (`30s`, `2m`, `1h30m`).
pub fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// Nix cache daemon: serve a store over HTTP, upload build results asynchronously.
#[derive(Debug, Parser)]
#[command(name = "nixcached", version, about, propagate_version = true)]
pub struct Cli {
    /// Show debug logs (RUST_LOG overrides).
    #[arg(long, global = true)]
    pub debug: bool,

    /// Run every cache and upload pipeline described in this TOML file (instead of a subcommand).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an HTTP binary cache server for a store.
    Serve(Box<ServeArgs>),
    /// Upload store paths read from a file or pipe to a binary cache.
    Upload(UploadArgs),
    /// Queue store paths for upload (what a Nix post-build hook runs).
    Send(SendArgs),
    /// Check a binary cache: missing or wrong NARs, dangling references, signatures, orphans.
    Fsck(FsckArgs),
    /// Remove from a binary cache what no pin, --keep root or --max-age keeps (closure-safe).
    Gc(GcArgs),
    /// Pins kept in a binary cache (under pins/), whose closures gc never removes.
    #[command(subcommand)]
    Pin(PinCommand),
    /// Credentials for private or writable caches (`serve --credentials`, `[[cache.credential]]`).
    #[command(subcommand)]
    Credential(CredentialCommand),
}

/// `nixcached credential`.
#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Print a fresh random token and the hashed entry to paste into the config (only the
    /// hash goes into the config; give the token to the client).
    New {
        /// Rights of the credential: read, write, or read,write.
        #[arg(long, value_delimiter = ',', default_value = "read")]
        rights: Vec<String>,
        /// Make a Basic user (login USER, password the token) instead of a bearer token.
        #[arg(long, value_name = "USER")]
        user: Option<String>,
    },
}

/// `nixcached gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// File of store paths (one per line) whose closures stay; repeatable.
    #[arg(long = "keep", value_name = "FILE")]
    pub keep: Vec<PathBuf>,
    /// Keep what was uploaded or served (see --access-records) within this long, with its
    /// closure; older paths go. 0s keeps only pins and --keep roots.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub max_age: Option<Duration>,
    /// Besides, remove least recently used paths (uploaded or served) until the cache holds at
    /// most this much: 500G, 20GiB, 1T, 750M or bytes. Pins, --keep roots and paths younger
    /// than --grace always stay, so the cache may stay above it.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_size: Option<u64>,
    /// Access records of `serve` (a file, or the folder `serve` keeps them in: its state
    /// folder's access/), so that served paths count as used; repeatable, for several servers.
    #[arg(long = "access-records", value_name = "PATH")]
    pub access_records: Vec<PathBuf>,
    /// Never remove anything younger than this (an uploader may be mid-closure), and remove
    /// NAR files only this long after their narinfo (servers and CDNs may still hand it out).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub grace: Duration,
    /// Print what would be removed and the bytes freed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Narinfos read at once.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub jobs: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Cache: file:///DIR, s3://BUCKET[?…] or gs://BUCKET[?…].
    pub cache: String,
}

/// `nixcached pin …`.
#[derive(Debug, Subcommand)]
pub enum PinCommand {
    /// Pin store paths under NAME (replacing what NAME pinned).
    Add {
        /// Cache: file:///DIR, s3://BUCKET[?…] or gs://BUCKET[?…].
        cache: String,
        /// Pin name (letters, digits, . _ -).
        name: String,
        /// Store paths.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Remove the pin NAME.
    Rm {
        /// Cache.
        cache: String,
        /// Pin name.
        name: String,
    },
    /// List pins and what they hold.
    Ls {
        /// Cache.
        cache: String,
    },
}

/// `nixcached fsck`.
#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Also stream every NAR and recompute FileHash, NarHash and NarSize (reads the whole cache).
    #[arg(long)]
    pub verify_content: bool,
    /// Require a valid signature by one of these keys (NAME:BASE64, as in Nix's
    /// trusted-public-keys; repeatable).
    #[arg(long = "trusted-public-key", value_name = "NAME:KEY")]
    pub trusted_public_keys: Vec<String>,
    /// Narinfos checked at once.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub jobs: usize,
    /// Print the report as JSON (for machines) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Fix broken paths: write those that --from-store holds again from it, and remove the
    /// narinfos of the others and of every path referencing one (referrers first), so that
    /// every narinfo left has its NAR and its references. NAR files of removed narinfos are
    /// left for garbage collection; unsigned paths and orphan NARs are only reported.
    #[arg(long)]
    pub repair: bool,
    /// With --repair, write broken paths, and missing paths that narinfos reference, again
    /// from this local Nix store (/nix/store, local or local?root=DIR), references first, as
    /// upload writes them; only what it does not hold is removed.
    #[arg(long, value_name = "STORE", requires = "repair")]
    pub from_store: Option<String>,
    /// NAR compression of paths written again: zstd, xz, bzip2, gzip, br or none [default: zstd].
    #[arg(long, requires = "from_store")]
    pub compression: Option<String>,
    /// Compression level of paths written again, on the codec's own scale (zstd 1-19, xz 0-9, …).
    #[arg(long, requires = "from_store")]
    pub compression_level: Option<i32>,
    /// Sign paths written again with this key (repeatable; nix-store
    /// --generate-binary-cache-key format).
    #[arg(long = "secret-key-file", value_name = "FILE", requires = "from_store")]
    pub secret_key_files: Vec<PathBuf>,
    /// Cache to check: file:///DIR, s3://BUCKET[?…] or gs://BUCKET[?…].
    pub cache: String,
}

/// Parses a size: a number of bytes, or with a unit K, M, G, T (powers of 1024, as `du -h`;
/// `KiB`, `MB` and the like are read the same way).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {s:?}; write for example 500G, 20GiB, 750M or 1048576");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// The longest duration a flag or the config file may give: 100 years.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses durations as Go writes them (`300ms`, `30s`, `2m`, `1h`, `1h30m`), and days
/// (`30d`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}; write for example 30s, 2m, 1h, 7d or 500ms");
    // Checked conversions: a value from a config file or flag must never panic the process
    // (infinite, NaN, negative or beyond what a Duration holds are errors).
    // At most a century, so adding one to a clock reading cannot overflow either.
    let secs_of = |x: f64| {
        Duration::try_from_secs_f64(x)
            .ok()
            .filter(|d| *d <= MAX_DURATION)
            .ok_or_else(bad)
    };
    if let Ok(secs) = s.parse::<f64>() {
        return secs_of(secs);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_len);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            // Not Go's, but what retention periods are written in.
            "d" => 86400.0,
            _ => return Err(bad()),
        };
        total = total
            .checked_add(secs_of(n * scale)?)
            .filter(|d| *d <= MAX_DURATION)
            .ok_or_else(bad)?;
        rest = tail;
    }
    Ok(total)
}

/// `nixcached serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Interface to listen on.
    #[arg(long, default_value = defaults::HOST)]
    pub host: String,
    /// TCP port.
    #[arg(short, long, default_value_t = defaults::PORT)]
    pub port: u16,
    /// Listen on this address instead of --host/--port: host:port, or unix:/path (repeatable).
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Use systemd socket activation (one inherited socket).
    #[arg(long)]
    pub systemd: bool,
    /// Folder replacing the explorer UI's embedded resources: templates/ (base.html,
    /// index.html, narinfo.html, browse.html, error.html; re-read on every request, missing
    /// ones fall back to the built-in ones) and dist/ (style.css).
    #[arg(long)]
    pub client: Option<PathBuf>,
    /// Least time between the end of one store listing (for the explorer index) and the
    /// start of the next.
    #[arg(long, default_value = defaults::MAX_LIST_FREQUENCY, value_parser = parse_duration)]
    pub max_list_frequency: Duration,
    /// Most objects the explorer index holds (about 0.65-0.7 KiB of memory each); objects beyond
    /// are served but not listed.
    #[arg(long, default_value_t = defaults::INDEX_MAX_OBJECTS, value_name = "N")]
    pub index_max_objects: usize,
    /// Sign narinfos that lack a signature by this key (repeatable; nix-store --generate-binary-cache-key format).
    #[arg(long = "secret-key-file", value_name = "FILE")]
    pub secret_key_files: Vec<PathBuf>,
    /// Priority advertised in nix-cache-info (lower is preferred by Nix).
    #[arg(long)]
    pub priority: Option<u32>,
    /// Memory for cached narinfos, in MiB.
    #[arg(long, default_value_t = defaults::CACHE_SIZE_MIB)]
    pub cache_size_mib: u64,
    /// How long a found narinfo is cached.
    #[arg(long, default_value = defaults::CACHE_TTL, value_parser = parse_duration)]
    pub cache_ttl: Duration,
    /// How long a missing narinfo is remembered (and may be cached by clients).
    #[arg(long, default_value = defaults::NEGATIVE_TTL, value_parser = parse_duration)]
    pub negative_ttl: Duration,
    /// Longest a store operation may take; slower ones answer 404 (never 5xx, which makes Nix give up on the cache).
    #[arg(long, default_value = defaults::BACKEND_TIMEOUT, value_parser = parse_duration)]
    pub backend_timeout: Duration,
    /// How long in-flight responses may run after SIGTERM, SIGINT, or SIGHUP without TLS
    /// (with TLS, SIGHUP reloads the certificate and key instead).
    #[arg(long, default_value = defaults::GRACE, value_parser = parse_duration)]
    pub grace: Duration,
    /// Drop a client that reads nothing of a response for this long, stopping what produces
    /// the response (0s: never).
    #[arg(long, default_value = defaults::IDLE_TIMEOUT, value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// HTTP worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Store metadata lookups (narinfos, listings; on the local store each holds an SQLite
    /// connection and a thread) running at once; more wait their turn.
    #[arg(long, default_value_t = defaults::METADATA_SLOTS, value_name = "N")]
    pub metadata_slots: usize,
    /// NAR and build-log opens running at once (a NAR being sent holds none).
    #[arg(long, default_value_t = defaults::NAR_SLOTS, value_name = "N")]
    pub nar_slots: usize,
    /// Explorer passes over whole NARs (file trees of NARs without a .ls) running at once.
    #[arg(long, default_value_t = defaults::EXPLORER_SLOTS, value_name = "N")]
    pub explorer_slots: usize,
    /// Send uncompressed NARs (narinfo `Compression: none`, as the local and ssh stores serve)
    /// zstd-encoded to clients that send `Accept-Encoding: zstd`: less bandwidth, more CPU.
    #[arg(long)]
    pub transparent_zstd: bool,
    /// Folder for the access records (when each path was last served; give it to
    /// `gc --access-records`). Default: $STATE_DIRECTORY, else $XDG_STATE_HOME/nixcached,
    /// else ~/.local/state/nixcached; the records are in its access/ folder.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Keep no access records.
    #[arg(long)]
    pub no_access_records: bool,
    /// TOML file of [[credential]] entries (token-hash, or user and password-hash; rights):
    /// with a read credential the cache is private, writes need a write credential. Make
    /// entries with `nixcached credential new`.
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// Certificate chain (PEM) to serve HTTPS with (HTTP/2 and HTTP/1.1 by ALPN); needs
    /// --tls-key. SIGHUP reloads both files (a bad file keeps the old pair serving).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Take pushes: `nix copy --to http://HOST:PORT` PUTs NARs and narinfos, which are
    /// stored once their hashes and references check out. The store must be writable
    /// (file://, s3://, gs://, ssh://), not the local Nix store.
    #[arg(long)]
    pub allow_push: bool,
    /// With --allow-push, store only narinfos signed by this key (NAME:BASE64, as in Nix's
    /// trusted-public-keys; repeatable); others get 403.
    #[arg(
        long = "push-trusted-key",
        value_name = "NAME:KEY",
        requires = "allow_push"
    )]
    pub push_trusted_keys: Vec<String>,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// Store to serve: /nix/store, local?root=DIR, file:///DIR, s3://BUCKET, gs://BUCKET,
    /// ssh://HOST or https://CACHE. Default: the local Nix store when there is one, else a
    /// cache folder; with --upstream and no store, the upstreams alone.
    pub store: Option<String>,
}

/// Upstream binary caches behind the served store (`serve --upstream`).
#[derive(Debug, Args)]
pub struct UpstreamArgs {
    /// Upstream binary cache (http:// or https://) for what the store lacks; repeatable, tried
    /// in order.
    #[arg(long = "upstream", value_name = "URL")]
    pub upstreams: Vec<String>,
    /// Trusted key (NAME:BASE64, as in Nix's trusted-public-keys; repeatable): upstream
    /// narinfos must carry a signature by one (without any, they are not verified), and the
    /// explorer reports signatures by them as verified (as it does for --secret-key-file keys).
    #[arg(long = "trusted-public-key", value_name = "NAME:KEY")]
    pub trusted_public_keys: Vec<String>,
    /// Longest wait for an upstream to connect and answer; then the next one is tried.
    #[arg(long, default_value = defaults::UPSTREAM_TIMEOUT, value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Folder keeping NARs fetched from upstreams (default: $XDG_CACHE_HOME/nixcached/upstream-nars).
    #[arg(long, value_name = "DIR")]
    pub nar_cache_dir: Option<PathBuf>,
    /// Size bound of the NAR folder in MiB (0: keep no NARs, stream them through).
    #[arg(long, default_value_t = defaults::NAR_CACHE_SIZE_MIB)]
    pub nar_cache_size_mib: u64,
    /// Host (HOST or HOST:PORT; repeatable) besides the upstreams' own that NARs may be
    /// fetched from, when an upstream's narinfos name absolute URLs there or it redirects
    /// there (a CDN). No other host is ever contacted.
    #[arg(long = "upstream-nar-host", value_name = "HOST")]
    pub upstream_nar_hosts: Vec<String>,
    /// netrc file (as Nix's netrc-file) with `machine HOST login USER password SECRET` lines:
    /// requests to an upstream on HOST carry those Basic credentials; no other host gets them.
    #[arg(long, value_name = "FILE")]
    pub netrc_file: Option<PathBuf>,
}

/// `nixcached upload`, and a config file's `[[upload]]` (the same struct, so both take the
/// same settings with the same defaults; config keys are the flag names, and
/// `secret-key-files` is the list form of `--secret-key-file`).
#[derive(Debug, Clone, Args, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct UploadArgs {
    /// File or FIFO to read store paths from (default: standard input).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Keep a FIFO open for new senders instead of stopping at end of input (in a config
    /// file the default is true: pipelines there are long-lived).
    #[arg(short = 'k', long)]
    #[serde(default = "keep_alive_in_config")]
    pub keep_alive: bool,
    /// Stop after the finish marker that `send --finish` writes.
    #[arg(long)]
    pub allow_finish: bool,
    /// Upload objects even when the cache has them.
    #[arg(short, long)]
    pub force: bool,
    /// NAR compression: zstd, xz, bzip2, gzip, br or none.
    #[arg(long, default_value = defaults::COMPRESSION)]
    pub compression: String,
    /// Compression level, on the codec's own scale (zstd 1-19, xz 0-9, …).
    #[arg(long)]
    pub compression_level: Option<i32>,
    /// Also write a .ls listing of each NAR (--write-nar-listing=false to disable).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub write_nar_listing: bool,
    /// Also write each path's build log (`log/<drv>`) when the local store has it
    /// (--write-build-logs=false to disable); `nix log` reads it from the cache.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub write_build_logs: bool,
    /// Objects uploaded concurrently (at least 1).
    #[arg(short, long, default_value_t = defaults::JOBS, value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: u32,
    /// Sign narinfos with this key (repeatable; nix-store --generate-binary-cache-key format).
    #[arg(long = "secret-key-file", value_name = "FILE")]
    pub secret_key_files: Vec<PathBuf>,
    /// Folder for the durable queue (default: $STATE_DIRECTORY, else ~/.local/state/nixcached).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Accepted-but-unfinished paths before reading pauses (and senders block).
    #[arg(long, default_value_t = defaults::QUEUE_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_size: u32,
    /// How often to log progress (0 to never).
    #[arg(long, default_value = defaults::PROGRESS_INTERVAL, value_parser = parse_duration)]
    #[serde(deserialize_with = "de_duration")]
    pub progress_interval: Duration,
    /// The local Nix store the paths are in: /nix/store, or local?root=DIR for a chroot store.
    #[arg(long, default_value = defaults::FROM)]
    pub from: String,
    /// Destination: file:///DIR, s3://BUCKET, gs://BUCKET or ssh://HOST.
    pub dest: String,
}

fn keep_alive_in_config() -> bool {
    true
}

impl Default for UploadArgs {
    /// The flags' defaults (what `[[upload]]` keys left out take), with no input or
    /// destination.
    fn default() -> Self {
        UploadArgs {
            input: None,
            keep_alive: false,
            allow_finish: false,
            force: false,
            compression: defaults::COMPRESSION.into(),
            compression_level: None,
            write_nar_listing: true,
            write_build_logs: true,
            jobs: defaults::JOBS,
            secret_key_files: Vec::new(),
            state_dir: None,
            queue_size: defaults::QUEUE_SIZE,
            progress_interval: defaults::duration(defaults::PROGRESS_INTERVAL),
            from: defaults::FROM.into(),
            dest: String::new(),
        }
    }
}

/// `nixcached send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The pipe `upload` reads from.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Give up after this long (for example 30s or 2m).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Also tell `upload --allow-finish` to stop after these paths.
    #[arg(long)]
    pub finish: bool,
    /// Return only once the uploader has put the paths' closures in the destination
    /// (across uploader restarts); exit 2 if an upload failed, 3 on --timeout.
    #[arg(long)]
    pub wait: bool,
    /// Store paths to queue.
    pub paths: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("750M"), Ok(750 << 20));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        for bad in ["", "G", "1.5G", "-1", "1X", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("2x").is_err());
        assert!(parse_duration("-1").is_err());
        assert_eq!(
            parse_duration("876000h").unwrap(),
            Duration::from_secs(876_000 * 3600)
        );
        // Found by the config fuzzer: these panicked (Duration::from_secs_f64, +=).
        for huge in [
            "inf",
            "NaN",
            "1e400",
            "3333333333333333333333333333333333333333333333330s",
            "18446744073709551615s18446744073709551615s",
            "9999999999999999999h",
            "876001h",
            "876000h1s",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert!(e.contains("invalid duration"), "{huge}: {e}");
        }
    }

    #[test]
    fn defaults_are_the_flags_defaults() {
        let parsed = Cli::parse_from(["nixcached", "upload", "file:///x"]);
        let Some(Command::Upload(args)) = parsed.command else {
            panic!("upload parses")
        };
        let d = UploadArgs::default();
        assert_eq!(
            (
                args.compression,
                args.jobs,
                args.queue_size,
                args.progress_interval,
                args.from,
                args.write_nar_listing
            ),
            (
                d.compression,
                d.jobs,
                d.queue_size,
                d.progress_interval,
                d.from,
                d.write_nar_listing
            )
        );
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
