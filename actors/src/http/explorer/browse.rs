//! The NAR browser page: a directory's entries, a file with its text inline, or where a
//! symlink leads.

use actix_web::HttpResponse;
use serde::Serialize;

use super::entry::{object_tree, store_failure};
use super::{as_text, render, INLINE_LIMIT};
use crate::formats::nar::Node;
use crate::formats::Digest;
use crate::http::nar_path::NarPath;
use crate::http::Ingress;
use crate::nar_files::read_prefix;
use crate::store::StoreError;

/// Most entries listed on one directory page. Real directories stay below this (the biggest,
/// such as icon themes or man page sections, hold a few thousand); a hostile NAR may hold
/// up to a million entries in one directory, and a page with a row for each would take
/// hundreds of MiB to render.
const MAX_ROWS: usize = 10_000;

/// One step of the path from the object to the entry shown.
#[derive(Clone, Serialize)]
pub(super) struct Crumb {
    pub(super) name: String,
    pub(super) href: String,
}

/// One entry of a directory listing.
#[derive(Clone, Serialize)]
pub(super) struct EntryRow {
    pub(super) name: String,
    pub(super) href: String,
    pub(super) kind: &'static str,
    pub(super) size: Option<u64>,
    pub(super) executable: bool,
    pub(super) target: Option<String>,
    pub(super) target_href: Option<String>,
}

/// A regular file on its page.
#[derive(Clone, Serialize)]
pub(super) struct FileView {
    pub(super) size: u64,
    pub(super) executable: bool,
    /// The inline text (a prefix when `truncated`); `None` for binary files.
    pub(super) text: Option<String>,
    pub(super) truncated: bool,
    pub(super) raw_href: String,
    pub(super) download_href: String,
}

/// What `browse.html` shows: a directory, a file or a symlink.
#[derive(Clone, Serialize)]
pub(super) struct BrowsePage<'a> {
    pub(super) root: &'a str,
    pub(super) title: String,
    pub(super) base: String,
    pub(super) object_href: String,
    pub(super) path: String,
    pub(super) crumbs: Vec<Crumb>,
    pub(super) kind: &'static str,
    pub(super) entries: Vec<EntryRow>,
    /// Says how many entries of a huge directory are left out, if any.
    pub(super) more: Option<String>,
    pub(super) file: Option<FileView>,
    pub(super) target: Option<String>,
    pub(super) target_href: Option<String>,
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

/// The links from the object's root down to `path`.
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

/// `/<digest>/browse/<path>`: a directory's entries, or a file with its text inline.
pub async fn browse(ing: &Ingress, root: &str, digest: &Digest, encoded: &str) -> HttpResponse {
    let svc = &*ing.service;
    let store_dir = svc.store_dir();
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
        more: None,
        file: None,
        target: None,
        target_href: None,
    };
    match node {
        Node::Directory { entries } => {
            if entries.len() > MAX_ROWS {
                page.more = Some(format!(
                    "{} more entries are not shown: a page lists the first {MAX_ROWS}. Download the NAR from the object page to see them all.",
                    entries.len() - MAX_ROWS
                ));
            }
            for (name, child) in entries.iter().take(MAX_ROWS) {
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
                        .and_then(|t| target_link(root, &store_dir, digest, &path, t)),
                    target: target.map(|t| String::from_utf8_lossy(&t).into_owned()),
                });
            }
        }
        Node::Symlink { target } => {
            page.kind = "symlink";
            page.target_href = target_link(root, &store_dir, digest, &path.parent(), target);
            page.target = Some(String::from_utf8_lossy(target).into_owned());
        }
        Node::Regular {
            size, executable, ..
        } => {
            page.kind = "file";
            // No window for an empty file: any range of it is unsatisfiable (416).
            let window =
                (*size > 0).then(|| crate::store::ByteRange::span(0, Some(INLINE_LIMIT as u64)));
            let prefix = match svc
                .nar_files
                .open(info, &tree, &path.as_bytes(), window)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets_link_only_where_they_can_be_followed() {
        let d = "0123456789abcdfghijklmnpqrsvwxyz";
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
