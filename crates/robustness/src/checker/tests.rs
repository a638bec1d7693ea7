//! Property tests: histories made from a sequential run (every operation
//! takes effect at a point inside its interval) pass; planting an anomaly in
//! one makes it fail.

use proptest::prelude::*;

use super::*;
use crate::history::{Function, Operation, Outcome};

/// One step of a sequential run: (is a write, client, key, slack before
/// the effect, slack after it, outcome hidden).
type Step = (bool, u32, u8, u64, u64, bool);

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            any::<bool>(),
            0u32..5,
            0u8..3,
            0u64..60,
            0u64..60,
            prop::bool::weighted(0.2),
        ),
        1..80,
    )
}

/// Runs the steps against real registers, one effect every 10 ns; each
/// operation's interval contains its effect, so intervals overlap and the
/// history is linearizable by construction. Some writes come out unknown
/// (they happened, the client never heard); some unknown writes never
/// happened at all.
fn sequential_history(steps: &[Step]) -> Vec<Operation> {
    let mut state: HashMap<String, String> = HashMap::new();
    let mut ops = Vec::new();
    for (i, &(write, client, key, before, after, hidden)) in steps.iter().enumerate() {
        let at = 100 + 10 * i as u64;
        let key = format!("k{key}");
        let id = ops.len() as u64;
        let (value, outcome, complete) = if write {
            let v = format!("v{i}");
            state.insert(key.clone(), v.clone());
            if hidden {
                (Some(v), Outcome::Unknown, None)
            } else {
                (Some(v), Outcome::Ok, Some(at + after))
            }
        } else {
            (state.get(&key).cloned(), Outcome::Ok, Some(at + after))
        };
        ops.push(Operation {
            id,
            client,
            scenario: "prop".into(),
            key: key.clone(),
            f: if write {
                Function::Write
            } else {
                Function::Read
            },
            value,
            invoke: at - before,
            complete,
            outcome,
        });
        if write && hidden && i % 2 == 0 {
            // An unknown write that never took effect.
            ops.push(Operation {
                id: id + 1,
                client,
                scenario: "prop".into(),
                key,
                f: Function::Write,
                value: Some(format!("never{i}")),
                invoke: at,
                complete: None,
                outcome: Outcome::Unknown,
            });
        }
    }
    ops
}

fn read(id: u64, key: &str, value: Option<&str>, invoke: u64, complete: u64) -> Operation {
    Operation {
        id,
        client: 99,
        scenario: "prop".into(),
        key: key.into(),
        f: Function::Read,
        value: value.map(String::from),
        invoke,
        complete: Some(complete),
        outcome: Outcome::Ok,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn histories_of_sequential_runs_pass(steps in steps()) {
        let ops = sequential_history(&steps);
        let report = check(&ops, Limits::default()).unwrap();
        prop_assert!(report.passed(), "{:#?}", report.violations);
    }

    #[test]
    fn a_planted_stale_read_fails(steps in steps(), pick in any::<prop::sample::Index>()) {
        let mut ops = sequential_history(&steps);
        // Two acknowledged writes of one key, the first acknowledged before
        // the second began; a read after the second returns the first.
        let pairs: Vec<(usize, usize)> = (0..ops.len())
            .flat_map(|a| (0..ops.len()).map(move |b| (a, b)))
            .filter(|&(a, b)| {
                let (wa, wb) = (&ops[a], &ops[b]);
                wa.f == Function::Write && wb.f == Function::Write
                    && wa.outcome == Outcome::Ok && wb.outcome == Outcome::Ok
                    && wa.key == wb.key && wa.precedes(wb)
            })
            .collect();
        prop_assume!(!pairs.is_empty());
        let (a, b) = pairs[pick.index(pairs.len())];
        let at = ops[b].complete.unwrap() + 1;
        let (key, old) = (ops[a].key.clone(), ops[a].value.clone());
        ops.push(read(10_000, &key, old.as_deref(), at, at + 5));
        let report = check(&ops, Limits::default()).unwrap();
        prop_assert!(report.has(Anomaly::NotLinearizable), "{:#?}", report);
        prop_assert!(
            report.has(Anomaly::StaleRead) || report.has(Anomaly::LostWrite),
            "{:#?}", report
        );
    }

    #[test]
    fn a_planted_value_never_written_fails(steps in steps(), at in 0u64..1000) {
        let mut ops = sequential_history(&steps);
        let key = ops[0].key.clone();
        ops.push(read(10_000, &key, Some("nobody-wrote-this"), at, at + 5));
        let report = check(&ops, Limits::default()).unwrap();
        prop_assert!(report.has(Anomaly::NeverWritten), "{:#?}", report);
        prop_assert!(report.has(Anomaly::NotLinearizable), "{:#?}", report);
    }
}

#[test]
fn values_written_twice_are_refused() {
    let w = |id| Operation {
        id,
        client: 0,
        scenario: "s".into(),
        key: "k".into(),
        f: Function::Write,
        value: Some("same".into()),
        invoke: id,
        complete: Some(id + 1),
        outcome: Outcome::Ok,
    };
    assert!(check(&[w(0), w(5)], Limits::default()).is_err());
}

#[test]
fn a_stopped_read_is_reported_as_lost_only_at_the_end() {
    let ops = vec![
        Operation {
            id: 0,
            client: 1,
            scenario: "s".into(),
            key: "k".into(),
            f: Function::Write,
            value: Some("a".into()),
            invoke: 0,
            complete: Some(10),
            outcome: Outcome::Ok,
        },
        read(1, "k", None, 20, 30),
        read(2, "k", None, 40, 50),
    ];
    let report = check(&ops, Limits::default()).unwrap();
    let kinds: Vec<_> = report.violations.iter().map(|v| v.anomaly).collect();
    assert!(kinds.contains(&Anomaly::StaleRead), "{kinds:?}");
    assert!(kinds.contains(&Anomaly::LostWrite), "{kinds:?}");
}
