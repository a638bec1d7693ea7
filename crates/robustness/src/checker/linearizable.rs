//! Linearizability of one register's history: the Wing–Gong search with
//! Lowe's memoization, as Porcupine runs it.
//!
//! Operations are a doubly linked list of call and return entries in time
//! order. The search walks it, linearizing the first call whose operation
//! the model accepts in the current state (lifting its call and return out
//! of the list), and backtracks when it meets the return of an operation it
//! has not linearized: that operation had to take effect before now. A
//! (linearized set, state) pair seen before is not searched again.
//!
//! Unknown operations have their return at infinity: they may take effect
//! anywhere after their call. Reaching such a return means every operation
//! with a known outcome is linearized; the pending writes can all go last
//! (after everything, no read sees them), so the history is linearizable.

use std::collections::HashSet;

/// One operation on the register, with values as small integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterOp {
    pub kind: RegisterKind,
    pub invoke: u64,
    /// None: unknown outcome.
    pub complete: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterKind {
    Write(u32),
    /// What the read returned (None: not set).
    Read(Option<u32>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// `op` (an index into the input) could not be placed; `linearized`
    /// operations were at most placed before it.
    NotLinearizable {
        op: usize,
        linearized: usize,
    },
    /// The search took more than its step budget.
    Undecided {
        steps: u64,
    },
}

type State = Option<u32>;

/// The register: a write sets it, a read must see what is set.
fn step(state: State, op: RegisterKind) -> Option<State> {
    match op {
        RegisterKind::Write(v) => Some(Some(v)),
        RegisterKind::Read(r) => (r == state).then_some(state),
    }
}

#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    call: bool,
    /// For a call: the index of its return entry.
    partner: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// Checks `ops` against a register that starts unset, in at most
/// `max_steps` steps of the search.
pub fn check(ops: &[RegisterOp], max_steps: u64) -> Verdict {
    if ops.is_empty() {
        return Verdict::Linearizable;
    }
    // Entries 1.. are calls and returns; entry 0 is the list head.
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        order.push((op.invoke, true, i));
        order.push((op.complete.unwrap_or(u64::MAX), false, i));
    }
    // Calls before returns at the same instant: operations that touch in
    // time are taken as concurrent, the permissive reading.
    order.sort_by_key(|&(t, call, i)| (t, !call, i));
    let mut entries = Vec::with_capacity(order.len() + 1);
    entries.push(Entry {
        op: NIL,
        call: false,
        partner: NIL,
        prev: NIL,
        next: 1,
    });
    let mut return_at = vec![0usize; ops.len()];
    for (pos, &(_, call, op)) in order.iter().enumerate() {
        let idx = pos + 1;
        entries.push(Entry {
            op,
            call,
            partner: NIL,
            prev: idx - 1,
            next: if pos + 1 == order.len() { NIL } else { idx + 1 },
        });
        if !call {
            return_at[op] = idx;
        }
    }
    for e in entries.iter_mut().skip(1) {
        if e.call {
            e.partner = return_at[e.op];
        }
    }

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Box<[u64]>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut steps = 0u64;
    let mut deepest = (0usize, NIL);

    let unlink = |entries: &mut Vec<Entry>, i: usize| {
        let (p, n) = (entries[i].prev, entries[i].next);
        entries[p].next = n;
        if n != NIL {
            entries[n].prev = p;
        }
    };
    let relink = |entries: &mut Vec<Entry>, i: usize| {
        let (p, n) = (entries[i].prev, entries[i].next);
        entries[p].next = i;
        if n != NIL {
            entries[n].prev = i;
        }
    };

    let mut cur = entries[0].next;
    loop {
        if cur == NIL {
            return Verdict::Linearizable;
        }
        steps += 1;
        if steps > max_steps {
            return Verdict::Undecided { steps: max_steps };
        }
        let e = entries[cur];
        if e.call {
            if let Some(next_state) = step(state, ops[e.op].kind) {
                set(&mut linearized, e.op, true);
                if cache.insert((linearized.clone().into_boxed_slice(), next_state)) {
                    stack.push((cur, state));
                    state = next_state;
                    // Lift the call and its return (dancing links: undone
                    // in reverse order on backtracking).
                    unlink(&mut entries, cur);
                    unlink(&mut entries, e.partner);
                    cur = entries[0].next;
                    continue;
                }
                set(&mut linearized, e.op, false);
            }
            cur = e.next;
        } else {
            if ops[e.op].complete.is_none() {
                return Verdict::Linearizable;
            }
            if deepest.1 == NIL || stack.len() > deepest.0 {
                deepest = (stack.len(), e.op);
            }
            let Some((call, prev_state)) = stack.pop() else {
                return Verdict::NotLinearizable {
                    op: deepest.1,
                    linearized: deepest.0,
                };
            };
            let c = entries[call];
            relink(&mut entries, c.partner);
            relink(&mut entries, call);
            set(&mut linearized, c.op, false);
            state = prev_state;
            cur = c.next;
        }
    }
}

fn set(bits: &mut [u64], i: usize, on: bool) {
    let (w, b) = (i / 64, i % 64);
    if on {
        bits[w] |= 1 << b;
    } else {
        bits[w] &= !(1 << b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegisterKind::{Read, Write};

    fn op(kind: RegisterKind, invoke: u64, complete: Option<u64>) -> RegisterOp {
        RegisterOp {
            kind,
            invoke,
            complete,
        }
    }

    #[test]
    fn sequential_and_concurrent_histories() {
        let ok = [
            op(Write(1), 0, Some(10)),
            op(Read(Some(1)), 11, Some(12)),
            op(Write(2), 13, Some(30)),
            // Concurrent with the write of 2: may see either.
            op(Read(Some(1)), 14, Some(15)),
            op(Read(Some(2)), 16, Some(17)),
            op(Read(Some(2)), 31, Some(32)),
        ];
        assert_eq!(check(&ok, 1000), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_is_not_linearizable() {
        let h = [
            op(Write(1), 0, Some(10)),
            op(Write(2), 11, Some(20)),
            op(Read(Some(1)), 21, Some(22)),
        ];
        assert_eq!(
            check(&h, 1000),
            Verdict::NotLinearizable {
                op: 2,
                linearized: 2
            }
        );
    }

    #[test]
    fn reads_that_flip_back_are_not_linearizable() {
        // The write of 2 is concurrent with both reads, but once one read
        // saw 2, a later read cannot see 1 again.
        let h = [
            op(Write(1), 0, Some(1)),
            op(Write(2), 2, Some(100)),
            op(Read(Some(2)), 3, Some(4)),
            op(Read(Some(1)), 5, Some(6)),
        ];
        assert!(matches!(check(&h, 1000), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn unknown_writes_may_happen_late_or_never() {
        let h = [
            op(Write(1), 0, None),
            op(Read(None), 5, Some(6)),
            op(Read(Some(1)), 50, Some(60)),
            op(Write(2), 70, None),
            op(Read(Some(1)), 80, Some(90)),
        ];
        assert_eq!(check(&h, 1000), Verdict::Linearizable);
        // But an unknown write cannot be seen before it was invoked.
        let early = [op(Read(Some(1)), 0, Some(1)), op(Write(1), 5, None)];
        assert!(matches!(
            check(&early, 1000),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn the_search_gives_up_within_its_budget() {
        // Many concurrent writes and a read nobody wrote: the search must
        // try every order before refusing; with a tiny budget it gives up.
        let mut h: Vec<RegisterOp> = (0..12).map(|i| op(Write(i), 0, Some(100))).collect();
        h.push(op(Read(Some(99)), 0, Some(100)));
        assert_eq!(check(&h, 50), Verdict::Undecided { steps: 50 });
    }
}
