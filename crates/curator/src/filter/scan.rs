//! The pre-scan: size limits enforced on a filter's source before the CEL
//! parser sees it (see the module documentation of `filter`).

use super::*;

/// What the pre-scan learned about a filter's source.
#[derive(Debug, Default)]
pub(super) struct Shape {
    pub(super) operators: usize,
    pub(super) depth: usize,
    /// Upper bound on the elements of all list and map literals.
    pub(super) commas: usize,
    /// Concatenations can grow lists beyond any literal.
    pub(super) pluses: usize,
}

impl Shape {
    /// An upper bound for the length of a list the compile pass cannot size.
    pub(super) fn list_len_bound(&self) -> u64 {
        let literal = (self.commas as u64 + 1).saturating_add(ASSUMED_NODE_LIST_LEN);
        literal.saturating_mul(self.pluses as u64 + 1)
    }
}

/// Enforces the size limits without parsing.
pub(super) fn prescan(src: &str) -> Result<Shape, FilterError> {
    if src.len() > MAX_FILTER_LEN {
        return Err(FilterError::TooLong {
            len: src.len(),
            limit: MAX_FILTER_LEN,
        });
    }
    let shape = Scanner::new(src.as_bytes()).run();
    if shape.depth > MAX_NESTING {
        return Err(FilterError::TooDeep {
            depth: shape.depth,
            limit: MAX_NESTING,
        });
    }
    if shape.operators > MAX_OPERATORS {
        return Err(FilterError::TooManyOperators {
            count: shape.operators,
            limit: MAX_OPERATORS,
        });
    }
    Ok(shape)
}

/// A lexer just good enough to tell code from string literals and comments.
///
/// It must never see less code than CEL's lexer does, or operators hidden in
/// what it takes for a string would escape the count. It follows the grammar's
/// string rules exactly; wherever the real lexer would fail or could read the
/// input differently (an invalid escape, an unknown character, a backtick, a
/// raw-string prefix it cannot attribute), it stops trusting its own reading
/// and counts every remaining byte as code, brackets inside strings included.
pub(super) struct Scanner<'s> {
    pub(super) src: &'s [u8],
    pub(super) pos: usize,
    pub(super) shape: Shape,
    pub(super) trusted: bool,
    /// Per open bracket, the `?` conditionals begun inside it: each deepens
    /// the parse until the bracket closes.
    pub(super) groups: Vec<usize>,
    pub(super) ternaries: usize,
    /// Opening brackets seen since the scanner stopped trusting itself: once
    /// closing brackets may hide in strings, only these bound the depth.
    pub(super) untrusted_opens: usize,
    /// Where the last identifier-like run of bytes began and ended.
    pub(super) word: (usize, usize),
}

impl<'s> Scanner<'s> {
    pub(super) fn new(src: &'s [u8]) -> Self {
        Scanner {
            src,
            pos: 0,
            shape: Shape::default(),
            trusted: true,
            groups: Vec::new(),
            ternaries: 0,
            untrusted_opens: 0,
            word: (usize::MAX, usize::MAX),
        }
    }

    pub(super) fn peek(&self, offset: usize) -> Option<u8> {
        self.src.get(self.pos + offset).copied()
    }

    pub(super) fn run(mut self) -> Shape {
        while let Some(c) = self.peek(0) {
            self.step(c);
            let depth = self.groups.len() + self.ternaries + self.untrusted_opens;
            self.shape.depth = self.shape.depth.max(depth);
        }
        self.shape
    }

    pub(super) fn op(&mut self, len: usize) {
        self.shape.operators += 1;
        self.pos += len;
    }

    pub(super) fn open(&mut self) {
        if self.trusted {
            self.groups.push(0);
        } else {
            self.untrusted_opens += 1;
        }
    }

    pub(super) fn step(&mut self, c: u8) {
        let next = self.peek(1);
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => self.pos += 1,
            b'/' if next == Some(b'/') && self.trusted => {
                while self.peek(0).is_some_and(|c| c != b'\n') {
                    self.pos += 1;
                }
            }
            b'"' | b'\'' if self.trusted => match self.string(c) {
                Some(end) => self.pos = end,
                None => self.distrust(),
            },
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => self.word(),
            b'=' | b'!' | b'<' | b'>' if next == Some(b'=') => self.op(2),
            b'&' if next == Some(b'&') => self.op(2),
            b'|' if next == Some(b'|') => self.op(2),
            b'+' => {
                self.shape.pluses += 1;
                self.op(1);
            }
            b'-' | b'*' | b'/' | b'%' | b'!' | b'<' | b'>' | b'.' => self.op(1),
            b'?' => {
                if let Some(last) = self.groups.last_mut() {
                    *last += 1;
                }
                self.ternaries += 1;
                self.op(1);
            }
            b'[' => {
                self.open();
                self.op(1);
            }
            b'(' | b'{' => {
                self.open();
                self.pos += 1;
            }
            b')' | b']' | b'}' => {
                if self.trusted && !self.groups.is_empty() {
                    let inner = self.groups.pop().unwrap_or(0);
                    self.ternaries -= inner;
                }
                self.pos += 1;
            }
            b',' => {
                self.shape.commas += 1;
                self.pos += 1;
            }
            b':' => self.pos += 1,
            _ if !self.trusted => {
                // Stray `=`, `&`, `|` still count: they may pair up with
                // bytes the real lexer reads differently.
                if matches!(c, b'=' | b'&' | b'|') {
                    self.shape.operators += 1;
                }
                self.pos += 1;
            }
            _ => {
                // A byte that starts no CEL token: the real lexer drops it and
                // possibly the next one, so from here on the views may differ.
                self.distrust();
            }
        }
    }

    pub(super) fn distrust(&mut self) {
        if self.trusted {
            self.trusted = false;
            // Keep the depth reached so far; from now on count every opening.
            self.untrusted_opens = self.groups.len() + self.ternaries;
            self.groups.clear();
            self.ternaries = 0;
        }
        self.pos += 1;
    }

    /// An identifier, keyword or number: only `in` is an operator.
    pub(super) fn word(&mut self) {
        let start = self.pos;
        while self
            .peek(0)
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            self.pos += 1;
        }
        let run = &self.src[start..self.pos];
        // A run starting with a letter is one token. One starting with a digit
        // may be numbers followed by one identifier or keyword, which then
        // ends the run: `1in` is `1` and `in`.
        let starts_with_digit = run.first().is_some_and(u8::is_ascii_digit);
        let is_in = run == b"in" || (starts_with_digit && run.ends_with(b"in"));
        if is_in {
            self.shape.operators += 1;
        }
        self.word = (start, self.pos);
    }

    /// The end of the string literal starting at the quote at `self.pos`, if
    /// it is one the real lexer reads the same way.
    pub(super) fn string(&self, quote: u8) -> Option<usize> {
        let start = self.pos;
        let raw = if self.word.1 == start {
            match &self.src[self.word.0..self.word.1] {
                b"r" | b"R" | b"br" | b"bR" | b"Br" | b"BR" => Some(true),
                run if run.ends_with(b"r") || run.ends_with(b"R") => None,
                _ => Some(false),
            }
        } else {
            Some(false)
        };
        let triple = self.src[start..].starts_with(&[quote; 3]);
        let mut i = start + if triple { 3 } else { 1 };
        loop {
            let c = *self.src.get(i)?;
            if triple && self.src[i..].starts_with(&[quote; 3]) {
                return Some(i + 3);
            }
            if !triple && c == quote {
                return Some(i + 1);
            }
            if !triple && (c == b'\n' || c == b'\r') {
                return None;
            }
            if c == b'\\' {
                // Whether a backslash escapes depends on rawness.
                if raw? {
                    i += 1;
                } else {
                    i += escape_len(&self.src[i..])?;
                }
                continue;
            }
            i += 1;
        }
    }
}

/// The length of the valid escape sequence at the start of `s`, which begins
/// with a backslash.
pub(super) fn escape_len(s: &[u8]) -> Option<usize> {
    let hex = |range: std::ops::Range<usize>| {
        s.get(range.clone())
            .filter(|d| d.len() == range.len() && d.iter().all(u8::is_ascii_hexdigit))
            .map(|_| range.end)
    };
    match s.get(1)? {
        b'a' | b'b' | b'f' | b'n' | b'r' | b't' | b'v' | b'"' | b'\'' | b'\\' | b'?' | b'`' => {
            Some(2)
        }
        b'0'..=b'3' => {
            let octal = |i: usize| s.get(i).is_some_and(|c| (b'0'..=b'7').contains(c));
            (octal(2) && octal(3)).then_some(4)
        }
        b'x' | b'X' => hex(2..4),
        b'u' => hex(2..6),
        b'U' => hex(2..10),
        _ => None,
    }
}
