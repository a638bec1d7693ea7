//! The recorded history: one event when a client invokes an operation and
//! one when it learns the outcome, as JSON lines.
//!
//! An operation whose outcome the client cannot know (a timeout, a
//! connection cut mid-call, an error the server may have raised after
//! committing) completes as `unknown`; one with no completion event at all
//! (the recorder stopped first) is unknown too. Times are nanoseconds on one
//! monotonic clock, from the start of the run.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// What happened to an operation, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Invoke,
    /// Done, with this result.
    Ok,
    /// Definitely not done (the server refused it before acting).
    Fail,
    /// Maybe done, maybe not.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Function {
    Write,
    Read,
}

/// One line of a history file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub op: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub client: u32,
    pub scenario: String,
    pub f: Function,
    pub key: String,
    /// On a write's events: the value written. On a read's `ok`: the value
    /// read (absent: the key was not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub time_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An operation with its outcome, paired from its events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub id: u64,
    pub client: u32,
    pub scenario: String,
    pub key: String,
    pub f: Function,
    /// Written, or read (None: not set).
    pub value: Option<String>,
    pub invoke: u64,
    /// None while unknown: the operation may take effect at any time after
    /// its invocation, or never.
    pub complete: Option<u64>,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Fail,
    Unknown,
}

impl Operation {
    /// Whether `self` was acknowledged before `other` was invoked, so any
    /// linearization orders it first.
    pub fn precedes(&self, other: &Operation) -> bool {
        self.complete.is_some_and(|c| c < other.invoke)
    }
}

/// Pairs invocations with completions. Fails on a history that cannot have
/// come from a recorder: a completion without an invocation, two of either,
/// or a completion before its invocation.
pub fn operations(events: &[Event]) -> anyhow::Result<Vec<Operation>> {
    let mut ops: BTreeMap<u64, Operation> = BTreeMap::new();
    let mut completed = std::collections::HashSet::new();
    for e in events {
        match e.kind {
            EventType::Invoke => {
                let op = Operation {
                    id: e.op,
                    client: e.client,
                    scenario: e.scenario.clone(),
                    key: e.key.clone(),
                    f: e.f,
                    value: if e.f == Function::Write {
                        e.value.clone()
                    } else {
                        None
                    },
                    invoke: e.time_ns,
                    complete: None,
                    outcome: Outcome::Unknown,
                };
                if ops.insert(e.op, op).is_some() {
                    bail!("operation {} is invoked twice", e.op);
                }
            }
            kind => {
                let Some(op) = ops.get_mut(&e.op) else {
                    bail!("operation {} completes without being invoked", e.op);
                };
                if !completed.insert(e.op) {
                    bail!("operation {} completes twice", e.op);
                }
                if e.time_ns < op.invoke {
                    bail!("operation {} completes before it was invoked", e.op);
                }
                match kind {
                    EventType::Ok => {
                        op.outcome = Outcome::Ok;
                        op.complete = Some(e.time_ns);
                        if op.f == Function::Read {
                            op.value = e.value.clone();
                        }
                    }
                    EventType::Fail => {
                        op.outcome = Outcome::Fail;
                        op.complete = Some(e.time_ns);
                    }
                    EventType::Unknown | EventType::Invoke => {}
                }
            }
        }
    }
    Ok(ops.into_values().collect())
}

pub fn read_file(path: &Path) -> anyhow::Result<Vec<Event>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("opening history {}", path.display()))?;
    let mut events = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line).with_context(|| {
            let start: String = line.chars().take(60).collect();
            format!(
                "{} line {}: not a history event ({start:?}...)",
                path.display(),
                i + 1
            )
        })?;
        events.push(event);
    }
    Ok(events)
}

pub fn write_file(path: &Path, events: &[Event]) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("creating history {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for e in events {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    out.flush()
        .with_context(|| format!("writing history {}", path.display()))
}

/// Collects events from concurrent clients, on one clock.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderInner>>,
    start: Instant,
}

struct RecorderInner {
    next: u64,
    events: Vec<Event>,
}

/// An invoked operation; complete it with [`Recorder::complete`].
pub struct Pending {
    op: u64,
    client: u32,
    scenario: String,
    f: Function,
    key: String,
    value: Option<String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            inner: Arc::new(Mutex::new(RecorderInner {
                next: 0,
                events: Vec::new(),
            })),
            start: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn invoke(
        &self,
        client: u32,
        scenario: &str,
        f: Function,
        key: &str,
        value: Option<String>,
    ) -> Pending {
        let mut inner = self.lock();
        let op = inner.next;
        inner.next += 1;
        // The time is taken under the lock, so the file's order is the
        // clock's order.
        let time_ns = self.now_ns();
        inner.events.push(Event {
            op,
            kind: EventType::Invoke,
            client,
            scenario: scenario.to_string(),
            f,
            key: key.to_string(),
            value: value.clone(),
            time_ns,
            error: None,
        });
        Pending {
            op,
            client,
            scenario: scenario.to_string(),
            f,
            key: key.to_string(),
            value,
        }
    }

    /// `kind` is Ok, Fail or Unknown; `read` is the value a read returned.
    pub fn complete(
        &self,
        p: Pending,
        kind: EventType,
        read: Option<String>,
        error: Option<String>,
    ) {
        let mut inner = self.lock();
        let time_ns = self.now_ns();
        let value = match p.f {
            Function::Write => p.value,
            Function::Read => read,
        };
        inner.events.push(Event {
            op: p.op,
            kind,
            client: p.client,
            scenario: p.scenario,
            f: p.f,
            key: p.key,
            value,
            time_ns,
            error,
        });
    }

    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_events_and_round_trips_through_a_file() {
        let r = Recorder::new();
        let w = r.invoke(1, "s", Function::Write, "k", Some("a".into()));
        let rd = r.invoke(2, "s", Function::Read, "k", None);
        let lost = r.invoke(3, "s", Function::Write, "k", Some("b".into()));
        r.complete(w, EventType::Ok, None, None);
        r.complete(rd, EventType::Ok, Some("a".into()), None);
        let never = r.invoke(3, "s", Function::Write, "k", Some("c".into()));
        r.complete(lost, EventType::Unknown, None, Some("timeout".into()));
        let events = r.events();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("h.jsonl");
        write_file(&path, &events).unwrap();
        let back = read_file(&path).unwrap();
        assert_eq!(back, events);
        let ops = operations(&back).unwrap();
        assert_eq!(ops.len(), 4);
        assert_eq!(ops[0].outcome, Outcome::Ok);
        assert_eq!(ops[1].value.as_deref(), Some("a"));
        assert_eq!(ops[2].outcome, Outcome::Unknown);
        assert_eq!(ops[2].complete, None);
        assert_eq!(ops[3].id, never.op);
        assert_eq!(ops[3].complete, None, "no completion: unknown");
    }

    #[test]
    fn rejects_impossible_histories() {
        let r = Recorder::new();
        let w = r.invoke(1, "s", Function::Write, "k", Some("a".into()));
        r.complete(w, EventType::Ok, None, None);
        let mut events = r.events();
        events.push(events[1].clone());
        assert!(operations(&events).is_err(), "completed twice");
        let mut orphan = r.events();
        orphan.remove(0);
        assert!(operations(&orphan).is_err(), "never invoked");
    }
}
