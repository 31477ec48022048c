//! Sample contexts for the template tests, built from the pages' own context types, so
//! they carry exactly the fields the pages send.

use super::browse::{BrowsePage, Crumb, EntryRow, FileView};
use super::index::IndexPage;
use super::object::{Link, NarInfoPage, SigRow};
use super::ErrorPage;
use crate::catalog::{Closure, Page};

/// Sample contexts for every template, with markup in every string, for the template tests.
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
        full: true,
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
        cache_url: evil.into(),
        public_keys: vec![evil.into()],
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
        last_served: Some(evil.into()),
        records: true,
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
        more: Some(evil.into()),
        file: None,
        target: None,
        target_href: None,
    };
    let file = BrowsePage {
        more: None,
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
