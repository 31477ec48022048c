//! The index page: the store's objects, searchable, sortable, paged by key.

use actix_web::{HttpRequest, HttpResponse};
use serde::Serialize;

use super::{query_param, render, PAGE_SIZE};
use crate::catalog::{Discover, Page, SortBy};
use crate::http::CacheService;

/// What `index.html` shows.
#[derive(Serialize)]
pub(super) struct IndexPage<'a> {
    pub(super) root: &'a str,
    pub(super) title: &'a str,
    pub(super) store_dir: &'a str,
    pub(super) cache_info: &'a str,
    pub(super) q: String,
    pub(super) sort: &'static str,
    pub(super) page: Page,
    pub(super) next_href: Option<String>,
    pub(super) first_href: Option<String>,
    /// This cache's address as the client reached it, for the nix.conf snippet.
    pub(super) cache_url: String,
    /// The public keys of what this server signs with.
    pub(super) public_keys: Vec<String>,
}

/// The index address for a search, a sort order and a page (the first when `after` is none).
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
    let (store_dir, cache_info) = (svc.store_dir(), svc.cache_info_text());
    // As the client reached us (behind a proxy, its Host and scheme): shown to that client
    // only, and escaped like everything else on the page.
    let info = req.connection_info();
    let cache_url = format!("{}://{}{root}", info.scheme(), info.host());
    let ctx = IndexPage {
        cache_url,
        public_keys: svc.signing_keys.iter().map(|k| k.to_string()).collect(),
        root,
        title: "Index",
        store_dir: &store_dir,
        cache_info: &cache_info,
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
