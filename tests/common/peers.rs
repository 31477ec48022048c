//! The real peers scripts/test starts: addresses from the environment, fresh buckets.

/// A peer setting from the environment scripts/test exports; never skips silently.
pub fn peer(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests through scripts/test, which starts sshd, moto and fake-gcs-server")
    })
}

/// A name no other test (or earlier run against the same server) uses.
pub fn fresh_name(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{what}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates a bucket on an S3 server that checks no signatures (moto); returns its name.
fn create_s3_bucket(endpoint: &str, what: &str) -> String {
    let bucket = fresh_name(what);
    let (code, body) = super::curl(&["-X", "PUT", &format!("{endpoint}/{bucket}")]);
    assert_eq!(
        code,
        200,
        "creating bucket {bucket}: {}",
        String::from_utf8_lossy(&body)
    );
    bucket
}

/// Creates a bucket on an S3 server at `endpoint`; returns its store URL.
pub fn s3_bucket_at(endpoint: &str, what: &str) -> String {
    let bucket = create_s3_bucket(endpoint, what);
    format!("s3://{bucket}?endpoint={endpoint}&region=us-east-1")
}

/// A fresh bucket on the shared moto: (endpoint, bucket name).
pub fn new_s3_bucket(what: &str) -> (String, String) {
    peer("AWS_ACCESS_KEY_ID");
    let ep = peer("NIXCACHED_TEST_S3_ENDPOINT");
    let bucket = create_s3_bucket(&ep, what);
    (ep, bucket)
}

/// A fresh bucket on the shared moto; returns its store URL.
pub fn s3_bucket(what: &str) -> String {
    let (ep, bucket) = new_s3_bucket(what);
    format!("s3://{bucket}?endpoint={ep}&region=us-east-1")
}

/// A fresh bucket on fake-gcs-server: (endpoint, bucket name).
pub fn new_gcs_bucket(what: &str) -> (String, String) {
    let ep = peer("NIXCACHED_TEST_GCS_ENDPOINT");
    let bucket = fresh_name(what);
    let (code, body) = super::curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        &format!(r#"{{"name":"{bucket}"}}"#),
        &format!("{ep}/storage/v1/b?project=test"),
    ]);
    assert_eq!(
        code,
        200,
        "creating bucket {bucket}: {}",
        String::from_utf8_lossy(&body)
    );
    (ep, bucket)
}

/// A fresh bucket on fake-gcs-server; returns its store URL.
pub fn gcs_bucket(what: &str) -> String {
    let (ep, bucket) = new_gcs_bucket(what);
    format!("gs://{bucket}?endpoint={ep}")
}

/// An `ssh://` URL for the loopback sshd, with its remote side in the chroot store `remote`.
pub fn ssh_url(remote: &std::path::Path) -> String {
    let host = peer("NIXCACHED_TEST_SSH_HOST");
    let port = peer("NIXCACHED_TEST_SSH_PORT");
    let key = peer("NIXCACHED_TEST_SSH_KEY");
    format!(
        "ssh://{host}:{port}?remote-store={}&ssh-key={key}",
        remote.display()
    )
}

/// A free loopback TCP port (for servers that cannot report theirs).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private moto (S3) server on a port of its own, for tests that stop and restart S3
/// without disturbing the shared one; killed when dropped. Being in-memory, it comes back
/// empty after a restart.
pub struct Moto {
    child: std::process::Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
}

impl Moto {
    /// Starts moto on `port` and waits until it answers.
    pub fn start(port: u16) -> Moto {
        use std::time::{Duration, Instant};
        let child = std::process::Command::new(peer("NIXCACHED_TEST_MOTO_SERVER"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while super::curl(&[&format!("http://127.0.0.1:{port}/")]).0 != 200 {
            assert!(Instant::now() < deadline, "private moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel and never
    /// answered, as with a destination that hangs.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws a [`Moto::pause`]d server (SIGCONT); the requests it held are answered.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} moto");
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
