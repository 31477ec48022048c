//! The explorer UI in a real headless Chromium, against a real local store and real `file://`
//! caches written by the real Nix: index → object → reference → NAR browser → file view,
//! escaping of hostile names, the two ways into a NAR (ranged and streamed), and a NAR larger
//! than 1 GiB browsed in bounded memory.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::browser::Browser;
use common::{curl, curl_headers, Daemon, NixEnv};

/// A name that is markup if anything forgets to escape it.
const EVIL_NAME: &str = "<img src=x onerror=alert(1)>.txt";
const EVIL_TEXT: &str = "<script>document.title='owned'</script>\n<b>not bold</b>\n";

fn digest(path: &str) -> &str {
    &path["/nix/store/".len()..][..32]
}

fn header<'a>(h: &'a [(String, String)], k: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

/// A store path whose files have hostile names and contents.
fn add_evil(env: &NixEnv) -> String {
    let dir = env.path("evil");
    fs::create_dir_all(dir.join("sub dir")).unwrap();
    fs::write(dir.join(EVIL_NAME), EVIL_TEXT).unwrap();
    fs::write(
        dir.join("sub dir/page.html"),
        "<html><script>alert(1)</script></html>\n",
    )
    .unwrap();
    env.add(&dir)
}

/// Pages carry no JavaScript at all, so everything works without it.
fn assert_no_script(b: &Browser) {
    assert!(
        b.find_all("script").is_empty(),
        "{} has a <script>",
        b.current_url()
    );
}

/// Waits until discovery has listed the store and `name` shows on the index.
fn wait_for_index(b: &Browser, url: &str, name: &str) {
    b.goto(&format!("{url}/"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let names: Vec<String> = b.find_all("a.object").iter().map(|e| b.text(e)).collect();
        if names.iter().any(|n| n == name) && b.find_all("#discovery-notice").is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never showed on the index: {names:?}\n{}",
            b.body_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
        b.refresh();
    }
}

/// The walk every store must support: index → search → object → reference → NAR browser →
/// file view, then the hostile path. `sig` is the status the signatures should show.
fn walk(b: &Browser, url: &str, closure: &common::Closure, evil: &str, sig: &str, tag: &str) {
    wait_for_index(b, url, "testapp");
    assert_eq!(b.title(), "Index · nixcached");
    assert!(b.body_text().contains("StoreDir: /nix/store"));
    assert_no_script(b);
    b.screenshot(&format!("{tag}-01-index"));

    // Search with the real form.
    let q = b.find("form.filter input[name=q]");
    b.type_into(&q, "testap");
    b.click(&b.find("form.filter button"));
    assert!(b.current_url().contains("q=testap"), "{}", b.current_url());
    let rows: Vec<String> = b.find_all("a.object").iter().map(|e| b.text(e)).collect();
    assert!(rows.contains(&"testapp".to_owned()), "{rows:?}");
    assert!(rows.iter().all(|r| r.contains("testap")), "{rows:?}");
    assert_no_script(b);
    b.screenshot(&format!("{tag}-02-search"));

    // Object page: fields, signature verdict, closure, references.
    b.click(
        &b.find_all("a.object")
            .into_iter()
            .find(|e| b.text(e) == "testapp")
            .unwrap(),
    );
    let h1 = b.text(&b.find("h1"));
    assert_eq!(h1, closure.app.trim_start_matches("/nix/store/"));
    let page = b.body_text();
    for field in [
        "StorePath",
        "NarHash",
        "NarSize",
        "Compression",
        "Signatures",
    ] {
        assert!(page.contains(field), "{field} missing:\n{page}");
    }
    let status = b.text(&b.find("table.sigs td.status"));
    assert!(
        status.contains(sig),
        "signature status {status:?}, want {sig}"
    );
    let closure_text = b.text(&b.find("#closure"));
    assert!(closure_text.contains("objects"), "{closure_text}");
    assert_no_script(b);
    b.screenshot(&format!("{tag}-03-object"));

    // Follow the reference to testlib; testapp is among its referrers.
    b.click(&b.find_with_text("a.reference", "testlib"));
    assert_eq!(
        b.text(&b.find("h1")),
        closure.lib.trim_start_matches("/nix/store/")
    );
    b.find_with_text("a.referrer", "testapp");
    assert_no_script(b);
    b.screenshot(&format!("{tag}-04-reference"));

    // NAR browser down to a file shown inline.
    b.click(&b.find("#browse"));
    b.click(&b.find_with_text("a.entry", "lib"));
    b.click(&b.find_with_text("a.entry", "x"));
    assert_eq!(b.text(&b.find("#contents")).trim(), closure.dep);
    assert_no_script(b);
    b.screenshot(&format!("{tag}-05-file"));

    // The app's tree: executable flag, symlink target (a link into the referenced path).
    b.goto(&format!("{url}/{}/browse/", digest(&closure.app)));
    let page = b.body_text();
    assert!(page.contains("symlink"), "{page}");
    assert!(page.contains(&format!("{}/lib/x", closure.lib)), "{page}");
    // The symlink's target is a link into the referenced store path.
    b.click(&b.find("tr.symlink td.v a"));
    assert_eq!(b.text(&b.find("#contents")).trim(), closure.dep);
    b.goto(&format!("{url}/{}/browse/", digest(&closure.app)));
    b.click(&b.find_with_text("a.entry", "bin"));
    assert!(b.body_text().contains("executable"));
    assert_no_script(b);
    b.screenshot(&format!("{tag}-06-tree"));
    b.goto(&format!("{url}/{}/browse/random", digest(&closure.app)));
    assert!(b.body_text().contains("Binary file"));

    // A file named like a tag is shown as text, and its contents are not run.
    b.goto(&format!("{url}/{}.narinfo", digest(evil)));
    b.click(&b.find("#browse"));
    let entry = b.find_with_text("a.entry", "onerror");
    assert_eq!(b.text(&entry), EVIL_NAME);
    let href = b.attr(&entry, "href").unwrap();
    assert!(
        href.ends_with("/browse/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.txt"),
        "{href}"
    );
    assert!(
        b.find_all("main img").is_empty(),
        "the name became an <img>"
    );
    b.screenshot(&format!("{tag}-07-escaped-name"));
    b.click(&entry);
    assert_eq!(b.text(&b.find("#contents")), EVIL_TEXT.trim_end());
    assert!(
        b.find_all("script").is_empty(),
        "file contents became a <script>"
    );
    assert!(
        b.find_all("main b").is_empty(),
        "file contents became markup"
    );
    assert!(!b.title().contains("owned"));
    b.screenshot(&format!("{tag}-08-escaped-file"));
    // Opening the raw file in the browser shows text, never a page of this site.
    b.click(&b.find("#raw"));
    assert!(b.find_all("script").is_empty());
    assert!(!b.title().contains("owned"));
    assert!(b.body_text().contains("<script>"));
    b.screenshot(&format!("{tag}-09-raw"));
}

/// What the file route promises any client: text or attachment, nosniff, a sandbox CSP.
fn check_file_headers(url: &str, evil: &str) {
    let raw = format!("{url}/{}/file/sub%20dir/page.html", digest(evil));
    let (code, h) = curl_headers(&[&raw]);
    assert_eq!(code, 200);
    assert_eq!(
        header(&h, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    assert_eq!(
        header(&h, "content-security-policy"),
        Some("default-src 'none'; sandbox")
    );
    let (code, h) = curl_headers(&[&format!("{raw}?download=1")]);
    assert_eq!(code, 200);
    assert_eq!(header(&h, "content-type"), Some("application/octet-stream"));
    assert!(header(&h, "content-disposition")
        .unwrap()
        .starts_with("attachment"));
    // Traversal and odd bytes are refused before the store is asked.
    for bad in ["..", "sub%20dir/../x", "a%00b", "a//b"] {
        let (code, _) = curl(&[
            "--path-as-is",
            &format!("{url}/{}/file/{bad}", digest(evil)),
        ]);
        assert_eq!(code, 400, "{bad}");
    }
    let (code, _) = curl(&[&format!("{url}/{}/file/nope", digest(evil))]);
    assert_eq!(code, 404);
}

#[test]
fn chromium_walks_a_local_store() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let evil = add_evil(&env);
    let (sk, _) = env.keypair("explorer-local-1");
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--secret-key-file",
            sk.to_str().unwrap(),
            "--max-list-frequency",
            "1s",
            &env.store_arg(),
        ],
    );
    let b = Browser::start("local");
    // The daemon signs with its key, whose public half is trusted.
    walk(&b, &d.url, &closure, &evil, "verified", "local");
    check_file_headers(&d.url, &evil);

    // Index: sort by size (chosen in the form) puts the largest first (busybox).
    b.goto(&format!("{}/", d.url));
    b.click(&b.find("select[name=sort] option[value=size]"));
    b.click(&b.find("form.filter button"));
    assert!(b.current_url().contains("sort=size"), "{}", b.current_url());
    let names: Vec<String> = b.find_all("a.object").iter().map(|e| b.text(e)).collect();
    assert_eq!(
        names.first().map(String::as_str),
        Some("bbdir"),
        "{names:?}"
    );
    b.screenshot("local-10-by-size");

    // Light and dark themes follow the system setting.
    b.goto(&format!("{}/{}/browse/lib/x", d.url, digest(&closure.lib)));
    let light = b.css(&b.find("body"), "background-color");
    b.color_scheme("dark");
    b.refresh();
    let dark = b.css(&b.find("body"), "background-color");
    assert_eq!(light, "rgba(255, 255, 255, 1)");
    assert_eq!(dark, "rgba(17, 19, 24, 1)");
    b.screenshot("local-11-dark");
    b.color_scheme("light");
    // Closure size of testapp covers testlib and dep.
    b.goto(&format!("{}/?q=testapp", d.url));
    let cells: Vec<String> = b
        .find_all("table.objects tbody tr:first-child td.num")
        .iter()
        .map(|e| b.text(e))
        .collect();
    assert_eq!(cells.len(), 4, "{cells:?}");
    assert_ne!(
        cells[0], cells[2],
        "closure larger than the object: {cells:?}"
    );
    assert!(!cells[2].starts_with('≥'), "closure complete: {cells:?}");
}

#[test]
fn chromium_walks_file_caches_streamed_and_ranged() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let evil = add_evil(&env);
    let (sk, pk) = env.keypair("explorer-cache-1");
    let (_other_sk, other_pk) = env.keypair("explorer-other-1");
    let b = Browser::start("file-cache");

    // zstd, no listings: the tree and every file come from streaming the NAR.
    let zstd = env.path("cache-zstd");
    env.copy_to(
        &format!(
            "file://{}?compression=zstd&secret-key={}",
            zstd.display(),
            sk.display()
        ),
        &[&closure.app, &evil],
    );
    assert_streamed_only(&zstd, &evil, "zstd");
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--trusted-public-key",
            &other_pk,
            &format!("file://{}", zstd.display()),
        ],
    );
    // Signed by a key the daemon does not trust: reported as unknown.
    walk(&b, &d.url, &closure, &evil, "unknown key", "zstd");
    check_file_headers(&d.url, &evil);
    drop(d);

    // Same cache, key trusted: verified.
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--trusted-public-key",
            &pk,
            &format!("file://{}", zstd.display()),
        ],
    );
    b.goto(&format!("{}/{}.narinfo", d.url, digest(&closure.app)));
    assert!(b.text(&b.find("table.sigs td.status")).contains("verified"));
    drop(d);

    // Uncompressed with .ls listings: one ranged read per file. Proof: with the NAR's
    // header destroyed, streaming would fail, yet the file still comes out.
    let plain = env.path("cache-none");
    env.copy_to(
        &format!(
            "file://{}?compression=none&write-nar-listing=true",
            plain.display()
        ),
        &[&evil],
    );
    let narinfo = fs::read_to_string(plain.join(format!("{}.narinfo", digest(&evil)))).unwrap();
    assert!(narinfo.contains("Compression: none\n"), "{narinfo}");
    assert!(plain.join(format!("{}.ls", digest(&evil))).exists());
    let nar_url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    let nar = plain.join(nar_url);
    let mut bytes = fs::read(&nar).unwrap();
    bytes[..16].copy_from_slice(b"NOT-A-NAR-HEADER");
    fs::set_permissions(&nar, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&nar, bytes).unwrap();
    let d = Daemon::start(&env, &["serve", &format!("file://{}", plain.display())]);
    let (code, body) = curl(&[&format!(
        "{}/{}/file/sub%20dir/page.html",
        d.url,
        digest(&evil)
    )]);
    assert_eq!(code, 200);
    assert_eq!(body, b"<html><script>alert(1)</script></html>\n");
    b.goto(&format!("{}/{}/browse/", d.url, digest(&evil)));
    b.click(&b.find_with_text("a.entry", "onerror"));
    assert_eq!(b.text(&b.find("#contents")), EVIL_TEXT.trim_end());
    b.screenshot("none-ranged-file");
}

/// Checks that a cache holds `path` compressed with `compression` and without a `.ls`
/// listing, so the explorer has to stream its NAR.
fn assert_streamed_only(cache: &std::path::Path, path: &str, compression: &str) {
    let narinfo = fs::read_to_string(cache.join(format!("{}.narinfo", digest(path)))).unwrap();
    assert!(
        narinfo.contains(&format!("Compression: {compression}\n")),
        "{narinfo}"
    );
    assert!(!cache.join(format!("{}.ls", digest(path))).exists());
}

/// A store path with one file over 1 GiB and a small text file after it (names sort
/// `big` < `small.txt`, so the NAR holds the small file after the big one).
fn add_big(env: &NixEnv) -> String {
    let dir = env.path("big");
    fs::create_dir_all(&dir).unwrap();
    let f = fs::File::create(dir.join("big")).unwrap();
    f.set_len(1024 * 1024 * 1024 + 4096).unwrap();
    drop(f);
    fs::write(dir.join("small.txt"), "small text after a big file\n").unwrap();
    env.add(&dir)
}

fn open_small_and_a_window(url: &str, sp: &str) {
    let (code, html) = curl(&[
        "-H",
        "Accept: text/html",
        &format!("{url}/{}/browse/small.txt", digest(sp)),
    ]);
    assert_eq!(code, 200);
    let html = String::from_utf8(html).unwrap();
    assert!(html.contains("small text after a big file"), "{html}");
    let (code, body) = curl(&[&format!("{url}/{}/file/small.txt", digest(sp))]);
    assert_eq!(code, 200);
    assert_eq!(body, b"small text after a big file\n");
    let (code, body) = curl(&[
        "-H",
        "Range: bytes=1073741824-1073741833",
        &format!("{url}/{}/file/big", digest(sp)),
    ]);
    assert_eq!(code, 206);
    assert_eq!(body, vec![0u8; 10]);
    let (code, html) = curl(&[&format!("{url}/{}/browse/", digest(sp))]);
    assert_eq!(code, 200);
    assert!(String::from_utf8(html).unwrap().contains("1.0 GiB"));
}

#[test]
fn nar_browser_opens_a_file_from_a_nar_over_1_gib_in_bounded_memory() {
    let env = NixEnv::new();
    let sp = add_big(&env);

    // Local store: listing from the file system, ranged reads of the serialised NAR.
    let d = Daemon::start(&env, &["serve", &env.store_arg()]);
    open_small_and_a_window(&d.url, &sp);
    let peak = d.peak_rss_kib();
    eprintln!("local store: peak RSS {} MiB", peak / 1024);
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    drop(d);

    // zstd cache without listings: the tree and each file stream through the decompressor.
    let zstd = env.path("cache-big-zstd");
    env.copy_to(
        &format!("file://{}?compression=zstd", zstd.display()),
        &[&sp],
    );
    assert_streamed_only(&zstd, &sp, "zstd");
    let d = Daemon::start(&env, &["serve", &format!("file://{}", zstd.display())]);
    open_small_and_a_window(&d.url, &sp);
    let peak = d.peak_rss_kib();
    eprintln!("zstd cache (streamed): peak RSS {} MiB", peak / 1024);
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    drop(d);
    fs::remove_dir_all(&zstd).unwrap();

    // Uncompressed cache with listings: ranged reads of the stored NAR.
    let plain = env.path("cache-big-none");
    env.copy_to(
        &format!(
            "file://{}?compression=none&write-nar-listing=true",
            plain.display()
        ),
        &[&sp],
    );
    assert!(plain.join(format!("{}.ls", digest(&sp))).exists());
    let d = Daemon::start(&env, &["serve", &format!("file://{}", plain.display())]);
    open_small_and_a_window(&d.url, &sp);
    let peak = d.peak_rss_kib();
    eprintln!(
        "uncompressed cache with .ls (ranged): peak RSS {} MiB",
        peak / 1024
    );
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn client_folder_replaces_templates_and_static_files_per_request() {
    let env = NixEnv::new();
    let evil = add_evil(&env);
    let client = env.path("client");
    fs::create_dir_all(client.join("templates")).unwrap();
    fs::create_dir_all(client.join("dist")).unwrap();
    fs::write(client.join("dist/style.css"), "body{color:red}").unwrap();
    fs::write(
        client.join("templates/narinfo.html"),
        "<!DOCTYPE html><p id=custom>custom {{ base }}</p>",
    )
    .unwrap();
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--client",
            client.to_str().unwrap(),
            &env.store_arg(),
        ],
    );
    let page = format!("{}/{}.narinfo", d.url, digest(&evil));
    let get = || {
        let (code, html) = curl(&["-H", "Accept: text/html", &page]);
        assert_eq!(code, 200);
        String::from_utf8(html).unwrap()
    };
    assert!(get().contains("custom "), "{}", get());
    // Re-read on every request, as the original does.
    fs::write(
        client.join("templates/narinfo.html"),
        "<!DOCTYPE html><p>edited {{ base }}</p>",
    )
    .unwrap();
    assert!(get().contains("edited "));
    // Templates the folder lacks fall back to the built-in ones.
    let (code, html) = curl(&[&format!("{}/{}/browse/", d.url, digest(&evil))]);
    assert_eq!(code, 200);
    assert!(String::from_utf8(html).unwrap().contains("sub dir/"));
    let (code, css) = curl(&[&format!("{}/_/style.css", d.url)]);
    assert_eq!(code, 200);
    assert_eq!(css, b"body{color:red}");
    // A broken override is a clear error, not a blank page.
    fs::write(client.join("templates/narinfo.html"), "{% if %}").unwrap();
    let (code, body) = curl(&["-H", "Accept: text/html", &page]);
    assert_eq!(code, 500);
    assert!(String::from_utf8(body).unwrap().contains("template"));
    assert!(d.logged("narinfo.html"), "{:?}", d.log());

    // A folder without templates/ stops serve with what to do.
    let out = env.output(
        env!("CARGO_BIN_EXE_nixcached"),
        &[
            "serve",
            "--client",
            env.path("nope").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("templates/"));
}

#[test]
fn discovery_lists_at_most_once_per_max_list_frequency_and_fetches_each_narinfo_once() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let cache = env.path("cache");
    env.copy_to(
        &format!("file://{}?compression=zstd", cache.display()),
        &[&closure.app],
    );
    let objects = closure.paths.len() as u64;
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--max-list-frequency",
            "5s",
            &format!("file://{}", cache.display()),
        ],
    );
    let index = format!("{}/", d.url);
    let wait_listed = || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (_, html) = curl(&[&index]);
            let html = String::from_utf8(html).unwrap();
            if html.contains(&format!("{objects} matching of {objects} known"))
                && !html.contains("discovery-notice")
            {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{html}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    // A burst of visits makes one listing, and each narinfo is fetched once.
    for _ in 0..20 {
        let (code, _) = curl(&[&index]);
        assert_eq!(code, 200);
    }
    wait_listed();
    for _ in 0..20 {
        curl(&[&index]);
    }
    assert_eq!(d.metric("nixcached_backend_listings_total"), 1);
    assert_eq!(d.metric("nixcached_backend_narinfo_fetches_total"), objects);
    // Once the interval has passed, a visit lists again, and nothing known is fetched again.
    std::thread::sleep(std::time::Duration::from_millis(5500));
    curl(&[&index]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while d.metric("nixcached_backend_listings_total") < 2 {
        assert!(std::time::Instant::now() < deadline, "no second listing");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    wait_listed();
    assert_eq!(d.metric("nixcached_backend_listings_total"), 2);
    assert_eq!(d.metric("nixcached_backend_narinfo_fetches_total"), objects);
}
