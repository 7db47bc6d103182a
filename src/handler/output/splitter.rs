//! Cutting a byte stream into bounded lines, and keeping its tail: pure,
//! synchronous, and fed whatever chunks the pipe gives.

use std::collections::VecDeque;

/// Splits bytes into lines ending at `\n`, `\r` or `\r\n`, at most `max`
/// bytes each: a longer line is emitted once, cut at `max`, and the rest of
/// it is skipped up to its end. Holds at most `max` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    /// The start of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// The bound.
    max: usize,
    /// The current line was cut: skip to its end.
    skipping: bool,
    /// The last line ended with `\r`: a `\n` next belongs to it.
    after_cr: bool,
}

impl LineSplitter {
    /// A splitter cutting lines at `max` bytes.
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            line: Vec::new(),
            max,
            skipping: false,
            after_cr: false,
        }
    }

    /// Feeds a chunk; `emit(line, cut)` gets each line (without its end).
    pub fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
        while !bytes.is_empty() {
            if std::mem::take(&mut self.after_cr) && bytes[0] == b'\n' {
                bytes = &bytes[1..];
                continue;
            }
            if let Some(i) = memchr::memchr2(b'\n', b'\r', bytes) {
                self.after_cr = bytes[i] == b'\r';
                self.take(&bytes[..i], true, emit);
                bytes = &bytes[i + 1..];
            } else {
                self.take(bytes, false, emit);
                break;
            }
        }
    }

    /// The end of the stream: a last line without its end is emitted too.
    pub fn finish(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        if !self.skipping && !self.line.is_empty() {
            emit(&self.line, false);
        }
        self.line.clear();
        self.skipping = false;
    }

    /// Bytes of memory the line buffer holds.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.line.capacity()
    }

    /// A part of a line, and whether the line ends after it.
    fn take(&mut self, part: &[u8], ends: bool, emit: &mut impl FnMut(&[u8], bool)) {
        if self.skipping {
            self.skipping = !ends;
            return;
        }
        let room = self.max - self.line.len();
        if part.len() > room {
            self.line.extend_from_slice(&part[..room]);
            emit(&self.line, true);
            self.line.clear();
            self.skipping = !ends;
        } else if !ends {
            self.line.extend_from_slice(part);
        } else if self.line.is_empty() {
            // The usual case: a whole line in one chunk, never copied.
            emit(part, false);
        } else {
            self.line.extend_from_slice(part);
            emit(&self.line, false);
            self.line.clear();
        }
    }
}

/// The last bytes of a stream.
#[derive(Debug)]
pub struct Tail {
    bytes: VecDeque<u8>,
    keep: usize,
}

impl Tail {
    /// Keeps the last `keep` bytes (0 keeps nothing).
    pub fn new(keep: usize) -> Tail {
        Tail {
            bytes: VecDeque::new(),
            keep,
        }
    }

    /// Adds a chunk, forgetting what falls out of the window.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.keep == 0 {
            return;
        }
        let chunk = &chunk[chunk.len().saturating_sub(self.keep)..];
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(self.keep);
        self.bytes.drain(..overflow);
        self.bytes.extend(chunk);
    }

    /// The tail as text: lossy UTF-8, line ends as `\n`, no trailing line
    /// end, at most `keep` bytes (cut at the front, on a character boundary).
    pub fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let raw = [a, b].concat();
        let text = String::from_utf8_lossy(&raw)
            .replace("\r\n", "\n")
            .replace('\r', "\n");
        let text = text.trim_end_matches('\n');
        let mut cut = text.len().saturating_sub(self.keep);
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text[cut..].to_string()
    }
}
