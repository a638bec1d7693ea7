//! With `--store etcd`: the node's own etcd, read and written directly
//! over its client socket, to put the registration throughput next to what
//! that same etcd can do without the curator in front of it.
//!
//! The raw measurement (`crate::store`) writes only under
//! `crate::store::RAW_PREFIX`, which the curator never reads, so cluster
//! state stays as the registrations left it.

use std::sync::Arc;

use anyhow::Context;
use futures::TryStreamExt;
use metropolis_api::api::{
    LogsRequest, logs_request, node_management_client::NodeManagementClient,
};
use metropolis_api::osbase::logtree::proto::log_entry::Kind;
use metropolis_identity::SigningKey;
use metropolis_rpc::client::explain_status;
use metropolis_store::{EtcdStore, Store};

use crate::stats::ErrorTally;

/// Where the curator keeps node records (`metropolis_curator::state`; the
/// loadgen talks to the store, not to the curator's code).
const NODES_PREFIX: &str = "/nodes/";

/// Connects to the etcd a high-availability node runs, by its socket.
pub async fn connect(socket: &std::path::Path) -> anyhow::Result<Arc<EtcdStore>> {
    EtcdStore::connect_unix(socket)
        .await
        .with_context(|| format!("connecting to the node's etcd at {}", socket.display()))
}

pub async fn revision(store: &EtcdStore) -> anyhow::Result<i64> {
    store
        .revision()
        .await
        .context("reading the store revision from the node's etcd")
}

/// The stored record of node `id`, as the curator wrote it.
pub async fn node_record(store: &EtcdStore, id: &str) -> anyhow::Result<Vec<u8>> {
    let key = format!("{NODES_PREFIX}{id}");
    let kv = store
        .get(key.as_bytes())
        .await
        .with_context(|| format!("reading {key} from the node's etcd"))?
        .with_context(|| {
            format!("{key} is not in the node's etcd, though the node was admitted")
        })?;
    Ok(kv.value)
}

/// The node's log tree DN for etcd's own output (zap JSON lines), which
/// goes there and not to the node's stderr.
const ETCD_LOG_DN: &str = "root.consensus.etcd";

/// What etcd logged, as far as the node's log tree still holds it.
#[derive(Default)]
pub struct EtcdLog {
    pub entries: usize,
    /// Entries by zap level ("info", "warn", ...; "unparsed" for lines
    /// that are not JSON, such as ones the log tree cut short).
    pub by_level: std::collections::BTreeMap<String, u64>,
    /// Messages of entries above info, counted by level and message.
    pub notable: ErrorTally,
}

/// Reads etcd's log lines from the node (NodeManagement.Logs, as the
/// owner) and counts them by level.
pub async fn log(
    addr: std::net::SocketAddr,
    ca: &[u8],
    owner: (Vec<u8>, SigningKey),
) -> anyhow::Result<EtcdLog> {
    let channel = crate::cluster::channel(addr, ca, owner)
        .await
        .context("connecting to NodeManagement as the owner")?;
    let request = LogsRequest {
        dn: ETCD_LOG_DN.into(),
        filters: Vec::new(),
        backlog_mode: logs_request::BacklogMode::All as i32,
        backlog_count: 0,
        stream_mode: logs_request::StreamMode::Disable as i32,
    };
    let responses: Vec<_> = NodeManagementClient::new(channel)
        .logs(request)
        .await
        .map_err(|s| anyhow::anyhow!("NodeManagement.Logs: {}", explain_status(&s)))?
        .into_inner()
        .try_collect()
        .await
        .map_err(|s| anyhow::anyhow!("NodeManagement.Logs: {}", explain_status(&s)))?;
    let mut out = EtcdLog::default();
    for entry in responses.into_iter().flat_map(|r| r.backlog_entries) {
        out.entries += 1;
        let (level, message) = match entry.kind {
            Some(Kind::Raw(raw)) => zap_level_and_message(&raw.data),
            // The supervisor's own events are under the parent DN; anything
            // else here is unexpected, but still counted.
            other => ("unparsed".to_string(), format!("{other:?}")),
        };
        if !matches!(level.as_str(), "debug" | "info") {
            out.notable.add(&level, &message);
        }
        *out.by_level.entry(level).or_default() += 1;
    }
    Ok(out)
}

/// Longest part of a line that is not zap JSON the report quotes.
const UNPARSED_QUOTE: usize = 120;

/// Level and message of a zap JSON line; for any other line, "unparsed"
/// and the start of the line itself, since an odd line is worth seeing.
fn zap_level_and_message(line: &str) -> (String, String) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        // The log tree cuts lines at 1 KiB, and etcd's first line (its
        // whole configuration) is longer: zap writes level and message
        // first, so they survive the cut.
        if let (Some(level), Some(msg)) = (
            string_field_prefix(line, "level"),
            string_field_prefix(line, "msg"),
        ) {
            return (level.to_string(), msg.to_string());
        }
        let quote: String = line.chars().take(UNPARSED_QUOTE).collect();
        return ("unparsed".into(), quote);
    };
    let field = |name: &str| v.get(name).and_then(|f| f.as_str()).unwrap_or_default();
    let level = match field("level") {
        "" => "unparsed",
        l => l,
    };
    (level.to_string(), field("msg").to_string())
}

/// `"name":"value"` in the text of a JSON object, for a value without
/// escapes (etcd's levels and messages have none).
fn string_field_prefix<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!("\"{name}\":\"");
    let start = line.find(&needle)? + needle.len();
    let len = line[start..].find('"')?;
    let value = &line[start..start + len];
    (!value.contains('\\')).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zap_lines() {
        let line = r#"{"level":"warn","ts":"2024-01-01T00:00:00.000Z","caller":"etcdserver/util.go:163","msg":"apply request took too long","took":"120ms"}"#;
        assert_eq!(
            zap_level_and_message(line),
            ("warn".into(), "apply request took too long".into())
        );
        assert_eq!(
            zap_level_and_message(
                r#"{"level":"info","ts":"x","msg":"starting an etcd server","na"#
            ),
            ("info".into(), "starting an etcd server".into())
        );
        assert_eq!(
            zap_level_and_message(r#"{"level":"info","ts":"2024-01"#),
            ("unparsed".into(), r#"{"level":"info","ts":"2024-01"#.into())
        );
        assert_eq!(
            zap_level_and_message("panic: boom"),
            ("unparsed".into(), "panic: boom".into())
        );
        assert_eq!(
            zap_level_and_message(r#"{"msg":"x"}"#),
            ("unparsed".into(), "x".into())
        );
    }
}
