//! The explorer: the index of a store's objects, the object page, and the NAR browser.
//!
//! Every page is plain HTML from a template (no JavaScript: forms use GET). Everything that
//! comes from the store is escaped by the templates; file contents are only ever sent as
//! `text/plain` or as an attachment, with `nosniff` and a sandboxing Content-Security-Policy,
//! so a file in a store path can never run as a page of this site.

use std::sync::Arc;

use actix_web::body::SizedStream;
use actix_web::http::header;
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use super::error::{respond, Failure, Mode};
use super::nar_path::{encode_segment, NarPath};
use super::{range, CacheService, Ingress};
use crate::catalog::{Closure, Discover, Page, SortBy};
use crate::formats::nar::Node;
use crate::formats::{Digest, NarInfo, PublicKey};
use crate::lookup::{Lookup, ServedNarInfo};
use crate::nar_files::{read_prefix, ObjectTree};
use crate::store::{ByteStream, StoreError};

/// Objects per index page (as the original).
pub const PAGE_SIZE: usize = 100;
/// Largest prefix of a file shown inline; the rest is a download away.
pub const INLINE_LIMIT: usize = 256 * 1024;
/// What file responses may do in a browser: nothing (no scripts, no subresources, no forms).
pub const FILE_CSP: &str = "default-src 'none'; sandbox";
/// What explorer pages may do: their own stylesheet, nothing else.
const PAGE_CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'";

/// Which explorer resource a path names (below `<digest>/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// `<digest>/browse/<path>`: a directory listing or a file page.
    Browse,
    /// `<digest>/file/<path>`: a file's bytes.
    File,
}

/// Splits `<digest>/browse/<rest>` or `<digest>/file/<rest>`.
pub fn parse_view(rel: &str) -> Option<(Digest, View, &str)> {
    let (digest, rest) = rel.split_at_checked(32)?;
    let digest = Digest::parse(digest).ok()?;
    let rest = rest.strip_prefix('/')?;
    let (view, tail) = rest.split_once('/').unwrap_or((rest, ""));
    match view {
        "browse" => Some((digest, View::Browse, tail)),
        "file" => Some((digest, View::File, tail)),
        _ => None,
    }
}

fn html(status: StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CONTENT_SECURITY_POLICY, PAGE_CSP))
        .insert_header((header::VARY, "Accept"))
        .body(body)
}

#[derive(Serialize)]
struct ErrorPage<'a> {
    root: &'a str,
    title: String,
    status: u16,
    message: String,
}

/// An HTML error page saying what to do; falls back to plain text if even that fails.
pub fn error_page(
    svc: &CacheService,
    root: &str,
    status: StatusCode,
    message: &str,
) -> HttpResponse {
    let ctx = ErrorPage {
        root,
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        message: message.to_owned(),
    };
    match svc.templates.render("error.html", &ctx) {
        Ok(body) => html(status, body),
        Err(e) => template_failed(e),
    }
}

fn template_failed(e: super::templates::TemplateError) -> HttpResponse {
    tracing::error!("{e}");
    HttpResponse::InternalServerError()
        .content_type("text/plain; charset=utf-8")
        .body("500: a page template failed; the server log says which and where\n")
}

fn render<S: Serialize>(svc: &CacheService, name: &str, ctx: &S) -> HttpResponse {
    match svc.templates.render(name, ctx) {
        Ok(body) => html(StatusCode::OK, body),
        Err(e) => template_failed(e),
    }
}

fn query_param(req: &HttpRequest, key: &str) -> Option<String> {
    url::form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

// ----------------------------------------------------------------------------------------
// Index
// ----------------------------------------------------------------------------------------

#[derive(Serialize)]
struct IndexPage<'a> {
    root: &'a str,
    title: &'a str,
    store_dir: &'a str,
    cache_info: &'a str,
    q: String,
    sort: &'static str,
    page: Page,
    next_href: Option<String>,
    first_href: Option<String>,
}

fn index_href(root: &str, q: &str, sort: SortBy, after: Option<&str>) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    if !q.is_empty() {
        s.append_pair("q", q);
    }
    if sort != SortBy::Name {
        s.append_pair("sort", sort.as_str());
    }
    if let Some(a) = after {
        s.append_pair("after", a);
    }
    let qs = s.finish();
    if qs.is_empty() {
        format!("{root}/")
    } else {
        format!("{root}/?{qs}")
    }
}

/// `/`: the store's objects, searchable, sortable, paged by key.
pub fn index(req: &HttpRequest, svc: &CacheService, root: &str) -> HttpResponse {
    // A visit is what makes discovery due (as the original); a full mailbox means a pass is
    // already requested, so dropping this one loses nothing.
    let _ = svc.discovery.try_send(Discover);
    let q = query_param(req, "q").unwrap_or_default();
    let sort = SortBy::parse(&query_param(req, "sort").unwrap_or_default());
    let after = query_param(req, "after");
    let page = svc.catalog.page(&q, sort, after.as_deref(), PAGE_SIZE);
    let ctx = IndexPage {
        root,
        title: "Index",
        store_dir: &svc.store_dir,
        cache_info: std::str::from_utf8(&svc.cache_info).unwrap_or(""),
        next_href: page
            .next_after
            .as_deref()
            .map(|a| index_href(root, &q, sort, Some(a))),
        first_href: after.is_some().then(|| index_href(root, &q, sort, None)),
        sort: sort.as_str(),
        q,
        page,
    };
    render(svc, "index.html", &ctx)
}

// ----------------------------------------------------------------------------------------
// Object page
// ----------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Link {
    digest: String,
    base: String,
    href: String,
}

#[derive(Serialize)]
struct SigRow {
    key: String,
    value: String,
    /// `verified`, `invalid` (a trusted key's name, but the signature does not verify) or
    /// `unknown` (no trusted key of that name).
    status: &'static str,
}

#[derive(Serialize)]
struct NarInfoPage<'a> {
    root: &'a str,
    title: String,
    base: String,
    store_path: String,
    url: String,
    nar_href: String,
    compression: &'static str,
    file_hash: Option<String>,
    file_size: Option<u64>,
    nar_hash: String,
    nar_size: u64,
    references: Vec<Link>,
    referrers: Vec<Link>,
    deriver: Option<String>,
    system: Option<String>,
    sigs: Vec<SigRow>,
    ca: Option<String>,
    extra: Vec<(String, String)>,
    closure: Option<Closure>,
    browse_href: String,
    text_href: String,
    listing_href: String,
}

/// Verdict on each signature of `info` against the trusted keys.
fn signatures(info: &NarInfo, trusted: &[PublicKey]) -> Vec<SigRow> {
    let fp = info.fingerprint();
    info.sigs
        .iter()
        .map(|s| {
            let keys: Vec<&PublicKey> = trusted.iter().filter(|k| k.name() == s.key_name).collect();
            let status = if keys.is_empty() {
                "unknown"
            } else if keys.iter().any(|k| k.verify(&fp, s)) {
                "verified"
            } else {
                "invalid"
            };
            SigRow {
                key: s.key_name.clone(),
                value: s.to_string(),
                status,
            }
        })
        .collect()
}

/// The HTML page of `/<digest>.narinfo` for browsers.
pub fn narinfo_page(svc: &CacheService, root: &str, served: &ServedNarInfo) -> HttpResponse {
    let info = &served.info;
    let digest = info.store_path.digest();
    let link = |d: &str, base: String| Link {
        digest: d.to_owned(),
        href: format!("{root}/{d}.narinfo"),
        base,
    };
    let ctx = NarInfoPage {
        root,
        title: info.store_path.name().to_owned(),
        base: info.store_path.to_string(),
        store_path: info.store_dir.display(&info.store_path),
        nar_href: format!("{root}/{}", info.url),
        url: info.url.clone(),
        compression: info.compression.name(),
        file_hash: info.file_hash.as_ref().map(|h| h.to_nix32()),
        file_size: info.file_size,
        nar_hash: info.nar_hash.to_nix32(),
        nar_size: info.nar_size,
        references: info
            .references
            .iter()
            .map(|r| link(r.digest(), r.to_string()))
            .collect(),
        referrers: svc
            .catalog
            .referrers(digest)
            .into_iter()
            .map(|(d, name)| link(&d, format!("{d}-{name}")))
            .collect(),
        deriver: info.deriver.clone(),
        system: info.system.clone(),
        sigs: signatures(info, &svc.trusted_keys),
        ca: info.ca.clone(),
        extra: info.extra.clone(),
        closure: svc.catalog.closure(digest),
        browse_href: format!("{root}/{digest}/browse/"),
        text_href: format!("{root}/{digest}.narinfo?format=text"),
        listing_href: format!("{root}/{digest}.ls"),
    };
    render(svc, "narinfo.html", &ctx)
}

// ----------------------------------------------------------------------------------------
// NAR browser
// ----------------------------------------------------------------------------------------

#[derive(Clone, Serialize)]
struct Crumb {
    name: String,
    href: String,
}

#[derive(Clone, Serialize)]
struct EntryRow {
    name: String,
    href: String,
    kind: &'static str,
    size: Option<u64>,
    executable: bool,
    target: Option<String>,
    target_href: Option<String>,
}

#[derive(Clone, Serialize)]
struct FileView {
    size: u64,
    executable: bool,
    /// The inline text (a prefix when `truncated`); `None` for binary files.
    text: Option<String>,
    truncated: bool,
    raw_href: String,
    download_href: String,
}

#[derive(Clone, Serialize)]
struct BrowsePage<'a> {
    root: &'a str,
    title: String,
    base: String,
    object_href: String,
    path: String,
    crumbs: Vec<Crumb>,
    kind: &'static str,
    entries: Vec<EntryRow>,
    file: Option<FileView>,
    target: Option<String>,
    target_href: Option<String>,
}

/// What the object pages say when the store lacks the object.
const NO_OBJECT: &str =
    "This store has no object with that digest. Search the index for it by name.";
/// What the NAR browser says when the object lacks the entry.
const NO_ENTRY: &str =
    "There is no such entry in this store object. Go up a level to see what it holds.";

async fn lookup(
    ing: &Ingress,
    root: &str,
    digest: &Digest,
) -> Result<Arc<ServedNarInfo>, HttpResponse> {
    let svc = &*ing.service;
    let mode = Mode::Html {
        root,
        missing: NO_OBJECT,
    };
    match ing.lookup.send(Lookup(*digest)).await {
        Ok(Ok(s)) => {
            super::learn(svc, &s);
            Ok(s)
        }
        Ok(Err(e)) => Err(respond(svc, mode, digest, e.into())),
        Err(e) => Err(respond(svc, mode, digest, e.into())),
    }
}

fn store_failure(svc: &CacheService, root: &str, what: &str, e: StoreError) -> HttpResponse {
    let mode = Mode::Html {
        root,
        missing: NO_ENTRY,
    };
    respond(svc, mode, what, Failure::Store(e))
}

/// Where a symlink leads, as a browse link, when it can be followed: into another store path
/// (absolute targets in the store directory) or inside this NAR (relative targets that stay
/// inside it). `dir` is the directory holding the symlink.
fn target_link(
    root: &str,
    store_dir: &str,
    digest: &str,
    dir: &NarPath,
    target: &[u8],
) -> Option<String> {
    if !target.starts_with(b"/") {
        let p = dir.resolve(target)?;
        return Some(format!("{root}/{digest}/browse/{}", p.encoded()));
    }
    let rest = target
        .strip_prefix(store_dir.as_bytes())?
        .strip_prefix(b"/")?;
    let base_len = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    let other = std::str::from_utf8(rest.get(..32)?).ok()?;
    if base_len < 32 || !crate::formats::store_path::is_valid_digest(other) {
        return None;
    }
    let inner = NarPath::default().resolve(&rest[base_len..])?;
    Some(format!("{root}/{other}/browse/{}", inner.encoded()))
}

fn crumbs(root: &str, digest: &str, base: &str, path: &NarPath) -> Vec<Crumb> {
    let mut out = vec![Crumb {
        name: base.to_owned(),
        href: format!("{root}/{digest}/browse/"),
    }];
    let mut p = NarPath::default();
    for seg in path.segments() {
        p = p.join(seg);
        out.push(Crumb {
            name: String::from_utf8_lossy(seg).into_owned(),
            href: format!("{root}/{digest}/browse/{}", p.encoded()),
        });
    }
    out
}

/// Is this prefix of a file text to show inline? UTF-8 (a character cut at the end of a
/// truncated prefix is fine) without NUL bytes.
fn as_text(bytes: &[u8], truncated: bool) -> Option<String> {
    if bytes.contains(&0) {
        return None;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Some(s.to_owned()),
        Err(e) if truncated && e.error_len().is_none() => {
            Some(String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned())
        }
        Err(_) => None,
    }
}

/// The path asked for inside a NAR, the object's narinfo and its file tree, or the error page
/// that says which of the three is wrong.
async fn object_tree(
    ing: &Ingress,
    root: &str,
    digest: &Digest,
    encoded: &str,
) -> Result<(NarPath, Arc<ServedNarInfo>, Arc<ObjectTree>), HttpResponse> {
    let svc = &*ing.service;
    let path = NarPath::parse(encoded)
        .map_err(|e| error_page(svc, root, StatusCode::BAD_REQUEST, &e.to_string()))?;
    let served = lookup(ing, root, digest).await?;
    let tree = svc
        .nar_files
        .tree(&served.info)
        .await
        .map_err(|e| store_failure(svc, root, &format!("{digest} file tree"), e))?;
    Ok((path, served, tree))
}

/// `/<digest>/browse/<path>`: a directory's entries, or a file with its text inline.
pub async fn browse(ing: &Ingress, root: &str, digest: &Digest, encoded: &str) -> HttpResponse {
    let svc = &*ing.service;
    let (path, served, tree) = match object_tree(ing, root, digest, encoded).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let info = &served.info;
    let Some(node) = crate::nar_files::lookup(&tree.listing.root, &path.as_bytes()) else {
        return store_failure(svc, root, digest, StoreError::NotFound(String::new()));
    };
    let base = info.store_path.to_string();
    let mut page = BrowsePage {
        root,
        title: if path.is_root() {
            info.store_path.name().to_owned()
        } else {
            path.file_name()
        },
        object_href: format!("{root}/{digest}.narinfo"),
        path: path.display(),
        crumbs: crumbs(root, digest, &base, &path),
        base,
        kind: "directory",
        entries: Vec::new(),
        file: None,
        target: None,
        target_href: None,
    };
    match node {
        Node::Directory { entries } => {
            for (name, child) in entries {
                let p = path.join(name);
                let href = format!("{root}/{digest}/browse/{}", p.encoded());
                let (kind, size, executable, target) = match child {
                    Node::Directory { .. } => ("directory", None, false, None),
                    Node::Regular {
                        size, executable, ..
                    } => ("file", Some(*size), *executable, None),
                    Node::Symlink { target } => ("symlink", None, false, Some(target.clone())),
                };
                page.entries.push(EntryRow {
                    name: String::from_utf8_lossy(name).into_owned(),
                    href,
                    kind,
                    size,
                    executable,
                    target_href: target
                        .as_deref()
                        .and_then(|t| target_link(root, &svc.store_dir, digest, &path, t)),
                    target: target.map(|t| String::from_utf8_lossy(&t).into_owned()),
                });
            }
        }
        Node::Symlink { target } => {
            page.kind = "symlink";
            page.target_href = target_link(root, &svc.store_dir, digest, &path.parent(), target);
            page.target = Some(String::from_utf8_lossy(target).into_owned());
        }
        Node::Regular {
            size, executable, ..
        } => {
            page.kind = "file";
            let window = crate::store::ByteRange::span(0, Some(INLINE_LIMIT as u64));
            let prefix = match svc
                .nar_files
                .open(info, &tree, &path.as_bytes(), Some(window))
                .await
            {
                Ok(f) => read_prefix(f.stream, INLINE_LIMIT).await,
                Err(e) => return store_failure(svc, root, &format!("{digest} file"), e),
            };
            let prefix = match prefix {
                Ok(p) => p,
                Err(e) => {
                    return store_failure(
                        svc,
                        root,
                        &format!("{digest} file"),
                        StoreError::backend("reading the file", e),
                    )
                }
            };
            let truncated = (prefix.len() as u64) < *size;
            let raw = format!("{root}/{digest}/file/{}", path.encoded());
            page.file = Some(FileView {
                size: *size,
                executable: *executable,
                text: as_text(&prefix, truncated),
                truncated,
                download_href: format!("{raw}?download=1"),
                raw_href: raw,
            });
        }
    }
    render(svc, "browse.html", &page)
}

/// `/<digest>/file/<path>`: the file's bytes (Range supported), as `text/plain` when it
/// looks like text and as an attachment otherwise or on `?download=1`; never as HTML.
pub async fn file(
    req: &HttpRequest,
    ing: &Ingress,
    root: &str,
    digest: &Digest,
    encoded: &str,
) -> HttpResponse {
    let svc = &*ing.service;
    let (path, served, tree) = match object_tree(ing, root, digest, encoded).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let info = &served.info;
    match crate::nar_files::lookup(&tree.listing.root, &path.as_bytes()) {
        Some(Node::Regular { .. }) => {}
        Some(_) => return error_page(
            svc,
            root,
            StatusCode::NOT_FOUND,
            "That is a directory or a symlink, not a file; open it in the browser view instead.",
        ),
        None => return store_failure(svc, root, digest, StoreError::NotFound(String::new())),
    }
    let window = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(range::parse);
    let f = match svc
        .nar_files
        .open(info, &tree, &path.as_bytes(), window)
        .await
    {
        Ok(f) => f,
        Err(e) => return store_failure(svc, root, &format!("{digest} file"), e),
    };
    let download = query_param(req, "download").is_some();
    // Sniff only the first chunk: enough to tell text from binary without buffering.
    let mut stream = f.stream;
    let first = match stream.next().await {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            return store_failure(
                svc,
                root,
                &format!("{digest} file"),
                StoreError::backend("reading the file", e),
            )
        }
        None => Bytes::new(),
    };
    let len = f.span.1 - f.span.0;
    let is_text = f.span.0 == 0 && as_text(&first, (first.len() as u64) < len).is_some();
    let mut b = HttpResponse::Ok();
    if window.is_some() {
        b.status(StatusCode::PARTIAL_CONTENT).insert_header((
            header::CONTENT_RANGE,
            format!(
                "bytes {}-{}/{}",
                f.span.0,
                f.span.1.saturating_sub(1),
                f.size
            ),
        ));
    }
    b.insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CONTENT_SECURITY_POLICY, FILE_CSP))
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((header::CACHE_CONTROL, "public, max-age=31536000, immutable"));
    if is_text && !download {
        b.content_type("text/plain; charset=utf-8");
    } else {
        let name = path
            .segments()
            .last()
            .map(|s| encode_segment(s))
            .unwrap_or_default();
        b.content_type("application/octet-stream").insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename*=UTF-8''{name}"),
        ));
    }
    if req.method() == Method::HEAD {
        return b.body(SizedStream::new(
            len,
            futures::stream::empty::<Result<Bytes, std::io::Error>>(),
        ));
    }
    let body: ByteStream = Box::pin(futures::stream::once(async move { Ok(first) }).chain(stream));
    b.body(SizedStream::new(len, body))
}

/// `/_/<name>`: the stylesheet and other static files.
pub fn static_file(svc: &CacheService, root: &str, name: &str) -> HttpResponse {
    match svc.templates.static_file(name) {
        Some((bytes, ty)) => HttpResponse::Ok()
            .content_type(ty)
            .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
            .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
            .body(bytes),
        None => error_page(svc, root, StatusCode::NOT_FOUND, "No such static file."),
    }
}

/// Sample contexts for every template, with markup in every string, for the template tests.
#[cfg(test)]
pub fn samples() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let evil = "<evil>";
    let page = Page {
        rows: vec![crate::catalog::Row {
            digest: "a".repeat(32),
            name: evil.into(),
            nar_size: 100,
            file_size: Some(50),
            closure_nar_size: 300,
            closure_file_size: 150,
            closure_count: 3,
            closure_complete: false,
        }],
        next_after: Some("a".repeat(32)),
        matching: 1,
        known: 1,
        listed: false,
        discovering: true,
    };
    let index = IndexPage {
        root: "",
        title: "Index",
        store_dir: evil,
        cache_info: evil,
        q: evil.into(),
        sort: "name",
        page,
        next_href: Some(evil.into()),
        first_href: Some(evil.into()),
    };
    let link = || Link {
        digest: "a".repeat(32),
        base: evil.into(),
        href: evil.into(),
    };
    let narinfo = NarInfoPage {
        root: "",
        title: evil.into(),
        base: evil.into(),
        store_path: evil.into(),
        url: evil.into(),
        nar_href: evil.into(),
        compression: "none",
        file_hash: Some(evil.into()),
        file_size: Some(1),
        nar_hash: evil.into(),
        nar_size: 2,
        references: vec![link()],
        referrers: vec![link()],
        deriver: Some(evil.into()),
        system: Some(evil.into()),
        sigs: vec![
            SigRow {
                key: evil.into(),
                value: evil.into(),
                status: "verified",
            },
            SigRow {
                key: evil.into(),
                value: evil.into(),
                status: "invalid",
            },
            SigRow {
                key: evil.into(),
                value: evil.into(),
                status: "unknown",
            },
        ],
        ca: Some(evil.into()),
        extra: vec![(evil.into(), evil.into())],
        closure: Some(Closure {
            count: 2,
            nar_size: 3,
            file_size: 4,
            complete: false,
        }),
        browse_href: evil.into(),
        text_href: evil.into(),
        listing_href: evil.into(),
    };
    let entry = |kind| EntryRow {
        name: evil.into(),
        href: evil.into(),
        kind,
        size: Some(3),
        executable: true,
        target: Some(evil.into()),
        target_href: Some(evil.into()),
    };
    let dir = BrowsePage {
        root: "",
        title: evil.into(),
        base: evil.into(),
        object_href: evil.into(),
        path: evil.into(),
        crumbs: vec![Crumb {
            name: evil.into(),
            href: evil.into(),
        }],
        kind: "directory",
        entries: vec![entry("directory"), entry("file"), entry("symlink")],
        file: None,
        target: None,
        target_href: None,
    };
    let file = BrowsePage {
        kind: "file",
        entries: vec![],
        file: Some(FileView {
            size: 10,
            executable: false,
            text: Some(evil.into()),
            truncated: true,
            raw_href: evil.into(),
            download_href: evil.into(),
        }),
        ..dir.clone()
    };
    let link_page = BrowsePage {
        kind: "symlink",
        entries: vec![],
        target: Some(evil.into()),
        target_href: Some(evil.into()),
        ..dir.clone()
    };
    let binary = BrowsePage {
        file: Some(FileView {
            text: None,
            truncated: false,
            ..file.file.clone().unwrap()
        }),
        ..file.clone()
    };
    let error = ErrorPage {
        root: "",
        title: evil.into(),
        status: 404,
        message: evil.into(),
    };
    let v = |x: serde_json::Result<serde_json::Value>| x.unwrap();
    vec![
        ("index.html", v(serde_json::to_value(&index))),
        ("narinfo.html", v(serde_json::to_value(&narinfo))),
        ("browse.html", v(serde_json::to_value(&dir))),
        ("browse.html", v(serde_json::to_value(&file))),
        ("browse.html", v(serde_json::to_value(&link_page))),
        ("browse.html", v(serde_json::to_value(&binary))),
        ("error.html", v(serde_json::to_value(&error))),
        (
            "error.html",
            json!({"root": "/p", "title": "t", "status": 400, "message": "<evil>"}),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::StoreDir;
    use crate::serve::{start_service, ServeOptions};
    use crate::store::binary_cache::BinaryCache;
    use crate::store::memory::MemoryBlobs;
    use crate::store::Store;

    const NARINFO: &str = "StorePath: /nix/store/5r1dlyl2wyar1nn50ry8xi6apps79m0j-dir1\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nNarSize: 1240\nReferences: \n";

    #[actix::test]
    async fn links_stay_below_the_scope_prefix() {
        let cache = BinaryCache::new(Arc::new(MemoryBlobs::new()));
        cache.ensure_cache_info(&StoreDir::default()).await.unwrap();
        cache
            .put_narinfo(&NarInfo::parse(NARINFO).unwrap())
            .await
            .unwrap();
        let opts = ServeOptions {
            store: Arc::new(cache),
            listen: Vec::new(),
            keys: Vec::new(),
            priority: None,
            cache: Default::default(),
            backend_timeout: std::time::Duration::from_secs(5),
            grace: std::time::Duration::from_secs(1),
            workers: 1,
            transparent_zstd: false,
            ui: Default::default(),
        };
        let svc = start_service(&opts).await.unwrap();
        let app = actix_web::test::init_service(
            actix_web::App::new().service(super::super::scope("/team", Ingress::start(svc))),
        )
        .await;
        let get = |uri: &str| {
            actix_web::test::TestRequest::get()
                .uri(uri)
                .insert_header((header::ACCEPT, "text/html"))
                .to_request()
        };
        let body = actix_web::test::call_and_read_body(&app, get("/team/")).await;
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(html.contains("href=\"/team/_/style.css\""), "{html}");
        assert!(html.contains("action=\"/team/\""), "{html}");
        let body = actix_web::test::call_and_read_body(
            &app,
            get("/team/5r1dlyl2wyar1nn50ry8xi6apps79m0j.narinfo"),
        )
        .await;
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            html.contains("href=\"/team/5r1dlyl2wyar1nn50ry8xi6apps79m0j/browse/\""),
            "{html}"
        );
        assert!(html.contains("href=\"/team/nar/x.nar\""), "{html}");
        let resp = actix_web::test::call_service(&app, get("/team/_/style.css")).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[test]
    fn views_and_text_detection() {
        let d = "0123456789abcdfghijklmnpqrsvwxyz";
        let dd = Digest::parse(d).unwrap();
        assert_eq!(
            parse_view(&format!("{d}/browse/a/b")),
            Some((dd, View::Browse, "a/b"))
        );
        assert_eq!(
            parse_view(&format!("{d}/browse")),
            Some((dd, View::Browse, ""))
        );
        assert_eq!(
            parse_view(&format!("{d}/file/x")),
            Some((dd, View::File, "x"))
        );
        assert_eq!(parse_view(&format!("{d}/other/x")), None);
        assert_eq!(parse_view("nar/x.nar"), None);
        assert!(as_text(b"hello", false).is_some());
        assert!(as_text(b"a\0b", false).is_none());
        assert!(as_text(b"caf\xc3", true).is_some());
        assert!(as_text(b"caf\xc3", false).is_none());
        assert!(as_text(b"\xff\xfe", true).is_none());
        let root = NarPath::default();
        let bin = NarPath::parse("bin").unwrap();
        let other = "1123456789abcdfghijklmnpqrsvwxyz";
        assert_eq!(
            target_link(
                "",
                "/nix/store",
                d,
                &bin,
                format!("/nix/store/{other}-x/lib/a%b").as_bytes()
            ),
            Some(format!("/{other}/browse/lib/a%25b"))
        );
        assert_eq!(
            target_link("/t", "/nix/store", d, &bin, b"../share/x y"),
            Some(format!("/t/{d}/browse/share/x%20y"))
        );
        assert_eq!(target_link("", "/nix/store", d, &root, b"../x"), None);
        assert_eq!(
            target_link("", "/nix/store", d, &root, b"/etc/passwd"),
            None
        );
    }
}
