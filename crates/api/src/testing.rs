//! The runner of every property test in the workspace (feature `testing`).
//!
//! Parsers of untrusted input are checked with generated inputs: they must
//! never panic, and what they accept must satisfy their rules. The number
//! of cases per property is `PROPTEST_CASES` (default 256, what CI runs);
//! `scripts/fuzz-props` runs 100,000 each. Each property prints how many
//! cases it ran, so a long run shows its counts.

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Runs `test` on `cases` inputs from `strategy` and prints the count;
/// panics with the minimal failing input if one fails (or panics).
pub fn props<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let config = Config {
        // Failures are reported by the panic; no regression files in the tree.
        failure_persistence: None,
        ..Config::default()
    };
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let ran = std::sync::atomic::AtomicU64::new(0);
    let outcome = runner.run(&strategy, |value| {
        ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        test(value)
    });
    if let Err(e) = outcome {
        panic!("property {name} failed: {e}");
    }
    println!(
        "property {name}: {} cases passed (PROPTEST_CASES={cases})",
        ran.into_inner()
    );
}

pub use proptest;
