//! The HTML pages of the cache: small, escaped, usable without JavaScript.

use crate::formats::NarInfo;

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#111;background:#fff}\
a{color:#0645ad}table{border-collapse:collapse}td,th{padding:.2rem .6rem;text-align:left;vertical-align:top;border-bottom:1px solid #ddd}\
code,td.v{font-family:ui-monospace,monospace;word-break:break-all}\
@media (prefers-color-scheme:dark){body{color:#eee;background:#111}a{color:#8ab4f8}td,th{border-color:#333}}";

/// Wraps a page body in the common layout.
pub fn layout(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
<title>{} · nixcached</title><style>{STYLE}</style></head><body><main>{body}</main>\
<footer><p>Served by nixcached</p></footer></body></html>",
        escape(title)
    )
}

/// Human size (binary units).
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The page a browser gets for `/<digest>.narinfo`.
pub fn narinfo_page(info: &NarInfo) -> String {
    let mut rows = String::new();
    let mut row = |k: &str, v: String| {
        rows.push_str(&format!("<tr><th>{k}</th><td class=\"v\">{v}</td></tr>"))
    };
    row(
        "StorePath",
        escape(&info.store_dir.display(&info.store_path)),
    );
    row(
        "URL",
        format!("<a href=\"/{0}\">{0}</a>", escape(&info.url)),
    );
    row("Compression", escape(info.compression.name()));
    if let Some(h) = &info.file_hash {
        row("FileHash", escape(&h.to_nix32()));
    }
    if let Some(n) = info.file_size {
        row("FileSize", format!("{n} ({})", human_size(n)));
    }
    row("NarHash", escape(&info.nar_hash.to_nix32()));
    row(
        "NarSize",
        format!("{} ({})", info.nar_size, human_size(info.nar_size)),
    );
    if !info.references.is_empty() {
        let refs: Vec<String> = info
            .references
            .iter()
            .map(|r| {
                format!(
                    "<a href=\"/{}.narinfo\">{}</a>",
                    escape(r.digest()),
                    escape(&r.to_string())
                )
            })
            .collect();
        row("References", refs.join("<br>"));
    }
    if let Some(d) = &info.deriver {
        row("Deriver", escape(d));
    }
    if let Some(s) = &info.system {
        row("System", escape(s));
    }
    for sig in &info.sigs {
        row("Sig", escape(&sig.to_string()));
    }
    if let Some(ca) = &info.ca {
        row("CA", escape(ca));
    }
    let name = info.store_path.to_string();
    layout(
        info.store_path.name(),
        &format!("<h1>{}</h1><table>{rows}</table>", escape(&name)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<script>\"x\"&'"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;"
        );
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(12), "12 B");
    }
}
