//! The `.ls` listing of a NAR: its tree with sizes and the offset of each file's contents.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{bad_name, MAX_DEPTH, MAX_LISTING_BYTES, MAX_NODES, MAX_TARGET};

/// One node of a NAR's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A regular file.
    Regular {
        /// Size in bytes.
        size: u64,
        /// The executable bit.
        executable: bool,
        /// Where the contents start in the uncompressed NAR.
        nar_offset: u64,
    },
    /// A symbolic link.
    Symlink {
        /// Its target, as stored.
        target: Vec<u8>,
    },
    /// A directory; names sorted bytewise, as in the NAR.
    Directory {
        /// Entries by name.
        entries: BTreeMap<Vec<u8>, Node>,
    },
}

/// A whole listing (`{"version":1,"root":…}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The top node.
    pub root: Node,
}

fn push_json_str(out: &mut String, bytes: &[u8]) {
    // Nix writes names as JSON strings; non-UTF-8 bytes cannot be represented faithfully in
    // JSON, so they are replaced, which only affects display of such (rare) names.
    let s = String::from_utf8_lossy(bytes);
    out.push_str(&serde_json::to_string(&s).expect("strings serialise"));
}

impl Node {
    fn render(&self, out: &mut String) {
        match self {
            Node::Regular {
                size,
                executable,
                nar_offset,
            } => {
                out.push_str(&format!("{{\"type\":\"regular\",\"size\":{size}"));
                if *executable {
                    out.push_str(",\"executable\":true");
                }
                out.push_str(&format!(",\"narOffset\":{nar_offset}}}"));
            }
            Node::Symlink { target } => {
                out.push_str("{\"type\":\"symlink\",\"target\":");
                push_json_str(out, target);
                out.push('}');
            }
            Node::Directory { entries } => {
                out.push_str("{\"type\":\"directory\",\"entries\":{");
                for (i, (name, node)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    push_json_str(out, name);
                    out.push(':');
                    node.render(out);
                }
                out.push_str("}}");
            }
        }
    }

    /// Follows a `/`-separated path below this node (no symlinks are followed).
    pub fn lookup(&self, path: &str) -> Option<&Node> {
        let mut node = self;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            match node {
                Node::Directory { entries } => node = entries.get(part.as_bytes())?,
                _ => return None,
            }
        }
        Some(node)
    }
}

impl Listing {
    /// Renders the listing exactly as Nix's `write-nar-listing` does.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{\"version\":1,\"root\":");
        self.root.render(&mut out);
        out.push('}');
        out
    }

    /// Parses a listing written by Nix or by [`Listing::to_json`].
    ///
    /// Listings come from caches, so the parser holds them to the bounds of the NAR reader:
    /// at most [`MAX_LISTING_BYTES`] long, [`MAX_DEPTH`] directories deep (checked before parsing, so that no input can
    /// make the JSON parser recurse deeper), [`MAX_NODES`] nodes, names and symlink targets
    /// as Nix allows them, and file extents whose end fits in a `u64`.
    pub fn from_json(text: &str) -> Result<Listing, String> {
        if text.len() > MAX_LISTING_BYTES {
            return Err(format!(
                "listing is {} bytes, more than the {MAX_LISTING_BYTES} this reader accepts",
                text.len()
            ));
        }
        // Each directory level is two JSON levels (the node and its `entries`), under the
        // outer object: a file in the deepest directory allowed sits at this depth.
        let max_json = 2 * MAX_DEPTH + 2;
        if json_depth_exceeds(text.as_bytes(), max_json) {
            return Err(format!(
                "listing is nested deeper than {MAX_DEPTH} directories; no real store path is that deep"
            ));
        }
        let mut de = serde_json::Deserializer::from_str(text);
        // serde_json stops at 128 levels (64 directories), which real listings can exceed;
        // the scan above bounds the depth instead.
        de.disable_recursion_limit();
        let v = serde_json::Value::deserialize(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(|e| format!("listing is not JSON: {e}"))?;
        if v.get("version").and_then(|v| v.as_u64()) != Some(1) {
            return Err("listing version is not 1".into());
        }
        let root = v.get("root").ok_or("listing has no root")?;
        let mut nodes = 0;
        Ok(Listing {
            root: node_from_json(root, 0, &mut nodes)?,
        })
    }
}

/// Whether the JSON `text` nests arrays and objects deeper than `max`; a flat scan, so any
/// depth is measured in constant stack. Brackets inside strings do not count.
fn json_depth_exceeds(text: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// One node; `depth` counts the directories above it, `nodes` those parsed so far. Recursion
/// is bounded by the depth scan in [`Listing::from_json`] and by [`MAX_DEPTH`] here.
fn node_from_json(v: &serde_json::Value, depth: usize, nodes: &mut u64) -> Result<Node, String> {
    *nodes += 1;
    if *nodes > MAX_NODES {
        return Err(format!("listing has more than {MAX_NODES} entries"));
    }
    let ty = v
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or("listing node has no type")?;
    Ok(match ty {
        "regular" => {
            let size = v
                .get("size")
                .and_then(|s| s.as_u64())
                .ok_or("regular node has no size")?;
            let nar_offset = v.get("narOffset").and_then(|s| s.as_u64()).unwrap_or(0);
            if nar_offset.checked_add(size).is_none() {
                return Err("regular node's narOffset + size overflows".into());
            }
            Node::Regular {
                size,
                executable: v
                    .get("executable")
                    .and_then(|e| e.as_bool())
                    .unwrap_or(false),
                nar_offset,
            }
        }
        "symlink" => {
            let target = v
                .get("target")
                .and_then(|t| t.as_str())
                .ok_or("symlink node has no target")?;
            if target.len() > MAX_TARGET {
                return Err(format!(
                    "symlink target longer than {MAX_TARGET} bytes in listing"
                ));
            }
            Node::Symlink {
                target: target.as_bytes().to_vec(),
            }
        }
        "directory" => {
            if depth >= MAX_DEPTH {
                return Err(format!(
                    "listing is nested deeper than {MAX_DEPTH} directories; no real store path is that deep"
                ));
            }
            let mut entries = BTreeMap::new();
            if let Some(map) = v.get("entries").and_then(|e| e.as_object()) {
                for (name, child) in map {
                    if let Some(why) = bad_name(name.as_bytes()) {
                        return Err(format!("bad entry name {name:?} in listing ({why})"));
                    }
                    entries.insert(
                        name.as_bytes().to_vec(),
                        node_from_json(child, depth + 1, nodes)?,
                    );
                }
            }
            Node::Directory { entries }
        }
        other => return Err(format!("unknown listing node type {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(dirs: usize) -> String {
        let mut json = String::from("{\"version\":1,\"root\":");
        for _ in 0..dirs - 1 {
            json.push_str("{\"type\":\"directory\",\"entries\":{\"d\":");
        }
        json.push_str("{\"type\":\"directory\",\"entries\":{\"f\":{\"type\":\"regular\",\"size\":1,\"narOffset\":8}}}");
        for _ in 0..dirs - 1 {
            json.push_str("}}");
        }
        json.push('}');
        json
    }

    #[test]
    fn depth_beyond_serde_json_limit_parses_up_to_the_bound() {
        // 100 directories are 200 JSON levels, past serde_json's default of 128.
        assert!(Listing::from_json(&nested(100)).is_ok());
        assert!(Listing::from_json(&nested(MAX_DEPTH)).is_ok());
        let e = Listing::from_json(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert!(e.contains("deeper than"), "{e}");
        // Refused by the scan, on a small stack, before any recursive parse.
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(|| {
                let e = Listing::from_json(&nested(100_000)).unwrap_err();
                assert!(e.contains("deeper than"), "{e}");
                let brackets = "[".repeat(1_000_000);
                assert!(Listing::from_json(&brackets).is_err());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn depth_scan_ignores_brackets_in_strings() {
        assert!(!json_depth_exceeds(br#"{"a":"{{{{[[[\"{{"}"#, 1));
        assert!(json_depth_exceeds(br#"{"a":{}}"#, 1));
    }

    #[test]
    fn hostile_names_targets_and_extents_are_refused() {
        let dir = |entries: &str| {
            format!(
                "{{\"version\":1,\"root\":{{\"type\":\"directory\",\"entries\":{{{entries}}}}}}}"
            )
        };
        let file = r#"{"type":"regular","size":1,"narOffset":8}"#;
        for name in ["..", ".", "", "a/b", "a\\u0000b"] {
            let e = Listing::from_json(&dir(&format!("\"{name}\":{file}"))).unwrap_err();
            assert!(e.contains("bad entry name"), "{name}: {e}");
        }
        let long = "n".repeat(256);
        assert!(Listing::from_json(&dir(&format!("\"{long}\":{file}"))).is_err());
        let ok = "n".repeat(255);
        assert!(Listing::from_json(&dir(&format!("\"{ok}\":{file}"))).is_ok());
        let target = "x".repeat(MAX_TARGET + 1);
        assert!(Listing::from_json(&dir(&format!(
            "\"l\":{{\"type\":\"symlink\",\"target\":\"{target}\"}}"
        )))
        .is_err());
        let e = Listing::from_json(&dir(&format!(
            "\"f\":{{\"type\":\"regular\",\"size\":{},\"narOffset\":2}}",
            u64::MAX
        )))
        .unwrap_err();
        assert!(e.contains("overflows"), "{e}");
    }
}
