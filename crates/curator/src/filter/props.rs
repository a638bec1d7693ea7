//! Generated filters: compiling and evaluating never panics (nor overflows
//! the stack), and every error is a short message.

use super::tests::{bare_node, full_node};
use super::*;
use metropolis_api::testing::props;
use metropolis_api::testing::proptest::prelude::*;

/// Fragments of CEL as GetNodes filters use it, and some that it refuses.
const TOKENS: &[&str] = &[
    "node",
    ".",
    "id",
    "state",
    "labels",
    "status",
    "external_address",
    "roles",
    "health",
    "time_since_heartbeat",
    "consensus_member",
    "peers",
    "pubkey",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "?",
    "!",
    "-",
    "+",
    "*",
    "/",
    "%",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "&&",
    "||",
    "in",
    "has",
    "size",
    "startsWith",
    "contains",
    "matches",
    "exists",
    "all",
    "map",
    "filter",
    "x",
    "int",
    "string",
    "duration",
    "timestamp",
    "NODE_STATE_UP",
    "HEALTHY",
    "1",
    "0",
    "-1",
    "9223372036854775807",
    "1.5",
    "true",
    "false",
    "null",
    "'zone'",
    "\"a\"",
    "'[a-'",
    "'^z.*$'",
    "b'x'",
    "1u",
    "'1s'",
    "\\",
    "'",
    "\"",
];

fn filter_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(prop::sample::select(TOKENS), 0..60).prop_map(|t| t.join(" ")),
        prop::collection::vec(prop::sample::select(TOKENS), 0..60).prop_map(|t| t.concat()),
        any::<String>(),
        // Deep nesting, past the pre-scan's limit and below it.
        (
            1usize..200,
            prop::sample::select(&["(", "[", "!", "-", "{"][..])
        )
            .prop_map(|(n, open)| format!("{}node.id", open.repeat(n))),
    ]
}

#[test]
fn props_filters_compile_and_evaluate() {
    let nodes = [bare_node(), full_node(), api::Node::default()];
    props("CEL filters", filter_text(), |src| {
        match Filter::compile(&src) {
            Ok(filter) => {
                for node in &nodes {
                    if let Err(e) = filter.matches(node) {
                        prop_assert!(e.to_string().len() < 8192, "{e}");
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.len() < 8192, "a {} byte message", message.len());
            }
        }
        Ok(())
    });
}
