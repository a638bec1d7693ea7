//! Quoting user-supplied values in error messages and logs.
//!
//! A status message that echoes its input whole can outgrow what clients
//! accept in `grpc-message` (a 1 MiB label value once came back whole, and
//! the caller saw a protocol error instead of INVALID_ARGUMENT), and a log
//! line that does can fill the log. Every message that names something a
//! caller sent quotes it through [`quote`]: escaped, and cut to a short
//! prefix that still identifies it.

use std::fmt;

/// How many characters of a value are quoted.
pub const QUOTED_CHARS: usize = 64;

/// `value` as a short, escaped, quoted prefix: `"abc"` when it is short,
/// `"abcd…" (1048576 bytes)` when it is not.
pub fn quote(value: &str) -> Quoted<'_> {
    Quoted(value)
}

/// Bytes quoted the same way, as text where they are UTF-8 and as hex
/// otherwise.
pub fn quote_bytes(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(s) => quote(s).to_string(),
        Err(_) => {
            let shown = value.len().min(QUOTED_CHARS / 2);
            let mut out = format!("0x{}", hex(&value[..shown]));
            if shown < value.len() {
                out.push_str(&format!("… ({} bytes)", value.len()));
            }
            out
        }
    }
}

/// How much of a library's error text is kept when it may embed the input
/// it failed on (a regexp parser's message quotes the pattern).
pub const CUT_CHARS: usize = 256;

/// `text` cut to [`CUT_CHARS`] characters, marked when cut.
pub fn cut(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(CUT_CHARS) {
        None => text.into(),
        Some((at, _)) => format!("{}… ({} bytes, cut)", &text[..at], text.len()).into(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// See [`quote`].
#[derive(Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(QUOTED_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

impl fmt::Debug for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole_and_escaped() {
        assert_eq!(quote("zone").to_string(), r#""zone""#);
        assert_eq!(quote("a\"b\n").to_string(), r#""a\"b\n""#);
        assert_eq!(quote("").to_string(), r#""""#);
    }

    #[test]
    fn long_values_are_cut_to_a_prefix_with_their_length() {
        let long = "é".repeat(1 << 19);
        let q = quote(&long).to_string();
        assert!(q.len() < 200, "{q}");
        assert!(q.starts_with("\"éé"), "{q}");
        assert!(q.ends_with("(1048576 bytes)"), "{q}");
        // Escapes cannot make it long: every character is escaped here.
        let nasty = "\u{0}".repeat(100_000);
        assert!(quote(&nasty).to_string().len() < 600);
    }

    #[test]
    fn bytes_are_text_or_hex() {
        assert_eq!(quote_bytes(b"ticket"), r#""ticket""#);
        assert_eq!(quote_bytes(&[0xff, 0x00]), "0xff00");
        let long = vec![0xffu8; 1000];
        let q = quote_bytes(&long);
        assert!(q.ends_with("(1000 bytes)") && q.len() < 100, "{q}");
    }
}
