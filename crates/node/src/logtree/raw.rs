//! Raw entries from a child process's output, split into lines.

use std::fmt;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::{LogError, LogTree, RAW_LINE_MAX, raw_kind, validate_dn};

impl LogTree {
    /// A line splitter that appends a child process's output to `dn` as raw
    /// entries; feed it bytes ([`io::Write`]) or let it [`RawWriter::pump`]
    /// a pipe.
    pub fn raw_writer(self: &Arc<Self>, dn: &str) -> Result<RawWriter, LogError> {
        validate_dn(dn)?;
        Ok(RawWriter {
            tree: self.clone(),
            dn: Arc::from(dn),
            buf: Vec::new(),
            line_len: 0,
            last_was_cr: false,
        })
    }
}

/// Splits a byte stream into lines and appends them to one DN as raw entries.
/// Keeps at most [`RAW_LINE_MAX`] bytes of the current line, however long it
/// is. A partial last line is appended when the writer is dropped (or
/// [`RawWriter::pump`] reaches EOF); [`io::Write::flush`] does not append it,
/// since the line may still go on.
pub struct RawWriter {
    tree: Arc<LogTree>,
    dn: Arc<str>,
    pub(super) buf: Vec<u8>,
    line_len: usize,
    last_was_cr: bool,
}

impl RawWriter {
    /// Copies `reader` (a child's stdout or stderr) into the tree until EOF.
    pub async fn pump<R: AsyncRead + Unpin>(mut self, mut reader: R) -> io::Result<()> {
        let mut chunk = vec![0u8; 8192];
        loop {
            let n = reader.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            self.feed(&chunk[..n]);
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.extend(&data[..pos]);
            self.emit();
            data = &data[pos + 1..];
        }
        self.extend(data);
    }

    fn extend(&mut self, part: &[u8]) {
        if let Some(&last) = part.last() {
            self.last_was_cr = last == b'\r';
        }
        self.line_len += part.len();
        let room = RAW_LINE_MAX.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn emit(&mut self) {
        let original_length = self.line_len - usize::from(self.last_was_cr);
        let kept = &self.buf[..self.buf.len().min(original_length)];
        self.tree.push(&self.dn, raw_kind(kept, original_length));
        self.buf.clear();
        self.line_len = 0;
        self.last_was_cr = false;
    }
}

impl io::Write for RawWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.feed(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for RawWriter {
    fn drop(&mut self) {
        if self.line_len > 0 {
            self.emit();
        }
    }
}

impl fmt::Debug for RawWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawWriter")
            .field("dn", &self.dn)
            .finish_non_exhaustive()
    }
}
