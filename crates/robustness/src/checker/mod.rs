//! Checks a history of register operations: per key, linearizability
//! against a register model (the complete check), and the cheaper
//! invariants that name what went wrong (an acknowledged write lost, a
//! stale read, a value never written, a client's reads going back).
//!
//! Keys are independent registers, and linearizability is local (a history
//! is linearizable iff each object's sub-history is), so the search runs per
//! key. Values must be distinct per key: a read then names the one write it
//! saw.

pub mod linearizable;

use std::collections::{BTreeMap, HashMap};

use anyhow::bail;
use serde::Serialize;

use crate::history::{Function, Operation, Outcome};
use linearizable::{RegisterKind, RegisterOp, Verdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Anomaly {
    /// The final read of a key shows a state from before an acknowledged
    /// write.
    LostWrite,
    /// A read that started after a write was acknowledged returned a value
    /// from before it.
    StaleRead,
    /// A read returned a value no write (that may have happened) wrote.
    NeverWritten,
    /// A client read a value older than one it had read before.
    NonMonotonicRead,
    /// No order of the operations explains the history.
    NotLinearizable,
}

impl Anomaly {
    pub const ALL: [Anomaly; 5] = [
        Anomaly::LostWrite,
        Anomaly::StaleRead,
        Anomaly::NeverWritten,
        Anomaly::NonMonotonicRead,
        Anomaly::NotLinearizable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Anomaly::LostWrite => "lost-write",
            Anomaly::StaleRead => "stale-read",
            Anomaly::NeverWritten => "never-written",
            Anomaly::NonMonotonicRead => "non-monotonic-read",
            Anomaly::NotLinearizable => "not-linearizable",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub anomaly: Anomaly,
    pub scenario: String,
    pub key: String,
    /// The operations involved, the offending one first.
    pub ops: Vec<u64>,
    pub message: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub operations: usize,
    pub keys: usize,
    pub violations: Vec<Violation>,
    /// Keys whose linearizability search ran out of steps: neither proven
    /// nor refuted.
    pub undecided: Vec<String>,
}

impl Report {
    pub fn has(&self, anomaly: Anomaly) -> bool {
        self.violations.iter().any(|v| v.anomaly == anomaly)
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.undecided.is_empty()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Steps of the linearizability search per key before it gives up.
    pub max_steps_per_key: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps_per_key: 2_000_000,
        }
    }
}

/// Checks every key of `ops`. Fails only on a history the checker cannot
/// judge (a value written twice to one key).
pub fn check(ops: &[Operation], limits: Limits) -> anyhow::Result<Report> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut report = Report {
        operations: ops.len(),
        keys: by_key.len(),
        ..Default::default()
    };
    for (key, ops) in by_key {
        check_key(key, &ops, limits, &mut report)?;
    }
    Ok(report)
}

fn check_key(
    key: &str,
    ops: &[&Operation],
    limits: Limits,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut writes: HashMap<&str, &Operation> = HashMap::new();
    for op in ops.iter().filter(|o| o.f == Function::Write) {
        let Some(v) = op.value.as_deref() else {
            bail!("operation {}: a write without a value", op.id);
        };
        if writes.insert(v, op).is_some() {
            bail!(
                "key {key}: value {v:?} is written twice; the checker needs distinct values per key"
            );
        }
    }
    let mut reads: Vec<&Operation> = ops
        .iter()
        .copied()
        .filter(|o| o.f == Function::Read && o.outcome == Outcome::Ok)
        .collect();
    reads.sort_by_key(|r| r.invoke);
    let scenario = ops.first().map(|o| o.scenario.clone()).unwrap_or_default();
    let mut violation = |anomaly, ops: Vec<u64>, message: String| {
        report.violations.push(Violation {
            anomaly,
            scenario: scenario.clone(),
            key: key.to_string(),
            ops,
            message,
        })
    };

    // The write a read saw, when it may have happened before the read ended.
    let source = |r: &Operation| -> Option<&Operation> {
        let w = writes.get(r.value.as_deref()?)?;
        (w.outcome != Outcome::Fail && w.invoke <= r.complete.unwrap_or(u64::MAX)).then_some(*w)
    };

    for r in &reads {
        if let Some(v) = r.value.as_deref()
            && source(r).is_none()
        {
            let why = match writes.get(v) {
                None => "no client wrote it".to_string(),
                Some(w) if w.outcome == Outcome::Fail => {
                    format!("its write (op {}) failed", w.id)
                }
                Some(w) => format!("its write (op {}) started only after the read", w.id),
            };
            violation(
                Anomaly::NeverWritten,
                vec![r.id],
                format!("op {} read {v:?}, but {why}", r.id),
            );
        }
    }

    // A read that started after write `w` was acknowledged must not see a
    // state definitely older than `w`: unset, or a write acknowledged
    // before `w` started.
    let last = reads.last().map(|r| r.id);
    for r in &reads {
        let seen = source(r);
        if r.value.is_some() && seen.is_none() {
            continue;
        }
        let older = ops
            .iter()
            .filter(|w| w.f == Function::Write && w.outcome == Outcome::Ok && w.precedes(r))
            .filter(|w| seen.is_none_or(|s| s.precedes(w)))
            .max_by_key(|w| w.complete);
        if let Some(w) = older {
            let shown = r.value.as_deref().unwrap_or("<unset>");
            let (anomaly, what) = if Some(r.id) == last {
                (Anomaly::LostWrite, "the final read")
            } else {
                (Anomaly::StaleRead, "a read")
            };
            violation(
                anomaly,
                vec![r.id, w.id],
                format!(
                    "{what} (op {}) returned {shown:?} after the write of {:?} (op {}) was acknowledged",
                    r.id,
                    w.value.as_deref().unwrap_or(""),
                    w.id
                ),
            );
        }
    }

    let mut per_client: BTreeMap<u32, Vec<&Operation>> = BTreeMap::new();
    for r in &reads {
        per_client.entry(r.client).or_default().push(r);
    }
    for (client, rs) in per_client {
        for pair in rs.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if !a.precedes(b) {
                continue;
            }
            let Some(wa) = source(a) else { continue };
            let went_back = match (b.value.as_deref(), source(b)) {
                (None, _) => true,
                (Some(_), Some(wb)) => wb.precedes(wa),
                (Some(_), None) => false,
            };
            if went_back {
                violation(
                    Anomaly::NonMonotonicRead,
                    vec![b.id, a.id],
                    format!(
                        "client {client} read {:?} (op {}) after it had read the newer {:?} (op {})",
                        b.value.as_deref().unwrap_or("<unset>"),
                        b.id,
                        a.value.as_deref().unwrap_or(""),
                        a.id
                    ),
                );
            }
        }
    }

    // The complete check. Failed writes did not happen; unknown writes that
    // no read saw may be taken as not having happened either (leaving out a
    // write nobody read keeps any order legal), which keeps the search small.
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut intern = |v: &str| -> u32 {
        let n = ids.len() as u32;
        *ids.entry(v.to_string()).or_insert(n)
    };
    let read_values: std::collections::HashSet<&str> =
        reads.iter().filter_map(|r| r.value.as_deref()).collect();
    let mut model: Vec<RegisterOp> = Vec::new();
    let mut origin: Vec<&Operation> = Vec::new();
    for op in ops {
        let kind = match (op.f, op.outcome) {
            (Function::Write, Outcome::Ok) => {
                RegisterKind::Write(intern(op.value.as_deref().unwrap_or("")))
            }
            (Function::Write, Outcome::Unknown)
                if op.value.as_deref().is_some_and(|v| read_values.contains(v)) =>
            {
                RegisterKind::Write(intern(op.value.as_deref().unwrap_or("")))
            }
            (Function::Read, Outcome::Ok) => {
                RegisterKind::Read(op.value.as_deref().map(&mut intern))
            }
            _ => continue,
        };
        model.push(RegisterOp {
            kind,
            invoke: op.invoke,
            complete: if op.outcome == Outcome::Ok {
                op.complete
            } else {
                None
            },
        });
        origin.push(op);
    }
    match linearizable::check(&model, limits.max_steps_per_key) {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable { op, linearized } => {
            let o = origin[op];
            let what = match o.f {
                Function::Write => format!("write of {:?}", o.value.as_deref().unwrap_or("")),
                Function::Read => format!(
                    "read returning {:?}",
                    o.value.as_deref().unwrap_or("<unset>")
                ),
            };
            violation(
                Anomaly::NotLinearizable,
                vec![o.id],
                format!(
                    "no order of the operations explains op {} ({what}); the longest legal \
                     prefix found has {linearized} operations",
                    o.id
                ),
            );
        }
        Verdict::Undecided { steps } => {
            tracing::warn!(key, steps, "linearizability search gave up");
            report.undecided.push(key.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
