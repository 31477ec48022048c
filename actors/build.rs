//! Build-time check of the explorer's templates: a template that does not parse fails the
//! build (with minijinja's message, which names the line) instead of the first page view.
//! Rendering is checked by the unit tests in `src/http/templates.rs`, which need the page data.

use std::path::Path;

fn main() {
    let dir = Path::new("templates");
    println!("cargo:rerun-if-changed=templates");
    let mut env = minijinja::Environment::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("actors/templates/ is missing")
        .map(|e| e.expect("reading actors/templates/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "html"))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if let Err(e) = env.add_template_owned(name.clone(), source) {
            panic!("template actors/templates/{name} does not parse: {e:#}");
        }
    }
}
