//! `check --self-test`: the checker run on histories with one planted
//! anomaly each, and on a clean one. Each planted anomaly must be reported
//! by its own invariant and by the linearizability search; the clean
//! history must pass.

use crate::checker::{self, Anomaly, Limits};
use crate::history::{Function, Operation, Outcome};

pub struct Planted {
    pub name: &'static str,
    /// None: the clean history, which must pass.
    pub expect: Option<Anomaly>,
    pub ops: Vec<Operation>,
}

/// A small builder: operations on one key, numbered in order.
struct H {
    scenario: &'static str,
    ops: Vec<Operation>,
}

impl H {
    fn new(scenario: &'static str) -> Self {
        H {
            scenario,
            ops: Vec::new(),
        }
    }

    fn push(
        mut self,
        client: u32,
        f: Function,
        value: Option<&str>,
        invoke: u64,
        complete: Option<u64>,
        outcome: Outcome,
    ) -> Self {
        self.ops.push(Operation {
            id: self.ops.len() as u64,
            client,
            scenario: self.scenario.into(),
            key: "k".into(),
            f,
            value: value.map(String::from),
            invoke,
            complete,
            outcome,
        });
        self
    }

    fn write(self, client: u32, v: &str, invoke: u64, complete: u64) -> Self {
        self.push(
            client,
            Function::Write,
            Some(v),
            invoke,
            Some(complete),
            Outcome::Ok,
        )
    }

    fn write_unknown(self, client: u32, v: &str, invoke: u64) -> Self {
        self.push(
            client,
            Function::Write,
            Some(v),
            invoke,
            None,
            Outcome::Unknown,
        )
    }

    fn read(self, client: u32, v: Option<&str>, invoke: u64, complete: u64) -> Self {
        self.push(
            client,
            Function::Read,
            v,
            invoke,
            Some(complete),
            Outcome::Ok,
        )
    }
}

pub fn planted() -> Vec<Planted> {
    vec![
        Planted {
            name: "clean history (concurrent writes, an unknown write seen late)",
            expect: None,
            ops: H::new("clean")
                .write(1, "a", 0, 10)
                .write(2, "b", 5, 30)
                .read(3, Some("a"), 12, 14)
                .read(4, Some("b"), 20, 25)
                .write_unknown(1, "c", 40)
                .read(3, Some("b"), 50, 55)
                .read(4, Some("c"), 60, 65)
                .ops,
        },
        Planted {
            name: "an acknowledged write lost",
            expect: Some(Anomaly::LostWrite),
            ops: H::new("lost")
                .write(1, "a", 0, 10)
                .write(2, "b", 20, 30)
                .read(4, Some("b"), 35, 38)
                .read(3, Some("a"), 40, 50)
                .ops,
        },
        Planted {
            name: "a stale read after an acknowledged write",
            expect: Some(Anomaly::StaleRead),
            ops: H::new("stale")
                .write(1, "a", 0, 10)
                .write(2, "b", 20, 30)
                .read(3, Some("a"), 40, 50)
                .read(4, Some("b"), 60, 70)
                .ops,
        },
        Planted {
            name: "a value never written",
            expect: Some(Anomaly::NeverWritten),
            ops: H::new("never")
                .write(1, "a", 0, 10)
                .read(3, Some("zzz"), 20, 30)
                .read(4, Some("a"), 40, 50)
                .ops,
        },
        Planted {
            name: "a non-monotonic read",
            expect: Some(Anomaly::NonMonotonicRead),
            // The write of b is still in flight when client 5 reads twice:
            // either value is fine alone, but not b and then a.
            ops: H::new("monotonic")
                .write(1, "a", 0, 10)
                .write(2, "b", 20, 100)
                .read(5, Some("b"), 30, 40)
                .read(5, Some("a"), 50, 60)
                .read(4, Some("b"), 110, 120)
                .ops,
        },
    ]
}

/// Runs the self-test, printing one line per history; Err names what was
/// missed.
pub fn run() -> anyhow::Result<()> {
    let mut missed = Vec::new();
    for p in planted() {
        let report = checker::check(&p.ops, Limits::default())?;
        let found: Vec<&str> = report.violations.iter().map(|v| v.anomaly.name()).collect();
        let ok = match p.expect {
            None => report.passed(),
            Some(a) => report.has(a) && report.has(Anomaly::NotLinearizable),
        };
        let expect = p.expect.map(Anomaly::name).unwrap_or("no violation");
        println!(
            "{} {:<58} expected {:<20} reported [{}]",
            if ok { "ok  " } else { "MISS" },
            p.name,
            expect,
            found.join(", ")
        );
        for v in &report.violations {
            println!("       {}: {}", v.anomaly.name(), v.message);
        }
        if !ok {
            missed.push(p.name);
        }
    }
    if missed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("the checker missed: {}", missed.join("; "))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn self_test_catches_every_planted_anomaly() {
        super::run().unwrap();
    }

    #[test]
    fn each_anomaly_is_planted() {
        let planted: Vec<_> = super::planted().iter().filter_map(|p| p.expect).collect();
        for a in super::Anomaly::ALL {
            if a != super::Anomaly::NotLinearizable {
                assert!(planted.contains(&a), "{} is not planted", a.name());
            }
        }
    }
}
