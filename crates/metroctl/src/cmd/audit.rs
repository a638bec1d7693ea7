//! `metroctl audit`: the cluster's record of mutating calls (owner only).

use clap::Args;
use futures::TryStreamExt;
use metropolis_api::admin::{
    AuditEntry, GetAuditLogRequest, audit_entry, cluster_admin_client::ClusterAdminClient,
};

use crate::conn::{Ctx, call_error};
use crate::output::{self, Format};

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Show at most this many entries, newest first (the cluster keeps the last 10,000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub async fn run(ctx: &Ctx, args: AuditArgs) -> anyhow::Result<()> {
    let mut admin = ClusterAdminClient::new(ctx.owner_channel().await?);
    let entries: Vec<AuditEntry> = admin
        .get_audit_log(GetAuditLogRequest { limit: args.limit })
        .await
        .map_err(|s| call_error("GetAuditLog", s))?
        .into_inner()
        .try_collect()
        .await
        .map_err(|s| call_error("GetAuditLog", s))?;
    if args.format != Format::Table {
        return output::print_structured(args.format, &entries, false);
    }
    if entries.is_empty() {
        println!("The audit log is empty.");
        return Ok(());
    }
    let mut t = output::table();
    t.set_header(vec!["TIME", "WHO", "METHOD", "RESULT", "REQUEST"]);
    for e in &entries {
        let who = match &e.principal {
            Some(audit_entry::Principal::Identity(n)) => n.clone(),
            Some(audit_entry::Principal::NodeId(id)) => format!("node {id}"),
            None => "-".into(),
        };
        // The service is clear from the method name; keep the column short.
        let method = e
            .method
            .rsplit_once('.')
            .map(|(_, m)| m.to_string())
            .unwrap_or_else(|| e.method.clone());
        let result = if e.message.is_empty() {
            code_name(e.code).to_string()
        } else {
            format!("{}: {}", code_name(e.code), e.message)
        };
        t.add_row(vec![
            e.time.as_ref().map(format_time).unwrap_or_default(),
            who,
            method,
            result,
            e.request.clone(),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// `2024-05-01T12:00:00Z` (UTC, seconds).
pub fn format_time(t: &prost_types::Timestamp) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t.seconds) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            d.year(),
            u8::from(d.month()),
            d.day(),
            d.hour(),
            d.minute(),
            d.second()
        ),
        Err(_) => format!("{}s", t.seconds),
    }
}

/// The canonical name of a gRPC status code.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN_CODE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_codes() {
        let t = prost_types::Timestamp {
            seconds: 1_714_564_800,
            nanos: 5,
        };
        assert_eq!(format_time(&t), "2024-05-01T12:00:00Z");
        assert_eq!(
            code_name(tonic::Code::InvalidArgument as i32),
            "INVALID_ARGUMENT"
        );
        assert_eq!(
            code_name(tonic::Code::Unauthenticated as i32),
            "UNAUTHENTICATED"
        );
        assert_eq!(code_name(99), "UNKNOWN_CODE");
    }
}
