//! A file's bytes out of a NAR: never as HTML, so nothing in a store path can run as a page
//! of this site.

use actix_web::body::SizedStream;
use actix_web::http::header;
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use futures::StreamExt;

use super::entry::{object_tree, store_failure};
use super::{as_text, error_page, query_param, FILE_CSP};
use crate::formats::nar::Node;
use crate::formats::Digest;
use crate::http::nar_path::encode_segment;
use crate::http::{range, Ingress};
use crate::store::{ByteStream, StoreError};

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
    b.body(SizedStream::new(len, crate::http::idle::guard(req, body)))
}
