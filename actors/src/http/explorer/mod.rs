//! The explorer: the index of a store's objects, the object page, and the NAR browser.
//!
//! Every page is plain HTML from a template (no JavaScript: forms use GET). Everything that
//! comes from the store is escaped by the templates; file contents are only ever sent as
//! `text/plain` or as an attachment, with `nosniff` and a sandboxing Content-Security-Policy,
//! so a file in a store path can never run as a page of this site.
//!
//! This file holds what every page shares (the HTML response, error pages, rendering); each
//! page lives in a module of its own.

mod browse;
mod entry;
mod file;
mod index;
mod object;
#[cfg(test)]
pub(crate) mod samples;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse};
use serde::Serialize;

use super::CacheService;
use crate::formats::Digest;

pub use self::browse::browse;
pub use self::file::file;
pub use self::index::index;
pub use self::object::narinfo_page;

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

/// What `error.html` shows.
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::formats::{NarInfo, StoreDir};
    use crate::http::Ingress;
    use crate::serve::{start_service, ServeOptions};
    use crate::store::binary_cache::BinaryCache;
    use crate::store::memory::MemoryBlobs;
    use crate::store::Store;

    const NARINFO: &str = "StorePath: /nix/store/5r1dlyl2wyar1nn50ry8xi6apps79m0j-dir1\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nNarSize: 1240\nReferences: \n";

    /// Options for serving `store` in these tests: defaults, public, one worker.
    fn options(store: Arc<dyn Store>) -> ServeOptions {
        ServeOptions {
            store,
            listen: Vec::new(),
            keys: Vec::new(),
            priority: None,
            cache: Default::default(),
            backend_timeout: std::time::Duration::from_secs(5),
            grace: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::ZERO,
            workers: 1,
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

    /// A cache that takes pushes without a write credential does not start; with one it does.
    #[actix::test]
    async fn a_cache_taking_pushes_needs_a_write_credential() {
        use crate::http::auth::{hash_secret, Access, Credential, CredentialSpec};
        let store: Arc<dyn Store> = Arc::new(BinaryCache::new(Arc::new(MemoryBlobs::new())));
        let refused = ServeOptions {
            push: Some(Default::default()),
            ..options(store.clone())
        };
        let e = start_service(&refused).await.err().expect("refused");
        assert!(
            e.to_string().contains("no credential with the write right"),
            "{e}"
        );
        let reader = CredentialSpec {
            token_hash: Some(hash_secret("r")),
            rights: vec!["read".into()],
            ..Default::default()
        };
        let reader_only = ServeOptions {
            push: Some(Default::default()),
            auth: Access::new("t", vec![Credential::from_spec(&reader).unwrap()]),
            ..options(store.clone())
        };
        assert!(start_service(&reader_only).await.is_err());
        let writer = CredentialSpec {
            rights: vec!["write".into()],
            ..reader
        };
        let ok = ServeOptions {
            push: Some(Default::default()),
            auth: Access::new("t", vec![Credential::from_spec(&writer).unwrap()]),
            ..options(store)
        };
        assert!(start_service(&ok).await.unwrap().push.is_some());
    }

    #[actix::test]
    async fn links_stay_below_the_scope_prefix() {
        let cache = BinaryCache::new(Arc::new(MemoryBlobs::new()));
        cache.ensure_cache_info(&StoreDir::default()).await.unwrap();
        cache
            .put_narinfo(&NarInfo::parse(NARINFO).unwrap())
            .await
            .unwrap();
        let opts = options(Arc::new(cache));
        let svc = start_service(&opts).await.unwrap();
        let app = actix_web::test::init_service(
            actix_web::App::new().service(crate::http::scope("/team", Ingress::start(svc))),
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
    }
}
