//! The local Nix store (`/nix/store`, or a chroot store such as `local?root=DIR`), served
//! read-only: metadata from Nix's SQLite database, NARs serialised in-process.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::nix_object::ObjectText;
use super::{Blob, ByteRange, ByteStream, Result, Store, StoreError};
use crate::formats::compression::Compression;
use crate::formats::nar;
use crate::formats::{CacheInfo, Digest, NarInfo, StoreDir, StorePath};

/// Where a local store keeps its objects and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStoreLayout {
    /// The logical store directory, as it appears in store paths (`/nix/store`).
    pub store_dir: StoreDir,
    /// Where the objects really are on this file system (differs for chroot stores).
    pub real_store_dir: PathBuf,
    /// Nix's state directory (holds `db/db.sqlite`).
    pub state_dir: PathBuf,
    /// Nix's log directory (holds `drvs/<2 chars>/<rest>[.bz2]`).
    pub log_dir: PathBuf,
}

impl LocalStoreLayout {
    /// The layout of the system store at `store_dir`, with state in the sibling `var/nix`
    /// (so `/nix/store` has its state in `/nix/var/nix`, as Nix's defaults say).
    pub fn system(store_dir: &str) -> Result<LocalStoreLayout> {
        let dir = StoreDir::new(store_dir).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let parent = Path::new(dir.as_str())
            .parent()
            .unwrap_or(Path::new("/"))
            .to_path_buf();
        Ok(LocalStoreLayout {
            real_store_dir: PathBuf::from(dir.as_str()),
            state_dir: parent.join("var/nix"),
            log_dir: parent.join("var/log/nix"),
            store_dir: dir,
        })
    }

    /// The layout of a chroot store (`nix --store DIR`, `local?root=DIR`): objects in
    /// `DIR/nix/store`, state in `DIR/nix/var/nix`, store paths still `/nix/store/…`.
    pub fn chroot(root: &Path) -> LocalStoreLayout {
        LocalStoreLayout {
            store_dir: StoreDir::default(),
            real_store_dir: root.join("nix/store"),
            state_dir: root.join("nix/var/nix"),
            log_dir: root.join("nix/var/log/nix"),
        }
    }

    /// Picks the layout for an absolute path a user gave: a chroot root when it has
    /// `nix/store` and a database below it, else a store directory.
    pub fn detect(path: &Path) -> Result<LocalStoreLayout> {
        if path.join("nix/var/nix/db/db.sqlite").is_file() {
            return Ok(LocalStoreLayout::chroot(path));
        }
        let s = path
            .to_str()
            .ok_or_else(|| StoreError::Invalid(format!("{} is not UTF-8", path.display())))?;
        LocalStoreLayout::system(s)
    }

    fn db_path(&self) -> PathBuf {
        self.state_dir.join("db/db.sqlite")
    }
}

/// The local Nix store.
pub struct LocalStore {
    layout: LocalStoreLayout,
    /// Idle read-only connections; a query takes one, so lookups run in parallel.
    pool: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalStore({:?})", self.layout)
    }
}

/// One row of `ValidPaths` with its references.
struct PathRow {
    path: String,
    hash: String,
    deriver: Option<String>,
    nar_size: Option<i64>,
    sigs: Option<String>,
    ca: Option<String>,
    refs: Vec<String>,
}

impl LocalStore {
    /// Opens the store; fails with advice when Nix's database cannot be read.
    pub fn open(layout: LocalStoreLayout) -> Result<Arc<LocalStore>> {
        let store = LocalStore {
            layout,
            pool: Mutex::new(Vec::new()),
        };
        let conn = store.connect()?;
        store.pool.lock().expect("pool").push(conn);
        Ok(Arc::new(store))
    }

    /// The layout.
    pub fn layout(&self) -> &LocalStoreLayout {
        &self.layout
    }

    fn connect(&self) -> Result<Connection> {
        let db = self.layout.db_path();
        let conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            // Nix holds write transactions briefly; wait instead of failing a lookup.
            c.busy_timeout(std::time::Duration::from_secs(10))?;
            c.query_row("SELECT count(*) FROM ValidPaths LIMIT 1", [], |_| Ok(()))?;
            Ok(c)
        })
        .map_err(|e| {
            StoreError::backend(
                format!(
                    "opening Nix's database {} read-only (is Nix installed, and is this process allowed to read it?)",
                    db.display()
                ),
                e,
            )
        })?;
        Ok(conn)
    }

    /// Runs `f` with a pooled connection on a blocking thread.
    async fn with_db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.pool.lock().expect("pool").pop();
            let conn = match conn {
                Some(c) => c,
                None => this.connect()?,
            };
            let r = f(&conn).map_err(|e| StoreError::backend("querying Nix's database", e));
            this.pool.lock().expect("pool").push(conn);
            r
        })
        .await
        .map_err(|e| StoreError::backend("database task", e))?
    }

    fn query_row_by_digest(
        conn: &Connection,
        store_dir: &str,
        digest: &str,
    ) -> rusqlite::Result<Option<PathRow>> {
        // Store paths sort as "<dir>/<digest>-<name>": a range scan on the unique path index.
        let lo = format!("{store_dir}/{digest}-");
        let hi = format!("{store_dir}/{digest}.");
        let row = conn
            .prepare_cached(
                "SELECT id, path, hash, deriver, narSize, sigs, ca FROM ValidPaths WHERE path >= ?1 AND path < ?2 LIMIT 1",
            )?
            .query_row([&lo, &hi], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    PathRow {
                        path: r.get(1)?,
                        hash: r.get(2)?,
                        deriver: r.get(3)?,
                        nar_size: r.get(4)?,
                        sigs: r.get(5)?,
                        ca: r.get(6)?,
                        refs: Vec::new(),
                    },
                ))
            })
            .optional()?;
        let Some((id, mut row)) = row else {
            return Ok(None);
        };
        let mut stmt = conn.prepare_cached(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.reference = v.id WHERE r.referrer = ?1",
        )?;
        row.refs = stmt
            .query_map([id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Some(row))
    }

    fn narinfo_from_row(&self, row: PathRow) -> Result<NarInfo> {
        let nar_size = row
            .nar_size
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                StoreError::Corrupt(format!("Nix database row for {}: no NAR size", row.path))
            })?;
        ObjectText {
            path: &row.path,
            nar_hash: &row.hash,
            nar_size,
            references: &row.refs,
            deriver: row.deriver.as_deref(),
            sigs: row
                .sigs
                .as_deref()
                .unwrap_or("")
                .split_whitespace()
                .collect(),
            ca: row.ca.as_deref(),
        }
        .to_narinfo(&self.layout.store_dir, "Nix database row")
    }

    async fn lookup(self: &Arc<Self>, digest: &str) -> Result<NarInfo> {
        let dir = self.layout.store_dir.as_str().to_owned();
        let d = digest.to_owned();
        let row = self
            .with_db(move |c| LocalStore::query_row_by_digest(c, &dir, &d))
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("{digest}.narinfo")))?;
        self.narinfo_from_row(row)
    }

    /// The closure of `roots` (store paths as absolute strings): every member with its
    /// direct references. A root Nix does not know is [`StoreError::NotFound`].
    pub async fn closure(
        self: &Arc<Self>,
        roots: Vec<String>,
    ) -> Result<Vec<(StorePath, Vec<StorePath>)>> {
        let dir = self.layout.store_dir.clone();
        let rows = self
            .with_db(move |c| {
                let mut ids = std::collections::BTreeMap::<i64, String>::new();
                let mut missing = Vec::new();
                let mut walk = c.prepare_cached(
                    "WITH RECURSIVE c(id) AS (
                         SELECT id FROM ValidPaths WHERE path = ?1
                         UNION SELECT r.reference FROM Refs r JOIN c ON r.referrer = c.id)
                     SELECT v.id, v.path FROM ValidPaths v JOIN c ON v.id = c.id",
                )?;
                for root in &roots {
                    let before = ids.len();
                    let mut found = false;
                    for row in walk.query_map([root], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
                        let (id, path) = row?;
                        found = true;
                        ids.insert(id, path);
                    }
                    if !found && ids.len() == before {
                        missing.push(root.clone());
                    }
                }
                let mut refs_of = c.prepare_cached(
                    "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.reference = v.id WHERE r.referrer = ?1",
                )?;
                let mut out = Vec::new();
                for (id, path) in &ids {
                    let refs = refs_of
                        .query_map([id], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    out.push((path.clone(), refs));
                }
                Ok((out, missing))
            })
            .await?;
        let (rows, missing) = rows;
        if let Some(m) = missing.first() {
            return Err(StoreError::NotFound(format!(
                "{m} is not a valid path in {}",
                dir
            )));
        }
        rows.into_iter()
            .map(|(p, refs)| {
                let parse = |x: &str| {
                    dir.parse_path(x)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                };
                Ok((
                    parse(&p)?,
                    refs.iter().map(|r| parse(r)).collect::<Result<Vec<_>>>()?,
                ))
            })
            .collect()
    }

    /// The file-system path of a valid store object, or NotFound.
    fn real_path(&self, p: &StorePath) -> PathBuf {
        self.layout.real_store_dir.join(p.to_string())
    }

    fn read_only(&self) -> StoreError {
        StoreError::Unsupported(format!(
            "the local Nix store {} is served read-only; upload to a file://, s3://, gs:// or ssh:// cache instead",
            self.layout.store_dir
        ))
    }
}

/// A local store is used through `Arc` so that blocking database work can own a handle.
/// Realisations (id, Nix's JSON) from the database's `Realisations` table, selected by
/// `filter` on `r` (the realisation) and `v` (its output's row in `ValidPaths`). A database
/// that never had content-addressed derivations enabled has no such table: none there.
fn realisation_rows(
    c: &Connection,
    filter: &str,
    params: [&String; 2],
) -> rusqlite::Result<Vec<(String, String)>> {
    let sql = format!(
        "SELECT r.drvPath, r.outputName, v.path, r.signatures FROM Realisations r \
         JOIN ValidPaths v ON r.outputPath = v.id {filter}"
    );
    let mut stmt = match c.prepare_cached(&sql) {
        Ok(s) => s,
        Err(rusqlite::Error::SqliteFailure(_, Some(msg))) if msg.contains("no such table") => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    let rows = stmt.query_map(params, |r| {
        let id = format!("{}!{}", r.get::<_, String>(0)?, r.get::<_, String>(1)?);
        let path: String = r.get(2)?;
        let sigs: Option<String> = r.get(3)?;
        Ok((id, path, sigs.unwrap_or_default()))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, path, sigs) = row?;
        let base = path.rsplit('/').next().unwrap_or_default().to_owned();
        let sigs: Vec<String> = sigs.split_whitespace().map(str::to_owned).collect();
        let json = super::realisation::render(&id, &base, &sigs);
        out.push((id, json));
    }
    Ok(out)
}

#[async_trait]
impl Store for Arc<LocalStore> {
    fn describe(&self) -> String {
        if self.layout.real_store_dir == Path::new(self.layout.store_dir.as_str()) {
            self.layout.store_dir.to_string()
        } else {
            format!(
                "local?root={}",
                self.layout
                    .real_store_dir
                    .parent()
                    .and_then(|p| p.parent())
                    .unwrap_or(Path::new("/"))
                    .display()
            )
        }
    }

    async fn cache_info(&self) -> Result<CacheInfo> {
        Ok(CacheInfo {
            store_dir: self.layout.store_dir.clone(),
            want_mass_query: true,
            priority: None,
        })
    }

    async fn narinfo(&self, digest: &Digest) -> Result<NarInfo> {
        self.lookup(digest).await
    }

    async fn nar(&self, url: &str, range: Option<ByteRange>) -> Result<Blob> {
        let info = super::object_of_nar_url(
            url,
            |d| self.lookup(d),
            |i: &NarInfo| crate::formats::nixbase32::encode(i.nar_hash.digest()),
        )
        .await?;
        let total = info.nar_size;
        let (start, end) = ByteRange::resolve_or_err(range, total)?;
        let path = self.real_path(&info.store_path);
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(StoreError::NotFound(format!(
                "{url}: the database lists {} but it is missing on disk",
                info.store_path
            )));
        }
        let stream: ByteStream = Box::pin(nar::dump_stream(path));
        Ok(Blob::of_span(stream, (start, end), total))
    }

    async fn listing(&self, digest: &Digest) -> Result<String> {
        let info = self.lookup(digest).await?;
        let path = self.real_path(&info.store_path);
        tokio::task::spawn_blocking(move || nar::listing(&path).map(|l| l.to_json()))
            .await
            .map_err(|e| StoreError::backend("listing task", e))?
            .map_err(|e| StoreError::backend(format!("listing {digest}"), e))
    }

    async fn log(&self, drv: &str) -> Result<Blob> {
        let p = StorePath::from_base_name(drv).map_err(|e| StoreError::Invalid(e.to_string()))?;
        if !p.is_derivation() {
            return Err(StoreError::Invalid(format!(
                "{drv} is not a derivation (.drv)"
            )));
        }
        let base = p.to_string();
        let dir = self.layout.log_dir.join("drvs").join(&base[..2]);
        let plain = dir.join(&base[2..]);
        // Logs are streamed from disk, never read whole: a build can print gigabytes, and
        // Nix compresses them to a few KiB of bzip2.
        if let Ok(f) = tokio::fs::File::open(&plain).await {
            let total = f
                .metadata()
                .await
                .map_err(|e| StoreError::backend(format!("reading log/{drv}"), e))?
                .len();
            return Ok(Blob {
                stream: Box::pin(tokio_util::io::ReaderStream::new(f)),
                span: (0, total),
                encoding: None,
                total,
            });
        }
        let bz = dir.join(format!("{}.bz2", &base[2..]));
        let compressed = tokio::fs::File::open(&bz)
            .await
            .map_err(|_| StoreError::NotFound(format!("log/{drv}")))?;
        // The response needs its length first: decoded into a temporary file.
        super::encoded::spool_decoded(
            Box::pin(tokio_util::io::ReaderStream::new(compressed)),
            Compression::Bzip2,
            super::MAX_LOG_BYTES,
            &format!("log/{drv}"),
        )
        .await
    }

    async fn realisation(&self, id: &str) -> Result<String> {
        super::realisation::check_id(id)?;
        let (drv_hash, output) = id.split_once('!').expect("checked");
        let (drv_hash, output) = (drv_hash.to_owned(), output.to_owned());
        let found = self
            .with_db(move |c| {
                realisation_rows(
                    c,
                    "WHERE r.drvPath = ?1 AND r.outputName = ?2",
                    [&drv_hash, &output],
                )
            })
            .await?;
        found
            .into_iter()
            .next()
            .map(|(_, json)| json)
            .ok_or_else(|| StoreError::NotFound(super::realisation::key(id)))
    }

    async fn realisations_of(&self, digest: &Digest) -> Result<Vec<(String, String)>> {
        let dir = self.layout.store_dir.as_str();
        let (lo, hi) = (format!("{dir}/{digest}-"), format!("{dir}/{digest}."));
        self.with_db(move |c| realisation_rows(c, "WHERE v.path >= ?1 AND v.path < ?2", [&lo, &hi]))
            .await
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let dir = self.layout.store_dir.clone();
        self.with_db(move |c| {
            let mut stmt = c.prepare("SELECT path FROM ValidPaths")?;
            let paths = stmt
                .query_map([], |r| r.get::<_, String>(0))?
                .filter_map(|p| p.ok().and_then(|p| dir.parse_path(&p).ok()))
                .map(|p| p.digest().to_owned())
                .collect();
            Ok(paths)
        })
        .await
    }

    async fn put_nar(&self, _url: &str, _data: ByteStream) -> Result<u64> {
        Err(self.read_only())
    }

    async fn put_narinfo(&self, _info: &NarInfo) -> Result<()> {
        Err(self.read_only())
    }

    async fn put_listing(&self, _digest: &Digest, _json: &str) -> Result<()> {
        Err(self.read_only())
    }

    async fn put_log(&self, _drv: &str, _data: ByteStream) -> Result<()> {
        Err(self.read_only())
    }

    async fn exists(&self, url: &str) -> Result<bool> {
        let digest = super::digest_of_object_url(url);
        match digest {
            Some(d) => match self.lookup(d).await {
                Ok(_) => Ok(true),
                Err(StoreError::NotFound(_)) | Err(StoreError::Invalid(_)) => Ok(false),
                Err(e) => Err(e),
            },
            None => Ok(false),
        }
    }
}
