//! The explorer's templates and static files: compiled into the binary, or read from a
//! `--client DIR` on every request (as the original does, handy while editing them).
//!
//! Engine: minijinja. One engine serves both the embedded set and the overrides, so an
//! override is the same language as what it replaces (askama, checked at compile time, could
//! not load templates at runtime, and two engines would mean two dialects). The embedded set
//! is checked where it cannot slip through: `actors/build.rs` parses every template, so one
//! that does not parse fails the build; every template is parsed again when a service starts
//! (for `--client` overrides: a broken one stops `serve` with the template's name and line); and
//! the unit tests render each of them with strict undefined-variable checking, so `cargo test`
//! fails on a typo.
//! Templates whose name ends in `.html` are auto-escaped by minijinja, so anything from the
//! store is escaped unless a template explicitly marks it safe (ours never do).

use std::path::{Path, PathBuf};

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State, UndefinedBehavior};
use serde::Serialize;

/// The embedded templates, by name.
pub const EMBEDDED: &[(&str, &str)] = &[
    ("base.html", include_str!("../../templates/base.html")),
    ("index.html", include_str!("../../templates/index.html")),
    ("narinfo.html", include_str!("../../templates/narinfo.html")),
    ("browse.html", include_str!("../../templates/browse.html")),
    ("error.html", include_str!("../../templates/error.html")),
];

/// The embedded static files (`/_/<name>`), with their content types.
pub const DIST: &[(&str, &str, &[u8])] = &[(
    "style.css",
    "text/css; charset=utf-8",
    include_bytes!("../../dist/style.css"),
)];

/// Why a page could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A template does not parse or fails while rendering.
    #[error("template {name}: {source:#}; fix the template (or remove it from --client DIR/templates to use the built-in one)")]
    Render {
        /// The template's name.
        name: String,
        /// minijinja's error, with line numbers.
        #[source]
        source: minijinja::Error,
    },
    /// The `--client` folder is not usable.
    #[error("--client {dir}: {why}; give a folder with templates/ (base.html, index.html, narinfo.html) and dist/ (style.css)")]
    Client {
        /// The folder.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// The templates and static files of one served cache.
pub struct Templates {
    client: Option<PathBuf>,
    embedded: Environment<'static>,
}

/// Escapes text for HTML element content and attribute values (`&`, `<`, `>`, quotes).
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

/// minijinja's HTML escaping also rewrites `/` (as `&#x2f;`), which is safe but makes every
/// link unreadable in the page source and to tools that read it; escape what HTML needs.
fn formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), minijinja::Error> {
    let plain = !value.is_safe() && !value.is_none() && !value.is_undefined();
    if matches!(state.auto_escape(), AutoEscape::Html) && plain {
        write!(out, "{}", escape(&value.to_string()))
            .map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure))
    } else {
        minijinja::escape_formatter(out, state, value)
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_formatter(formatter);
    env.add_filter("size", human_size);
    env
}

/// The original's size format: `1 byte`, `N bytes` below 512, then one decimal in binary units.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    match n {
        1 => "1 byte".into(),
        n if n < 512 => format!("{n} bytes"),
        n => {
            let mut v = n as f64 / 1024.0;
            let mut u = 0;
            while v >= 1024.0 && u + 1 < UNITS.len() {
                v /= 1024.0;
                u += 1;
            }
            format!("{v:.1} {}", UNITS[u])
        }
    }
}

impl Templates {
    /// The embedded set, or overrides from `client` (checked to exist, read per request).
    pub fn new(client: Option<PathBuf>) -> Result<Templates, TemplateError> {
        let mut embedded = environment();
        for (name, source) in EMBEDDED {
            embedded
                .add_template(name, source)
                .map_err(|source| TemplateError::Render {
                    name: (*name).into(),
                    source,
                })?;
        }
        if let Some(dir) = &client {
            if !dir.join("templates").is_dir() {
                return Err(TemplateError::Client {
                    dir: dir.clone(),
                    why: "it has no templates/ folder".into(),
                });
            }
        }
        Ok(Templates { client, embedded })
    }

    /// Renders `name` with `ctx`.
    pub fn render<S: Serialize>(&self, name: &str, ctx: S) -> Result<String, TemplateError> {
        let err = |source| TemplateError::Render {
            name: name.into(),
            source,
        };
        match &self.client {
            None => self
                .embedded
                .get_template(name)
                .and_then(|t| t.render(ctx))
                .map_err(err),
            Some(dir) => {
                let mut env = environment();
                let dir = dir.join("templates");
                // Templates missing from the folder fall back to the embedded ones, so a
                // folder made for the original (three templates) keeps every page working.
                env.set_loader(move |n| match read_template(&dir, n) {
                    Some(text) => Ok(Some(text)),
                    None => Ok(EMBEDDED
                        .iter()
                        .find(|(e, _)| *e == n)
                        .map(|(_, s)| (*s).to_owned())),
                });
                env.get_template(name)
                    .and_then(|t| t.render(ctx))
                    .map_err(err)
            }
        }
    }

    /// A static file for `/_/<name>`: from `--client DIR/dist` when given, else embedded.
    pub fn static_file(&self, name: &str) -> Option<(Vec<u8>, &'static str)> {
        if name.is_empty() || name.contains("..") || name.starts_with('/') || name.contains('\0') {
            return None;
        }
        let ty = content_type(name);
        if let Some(dir) = &self.client {
            return std::fs::read(dir.join("dist").join(name))
                .ok()
                .map(|b| (b, ty));
        }
        DIST.iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, ty, b)| (b.to_vec(), *ty))
    }
}

fn read_template(dir: &Path, name: &str) -> Option<String> {
    if name.contains('/') || name.contains("..") {
        return None;
    }
    std::fs::read_to_string(dir.join(name)).ok()
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or("") {
        "css" => "text/css; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::explorer::samples::samples;

    #[test]
    fn every_embedded_template_renders_with_sample_data_and_escapes() {
        let t = Templates::new(None).unwrap();
        for (name, ctx) in samples() {
            let html = t
                .render(name, ctx)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(html.starts_with("<!DOCTYPE html>"), "{name}");
            assert!(!html.contains("<evil>"), "{name} did not escape:\n{html}");
            assert!(html.contains("&lt;evil&gt;"), "{name}");
            assert!(!html.contains("&#x2f;"), "{name}: '/' needs no escaping");
        }
        let rendered: Vec<&str> = samples().iter().map(|(n, _)| *n).collect();
        for (name, _) in EMBEDDED {
            assert!(
                *name == "base.html" || rendered.contains(name),
                "{name} has no sample"
            );
        }
    }

    #[test]
    fn client_folder_overrides_and_falls_back() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("templates")).unwrap();
        std::fs::create_dir_all(d.path().join("dist")).unwrap();
        std::fs::write(d.path().join("dist/style.css"), "body{}").unwrap();
        std::fs::write(
            d.path().join("templates/error.html"),
            "<!DOCTYPE html>custom {{ message }}",
        )
        .unwrap();
        let t = Templates::new(Some(d.path().into())).unwrap();
        let (name, ctx) = samples()
            .into_iter()
            .find(|(n, _)| *n == "error.html")
            .unwrap();
        assert!(t.render(name, &ctx).unwrap().contains("custom"));
        // Edited on disk: seen on the next render.
        std::fs::write(
            d.path().join("templates/error.html"),
            "<!DOCTYPE html>edited",
        )
        .unwrap();
        assert!(t.render(name, &ctx).unwrap().contains("edited"));
        for (name, ctx) in samples() {
            t.render(name, ctx).unwrap();
        }
        assert_eq!(t.static_file("style.css").unwrap().0, b"body{}");
        assert!(t.static_file("../templates/error.html").is_none());
        assert!(Templates::new(Some(d.path().join("nope"))).is_err());
        assert_eq!(human_size(1), "1 byte");
        assert_eq!(human_size(511), "511 bytes");
        assert_eq!(human_size(512), "0.5 KiB");
        assert_eq!(human_size(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
