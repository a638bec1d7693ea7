use super::layer::{dn_for_target, severity_for};
use super::read::{LogStream, Plan};
use super::*;
use futures::StreamExt;
use metropolis_api::api::LogsRequest;
use metropolis_api::api::logs_request::{BacklogMode, StreamMode};
use metropolis_api::common::LogFilter;
use metropolis_api::common::log_filter::Filter as LogFilterKind;
use metropolis_api::common::log_filter::{
    LeveledWithMinimumSeverity, OnlyLeveled, OnlyRaw, WithChildren,
};
use std::io::Write as _;
use std::time::Duration;
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;

const SEV_INFO: LeveledLogSeverity = LeveledLogSeverity::Info;
const SEV_WARN: LeveledLogSeverity = LeveledLogSeverity::Warning;
const SEV_ERROR: LeveledLogSeverity = LeveledLogSeverity::Error;

fn req(dn: &str, backlog: BacklogMode, count: i64, stream: StreamMode) -> LogsRequest {
    LogsRequest {
        dn: dn.into(),
        filters: Vec::new(),
        backlog_mode: backlog as i32,
        backlog_count: count,
        stream_mode: stream as i32,
    }
}

fn all(dn: &str) -> LogsRequest {
    req(dn, BacklogMode::All, 0, StreamMode::Disable)
}

fn with(mut r: LogsRequest, filter: LogFilterKind) -> LogsRequest {
    r.filters.push(LogFilter {
        filter: Some(filter),
    });
    r
}

fn children() -> LogFilterKind {
    LogFilterKind::WithChildren(WithChildren {})
}

fn min_severity(s: LeveledLogSeverity) -> LogFilterKind {
    LogFilterKind::LeveledWithMinimumSeverity(LeveledWithMinimumSeverity { minimum: s as i32 })
}

/// The text of an entry: leveled lines joined with `\n`, or raw data.
fn text(e: &LogEntry) -> String {
    match &e.kind {
        Some(log_entry::Kind::Leveled(l)) => l.lines.join("\n"),
        Some(log_entry::Kind::Raw(r)) => r.data.clone(),
        None => "<none>".into(),
    }
}

fn texts(entries: &[LogEntry]) -> Vec<String> {
    entries.iter().map(text).collect()
}

fn leveled(e: &LogEntry) -> &log_entry::Leveled {
    match &e.kind {
        Some(log_entry::Kind::Leveled(l)) => l,
        other => panic!("expected a leveled entry, got {other:?}"),
    }
}

fn raw(e: &LogEntry) -> &log_entry::Raw {
    match &e.kind {
        Some(log_entry::Kind::Raw(r)) => r,
        other => panic!("expected a raw entry, got {other:?}"),
    }
}

fn backlog(tree: &LogTree, r: &LogsRequest) -> Vec<LogEntry> {
    tree.read(r).expect("valid request").backlog
}

fn info(tree: &LogTree, dn: &str, msg: &str) {
    tree.leveled(dn, SEV_INFO, "x.rs:1", msg).expect("valid DN");
}

async fn next(stream: &mut LogStream) -> LogEntry {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an entry within 5s")
        .expect("streams do not end")
}

#[test]
fn backlog_all_is_chronological() {
    let tree = LogTree::new();
    for i in 0..5 {
        info(&tree, "root.a", &format!("m{i}"));
    }
    let got = backlog(&tree, &all("root.a"));
    assert_eq!(texts(&got), ["m0", "m1", "m2", "m3", "m4"]);
    assert!(got.iter().all(|e| e.dn == "root.a"));
    let l = leveled(&got[0]);
    assert_eq!(l.severity, SEV_INFO as i32);
    assert_eq!(l.location, "x.rs:1");
    assert!(l.timestamp.is_some());
}

#[test]
fn backlog_count_is_the_last_n() {
    let tree = LogTree::new();
    for i in 0..10 {
        info(&tree, "root.a", &format!("m{i}"));
    }
    let last3 = req("root.a", BacklogMode::Count, 3, StreamMode::Disable);
    assert_eq!(texts(&backlog(&tree, &last3)), ["m7", "m8", "m9"]);
    let more = req("root.a", BacklogMode::Count, 100, StreamMode::Disable);
    assert_eq!(backlog(&tree, &more).len(), 10);
    // Counted after filtering: the last 2 raw entries, not raw among the last 2.
    tree.raw("root.a", "r0\nr1\nr2").expect("valid DN");
    info(&tree, "root.a", "late");
    let raw2 = with(
        req("root.a", BacklogMode::Count, 2, StreamMode::Disable),
        LogFilterKind::OnlyRaw(OnlyRaw {}),
    );
    assert_eq!(texts(&backlog(&tree, &raw2)), ["r1", "r2"]);
}

#[test]
fn backlog_count_with_children_is_the_merged_last_n() {
    let tree = LogTree::new();
    for i in 0..6 {
        let dn = if i % 2 == 0 { "root.a" } else { "root.a.b" };
        info(&tree, dn, &format!("m{i}"));
    }
    let r = with(
        req("root.a", BacklogMode::Count, 3, StreamMode::Disable),
        children(),
    );
    assert_eq!(texts(&backlog(&tree, &r)), ["m3", "m4", "m5"]);
}

#[test]
fn backlog_disable_gives_no_backlog() {
    let tree = LogTree::new();
    info(&tree, "root", "old");
    let reader = tree
        .read(&req(
            "root",
            BacklogMode::Disable,
            0,
            StreamMode::Unbuffered,
        ))
        .expect("valid request");
    assert!(reader.backlog.is_empty());
    assert!(reader.stream.is_some());
    assert!(tree.read(&all("root")).expect("valid").stream.is_none());
}

#[test]
fn children_are_merged_in_append_order() {
    let tree = LogTree::new();
    info(&tree, "root", "r0");
    info(&tree, "root.a", "a0");
    info(&tree, "root.a.b", "ab0");
    info(&tree, "root.ab", "sibling");
    info(&tree, "root.a", "a1");
    info(&tree, "root.a.b", "ab1");
    assert_eq!(texts(&backlog(&tree, &all("root.a"))), ["a0", "a1"]);
    let r = with(all("root.a"), children());
    assert_eq!(texts(&backlog(&tree, &r)), ["a0", "ab0", "a1", "ab1"]);
    let everything = with(all("root"), children());
    assert_eq!(backlog(&tree, &everything).len(), 6);
    assert!(backlog(&tree, &all("root.nothing")).is_empty());
}

#[test]
fn empty_dn_is_the_whole_tree() {
    let tree = LogTree::new();
    info(&tree, "root", "top");
    info(&tree, "root.x", "below");
    assert_eq!(texts(&backlog(&tree, &all(""))), ["top", "below"]);
    assert_eq!(
        texts(&backlog(&tree, &with(all(""), children()))),
        ["top", "below"]
    );
    // A DN nobody logs to (even outside `root`) has no entries.
    assert!(backlog(&tree, &all("elsewhere.x")).is_empty());
    assert!(backlog(&tree, &with(all("root.x.y"), children())).is_empty());
}

#[tokio::test]
async fn requests_read_as_upstream_reads_them() {
    let tree = LogTree::new();
    info(&tree, "root", "old");
    // An unset stream_mode streams nothing.
    let r = req("root", BacklogMode::All, 0, StreamMode::Invalid);
    let reader = tree.read(&r).expect("valid");
    assert_eq!(texts(&reader.backlog), ["old"]);
    assert!(reader.stream.is_none());
    // Neither backlog nor stream: a call that ends at once with nothing.
    let r = req("root", BacklogMode::Disable, 0, StreamMode::Disable);
    let got: Vec<_> = serve(&tree, &r).expect("valid").collect().await;
    assert!(got.is_empty(), "{got:?}");
    // backlog_count only counts with BACKLOG_MODE_COUNT.
    let r = req("root", BacklogMode::All, 7, StreamMode::Disable);
    assert_eq!(texts(&backlog(&tree, &r)), ["old"]);
    let r = req("root", BacklogMode::Disable, -3, StreamMode::Unbuffered);
    let reader = tree.read(&r).expect("valid");
    assert!(reader.backlog.is_empty() && reader.stream.is_some());
    // Ten filters are fine; an eleventh is refused.
    let mut ten = all("root");
    for _ in 0..read::MAX_FILTERS {
        ten = with(ten, children());
    }
    assert!(tree.read(&ten).is_ok());
    let eleven = with(ten, children());
    let err = tree.read(&eleven).expect_err("eleven filters");
    assert!(err.to_string().contains("at most 10"), "{err}");
}

#[test]
fn kind_and_severity_filters() {
    let tree = LogTree::new();
    tree.leveled("root", SEV_INFO, "", "i").expect("valid");
    tree.raw("root", "raw").expect("valid");
    tree.leveled("root", SEV_WARN, "", "w").expect("valid");
    tree.leveled("root", SEV_ERROR, "", "e").expect("valid");
    tree.leveled("root", LeveledLogSeverity::Fatal, "", "f")
        .expect("valid");
    let only_raw = with(all("root"), LogFilterKind::OnlyRaw(OnlyRaw {}));
    assert_eq!(texts(&backlog(&tree, &only_raw)), ["raw"]);
    let only_leveled = with(all("root"), LogFilterKind::OnlyLeveled(OnlyLeveled {}));
    assert_eq!(texts(&backlog(&tree, &only_leveled)), ["i", "w", "e", "f"]);
    let warn = with(all("root"), min_severity(SEV_WARN));
    assert_eq!(texts(&backlog(&tree, &warn)), ["w", "e", "f"]);
    let both = with(
        with(all("root"), LogFilterKind::OnlyLeveled(OnlyLeveled {})),
        min_severity(SEV_ERROR),
    );
    assert_eq!(texts(&backlog(&tree, &both)), ["e", "f"]);
    assert_eq!(backlog(&tree, &all("root")).len(), 5);
}

#[tokio::test]
async fn stream_gets_new_entries_not_old_ones() {
    let tree = LogTree::new();
    info(&tree, "root.a", "old");
    let reader = tree
        .read(&req(
            "root.a",
            BacklogMode::Disable,
            0,
            StreamMode::Unbuffered,
        ))
        .expect("valid request");
    let mut stream = reader.stream.expect("streaming");
    assert!(stream.try_next().is_none());
    let writer = {
        let tree = tree.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            info(&tree, "root.other", "elsewhere");
            info(&tree, "root.a.child", "child, not asked for");
            info(&tree, "root.a", "new1");
            info(&tree, "root.a", "new2");
        })
    };
    assert_eq!(text(&next(&mut stream).await), "new1");
    assert_eq!(text(&next(&mut stream).await), "new2");
    writer.await.expect("writer task");
    assert!(stream.try_next().is_none());
    assert_eq!(stream.dropped(), 0);
}

#[tokio::test]
async fn backlog_and_stream_neither_overlap_nor_miss() {
    // The stream is read only after all writes, so it must hold them all.
    let tree = LogTree::with_limits(Limits {
        stream_buffer: 4096,
        ..Limits::default()
    });
    let writer = {
        let tree = tree.clone();
        std::thread::spawn(move || {
            for i in 0..2000 {
                info(&tree, "root.a", &i.to_string());
            }
        })
    };
    // Somewhere in the middle of the writes.
    while tree.stats().entries < 300 {
        tokio::task::yield_now().await;
    }
    let reader = tree
        .read(&req("root.a", BacklogMode::All, 0, StreamMode::Unbuffered))
        .expect("valid request");
    writer.join().expect("writer thread");
    let mut stream = reader.stream.expect("streaming");
    let mut seen: Vec<usize> = texts(&reader.backlog)
        .iter()
        .map(|t| t.parse().expect("number"))
        .collect();
    while let Some(e) = stream.try_next() {
        seen.push(text(&e).parse().expect("number"));
    }
    // The ring holds 1024, so the backlog may have lost its start; from
    // there on every entry comes exactly once, in order.
    let first = seen[0];
    assert_eq!(seen, (first..2000).collect::<Vec<_>>());
    assert_eq!(stream.dropped(), 0);
}

#[tokio::test]
async fn stream_applies_filters_and_children() {
    let tree = LogTree::new();
    let r = with(
        with(
            req("root.a", BacklogMode::Disable, 0, StreamMode::Unbuffered),
            children(),
        ),
        min_severity(SEV_WARN),
    );
    let mut stream = tree.read(&r).expect("valid").stream.expect("streaming");
    info(&tree, "root.a", "info, filtered");
    tree.raw("root.a", "raw, filtered").expect("valid");
    tree.leveled("root.a.b", SEV_WARN, "", "warn child")
        .expect("valid");
    tree.leveled("root.b", SEV_ERROR, "", "not a child")
        .expect("valid");
    tree.leveled("root.a", SEV_ERROR, "", "error")
        .expect("valid");
    let e = next(&mut stream).await;
    assert_eq!(
        (e.dn.as_str(), text(&e).as_str()),
        ("root.a.b", "warn child")
    );
    assert_eq!(text(&next(&mut stream).await), "error");
    assert!(stream.try_next().is_none());
}

#[test]
fn invalid_requests_are_refused() {
    use BacklogMode as B;
    use StreamMode as S;
    let ok = req("root", B::All, 0, S::Disable);
    assert!(Plan::parse(&ok).is_ok());
    let mut cases: Vec<(&str, LogsRequest)> = vec![
        ("backlog invalid", req("root", B::Invalid, 0, S::Unbuffered)),
        ("count zero", req("root", B::Count, 0, S::Disable)),
        ("count negative", req("root", B::Count, -5, S::Disable)),
        (
            "raw and leveled",
            with(
                with(ok.clone(), LogFilterKind::OnlyRaw(OnlyRaw {})),
                LogFilterKind::OnlyLeveled(OnlyLeveled {}),
            ),
        ),
        (
            "raw and severity",
            with(
                with(ok.clone(), LogFilterKind::OnlyRaw(OnlyRaw {})),
                min_severity(SEV_WARN),
            ),
        ),
        (
            "severity invalid",
            with(ok.clone(), min_severity(LeveledLogSeverity::Invalid)),
        ),
        (
            "severity conflict",
            with(
                with(ok.clone(), min_severity(SEV_WARN)),
                min_severity(SEV_ERROR),
            ),
        ),
        ("empty segment", all("root..a")),
        ("trailing dot", all("root.")),
        ("leading dot", all(".root")),
        ("too long", all(&format!("root.{}", "a".repeat(300)))),
    ];
    let mut unknown_backlog = ok.clone();
    unknown_backlog.backlog_mode = 42;
    cases.push(("unknown backlog mode", unknown_backlog));
    let mut unknown_stream = ok.clone();
    unknown_stream.stream_mode = -1;
    cases.push(("unknown stream mode", unknown_stream));
    let mut unknown_severity = with(ok.clone(), min_severity(SEV_WARN));
    unknown_severity.filters[0].filter = Some(LogFilterKind::LeveledWithMinimumSeverity(
        LeveledWithMinimumSeverity { minimum: 99 },
    ));
    cases.push(("unknown severity", unknown_severity));
    let mut empty_filter = ok.clone();
    empty_filter.filters.push(LogFilter { filter: None });
    cases.push(("empty filter", empty_filter));

    let tree = LogTree::new();
    for (name, r) in cases {
        let err = match tree.read(&r) {
            Err(e) => e,
            Ok(_) => panic!("{name}: accepted"),
        };
        let status = tonic::Status::from(err.clone());
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}");
        assert!(!err.to_string().is_empty(), "{name}");
        assert!(
            serve(&tree, &r).is_err(),
            "{name}: serve accepted what read refused"
        );
    }
    // Duplicated but agreeing filters are fine.
    let dup = with(with(ok.clone(), children()), children());
    assert!(tree.read(&dup).is_ok());
    let same = with(with(ok, min_severity(SEV_WARN)), min_severity(SEV_WARN));
    assert!(tree.read(&same).is_ok());
}

#[test]
fn invalid_appends_are_refused() {
    let tree = LogTree::new();
    for dn in ["", "root..a", "a b", "curator", "root.é"] {
        assert!(tree.raw(dn, "x").is_err(), "{dn:?}");
        assert!(tree.leveled(dn, SEV_INFO, "", "x").is_err(), "{dn:?}");
        assert!(tree.raw_writer(dn).is_err(), "{dn:?}");
    }
    assert!(
        tree.leveled("root", LeveledLogSeverity::Invalid, "", "x")
            .is_err()
    );
    assert_eq!(tree.stats().entries, 0);
}

#[test]
fn long_raw_lines_are_cut_with_original_length() {
    let tree = LogTree::new();
    tree.raw("root.p", "short").expect("valid");
    tree.raw("root.p", &"x".repeat(5000)).expect("valid");
    // A 2-byte char straddling the cut goes entirely.
    let straddling = format!("{}é{}", "a".repeat(RAW_LINE_MAX - 1), "b".repeat(10));
    tree.raw("root.p", &straddling).expect("valid");
    let got = backlog(&tree, &all("root.p"));
    assert_eq!(raw(&got[0]).data, "short");
    assert_eq!(raw(&got[0]).original_length, 5);
    assert_eq!(raw(&got[1]).data.len(), RAW_LINE_MAX);
    assert_eq!(raw(&got[1]).original_length, 5000);
    assert_eq!(raw(&got[2]).data, "a".repeat(RAW_LINE_MAX - 1));
    assert_eq!(
        raw(&got[2]).original_length,
        i64::try_from(straddling.len()).expect("small")
    );
}

#[test]
fn raw_writer_splits_lines() {
    let tree = LogTree::new();
    {
        let mut w = tree.raw_writer("root.etcd").expect("valid");
        w.write_all(b"one\ntw").expect("infallible");
        w.write_all(b"o\r\n\nthr").expect("infallible");
        w.write_all(b"ee").expect("infallible");
        w.flush().expect("infallible");
        assert_eq!(tree.stats().entries, 3, "flush keeps the partial line");
        // 3000 bytes with no newline, in pieces, ending in a cut char.
        for _ in 0..1000 {
            w.write_all(b"\n").expect("infallible");
            w.write_all("é".as_bytes()).expect("infallible");
            w.write_all(&[0xff, b'z']).expect("infallible");
        }
        w.write_all(&"é".as_bytes()[..1]).expect("infallible");
    }
    let got = backlog(&tree, &all("root.etcd"));
    // "one", "two", "", "three", 999 × "é\xffz", then the partial last
    // line "é\xffz\xc3", appended on drop.
    assert_eq!(texts(&got[..4]), ["one", "two", "", "three"]);
    assert_eq!(raw(&got[1]).original_length, 3, "CR is not counted");
    assert_eq!(raw(&got[4]).data, "é\u{fffd}z");
    assert_eq!(raw(&got[4]).original_length, 4);
    assert_eq!(got.len(), 4 + 1000);
    assert_eq!(raw(&got[1003]).data, "é\u{fffd}z\u{fffd}");
}

#[test]
fn raw_writer_cuts_endless_lines_with_bounded_buffer() {
    let tree = LogTree::new();
    let mut w = tree.raw_writer("root.p").expect("valid");
    // 1 MiB of "ab…" then a 3-byte char crossing the cut.
    let mut line = "a".repeat(RAW_LINE_MAX - 1).into_bytes();
    line.extend_from_slice("€".as_bytes());
    line.extend(std::iter::repeat_n(b'b', 1 << 20));
    for piece in line.chunks(777) {
        w.write_all(piece).expect("infallible");
        assert!(w.buf.len() <= RAW_LINE_MAX);
    }
    w.write_all(b"\n").expect("infallible");
    let got = backlog(&tree, &all("root.p"));
    assert_eq!(raw(&got[0]).data, "a".repeat(RAW_LINE_MAX - 1));
    assert_eq!(
        raw(&got[0]).original_length,
        i64::try_from(line.len()).expect("small")
    );
}

#[tokio::test]
async fn pump_reads_a_pipe_to_eof() {
    let tree = LogTree::new();
    let (mut tx, rx) = tokio::io::duplex(64);
    let pump = tokio::spawn(
        tree.raw_writer("root.consensus.etcd")
            .expect("valid")
            .pump(rx),
    );
    tokio::io::AsyncWriteExt::write_all(&mut tx, b"started\n{\"level\":\"info\"}\npartial")
        .await
        .expect("pipe");
    drop(tx);
    pump.await.expect("task").expect("EOF is not an error");
    let got = backlog(&tree, &all("root.consensus.etcd"));
    assert_eq!(texts(&got), ["started", "{\"level\":\"info\"}", "partial"]);
}

#[test]
fn leveled_messages_become_lines_and_are_cut() {
    let tree = LogTree::new();
    info(&tree, "root", "first\nsecond\r\nthird\n");
    info(&tree, "root", "");
    let huge = "y".repeat(LEVELED_MESSAGE_MAX * 3);
    info(&tree, "root", &huge);
    let got = backlog(&tree, &all("root"));
    assert_eq!(leveled(&got[0]).lines, ["first", "second", "third"]);
    assert_eq!(leveled(&got[1]).lines, [""]);
    let lines = &leveled(&got[2]).lines;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].len(), LEVELED_MESSAGE_MAX);
    assert!(lines[1].contains(&(LEVELED_MESSAGE_MAX * 3).to_string()));
}

#[test]
fn tracing_layer_makes_leveled_entries() {
    let tree = LogTree::new();
    let subscriber = tracing_subscriber::registry().with(LogTreeLayer::new(tree.clone()));
    let line = tracing::subscriber::with_default(subscriber, || {
        tracing::error!(target: "metropolis_node::membership", "lost quorum");
        tracing::warn!(target: "metropolis_curator::leader::election", node = "n1", "slow\nsecond line");
        tracing::info!(target: "h2::proto", count = 3, reason = "two words", "plain");
        tracing::debug!(target: "metropolis_node::membership", "dropped by default");
        tracing::info!(target: "metropolis_node::membership", dn = "root.consensus.etcd", "explicit");
        tracing::info!(target: "metropolis_node", dn = "not a dn", "bad dn");
        let span = tracing::info_span!("etcd", dn = "root.consensus");
        span.in_scope(|| {
            tracing::info_span!("inner").in_scope(|| {
                tracing::info!(target: "metropolis_node::membership", "from span");
            });
        });
        let line = line!();
        tracing::info!(target: "other_crate", fields_only = true);
        line + 1
    });
    let got = backlog(&tree, &with(all("root"), children()));
    let summary: Vec<(String, i32, String)> = got
        .iter()
        .map(|e| (e.dn.clone(), leveled(e).severity, text(e)))
        .collect();
    let expected = [
        ("root.membership", SEV_ERROR, "lost quorum"),
        ("root.curator", SEV_WARN, "slow\nsecond line node=n1"),
        ("root", SEV_INFO, "plain count=3 reason=\"two words\""),
        ("root.consensus.etcd", SEV_INFO, "explicit"),
        ("root", SEV_INFO, "bad dn"),
        ("root.consensus", SEV_INFO, "from span"),
        ("root", SEV_INFO, "fields_only=true"),
    ];
    let expected: Vec<(String, i32, String)> = expected
        .iter()
        .map(|(dn, s, t)| (dn.to_string(), *s as i32, t.to_string()))
        .collect();
    assert_eq!(summary, expected);
    assert_eq!(leveled(&got[1]).lines, ["slow", "second line node=n1"]);
    let last = leveled(&got[6]);
    assert_eq!(last.location, format!("tests.rs:{line}"));
    assert!(last.timestamp.is_some());
}

#[test]
fn tracing_layer_can_keep_debug_as_info() {
    let tree = LogTree::new();
    let layer = LogTreeLayer::new(tree.clone()).with_max_level(Level::DEBUG);
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        tracing::debug!("kept");
        tracing::trace!("still dropped");
    });
    // The DN follows the test's own target (which depends on the crate
    // this module is compiled into), so read the whole tree.
    let got = backlog(&tree, &with(all("root"), children()));
    assert_eq!(texts(&got), ["kept"]);
    assert_eq!(leveled(&got[0]).severity, SEV_INFO as i32);
}

#[test]
fn target_mapping() {
    assert_eq!(
        dn_for_target("metropolis_node::membership"),
        "root.membership"
    );
    assert_eq!(dn_for_target("metropolis_node::serve::logs"), "root.serve");
    assert_eq!(dn_for_target("metropolis_node"), "root");
    assert_eq!(dn_for_target("metropolis_curator::x::y"), "root.curator");
    assert_eq!(dn_for_target("metropolis_store"), "root.store");
    assert_eq!(dn_for_target("tonic::transport"), "root");
    assert_eq!(dn_for_target(""), "root");
    assert_eq!(severity_for(&Level::TRACE), SEV_INFO);
}

#[test]
fn memory_stays_bounded() {
    let tree = LogTree::new();
    let limits = Limits::default();
    for i in 0..200_000 {
        tree.raw("root.busy", &format!("line {i}")).expect("valid");
    }
    let s = tree.stats();
    assert_eq!((s.dns, s.entries), (1, limits.entries_per_dn));
    let got = backlog(&tree, &all("root.busy"));
    assert_eq!(
        text(&got[0]),
        format!("line {}", 200_000 - limits.entries_per_dn)
    );
    assert_eq!(text(&got[got.len() - 1]), "line 199999");

    for i in 0..2000 {
        tree.raw(&format!("root.many.d{i}"), "x").expect("valid");
    }
    let s = tree.stats();
    assert_eq!(s.dns, limits.dns);
    assert_eq!(s.entries, limits.entries_per_dn + limits.dns - 1);
    assert_eq!(s.dropped_entries, 2000 - (limits.dns as u64 - 1));
    // Existing DNs still log when the table is full.
    tree.raw("root.busy", "still here").expect("valid");
    assert_eq!(tree.stats().dropped_entries, s.dropped_entries);

    // Bytes bind before the entry count for long lines.
    let long = "z".repeat(RAW_LINE_MAX);
    for _ in 0..5000 {
        tree.raw("root.busy", &long).expect("valid");
    }
    let s = tree.stats();
    assert!(s.bytes <= limits.dns * limits.bytes_per_dn, "{s:?}");
    let busy = backlog(&tree, &all("root.busy"));
    let busy_bytes: usize = busy.iter().map(|e| text(e).len()).sum();
    assert!(busy_bytes <= limits.bytes_per_dn, "{busy_bytes}");
    assert!(busy.len() > limits.bytes_per_dn / (RAW_LINE_MAX + 2 * ENTRY_OVERHEAD));
}

#[tokio::test]
async fn lagging_reader_loses_oldest_and_continues() {
    let tree = LogTree::with_limits(Limits {
        stream_buffer: 4,
        ..Limits::default()
    });
    let r = req("root", BacklogMode::Disable, 0, StreamMode::Unbuffered);
    let mut slow = tree.read(&r).expect("valid").stream.expect("streaming");
    for i in 0..10 {
        info(&tree, "root", &format!("m{i}"));
    }
    assert_eq!(slow.dropped(), 6);
    let mut got = Vec::new();
    while let Some(e) = slow.try_next() {
        got.push(text(&e));
    }
    assert_eq!(got, ["m6", "m7", "m8", "m9"]);
    info(&tree, "root", "after");
    assert_eq!(text(&next(&mut slow).await), "after");
    // The tree itself kept everything it is allowed to.
    assert_eq!(tree.stats().entries, 11);
}

#[tokio::test]
async fn dropped_streams_are_unregistered() {
    let tree = LogTree::new();
    let r = req("root", BacklogMode::Disable, 0, StreamMode::Unbuffered);
    let stream = tree.read(&r).expect("valid").stream.expect("streaming");
    assert_eq!(tree.stats().streams, 1);
    drop(stream);
    assert_eq!(tree.stats().streams, 0);
    info(&tree, "root", "prunes");
    assert!(lock(&tree.inner).readers.is_empty());
}

#[tokio::test]
async fn serve_chunks_backlog_and_batches_stream() {
    let tree = LogTree::new();
    // More than one response's worth, spread over DNs (each keeps 1024).
    let total = RESPONSE_CHUNK + 10;
    for i in 0..total {
        info(&tree, &format!("root.d{}", i % 4), &i.to_string());
    }
    let r = with(
        req("", BacklogMode::All, 0, StreamMode::Unbuffered),
        children(),
    );
    let mut responses = serve(&tree, &r).expect("valid");
    let first = responses.next().await.expect("a response").expect("ok");
    assert_eq!(first.backlog_entries.len(), RESPONSE_CHUNK);
    assert!(first.stream_entries.is_empty());
    let second = responses.next().await.expect("a response").expect("ok");
    assert_eq!(second.backlog_entries.len(), 10);
    assert_eq!(text(&second.backlog_entries[9]), (total - 1).to_string());
    info(&tree, "root", "s1");
    info(&tree, "root", "s2");
    let third = tokio::time::timeout(Duration::from_secs(5), responses.next())
        .await
        .expect("in time")
        .expect("a response")
        .expect("ok");
    assert!(third.backlog_entries.is_empty());
    assert_eq!(texts(&third.stream_entries), ["s1", "s2"]);

    let finite = req("root", BacklogMode::Count, 1, StreamMode::Disable);
    let all: Vec<_> = serve(&tree, &finite).expect("valid").collect().await;
    assert_eq!(all.len(), 1);
}

#[tokio::test]
async fn responses_stay_under_the_byte_bound() {
    use prost::Message;
    let tree = LogTree::new();
    // Long messages (each DN keeps 512 KiB of them): 2000 would be 16 MiB.
    let long = "x".repeat(LEVELED_MESSAGE_MAX);
    for i in 0..1000 {
        info(&tree, &format!("root.d{}", i % 40), &long);
    }
    let r = with(
        req("", BacklogMode::All, 0, StreamMode::Disable),
        children(),
    );
    let responses: Vec<_> = serve(&tree, &r).expect("valid").collect().await;
    let mut entries = 0;
    for resp in &responses {
        let resp = resp.as_ref().expect("ok");
        assert!(
            resp.encoded_len() <= RESPONSE_MAX_BYTES + 64,
            "{} bytes",
            resp.encoded_len()
        );
        entries += resp.backlog_entries.len();
    }
    assert_eq!(entries, 1000);
    assert!(responses.len() > 1);
}
