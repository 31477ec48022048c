use super::*;
use std::time::Duration;

/// A download that sends `pieces` with a pause after each, and counts how often it ran.
fn slow(pieces: Vec<&'static [u8]>, starts: Arc<AtomicU64>) -> impl FnOnce() -> StartDownload {
    let len = pieces.iter().map(|p| p.len() as u64).sum();
    slow_declaring(pieces, Some(len), starts)
}

/// Like [`slow`], announcing `len` as the download's length.
fn slow_declaring(
    pieces: Vec<&'static [u8]>,
    len: Option<u64>,
    starts: Arc<AtomicU64>,
) -> impl FnOnce() -> StartDownload {
    move || {
        starts.fetch_add(1, Ordering::SeqCst);
        let stream = futures::stream::iter(pieces).then(|p| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(Bytes::from_static(p))
        });
        let s: ByteStream = Box::pin(stream);
        Box::pin(async move { Ok((s, len)) })
    }
}

async fn read_all(b: Blob) -> io::Result<Vec<u8>> {
    b.into_bytes().await
}

#[tokio::test]
async fn one_download_feeds_every_reader_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarDiskCache::open(dir.path(), 1 << 20).unwrap();
    let starts = Arc::new(AtomicU64::new(0));
    let pieces: Vec<&'static [u8]> = vec![b"abc", b"def", b"ghi"];
    let expected = Expected {
        size: Some(9),
        hash: Some(Hash::sha256_of(b"abcdefghi")),
    };
    let readers = (0..8).map(|i| {
        let cache = cache.clone();
        let start = slow(pieces.clone(), starts.clone());
        let expected = expected.clone();
        async move {
            let range = (i == 7).then(|| ByteRange::span(2, Some(5)));
            let blob = cache
                .get("nar/x.nar", range, expected, start)
                .await
                .unwrap();
            read_all(blob).await.unwrap()
        }
    });
    let out = futures::future::join_all(readers).await;
    for (i, o) in out.iter().enumerate() {
        if i == 7 {
            assert_eq!(o, b"cde");
        } else {
            assert_eq!(o, b"abcdefghi");
        }
    }
    assert_eq!(
        starts.load(Ordering::SeqCst),
        1,
        "one download for 8 readers"
    );
    // Kept: served again without downloading.
    let again = cache
        .get(
            "nar/x.nar",
            None,
            expected.clone(),
            slow(vec![], starts.clone()),
        )
        .await
        .unwrap();
    assert_eq!(read_all(again).await.unwrap(), b"abcdefghi");
    assert_eq!(starts.load(Ordering::SeqCst), 1);
    // And found again by a new index over the same folder.
    let reopened = NarDiskCache::open(dir.path(), 1 << 20).unwrap();
    assert!(reopened.contains("nar/x.nar").await);
}

#[tokio::test]
async fn a_download_that_does_not_match_its_narinfo_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarDiskCache::open(dir.path(), 1 << 20).unwrap();
    let starts = Arc::new(AtomicU64::new(0));
    let expected = Expected {
        size: Some(6),
        hash: Some(Hash::sha256_of(b"abcdeX")),
    };
    let blob = cache
        .get(
            "nar/y.nar",
            None,
            expected.clone(),
            slow(vec![b"abc", b"def"], starts.clone()),
        )
        .await
        .unwrap();
    assert!(read_all(blob).await.is_err(), "the reader sees the failure");
    assert!(!cache.contains("nar/y.nar").await);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert!(names.is_empty(), "no file left behind: {names:?}");
}

#[tokio::test]
async fn a_download_longer_than_promised_is_cut_off_and_unchecked_bytes_are_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarDiskCache::open(dir.path(), 1 << 20).unwrap();
    let starts = Arc::new(AtomicU64::new(0));
    // FileSize 3, no Content-Length, and the upstream goes on: cut off at the cap.
    let blob = cache
        .get(
            "nar/z.nar",
            None,
            Expected {
                size: Some(3),
                hash: Some(Hash::sha256_of(b"abc")),
            },
            slow_declaring(vec![b"abc", b"def", b"ghi"], None, starts.clone()),
        )
        .await
        .unwrap();
    let err = read_all(blob).await.unwrap_err();
    assert!(err.to_string().contains("more than 3 bytes"), "{err}");
    assert!(!cache.contains("nar/z.nar").await);
    // Nothing to check the bytes against: served to the reader, never kept.
    let blob = cache
        .get(
            "nar/w.nar",
            None,
            Expected::default(),
            slow(vec![b"abc"], starts.clone()),
        )
        .await
        .unwrap();
    assert!(read_all(blob).await.is_err());
    assert!(!cache.contains("nar/w.nar").await);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert!(names.is_empty(), "no file left behind: {names:?}");
}

#[tokio::test]
async fn eviction_deletes_files_past_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    // Room for about two 1 KiB files.
    let cache = NarDiskCache::open(dir.path(), 2048).unwrap();
    let starts = Arc::new(AtomicU64::new(0));
    static KIB: [u8; 1024] = [7u8; 1024];
    for i in 0..6 {
        let b = cache
            .get(
                &format!("nar/{i}.nar"),
                None,
                Expected {
                    size: None,
                    hash: Some(Hash::sha256_of(&KIB)),
                },
                slow(vec![&KIB], starts.clone()),
            )
            .await
            .unwrap();
        assert_eq!(read_all(b).await.unwrap().len(), 1024);
    }
    cache.index.run_pending_tasks().await;
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(files <= 2, "{files} files kept for a 2 KiB bound");
}

/// With room for 2 downloads, clients asking for 5 different NARs at once: exactly 2
/// downloads run (the others wait, and so do their clients); once they end, every client gets
/// its NAR, each downloaded once.
#[tokio::test]
async fn downloads_at_once_are_bounded_and_the_rest_get_through_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let cache = NarDiskCache::open_with_downloads(dir.path(), 1 << 20, 2).unwrap();
    let (open, gate) = watch::channel(false);
    let running = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let body: &'static [u8] = b"nar bytes";
    let clients: Vec<_> = (0..5)
        .map(|i| {
            let cache = cache.clone();
            let (running, most, started) = (running.clone(), most.clone(), started.clone());
            let mut gate = gate.clone();
            tokio::spawn(async move {
                let start = move || -> StartDownload {
                    Box::pin(async move {
                        // Counted when polled: that is when a download really begins.
                        started.fetch_add(1, Ordering::SeqCst);
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        gate.wait_for(|o| *o).await.unwrap();
                        running.fetch_sub(1, Ordering::SeqCst);
                        let s: ByteStream = Box::pin(futures::stream::once(async move {
                            Ok(Bytes::from_static(body))
                        }));
                        Ok((s, Some(body.len() as u64)))
                    })
                };
                let expected = Expected {
                    size: Some(body.len() as u64),
                    hash: Some(Hash::sha256_of(body)),
                };
                let blob = cache
                    .get(&format!("nar/{i}.nar"), None, expected, start)
                    .await
                    .unwrap();
                read_all(blob).await.unwrap()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(running.load(Ordering::SeqCst), 2, "downloads running");
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "none began beyond the bound"
    );
    open.send(true).unwrap();
    for c in clients {
        let got = tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("every held-back client gets its NAR")
            .unwrap();
        assert_eq!(got, body);
    }
    assert_eq!(started.load(Ordering::SeqCst), 5);
    assert_eq!(most.load(Ordering::SeqCst), 2, "never more than 2 at once");
    assert_eq!(cache.fetches(), 5);
}
