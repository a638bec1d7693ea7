//! The supervisor: once a node has update slots, the process started as
//! `metropolis-node` runs the node from its slot as a child, and plays the
//! part of upstream's A/B loader and reboot.
//!
//! - It picks the slot ([`State::begin`]) and runs it with the same
//!   arguments (less `--params`) and `METROPOLIS_NODE_SLOT` set.
//! - A child that wants a restart (Reboot, UpdateNode, a consensus role
//!   change) exits with [`RESTART_EXIT`]; the supervisor picks again and
//!   starts it anew (new boot ID), keeping its own PID.
//! - During a trial it asks the cluster (Management.GetNodes for this node,
//!   with the node's certificate) until the record shows the new binary's
//!   SHA-256, HEALTHY, and a heartbeat sent after the child started; then
//!   the slot is confirmed. A child that exits, or does not get there within
//!   the trial bound, is stopped and the node reverts to the active slot.
//! - SIGTERM/SIGINT go on to the child; the supervisor exits as it does. The
//!   child dies with the supervisor (`PR_SET_PDEATHSIG`), so a SIGKILL takes
//!   both down, and the next start finds the trial unconfirmed.
//!
//! The supervisor is the old, proven binary judging the new one; the new one
//! only has to report its version, as every node does.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::api::{GetNodesRequest, management_client::ManagementClient, node::Health};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::Channel;

use super::slots::{Boot, SlotError, Slots, State};
use super::{RESTART_EXIT, SLOT_ENV, unix_now};
use crate::datadir::DataDir;

/// How long a stopping child may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// How often a trial asks the cluster about the node.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The end of the child's standard error kept for failure reports.
const TAIL_BYTES: usize = 4096;

pub struct Config {
    pub data_dir: PathBuf,
    pub address: IpAddr,
    pub trial_timeout: Duration,
    pub args: Vec<std::ffi::OsString>,
}

/// Runs the node from its slots until it stops; the process's exit code.
pub fn run(cfg: Config) -> ExitCode {
    // One thread: children are forked from it, and PR_SET_PDEATHSIG fires
    // when the forking thread exits, which here is the process.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metropolis-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(supervise(cfg))
}

async fn supervise(cfg: Config) -> ExitCode {
    let slots = Slots::new(&cfg.data_dir);
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
            return ExitCode::FAILURE;
        }
    };
    let mut fresh = true;
    loop {
        let now = unix_now();
        let begun = slots.modify(|s: &mut Option<State>| {
            Ok::<_, SlotError>(s.as_mut().map(|s| (s.begin(fresh, now), s.clone())))
        });
        let (boot, state) = match begun {
            Ok(Some(b)) => b,
            Ok(None) => {
                tracing::error!(
                    "the update state in {} vanished; start the node again",
                    cfg.data_dir.display()
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        fresh = false;
        if let Some(f) = &boot.interrupted {
            tracing::error!(slot = %f.slot, sha256 = %f.sha256, "update rolled back: {}", f.reason);
        }
        let sha256 = state
            .info(boot.slot)
            .map(|i| i.sha256.clone())
            .unwrap_or_default();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_BYTES)));
        let started = Instant::now();
        let mut child = match spawn(&cfg, &slots, &boot, tail.clone()) {
            Ok(c) => c,
            Err(e) if boot.trial.is_some() => {
                fail(&slots, format!("the new binary cannot be started: {e}"));
                continue;
            }
            Err(e) => {
                tracing::error!(slot = %boot.slot, "cannot start the node from slot {}: {e}", boot.slot);
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(slot = %boot.slot, %sha256, trial = boot.trial.is_some(), pid = child.id(), "started the node");
        let trial = boot.trial.map(|t| {
            let deadline_unix = t.started_unix + cfg.trial_timeout.as_secs();
            let left = Duration::from_secs(deadline_unix.saturating_sub(unix_now()));
            TrialWatch {
                sha256: sha256.clone(),
                deadline: started + left.min(cfg.trial_timeout),
                started,
            }
        });
        let ended = watch(&cfg, &slots, &mut child, trial, &mut term, &mut int).await;
        let said = last_words(&tail);
        match ended {
            Ended::Stopped(status) => return exit_code(status),
            Ended::TrialTimedOut => {
                fail(
                    &slots,
                    format!(
                        "the new binary did not rejoin the cluster and become HEALTHY within {}",
                        humantime::format_duration(cfg.trial_timeout)
                    ),
                );
            }
            Ended::Exited(status) if status.code() == Some(i32::from(RESTART_EXIT)) => {}
            Ended::Exited(status) => {
                let on_trial = slots
                    .load()
                    .ok()
                    .flatten()
                    .and_then(|s| s.trial)
                    .is_some_and(|t| t.slot == boot.slot);
                if !on_trial {
                    return exit_code(status);
                }
                let took = started.elapsed();
                fail(
                    &slots,
                    format!(
                        "the new binary {} after {:.1}s{}",
                        describe(status),
                        took.as_secs_f64(),
                        said.map(|s| format!(": {s}")).unwrap_or_default()
                    ),
                );
            }
        }
    }
}

struct TrialWatch {
    sha256: String,
    deadline: Instant,
    started: Instant,
}

enum Ended {
    /// The child ended on its own.
    Exited(ExitStatus),
    /// The supervisor was told to stop, and the child has.
    Stopped(ExitStatus),
    TrialTimedOut,
}

async fn watch(
    cfg: &Config,
    slots: &Slots,
    child: &mut Child,
    mut trial: Option<TrialWatch>,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> Ended {
    let mut probe = trial.as_ref().map(|_| Probe::new(cfg));
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = trial.as_ref().map(|t| t.deadline);
        tokio::select! {
            status = child.wait() => {
                return Ended::Exited(status.unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)));
            }
            _ = term.recv() => return Ended::Stopped(stop(child).await),
            _ = int.recv() => return Ended::Stopped(stop(child).await),
            () = sleep_until(deadline) => {
                tracing::warn!("the trial's time is up; stopping the new binary");
                stop(child).await;
                return Ended::TrialTimedOut;
            }
            _ = tick.tick(), if trial.is_some() => {
                let (Some(t), Some(p)) = (&trial, probe.as_mut()) else { continue };
                match p.confirmed(&t.sha256, t.started).await {
                    Ok(()) => {
                        let slot = slots.load().ok().flatten().and_then(|s| s.trial).map(|t| t.slot);
                        let confirmed = slot.is_some_and(|slot| {
                            slots
                                .modify(|s: &mut Option<State>| {
                                    Ok::<_, SlotError>(s.as_mut().is_some_and(|s| s.confirm(slot)))
                                })
                                .unwrap_or_else(|e| {
                                    tracing::error!("cannot confirm the update: {e}");
                                    false
                                })
                        });
                        if let (true, Some(slot)) = (confirmed, slot) {
                            tracing::info!(%slot, sha256 = %t.sha256, "the new binary is HEALTHY; slot {slot} boots from now on");
                        }
                        trial = None;
                        probe = None;
                    }
                    Err(why) => tracing::debug!(%why, "the new binary is not confirmed yet"),
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// SIGTERM, then SIGKILL after the grace period; the child's exit status.
async fn stop(child: &mut Child) -> ExitStatus {
    if let Some(pid) = child.id() {
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(status)) => status,
        _ => {
            tracing::warn!(
                "the node did not stop within {}; killing it",
                humantime::format_duration(STOP_GRACE)
            );
            let _ = child.kill().await;
            child
                .wait()
                .await
                .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL))
        }
    }
}

fn fail(slots: &Slots, reason: String) {
    let now = unix_now();
    match slots.modify(|s: &mut Option<State>| {
        Ok::<_, SlotError>(s.as_mut().and_then(|s| s.fail(reason.clone(), now)))
    }) {
        Ok(Some(f)) => {
            tracing::error!(slot = %f.slot, sha256 = %f.sha256, "update rolled back: {}", f.reason);
        }
        Ok(None) => {}
        Err(e) => tracing::error!("cannot record the failed update ({reason}): {e}"),
    }
}

fn spawn(
    cfg: &Config,
    slots: &Slots,
    boot: &Boot,
    tail: Arc<Mutex<VecDeque<u8>>>,
) -> std::io::Result<Child> {
    let mut cmd = Command::new(slots.path(boot.slot));
    cmd.args(&cfg.args)
        .env(SLOT_ENV, boot.slot.name())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    if let Some(mut err) = child.stderr.take() {
        // The child's standard error goes on to ours; its end is kept to say
        // why a trial failed.
        tokio::spawn(async move {
            let mut out = tokio::io::stderr();
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let _ = out.write_all(&buf[..n]).await;
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                t.extend(&buf[..n]);
                let over = t.len().saturating_sub(TAIL_BYTES);
                t.drain(..over);
            }
        });
    }
    Ok(child)
}

/// The most telling line of what the child wrote last: its last error line,
/// else its last line.
fn last_words(tail: &Mutex<VecDeque<u8>>) -> Option<String> {
    let bytes: Vec<u8> = tail
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let pick = lines
        .iter()
        .rev()
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .or(lines.last())?;
    Some(pick.chars().take(300).collect())
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

fn exit_code(status: ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(s)) => ExitCode::from(u8::try_from(128 + s).unwrap_or(1)),
        _ => ExitCode::FAILURE,
    }
}

/// Asks the cluster whether the node runs the new binary, HEALTHY.
struct Probe {
    data_dir: PathBuf,
    address: IpAddr,
    channel: Option<Channel>,
    attempt: usize,
}

impl Probe {
    fn new(cfg: &Config) -> Probe {
        Probe {
            data_dir: cfg.data_dir.clone(),
            address: cfg.address,
            channel: None,
            attempt: 0,
        }
    }

    /// Ok once the node's record shows `sha256`, HEALTHY, and a heartbeat
    /// received after `started` (so from the child: nothing else runs as
    /// this node); Err says what is missing.
    async fn confirmed(&mut self, sha256: &str, started: Instant) -> Result<(), String> {
        let asked = Instant::now();
        let r = tokio::time::timeout(PROBE_TIMEOUT, self.ask()).await;
        let node = match r {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                self.channel = None;
                return Err(e);
            }
            Err(_) => {
                self.channel = None;
                return Err("the cluster did not answer in time".into());
            }
        };
        let running = node
            .status
            .as_ref()
            .and_then(|s| s.version.as_ref())
            .map(|v| v.binary_sha256.as_str())
            .unwrap_or_default();
        if running != sha256 {
            return Err(format!("the node reports binary {running:?}"));
        }
        if node.health != Health::Healthy as i32 {
            return Err(format!("health is {}", node.health));
        }
        let since = node
            .time_since_heartbeat
            .and_then(|d| Duration::try_from(d).ok())
            .ok_or("no heartbeat age")?;
        if since >= asked.saturating_duration_since(started) {
            return Err("the last heartbeat is older than the new binary".into());
        }
        Ok(())
    }

    async fn ask(&mut self) -> Result<metropolis_api::api::Node, String> {
        let data = DataDir::new(self.data_dir.clone());
        let creds = data.unseal().map_err(|e| format!("{e:#}"))?;
        let channel = match &self.channel {
            Some(c) => c.clone(),
            None => {
                let tls = metropolis_identity::client_config(
                    metropolis_identity::ServerTrust::ClusterCa {
                        ca_der: creds.ca_certificate.clone(),
                        node_id: None,
                    },
                    Some((creds.node_certificate.clone(), creds.key.clone())),
                )
                .map_err(|e| e.to_string())?;
                let mut endpoints = vec![SocketAddr::new(self.address, crate::serve::CURATOR_PORT)];
                if let Ok(Some(dir)) = data.directory() {
                    for e in crate::membership::directory_endpoints(&dir) {
                        if !endpoints.contains(&e) {
                            endpoints.push(e);
                        }
                    }
                }
                self.attempt += 1;
                let c = metropolis_rpc::client::connect_leader(&endpoints, self.attempt, tls)
                    .await
                    .map_err(|e| e.to_string())?;
                self.channel = Some(c.channel.clone());
                c.channel
            }
        };
        let id = creds.node_id();
        let nodes: Vec<_> = ManagementClient::new(channel)
            .get_nodes(GetNodesRequest {
                filter: format!("node.id == {id:?}"),
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner()
            .try_collect()
            .await
            .map_err(|s| s.message().to_string())?;
        nodes
            .into_iter()
            .find(|n| n.id == id)
            .ok_or_else(|| "the cluster does not list this node".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_words_prefers_the_error_line() {
        let tail = Mutex::new(VecDeque::from(
            b"starting\nerror: unexpected argument '--bogus' found\n\nUsage: metropolis-node\n"
                .to_vec(),
        ));
        assert_eq!(
            last_words(&tail).as_deref(),
            Some("error: unexpected argument '--bogus' found")
        );
        let tail = Mutex::new(VecDeque::from(b"one\ntwo\n".to_vec()));
        assert_eq!(last_words(&tail).as_deref(), Some("two"));
        assert_eq!(last_words(&Mutex::new(VecDeque::new())), None);
    }

    #[test]
    fn exit_codes_follow_the_child() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), ExitCode::SUCCESS);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), ExitCode::from(3));
        assert_eq!(
            exit_code(ExitStatus::from_raw(libc::SIGKILL)),
            ExitCode::from(137)
        );
        assert_eq!(
            describe(ExitStatus::from_raw(2 << 8)),
            "exited with status 2"
        );
    }
}
