//! Finding what an explorer address names inside a store object: the object's narinfo, its
//! file tree and the path, each with the error page that says which is missing.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::HttpResponse;

use super::error_page;
use crate::formats::Digest;
use crate::http::error::{respond, Failure, Mode};
use crate::http::nar_path::NarPath;
use crate::http::{CacheService, Ingress};
use crate::lookup::{Lookup, ServedNarInfo};
use crate::nar_files::ObjectTree;
use crate::store::StoreError;

/// What the object pages say when the store lacks the object.
const NO_OBJECT: &str =
    "This store has no object with that digest. Search the index for it by name.";
/// What the NAR browser says when the object lacks the entry.
const NO_ENTRY: &str =
    "There is no such entry in this store object. Go up a level to see what it holds.";

/// The object's narinfo, or the error page saying why there is none.
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
            crate::http::learn(svc, &s);
            Ok(s)
        }
        Ok(Err(e)) => Err(respond(svc, mode, digest, e.into())),
        Err(e) => Err(respond(svc, mode, digest, e.into())),
    }
}

/// The error page for a store failure while reading inside an object: a miss here is a
/// missing entry, since the object itself was found.
pub(super) fn store_failure(
    svc: &CacheService,
    root: &str,
    what: &str,
    e: StoreError,
) -> HttpResponse {
    let mode = Mode::Html {
        root,
        missing: NO_ENTRY,
    };
    respond(svc, mode, what, Failure::Store(e))
}

/// The path asked for inside a NAR, the object's narinfo and its file tree, or the error page
/// that says which of the three is wrong.
pub(super) async fn object_tree(
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
