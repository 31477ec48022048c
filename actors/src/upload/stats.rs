//! What an upload pipeline has done so far, shared with whoever shows it: `upload`'s progress
//! bar or log lines, and `/metrics` of a config-file process that also serves caches.
//!
//! The scheduler is the only writer (after each event it stores its totals); readers take a
//! [`Snapshot`] whenever they like, so showing progress never asks the scheduler anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Live counters of one pipeline.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// The destination, as the metrics label it.
    dest: String,
    queued: AtomicU64,
    uploading: AtomicU64,
    uploaded: AtomicU64,
    present: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
    /// Store paths (without the store folder) with an uploader now.
    current: Mutex<Vec<String>>,
}

/// The counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Accepted paths whose closure is not finished yet.
    pub queued: u64,
    /// Objects with an uploader now.
    pub uploading: u64,
    /// Objects written.
    pub uploaded: u64,
    /// Objects the destination already had.
    pub present: u64,
    /// Objects given up on.
    pub failed: u64,
    /// Compressed bytes written.
    pub bytes: u64,
    /// Uploads that failed for a passing reason and were tried again.
    pub retries: u64,
    /// What is uploading now.
    pub current: Vec<String>,
}

impl UploadStats {
    /// Counters for a pipeline writing to `dest` (a description without credentials).
    pub fn new(dest: impl Into<String>) -> UploadStats {
        UploadStats {
            dest: dest.into(),
            ..UploadStats::default()
        }
    }

    /// The destination these counters are about.
    pub fn dest(&self) -> &str {
        &self.dest
    }

    /// Stores the scheduler's state (the scheduler calls this after each event).
    pub fn store(&self, s: Snapshot) {
        let set = |c: &AtomicU64, v| c.store(v, Ordering::Relaxed);
        set(&self.queued, s.queued);
        set(&self.uploading, s.uploading);
        set(&self.uploaded, s.uploaded);
        set(&self.present, s.present);
        set(&self.failed, s.failed);
        set(&self.bytes, s.bytes);
        set(&self.retries, s.retries);
        *self.current.lock().expect("stats") = s.current;
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            queued: get(&self.queued),
            uploading: get(&self.uploading),
            uploaded: get(&self.uploaded),
            present: get(&self.present),
            failed: get(&self.failed),
            bytes: get(&self.bytes),
            retries: get(&self.retries),
            current: self.current.lock().expect("stats").clone(),
        }
    }

    /// Renders the counters of `pipelines` in the Prometheus text format, one series per
    /// destination.
    pub fn render(pipelines: &[std::sync::Arc<UploadStats>]) -> String {
        let mut out = String::new();
        if pipelines.is_empty() {
            return out;
        }
        let snaps: Vec<(String, Snapshot)> = pipelines
            .iter()
            .map(|p| (label_value(&p.dest), p.snapshot()))
            .collect();
        type Pick = fn(&Snapshot) -> u64;
        let series: [(&str, &str, &str, Pick); 7] = [
            (
                "nixcached_upload_queued",
                "gauge",
                "Paths accepted whose closure is not uploaded yet.",
                |s| s.queued,
            ),
            (
                "nixcached_upload_uploading",
                "gauge",
                "Objects being uploaded now.",
                |s| s.uploading,
            ),
            (
                "nixcached_upload_uploaded_total",
                "counter",
                "Objects written to the destination.",
                |s| s.uploaded,
            ),
            (
                "nixcached_upload_present_total",
                "counter",
                "Objects the destination already had.",
                |s| s.present,
            ),
            (
                "nixcached_upload_failed_total",
                "counter",
                "Objects given up on.",
                |s| s.failed,
            ),
            (
                "nixcached_upload_bytes_total",
                "counter",
                "Compressed NAR bytes written.",
                |s| s.bytes,
            ),
            (
                "nixcached_upload_retries_total",
                "counter",
                "Uploads tried again after a passing failure.",
                |s| s.retries,
            ),
        ];
        for (name, kind, help, pick) in series {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (dest, s) in &snaps {
                out.push_str(&format!("{name}{{dest=\"{dest}\"}} {}\n", pick(s)));
            }
        }
        out
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_series_per_destination_with_escaped_labels() {
        let a = std::sync::Arc::new(UploadStats::new("file:///a"));
        let b = std::sync::Arc::new(UploadStats::new("s3://b\"\\\n"));
        a.store(Snapshot {
            queued: 2,
            uploaded: 5,
            bytes: 1234,
            retries: 1,
            ..Snapshot::default()
        });
        let text = UploadStats::render(&[a.clone(), b]);
        assert!(text.contains("nixcached_upload_queued{dest=\"file:///a\"} 2\n"));
        assert!(text.contains("nixcached_upload_uploaded_total{dest=\"file:///a\"} 5\n"));
        assert!(text.contains("nixcached_upload_bytes_total{dest=\"file:///a\"} 1234\n"));
        assert!(text.contains("nixcached_upload_retries_total{dest=\"file:///a\"} 1\n"));
        assert!(text.contains("nixcached_upload_uploaded_total{dest=\"s3://b\\\"\\\\\\n\"} 0\n"));
        assert_eq!(text.matches("# TYPE").count(), 7);
        assert_eq!(UploadStats::render(&[]), "");
        assert_eq!(a.snapshot().queued, 2);
    }
}
