//! `metroctl node describe --watch`: the node table, live.
//!
//! Table output redraws the whole table on every change (on a terminal; to
//! a pipe it prints each new state after a blank line). JSON and YAML print
//! one document per change: `{"type": "ADDED"|"MODIFIED", "node": Node}` or
//! `{"type": "DELETED", "id": ID, "reason": ...}`, the node in the protobuf
//! JSON mapping, as `describe -o json` prints it.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use tokio::sync::mpsc;

use crate::conn::Ctx;
use crate::output::Format;
use crate::watch::{Change, NodeTable, Update};

pub async fn describe_watch(
    ctx: &Ctx,
    ids: &[String],
    filter: &str,
    columns: &[String],
    format: Format,
) -> anyhow::Result<()> {
    let columns = super::node::table_columns(columns)?;
    let table = Mutex::new(NodeTable::default());
    let (tx, mut rx) = mpsc::channel(64);
    let watch = crate::watch::run(ctx, filter, &table, tx);
    let show = async {
        let wanted = |id: &str| ids.is_empty() || ids.iter().any(|i| i == id);
        let tty = std::io::stdout().is_terminal();
        while let Some(update) = rx.recv().await {
            match update {
                Update::Reconnecting(why) => {
                    eprintln!("metroctl: watch interrupted ({why}); watching again");
                }
                Update::Changes { changes, synced } => {
                    let changes: Vec<Change> =
                        changes.into_iter().filter(|c| wanted(c.id())).collect();
                    if format == Format::Table {
                        if changes.is_empty() && !synced {
                            continue;
                        }
                        let t = table.lock().unwrap_or_else(|p| p.into_inner());
                        let shown: Vec<_> = t.nodes().filter(|n| wanted(&n.id)).collect();
                        let mut out = String::new();
                        if tty {
                            // Home and clear: the table replaces the last one.
                            out.push_str("\x1b[H\x1b[2J");
                        } else if !synced {
                            out.push('\n');
                        }
                        out.push_str(
                            &super::node::nodes_table(shown.iter().copied(), &columns).to_string(),
                        );
                        out.push_str(&format!(
                            "\n{} node(s), curator leader {}; watching (Ctrl-C to stop)\n",
                            shown.len(),
                            t.leader
                        ));
                        print!("{out}");
                    } else {
                        for c in &changes {
                            print_change(format, c)?;
                        }
                    }
                    std::io::stdout().flush()?;
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = watch => r,
        r = show => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// One change as a JSON object.
pub fn change_json(c: &Change) -> anyhow::Result<serde_json::Value> {
    let node =
        |n| metropolis_api::json::to_json(n).map_err(|e| anyhow::anyhow!("rendering JSON: {e}"));
    Ok(match c {
        Change::Added(n) => serde_json::json!({"type": "ADDED", "node": node(n)?}),
        Change::Modified(n) => serde_json::json!({"type": "MODIFIED", "node": node(n)?}),
        Change::Removed { id, why } => {
            serde_json::json!({"type": "DELETED", "id": id, "reason": why})
        }
    })
}

fn print_change(format: Format, c: &Change) -> anyhow::Result<()> {
    let doc = change_json(c)?;
    match format {
        Format::Json => println!("{}", serde_json::to_string(&doc)?),
        Format::Yaml => print!("---\n{}", serde_norway::to_string(&doc)?),
        Format::Table => {}
    }
    Ok(())
}
