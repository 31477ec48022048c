//! Progress on a terminal: `upload`'s: one live line (objects done, bytes and rate, what is
//! uploading now) under the log, redrawn a few times a second, and the line of a pass of
//! `fsck` or `gc` over a cache. Off a terminal the scheduler's
//! plain progress log lines are used instead, so logs and journald stay readable.
//!
//! The log goes through [`LogWriter`], which lifts the bar out of the way for each line, so
//! log lines and the bar never overwrite each other.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nixcached_actors::upload::stats::{Snapshot, UploadStats};

/// The bar being shown, if any, for [`LogWriter`].
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// How often the line is redrawn.
const TICK: Duration = Duration::from_millis(200);

/// A `tracing` writer for standard error that suspends the progress bar around each line.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The subscriber formats a whole event, then writes it at once.
        let shown = SHOWN.lock().expect("progress").clone();
        match shown {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

/// The live line of one pipeline; the line is finished (left showing the totals) when dropped.
pub struct Progress {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
    stats: Arc<UploadStats>,
}

/// The line's text for a snapshot; `rate` is bytes per second.
pub fn line(s: &Snapshot, rate: f64) -> String {
    let mut text = format!(
        "{} uploaded, {} present, {} failed · {} queued · {} at {}/s",
        s.uploaded,
        s.present,
        s.failed,
        s.queued,
        HumanBytes(s.bytes),
        HumanBytes(rate as u64)
    );
    if s.retries > 0 {
        text.push_str(&format!(" · {} retries", s.retries));
    }
    if !s.current.is_empty() {
        text.push_str(&format!(" · uploading {}", s.current.join(", ")));
    }
    text
}

impl Progress {
    /// Shows the line on standard error for `stats`, redrawn until dropped.
    pub fn show(stats: Arc<UploadStats>) -> Progress {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {wide_msg}").expect("a valid template"),
        );
        *SHOWN.lock().expect("progress") = Some(bar.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (bar, stop, stats) = (bar.clone(), stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name("nixcached-progress".into())
                .spawn(move || {
                    // The rate over the last few seconds, not since the start.
                    let mut window: std::collections::VecDeque<(Instant, u64)> =
                        std::collections::VecDeque::new();
                    while !stop.load(Ordering::Relaxed) {
                        let s = stats.snapshot();
                        let now = Instant::now();
                        window.push_back((now, s.bytes));
                        while window.len() > 2
                            && now.duration_since(window[0].0) > Duration::from_secs(5)
                        {
                            window.pop_front();
                        }
                        let (t0, b0) = window[0];
                        let secs = now.duration_since(t0).as_secs_f64();
                        let rate = if secs > 0.0 {
                            (s.bytes - b0) as f64 / secs
                        } else {
                            0.0
                        };
                        bar.set_message(line(&s, rate));
                        bar.tick();
                        std::thread::sleep(TICK);
                    }
                })
                .ok()
        };
        Progress {
            bar,
            stop,
            ticker,
            stats,
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        let s = self.stats.snapshot();
        self.bar.finish_with_message(line(&s, 0.0));
        *SHOWN.lock().expect("progress") = None;
    }
}

/// The live line of a pass over a cache (`fsck`, `gc`), on standard error when it is a
/// terminal; cleared when dropped.
pub struct PassLine {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl PassLine {
    /// The counters to hand the pass, and the line showing them (both `None` off a terminal,
    /// where a redrawn line would only litter logs).
    pub fn on_terminal(
        what: &'static str,
    ) -> (
        Option<Arc<nixcached_actors::progress::Progress>>,
        Option<PassLine>,
    ) {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return (None, None);
        }
        let counters = Arc::new(nixcached_actors::progress::Progress::default());
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {wide_msg}")
                .expect("a valid template"),
        );
        // Drawn once here: a pass over a small cache can end before the ticker first runs,
        // and a terminal should still see what ran.
        bar.set_message(format!("{what}: {}", counters.line()));
        bar.tick();
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (bar, stop, counters) = (bar.clone(), stop.clone(), counters.clone());
            std::thread::Builder::new()
                .name("nixcached-progress".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        bar.set_message(format!("{what}: {}", counters.line()));
                        bar.tick();
                        std::thread::sleep(TICK);
                    }
                })
                .ok()
        };
        (Some(counters), Some(PassLine { bar, stop, ticker }))
    }
}

impl Drop for PassLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_counts_bytes_rate_and_what_is_uploading() {
        let s = Snapshot {
            queued: 4,
            uploading: 2,
            uploaded: 10,
            present: 3,
            failed: 1,
            bytes: 5 * 1024 * 1024,
            retries: 2,
            current: vec!["abc-foo".into(), "def-bar".into()],
        };
        assert_eq!(
            line(&s, 1024.0 * 1024.0),
            "10 uploaded, 3 present, 1 failed · 4 queued · 5.00 MiB at 1.00 MiB/s · 2 retries · uploading abc-foo, def-bar"
        );
        let idle = Snapshot::default();
        assert_eq!(
            line(&idle, 0.0),
            "0 uploaded, 0 present, 0 failed · 0 queued · 0 B at 0 B/s"
        );
    }
}
