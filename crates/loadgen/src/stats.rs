//! Latency summaries, error tallies and the units the report prints in.

use std::collections::BTreeMap;
use std::time::Duration;

/// Latency samples of one kind of operation.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    values: Vec<Duration>,
    sorted: bool,
}

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.values.push(d);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.values.sort_unstable();
            self.sorted = true;
        }
    }

    /// Nearest-rank percentile: with 10 samples p90 is the 9th smallest, an
    /// actually observed value rather than an interpolation.
    pub fn percentile(&mut self, p: f64) -> Option<Duration> {
        if self.values.is_empty() {
            return None;
        }
        self.sort();
        let n = self.values.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        Some(self.values[rank.clamp(1, n) - 1])
    }

    pub fn median(&mut self) -> Option<Duration> {
        self.percentile(50.0)
    }

    pub fn max(&mut self) -> Option<Duration> {
        self.percentile(100.0)
    }

    pub fn min(&mut self) -> Option<Duration> {
        self.sort();
        self.values.first().copied()
    }
}

/// Errors counted by message, so that 10,000 identical failures print as
/// one line with a count.
#[derive(Debug, Default)]
pub struct ErrorTally {
    total: u64,
    by_message: BTreeMap<String, u64>,
}

/// Distinct messages kept; beyond that they are only counted.
const DISTINCT_MESSAGES: usize = 20;

impl ErrorTally {
    pub fn add(&mut self, what: &str, message: &str) {
        self.total += 1;
        let key = format!("{what}: {}", redact_node_ids(message));
        if self.by_message.len() < DISTINCT_MESSAGES || self.by_message.contains_key(&key) {
            *self.by_message.entry(key).or_default() += 1;
        } else {
            *self
                .by_message
                .entry("(other messages)".into())
                .or_default() += 1;
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Most frequent first.
    pub fn messages(&self) -> Vec<(&str, u64)> {
        let mut v: Vec<_> = self
            .by_message
            .iter()
            .map(|(m, n)| (m.as_str(), *n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

/// Replaces node IDs (`metropolis-` + 32 hex digits) so that messages that
/// differ only in the node they name are counted together.
pub fn redact_node_ids(message: &str) -> String {
    const PREFIX: &str = metropolis_identity::NODE_ID_PREFIX;
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(PREFIX) {
        let after = &rest[at + PREFIX.len()..];
        let hex_len = after.bytes().take_while(|b| b.is_ascii_hexdigit()).count();
        out.push_str(&rest[..at]);
        if hex_len == 32 {
            out.push_str(PREFIX);
            out.push_str("<id>");
            rest = &after[32..];
        } else {
            out.push_str(PREFIX);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

pub fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

pub fn fmt_opt_duration(d: Option<Duration>) -> String {
    d.map(fmt_duration).unwrap_or_else(|| "-".into())
}

pub fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b < 1024.0 {
        format!("{b:.0} B")
    } else if b < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    }
}

/// Shell-quotes what needs it, so the printed command line can be pasted.
pub fn shell_join(args: impl IntoIterator<Item = String>) -> String {
    args.into_iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = Samples::default();
        for ms in (1..=10).rev() {
            s.push(Duration::from_millis(ms));
        }
        assert_eq!(s.median(), Some(Duration::from_millis(5)));
        assert_eq!(s.percentile(90.0), Some(Duration::from_millis(9)));
        assert_eq!(s.max(), Some(Duration::from_millis(10)));
        assert_eq!(s.min(), Some(Duration::from_millis(1)));
        assert_eq!(Samples::default().median(), None);
    }

    #[test]
    fn node_ids_are_redacted() {
        let id = format!("metropolis-{}", "ab".repeat(16));
        assert_eq!(
            redact_node_ids(&format!("node {id} was removed; metropolis-xyz")),
            "node metropolis-<id> was removed; metropolis-xyz"
        );
    }

    #[test]
    fn tally_groups_messages() {
        let mut t = ErrorTally::default();
        let a = format!("metropolis-{}", "01".repeat(16));
        let b = format!("metropolis-{}", "02".repeat(16));
        t.add("RegisterNode", &format!("{a} refused"));
        t.add("RegisterNode", &format!("{b} refused"));
        t.add("CommitNode", "boom");
        assert_eq!(t.total(), 3);
        assert_eq!(
            t.messages(),
            vec![
                ("RegisterNode: metropolis-<id> refused", 2),
                ("CommitNode: boom", 1)
            ]
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(
            shell_join(["a".to_string(), "b c".into(), "it's".into()]),
            r"a 'b c' 'it'\''s'"
        );
    }
}
