//! Splitting a watch stream into lines without ever holding more than a limit of one line:
//! [`LineSplitter`] hands out each complete line, and skips a longer one, reporting only its
//! length ([`Piece::Oversized`]). Pure: bytes in, pieces out, any chunking.

/// Splits a byte stream into lines, never holding more than `max` bytes of one line: a longer
/// line is skipped and reported with its length.
pub struct LineSplitter {
    max: usize,
    pending: Vec<u8>,
    /// `Some(n)`: inside an oversized line, `n` bytes so far.
    skipping: Option<usize>,
}

/// One item out of a [`LineSplitter`].
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Line(&'a [u8]),
    Oversized(usize),
}

impl LineSplitter {
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter { max, pending: Vec::new(), skipping: None }
    }

    /// Whether a line has started but not ended.
    pub fn mid_line(&self) -> bool {
        !self.pending.is_empty() || self.skipping.is_some()
    }

    /// Feed bytes; `f` is called for each complete line (without the newline; empty lines are
    /// dropped) and for each skipped oversized line. Stops early when `f` returns false.
    pub fn feed(&mut self, mut chunk: &[u8], f: &mut dyn FnMut(Piece<'_>) -> bool) -> bool {
        while !chunk.is_empty() {
            let nl = chunk.iter().position(|&b| b == b'\n');
            let (part, rest, ends) = match nl {
                Some(i) => (&chunk[..i], &chunk[i + 1..], true),
                None => (chunk, &[][..], false),
            };
            chunk = rest;
            if let Some(n) = &mut self.skipping {
                *n += part.len() + usize::from(ends);
                if ends {
                    let n = *n;
                    self.skipping = None;
                    if !f(Piece::Oversized(n)) {
                        return false;
                    }
                }
                continue;
            }
            if self.pending.len() + part.len() > self.max {
                self.skipping = Some(self.pending.len() + part.len() + usize::from(ends));
                self.pending = Vec::new(); // release the memory now
                if ends {
                    let n = self.skipping.take().unwrap_or(0);
                    if !f(Piece::Oversized(n)) {
                        return false;
                    }
                }
                continue;
            }
            if !ends {
                self.pending.extend_from_slice(part);
                continue;
            }
            let go_on = if self.pending.is_empty() {
                part.is_empty() || f(Piece::Line(part))
            } else {
                self.pending.extend_from_slice(part);
                let line = std::mem::take(&mut self.pending);
                let r = f(Piece::Line(&line));
                if line.capacity() <= 1 << 20 {
                    self.pending = line;
                    self.pending.clear();
                }
                r
            };
            if !go_on {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_handles_any_chunking_and_skips_long_lines() {
        let input = b"{\"a\":1}\n\n{\"b\":2}\nxxxxxxxxxxxxxxxxxxxx\n{\"c\":3}\n";
        for chunk in 1..input.len() {
            let mut s = LineSplitter::new(10);
            let mut got: Vec<String> = Vec::new();
            for c in input.chunks(chunk) {
                s.feed(c, &mut |p| {
                    got.push(match p {
                        Piece::Line(l) => String::from_utf8(l.to_vec()).unwrap(),
                        Piece::Oversized(n) => format!("<{n}>"),
                    });
                    true
                });
            }
            assert_eq!(got, vec!["{\"a\":1}", "{\"b\":2}", "<21>", "{\"c\":3}"], "chunk size {chunk}");
            assert!(!s.mid_line());
        }
    }
}
