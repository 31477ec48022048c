//! `ssh://[user@]host[:port][/storedir]`: a Nix store on another machine, reached with the
//! system `ssh` and the legacy `nix-store --serve --write` protocol, served like a binary cache
//! and writable like one.
//!
//! - Metadata goes over one long-lived session owned by the [`connection::SshConnection`]
//!   actor, which runs one exchange at a time, logs in at the first one (not when the store
//!   is opened: a host that is down makes a degraded store, not a daemon that cannot start)
//!   and again when the session drops.
//! - Clients ask by digest, which the protocol cannot look up: the names in the remote store
//!   directory are listed (`ls`) and kept, and listed again on a miss, at most every few
//!   seconds (see `index`).
//! - NARs stream over sessions of their own (`nix-store --serve`, command `DumpStorePath`) so
//!   that a long download never holds up narinfo lookups; finished sessions are reused. The
//!   narinfo says `URL: nar/<digest>.nar`, `Compression: none`, and FileHash/FileSize equal to
//!   NarHash/NarSize. `.ls` listings are computed by reading the NAR.
//! - Writes: a Nix store takes a NAR and its metadata in one request, a binary-cache writer
//!   gives them one after the other. `put_nar` accepts the NARs [`crate::publish`] writes
//!   (`nar/<narhash>.nar[.xz|.zst|…]`) into a temporary file on local disk; `put_narinfo` then
//!   decompresses it and imports it with the narinfo's metadata (path, references, deriver,
//!   NAR hash and size, signatures, CA) over the metadata session: `AddToStoreNar` (serve
//!   protocol 2.5 and later), else `ImportPaths` (which carries no signatures or CA, and which
//!   the remote Nix buffers in memory). The remote Nix checks the NAR hash (with
//!   `ImportPaths`, this store checks it before sending the end of the request) and that
//!   references are valid, so publish references first. Any other `put_nar` URL, and a
//!   `put_narinfo` with no NAR spooled before it, is [`StoreError::Unsupported`]. Listings are
//!   not stored (`put_listing` does nothing: they are derived from the NAR); build logs cannot
//!   be uploaded (the protocol has no command for it: `put_log` is Unsupported). Uploading
//!   with `Compression: none` saves compressing and decompressing again.
//! - Build logs are read with `nix-store --read-log` on the remote host.
//!
//! ssh itself is configured as users expect: `~/.ssh/config`, ssh-agent, `NIX_SSHOPTS`
//! (split on whitespace, as Nix does), `?ssh-key=`. ssh runs with `BatchMode=yes` (a daemon
//! cannot answer prompts). Each NAR stream costs one ssh login the first time; adding
//! `-o ControlMaster=auto -o ControlPath=… -o ControlPersist=60` to `NIX_SSHOPTS` makes those
//! nearly free.

pub mod connection;
mod dump;
pub mod error;
mod index;
mod process;
mod session;
mod spool;
pub mod target;
pub mod wire;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, MailboxError, Message};
use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::runtime::Handle;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use self::connection::{AddToStore, Connect, QueryPathInfos, QueryValidPaths, SshConnection};
use self::dump::DumpPool;
use self::error::SshError;
use self::index::{DigestIndex, REFRESH_INTERVAL};
use self::process::SshProcess;
use self::spool::Spool;
use self::target::SshTarget;
use self::wire::PathInfo;
use super::nix_object::ObjectText;
use super::{Blob, ByteRange, ByteStream, Result, Store, StoreError};
use crate::formats::hash::Algo;
use crate::formats::{
    nar, nixbase32, CacheInfo, Compression, Digest, NarInfo, StoreDir, StorePath,
};

/// Longest a listing of the remote store directory may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest reading a build log may take.
const LOG_TIMEOUT: Duration = Duration::from_secs(120);
/// Paths per `QueryValidPaths` when checking a whole listing, so other requests interleave.
const VALIDITY_BATCH: usize = 10_000;

/// A Nix store reached over ssh.
pub struct SshStore {
    target: Arc<SshTarget>,
    conn: Addr<SshConnection>,
    /// The runtime of the connection thread: every ssh process of this store lives there.
    rt: Handle,
    dumps: Arc<DumpPool>,
    /// Whether the metadata session is open (see [`SshConnection::spawn`]).
    logged_in: Arc<AtomicBool>,
    index: DigestIndex,
    spool: Spool,
}

impl std::fmt::Debug for SshStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SshStore({})", self.target.describe())
    }
}

impl SshStore {
    /// Opens the store without logging in: the first request does, and a host that is down
    /// or refuses the login fails that request (and the health probe, see
    /// [`Store::cache_info`]) in words a user can act on, so one unreachable host never
    /// stops a daemon from starting. Call [`SshStore::check`] to log in now.
    pub fn open(target: SshTarget) -> Result<SshStore> {
        Self::open_with(target, false)
    }

    /// Like [`SshStore::open`], but imports with the `ImportPaths` command even when the
    /// server has `AddToStoreNar`. Servers older than protocol 2.5 get `ImportPaths` anyway;
    /// this exists to exercise that path against newer ones.
    pub fn open_forcing_import_paths(target: SshTarget) -> Result<SshStore> {
        Self::open_with(target, true)
    }

    fn open_with(target: SshTarget, legacy_import: bool) -> Result<SshStore> {
        let target = Arc::new(target);
        let logged_in = Arc::new(AtomicBool::new(false));
        let (conn, rt) = SshConnection::spawn(target.clone(), legacy_import, logged_in.clone())
            .map_err(|e| StoreError::backend("starting the ssh connection thread", e))?;
        Ok(SshStore {
            dumps: DumpPool::new(target.clone(), rt.clone()),
            target,
            conn,
            rt,
            logged_in,
            index: DigestIndex::default(),
            spool: Spool::default(),
        })
    }

    /// Logs in unless a session is open: `Ok` when the host answers and the remote
    /// `nix-store` runs, else why not (host unreachable, login refused, host key, no
    /// `nix-store` there).
    pub async fn check(&self) -> Result<()> {
        self.ask(Connect, "connecting").await
    }

    /// The store's target.
    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    fn store_dir(&self) -> &StoreDir {
        &self.target.store_dir
    }

    fn context(&self, what: impl std::fmt::Display) -> String {
        format!("{} ({what})", self.target.describe())
    }

    /// Sends a request to the connection actor.
    async fn ask<M, T>(&self, msg: M, what: impl std::fmt::Display) -> Result<T>
    where
        M: Message<Result = std::result::Result<T, SshError>> + Send + 'static,
        T: Send + 'static,
        SshConnection: actix::Handler<M>,
    {
        match self.conn.send(msg).await {
            Ok(r) => r.map_err(|e| e.into_store_error(self.context(what))),
            Err(MailboxError::Closed | MailboxError::Timeout) => Err(StoreError::backend(
                self.context(what),
                "the ssh connection actor has stopped",
            )),
        }
    }

    /// Lists the names in the remote store directory.
    async fn list_remote(&self) -> Result<Vec<String>> {
        let context = || self.context("listing the remote store directory");
        let mut proc = SshProcess::spawn(&self.target, &self.target.list_command(), &self.rt)
            .map_err(|e| e.into_store_error(context()))?;
        let read = async {
            let mut names = Vec::new();
            // Byte lines: a stray file with a non-UTF-8 name must not spoil the listing.
            let mut lines = (&mut proc.stdout).split(b'\n');
            while let Some(line) = lines.next_segment().await? {
                if let Ok(name) = String::from_utf8(line) {
                    if StorePath::from_base_name(&name).is_ok() {
                        names.push(name);
                    }
                }
            }
            io::Result::Ok(names)
        };
        let names = match tokio::time::timeout(LIST_TIMEOUT, read).await {
            Ok(Ok(names)) => names,
            Ok(Err(e)) => {
                return Err(proc.failure(Some(&e)).await.into_store_error(context()));
            }
            Err(_) => {
                return Err(StoreError::backend(
                    context(),
                    format!("no answer within {} s", LIST_TIMEOUT.as_secs()),
                ))
            }
        };
        let (status, stderr) = proc.finish().await;
        if status.is_some_and(|s| s.success()) {
            return Ok(names);
        }
        if stderr.contains("No such file or directory") {
            // A remote store that was never written to has no directory yet.
            return Ok(Vec::new());
        }
        Err(
            error::classify(&self.target.destination(), "ls", status, &stderr, None)
                .into_store_error(context()),
        )
    }

    async fn refresh_index(&self) -> Result<()> {
        self.index
            .refresh(REFRESH_INTERVAL, || self.list_remote())
            .await
    }

    /// The remote metadata of the path with this digest.
    async fn path_info(&self, digest: &str) -> Result<PathInfo> {
        let mut names = self.index.lookup(digest);
        if names.is_empty() {
            self.refresh_index().await?;
            names = self.index.lookup(digest);
        }
        let not_found = || StoreError::NotFound(format!("{digest}.narinfo"));
        if names.is_empty() {
            return Err(not_found());
        }
        let paths = names
            .iter()
            .map(|n| format!("{}/{n}", self.store_dir()))
            .collect();
        let infos = self
            .ask(QueryPathInfos(paths), format!("looking up {digest}"))
            .await?;
        infos.into_iter().next().ok_or_else(not_found)
    }

    async fn is_known(&self, digest: &str) -> Result<bool> {
        match self.path_info(digest).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound(_) | StoreError::Invalid(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn nar_stream(&self, info: &PathInfo) -> Result<ByteStream> {
        self.dumps
            .dump(&info.path, info.nar_size)
            .await
            .map_err(|e| e.into_store_error(self.context(format!("streaming {}", info.path))))
    }
}

/// The narinfo a binary-cache client gets for a remote path.
fn narinfo_of(info: PathInfo, dir: &StoreDir) -> Result<NarInfo> {
    ObjectText {
        path: &info.path,
        nar_hash: &info.nar_hash,
        nar_size: info.nar_size,
        references: &info.references,
        deriver: Some(info.deriver.as_str()),
        sigs: info.sigs.iter().map(String::as_str).collect(),
        ca: Some(info.ca.as_str()),
    }
    .to_narinfo(dir, "the remote store's data")
}

/// The protocol's metadata for importing what a narinfo describes.
fn path_info_of(info: &NarInfo) -> Result<PathInfo> {
    if info.nar_hash.algo() != Algo::Sha256 {
        return Err(StoreError::Invalid(format!(
            "{}: NarHash {} is not SHA-256, which Nix requires",
            info.store_path, info.nar_hash
        )));
    }
    let dir = &info.store_dir;
    Ok(PathInfo {
        path: dir.display(&info.store_path),
        deriver: info
            .deriver_path()
            .map(|d| dir.display(&d))
            .unwrap_or_default(),
        references: info.references.iter().map(|r| dir.display(r)).collect(),
        nar_size: info.nar_size,
        // Base16 without prefix, as Nix's own client sends it.
        nar_hash: hex::encode(info.nar_hash.digest()),
        ca: info.ca.clone().unwrap_or_default(),
        sigs: info.sigs.iter().map(|s| s.to_string()).collect(),
    })
}

/// The NAR hash (nixbase32) and compression named by a URL of the form `publish` writes,
/// `nar/<nixbase32 sha256>.nar<extension>`.
fn spool_url(url: &str) -> Option<(&str, Compression)> {
    let rest = url.strip_prefix("nar/")?;
    let (hash, ext) = rest.split_once(".nar")?;
    let ext = format!(".nar{ext}");
    let compression = Compression::ALL
        .into_iter()
        .find(|c| format!(".nar{}", c.extension()) == ext)?;
    (hash.len() == nixbase32::encoded_len(32) && nixbase32::is_valid(hash.as_bytes()))
        .then_some((hash, compression))
}

#[async_trait]
impl Store for SshStore {
    fn describe(&self) -> String {
        self.target.describe()
    }

    /// Made up from the URL's options, as the protocol has no such file; but asked only once
    /// the host answers, because this is what the health probe of a served store reads. An
    /// open session counts as an answer without asking the actor, where the probe would
    /// queue behind other requests.
    async fn cache_info(&self) -> Result<CacheInfo> {
        if !self.logged_in.load(Ordering::Acquire) {
            self.check().await?;
        }
        Ok(CacheInfo {
            store_dir: self.store_dir().clone(),
            want_mass_query: self.target.want_mass_query,
            priority: self.target.priority,
        })
    }

    async fn narinfo(&self, digest: &Digest) -> Result<NarInfo> {
        narinfo_of(self.path_info(digest).await?, self.store_dir())
    }

    async fn nar(&self, url: &str, range: Option<ByteRange>) -> Result<Blob> {
        let info = super::object_of_nar_url(
            url,
            |d| self.path_info(d),
            |i: &PathInfo| {
                hex::decode(&i.nar_hash)
                    .map(|b| nixbase32::encode(&b))
                    .unwrap_or_default()
            },
        )
        .await?;
        let total = info.nar_size;
        let (start, end) = ByteRange::resolve_or_err(range, total)?;
        let stream = self.nar_stream(&info).await?;
        Ok(Blob::of_span(stream, (start, end), total))
    }

    async fn listing(&self, digest: &Digest) -> Result<String> {
        let info = self.path_info(digest).await?;
        let reader = SyncIoBridge::new(StreamReader::new(self.nar_stream(&info).await?));
        // The peer's NAR is held to the size its path info gives, like any NAR from afar.
        let nar_size = info.nar_size;
        tokio::task::spawn_blocking(move || {
            nar::read_at_most(reader, &mut (), nar_size).map(|l| l.to_json())
        })
        .await
        .map_err(|e| StoreError::backend("listing task", e))?
        .map_err(|e| StoreError::backend(self.context(format!("listing {digest}")), e))
    }

    async fn log(&self, drv: &str) -> Result<Blob> {
        let p = StorePath::from_base_name(drv).map_err(|e| StoreError::Invalid(e.to_string()))?;
        if !p.is_derivation() {
            return Err(StoreError::Invalid(format!(
                "{drv} is not a derivation (.drv)"
            )));
        }
        let context = || self.context(format!("reading the build log of {drv}"));
        let command = self.target.read_log_command(&self.store_dir().display(&p));
        let mut proc = SshProcess::spawn(&self.target, &command, &self.rt)
            .map_err(|e| e.into_store_error(context()))?;
        // The size must be known before answering, and logs can be large: spool to an
        // anonymous temporary file, which disappears when closed.
        let file = tokio::task::spawn_blocking(tempfile::tempfile)
            .await
            .map_err(|e| StoreError::backend("log spool task", e))?
            .map_err(|e| StoreError::backend(context(), e))?;
        let mut file = tokio::fs::File::from_std(file);
        // At most one byte past the cap, to tell a log at the cap from one beyond it.
        let mut capped = (&mut proc.stdout).take(super::MAX_LOG_BYTES + 1);
        let copied =
            tokio::time::timeout(LOG_TIMEOUT, tokio::io::copy(&mut capped, &mut file)).await;
        let total = match copied {
            Ok(Ok(n)) if n > super::MAX_LOG_BYTES => {
                return Err(StoreError::Corrupt(format!(
                    "{}: the log is larger than {} bytes; it is not served",
                    context(),
                    super::MAX_LOG_BYTES
                )))
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(proc.failure(Some(&e)).await.into_store_error(context())),
            Err(_) => {
                return Err(StoreError::backend(
                    context(),
                    format!("no answer within {} s", LOG_TIMEOUT.as_secs()),
                ))
            }
        };
        let (status, stderr) = proc.finish().await;
        if !status.is_some_and(|s| s.success()) {
            if stderr.contains("is not available") || stderr.contains("is not valid") {
                return Err(StoreError::NotFound(format!("log/{drv}")));
            }
            return Err(error::classify(
                &self.target.destination(),
                &self.target.remote_program,
                status,
                &stderr,
                None,
            )
            .into_store_error(context()));
        }
        file.flush()
            .await
            .and(file.rewind().await)
            .map_err(|e| StoreError::backend(context(), e))?;
        Ok(Blob {
            stream: Box::pin(ReaderStream::new(file)),
            span: (0, total),
            encoding: None,
            total,
        })
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        self.refresh_index().await?;
        let names = self.index.all();
        let mut digests = Vec::new();
        // The directory also holds lock files and paths being built or deleted: keep the
        // valid ones.
        for batch in names.chunks(VALIDITY_BATCH) {
            let paths = batch
                .iter()
                .map(|n| format!("{}/{n}", self.store_dir()))
                .collect();
            for p in self
                .ask(QueryValidPaths(paths), "listing valid paths")
                .await?
            {
                if let Ok(p) = self.store_dir().parse_path(&p) {
                    digests.push(p.digest().to_owned());
                }
            }
        }
        digests.sort();
        digests.dedup();
        Ok(digests)
    }

    async fn put_nar(&self, url: &str, data: ByteStream) -> Result<u64> {
        if spool_url(url).is_none() {
            return Err(StoreError::Unsupported(format!(
                "{}: an ssh:// store holds Nix store paths, not files; it accepts only NARs named nar/<narhash>.nar[.xz|.zst|…] (as nixcached's upload writes them), each followed by its narinfo",
                self.describe()
            )));
        }
        self.spool
            .put(url, data)
            .await
            .map_err(|e| StoreError::backend(format!("keeping {url} in a local temporary file"), e))
    }

    async fn put_narinfo(&self, info: &NarInfo) -> Result<()> {
        let Some(file) = self.spool.claim(&info.url) else {
            return Err(StoreError::Unsupported(format!(
                "{}: no NAR was written at {} before this narinfo; an ssh:// store imports each store path from the NAR given just before its narinfo",
                self.describe(),
                info.url
            )));
        };
        if &info.store_dir != self.store_dir() {
            return Err(StoreError::Invalid(format!(
                "{} is for store {}, but {} holds {}",
                info.store_path,
                info.store_dir,
                self.describe(),
                self.store_dir()
            )));
        }
        let (hash, compression) = spool_url(&info.url)
            .ok_or_else(|| StoreError::Invalid(format!("{} is not a NAR URL", info.url)))?;
        // nixcached's upload names a NAR by its NAR hash, Nix's `nix copy` (pushing through
        // `serve --allow-push`) by its file hash: either name is the content.
        let names = |h: &crate::formats::Hash| hash == nixbase32::encode(h.digest());
        if compression != info.compression
            || !(names(&info.nar_hash) || info.file_hash.as_ref().is_some_and(names))
        {
            return Err(StoreError::Invalid(format!(
                "the narinfo of {} (NarHash {}, Compression {}) does not match its URL {}",
                info.store_path, info.nar_hash, info.compression, info.url
            )));
        }
        let remote = path_info_of(info)?;
        let what = format!("adding {}", remote.path);
        let valid = self
            .ask(QueryValidPaths(vec![remote.path.clone()]), &what)
            .await?;
        if valid.is_empty() {
            self.ask(
                AddToStore {
                    info: remote,
                    nar_hash: info.nar_hash.clone(),
                    file,
                    compression,
                },
                &what,
            )
            .await?;
        }
        self.index.add(&info.store_path.to_string());
        Ok(())
    }

    /// Does nothing: listings are computed from the NAR when asked for.
    async fn put_listing(&self, _digest: &Digest, _json: &str) -> Result<()> {
        Ok(())
    }

    /// Unsupported: the serve protocol has no command to add a build log.
    async fn put_log(&self, drv: &str, _data: ByteStream) -> Result<()> {
        Err(StoreError::Unsupported(format!(
            "{}: build logs cannot be uploaded over ssh (log/{drv})",
            self.describe()
        )))
    }

    async fn exists(&self, url: &str) -> Result<bool> {
        let digest = super::digest_of_object_url(url);
        match digest {
            Some(d) => self.is_known(d).await,
            // Spooled NARs only exist until their narinfo is put: never worth skipping.
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_urls_are_what_publish_writes() {
        let h = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        assert_eq!(
            spool_url(&format!("nar/{h}.nar")),
            Some((h, Compression::None))
        );
        assert_eq!(
            spool_url(&format!("nar/{h}.nar.zst")),
            Some((h, Compression::Zstd))
        );
        assert_eq!(
            spool_url(&format!("nar/{h}.nar.xz")),
            Some((h, Compression::Xz))
        );
        for bad in [
            "nar/conformance.nar".to_owned(),
            format!("nar/{h}.nar.rar"),
            format!("{h}.nar"),
            format!("nar/../{h}.nar"),
            format!("nar/{}.nar", &h[..32]),
        ] {
            assert_eq!(spool_url(&bad), None, "{bad}");
        }
    }

    #[test]
    fn metadata_round_trips_between_narinfo_and_protocol() {
        let dir = StoreDir::default();
        let wire = PathInfo {
            path: "/nix/store/wxbdhil717xasnf3c4lq7p5q6npm3cid-testapp".into(),
            deriver: "/nix/store/0a9k6j9sfy79b2g3k9zzirbiqf85g7ga-testapp.drv".into(),
            references: vec![
                "/nix/store/wxbdhil717xasnf3c4lq7p5q6npm3cid-testapp".into(),
                "/nix/store/0a9k6j9sfy79b2g3k9zzirbiqf85g7ga-dir1".into(),
            ],
            nar_size: 1080,
            nar_hash: "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into(),
            ca: String::new(),
            sigs: vec![],
        };
        let ni = narinfo_of(wire.clone(), &dir).unwrap();
        assert_eq!(ni.url, "nar/wxbdhil717xasnf3c4lq7p5q6npm3cid.nar");
        assert_eq!(ni.compression, Compression::None);
        assert_eq!(ni.file_hash.as_ref(), Some(&ni.nar_hash));
        assert_eq!(ni.file_size, Some(1080));
        assert_eq!(
            ni.deriver.as_deref(),
            Some("0a9k6j9sfy79b2g3k9zzirbiqf85g7ga-testapp.drv")
        );
        assert_eq!(ni.ca, None);
        let back = path_info_of(&ni).unwrap();
        assert_eq!(back.path, wire.path);
        assert_eq!(back.deriver, wire.deriver);
        assert_eq!(back.nar_hash, hex::encode(ni.nar_hash.digest()));
        let mut refs = wire.references.clone();
        refs.sort();
        let mut got = back.references.clone();
        got.sort();
        assert_eq!(got, refs);

        let bad = PathInfo {
            nar_hash: "md5:nonsense".into(),
            ..wire
        };
        assert!(matches!(narinfo_of(bad, &dir), Err(StoreError::Corrupt(_))));
    }
}
