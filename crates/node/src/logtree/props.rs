//! Generated Logs requests: validating them never panics, and what is
//! accepted names a valid DN.

use super::*;
use metropolis_api::common::LogFilter;
use metropolis_api::common::log_filter::{
    LeveledWithMinimumSeverity, OnlyLeveled, OnlyRaw, WithChildren,
};
use metropolis_api::testing::props;
use metropolis_api::testing::proptest::prelude::*;
use prost::Message;

fn filter() -> impl Strategy<Value = LogFilter> {
    prop_oneof![
        Just(None),
        Just(Some(LogFilterKind::WithChildren(WithChildren {}))),
        Just(Some(LogFilterKind::OnlyRaw(OnlyRaw {}))),
        Just(Some(LogFilterKind::OnlyLeveled(OnlyLeveled {}))),
        any::<i32>().prop_map(|minimum| Some(LogFilterKind::LeveledWithMinimumSeverity(
            LeveledWithMinimumSeverity { minimum }
        ))),
    ]
    .prop_map(|filter| LogFilter { filter })
}

fn request() -> impl Strategy<Value = LogsRequest> {
    let dn = prop_oneof![
        any::<String>(),
        "[a-z.]{0,40}",
        "root(\\.[a-z0-9_-]{0,8}){0,6}",
    ];
    (
        dn,
        prop::collection::vec(filter(), 0..4),
        -1i32..5,
        any::<i64>(),
        -1i32..4,
    )
        .prop_map(
            |(dn, filters, backlog_mode, backlog_count, stream_mode)| LogsRequest {
                dn,
                filters,
                backlog_mode,
                backlog_count,
                stream_mode,
            },
        )
}

#[test]
fn props_logs_requests() {
    let decoded = prop::collection::vec(any::<u8>(), 0..512)
        .prop_filter_map("not a LogsRequest", |b| {
            LogsRequest::decode(b.as_slice()).ok()
        });
    props("Logs requests", prop_oneof![request(), decoded], |req| {
        match Plan::parse(&req) {
            Ok(_) => prop_assert!(req.dn.is_empty() || validate_dn(&req.dn).is_ok()),
            Err(e) => prop_assert!(e.to_string().len() < 1024, "{e}"),
        }
        Ok(())
    });
}
