//! Progress bars and log lines on the same stderr.
//!
//! A log line written while a bar is drawn would be overdrawn (or leave a
//! half bar behind), so every log line goes out through
//! [`MultiProgress::suspend`], which clears the bars, writes, and redraws.

use std::io::Write;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone)]
pub struct Progress {
    multi: MultiProgress,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            multi: MultiProgress::new(),
        }
    }

    /// A bar counting `total` items of `what`.
    pub fn bar(&self, total: u64, what: &str) -> ProgressBar {
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = self.multi.add(
            ProgressBar::new(total)
                .with_style(style)
                .with_prefix(what.to_string()),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        bar
    }

    pub fn log_writer(&self) -> LogWriter {
        LogWriter {
            multi: self.multi.clone(),
        }
    }
}

/// `MakeWriter` for tracing-subscriber: one buffered writer per event.
#[derive(Clone)]
pub struct LogWriter {
    multi: MultiProgress,
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine {
            multi: self.multi.clone(),
            buf: Vec::new(),
        }
    }
}

/// Collects one formatted event and writes it in one go when dropped.
pub struct LogLine {
    multi: MultiProgress,
    buf: Vec<u8>,
}

impl Write for LogLine {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.multi.suspend(|| {
            // Nowhere left to report a failing stderr.
            let _ = std::io::stderr().write_all(&buf);
        });
    }
}
