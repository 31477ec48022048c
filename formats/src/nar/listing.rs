//! The `.ls` listing of a NAR: its tree with sizes and the offset of each file's contents.

use std::collections::BTreeMap;

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
    pub fn from_json(text: &str) -> Result<Listing, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("listing is not JSON: {e}"))?;
        if v.get("version").and_then(|v| v.as_u64()) != Some(1) {
            return Err("listing version is not 1".into());
        }
        let root = v.get("root").ok_or("listing has no root")?;
        Ok(Listing {
            root: node_from_json(root)?,
        })
    }
}

fn node_from_json(v: &serde_json::Value) -> Result<Node, String> {
    let ty = v
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or("listing node has no type")?;
    Ok(match ty {
        "regular" => Node::Regular {
            size: v
                .get("size")
                .and_then(|s| s.as_u64())
                .ok_or("regular node has no size")?,
            executable: v
                .get("executable")
                .and_then(|e| e.as_bool())
                .unwrap_or(false),
            nar_offset: v.get("narOffset").and_then(|s| s.as_u64()).unwrap_or(0),
        },
        "symlink" => Node::Symlink {
            target: v
                .get("target")
                .and_then(|t| t.as_str())
                .ok_or("symlink node has no target")?
                .as_bytes()
                .to_vec(),
        },
        "directory" => {
            let mut entries = BTreeMap::new();
            if let Some(map) = v.get("entries").and_then(|e| e.as_object()) {
                for (name, child) in map {
                    entries.insert(name.as_bytes().to_vec(), node_from_json(child)?);
                }
            }
            Node::Directory { entries }
        }
        other => return Err(format!("unknown listing node type {other:?}")),
    })
}
