//! `upload`'s input under stress: odd writers, odd spool entries, full disks, signals that
//! race the writers. Whatever comes in, the pipeline keeps reading, says what it skipped,
//! and loses no path that was written.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::upload::{digest, many_paths, mkfifo, send, wait_for_narinfos, SmallFs, Upload};
use common::NixEnv;

/// Lines another writer put into the FIFO and the reader has not taken yet when SIGHUP
/// comes (in the pipe, or read ahead and not yet accepted) are uploaded by the drain too:
/// they vanish with the process otherwise. The destination (a private moto) is frozen, so
/// the queue of one stays full and the reader is held back while the later lines are written;
/// SIGHUP comes before the destination thaws.
#[test]
fn sighup_drain_takes_the_lines_still_in_the_pipe() {
    use std::io::Write;
    let env = NixEnv::new();
    let paths = many_paths(&env, 9);
    let moto = common::peers::Moto::start(common::peers::free_port());
    let bucket = common::peers::fresh_name("sighup-pipe");
    let (code, _) = common::curl(&["-X", "PUT", &format!("{}/{bucket}", moto.endpoint())]);
    assert_eq!(code, 200);
    let dest = format!(
        "s3://{bucket}?endpoint={}&region=us-east-1",
        moto.endpoint()
    );
    let fifo = env.path("f");
    mkfifo(&fifo);
    let up = Upload::start_logging(
        &env,
        &fifo,
        &dest,
        &["--jobs", "1", "--queue-size", "1"],
        "info,nixcached_actors::upload::reader=debug",
    );
    // Objects are private; the listing is not.
    let has = |key: &str| {
        let url = format!("{}/{bucket}?list-type=2&prefix={key}", moto.endpoint());
        let (code, body) = common::curl(&[&url]);
        code == 200 && String::from_utf8_lossy(&body).contains(&format!("<Key>{key}</Key>"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !has("nix-cache-info") {
        assert!(
            Instant::now() < deadline,
            "upload never prepared the bucket:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    moto.pause();
    let mut w = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let mut write = |ps: &[String]| {
        let text: String = ps.iter().map(|p| format!("{p}\n")).collect();
        w.write_all(text.as_bytes()).unwrap();
    };
    let wait_logged = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !up.log_text().contains(needle) {
            assert!(Instant::now() < deadline, "never logged {needle:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The first path takes the queue's only place and hangs on the frozen destination.
    write(&paths[..1]);
    wait_logged("accepting 1 paths");
    // The next two are accepted (journaled) and wait for room: the reader is held there.
    write(&paths[1..3]);
    wait_logged("accepting 2 paths");
    // Read ahead into the reader's hand-over slot, held by the reading thread, left in the
    // pipe: none of these is accepted before the signal.
    for piece in [&paths[3..5], &paths[5..7], &paths[7..]] {
        std::thread::sleep(Duration::from_millis(300));
        write(piece);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        up.log_text().matches("accepting ").count(),
        2,
        "the reader was not held back:\n{}",
        up.log_text()
    );
    up.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    moto.resume();
    let log = up.log.clone();
    let status = up.wait();
    let log = fs::read_to_string(log).unwrap();
    assert!(status.success(), "{status}\n{log}");
    drop(w);
    for p in &paths {
        assert!(
            has(&format!("{}.narinfo", digest(p))),
            "{p} missing after the SIGHUP drain\n{log}"
        );
    }
}

/// A line far past the input bound (or one that is not text) is skipped with a warning; the
/// pipeline keeps reading, so paths written after it are still uploaded.
#[test]
fn an_oversized_or_binary_input_line_is_skipped_and_reading_goes_on() {
    use std::io::Write;
    let env = NixEnv::new();
    let paths = many_paths(&env, 2);
    let fifo = env.path("f");
    mkfifo(&fifo);
    let dest = env.path("cache");
    let mut up = Upload::start(
        &env,
        &fifo,
        &format!("file://{}", dest.display()),
        &["--jobs", "1"],
    );
    {
        // Written straight into the FIFO, as any writer besides `send` may.
        let mut w = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let mut input = format!("{}\n", paths[0]).into_bytes();
        input.extend(std::iter::repeat_n(b'x', 3 << 20));
        input.extend_from_slice(b"\n\xff\xfe/nix/store/\x00\x01\n");
        input.extend_from_slice(format!("{}\n", paths[1]).as_bytes());
        w.write_all(&input).unwrap();
    }
    wait_for_narinfos(&dest, &paths, "paths around a 3 MiB line");
    assert!(
        up.child.try_wait().unwrap().is_none(),
        "upload stopped reading its input"
    );
    up.drain();
}

/// What is in the spool besides `send`'s files: a directory, a FIFO (reading it would block
/// the reader for good), a symbolic link (not followed, even to a file of paths), a file far
/// larger than `send` writes. Each is moved aside with a warning naming it; the spool files
/// beside them (one with a name that is not UTF-8) and paths sent afterwards are uploaded.
#[test]
fn odd_entries_in_the_spool_are_set_aside_and_reading_goes_on() {
    use std::os::unix::ffi::OsStrExt;
    let env = NixEnv::new();
    let paths = many_paths(&env, 4);
    let fifo = env.path("f");
    mkfifo(&fifo);
    let dest = env.path("cache");
    let mut up = Upload::start(
        &env,
        &fifo,
        &format!("file://{}", dest.display()),
        &["--jobs", "1"],
    );
    let spool = env.path("f.spool");
    fs::create_dir(spool.join("a-dir")).unwrap();
    fs::write(spool.join("a-dir/inside"), format!("{}\n", paths[3])).unwrap();
    mkfifo(&spool.join("b-fifo"));
    let outside = env.path("outside-list");
    fs::write(&outside, format!("{}\n", paths[3])).unwrap();
    std::os::unix::fs::symlink(&outside, spool.join("c-link")).unwrap();
    let big = fs::File::create(spool.join("d-big")).unwrap();
    big.set_len(65 << 20).unwrap();
    drop(big);
    let odd_name = std::ffi::OsStr::from_bytes(b"e-\xff\xfe");
    fs::write(spool.join(odd_name), format!("{}\n", paths[0])).unwrap();
    fs::write(spool.join("f-plain"), format!("{}\n", paths[1])).unwrap();
    let out = send(&fifo, &[&paths[2]], &[]);
    common::assert_succeeded(&out);

    wait_for_narinfos(&dest, &paths[..3], "spooled and sent paths");
    assert!(
        up.child.try_wait().unwrap().is_none(),
        "upload stopped:\n{}",
        up.log_text()
    );
    let log = up.log_text();
    for (name, why) in [
        ("a-dir", "is a directory"),
        ("b-fifo", "is a FIFO"),
        ("c-link", "is a symbolic link"),
        ("d-big", "is 68157440 bytes, more than `send` ever writes"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("{name} {why}")) && l.contains("moved it to")),
            "no warning for {name}:\n{log}"
        );
        assert!(
            spool
                .join(".rejected")
                .join(name)
                .symlink_metadata()
                .is_ok(),
            "{name} was not kept in .rejected"
        );
    }
    let mut left: Vec<_> = fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            std::ffi::OsString::from(".journal"),
            std::ffi::OsString::from(".rejected")
        ]
    );
    // Neither the link's target nor the folder's contents were taken for `send`'s lines.
    assert!(!dest.join(format!("{}.narinfo", digest(&paths[3]))).exists());
    up.drain();
}

/// The FIFO, its spool and the journal on a file system that is full: `send` still hands
/// the paths over (through the pipe, saying the spool failed), the reader holds them until
/// the journal can record them (saying so), and once there is space again every one is
/// uploaded. Nothing is lost and nothing stops.
#[test]
fn a_full_disk_under_the_spool_and_the_journal_loses_nothing() {
    let env = NixEnv::new();
    let paths = many_paths(&env, 3);
    let small = SmallFs::mount(env.path("small"), "1m");
    let fifo = small.0.join("f");
    mkfifo(&fifo);
    let state = small.0.join("state");
    let dest = env.path("cache");
    let mut up = Upload::start(
        &env,
        &fifo,
        &format!("file://{}", dest.display()),
        &["--jobs", "1", "--state-dir", state.to_str().unwrap()],
    );
    let filler = small.fill();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let out = send(&fifo, &refs, &[]);
    common::assert_succeeded(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("No space left on device")
            && stderr.contains("sending through the FIFO only"),
        "send did not say the spool failed:\n{stderr}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !up.log_text().contains("paths not accepted yet") {
        assert!(
            Instant::now() < deadline,
            "the reader never said the journal is full:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up.child.try_wait().unwrap().is_none(), "upload stopped");
    fs::remove_file(filler).unwrap();
    wait_for_narinfos(&dest, &paths, "paths sent while the disk was full");
    up.drain();
}
