//! Updates of the node's own binary: A/B slots in the data directory,
//! UpdateNode (download, digest, `--version` check, install), the
//! supervisor that runs the node from its slot and rolls a new binary back
//! unless it becomes HEALTHY in time, and the version the node reports.
//!
//! - `slots`: the on-disk slots and the state that says which one boots.
//! - `fetch`: the bounded http(s) download.
//! - `check`: the sandboxed `--version` run.
//! - `supervisor`: the process that runs the node from its slot.
//!
//! Until its first update a node runs as it always did: the binary started
//! is the node. The first update copies that binary into slot A and the new
//! one into B; from then on the binary started is the supervisor.

mod check;
mod fetch;
mod slots;
mod supervisor;

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use metropolis_api::api::{ActivationMode, UpdateNodeRequest};
use metropolis_api::version::spec::{
    Version,
    version::{GitInformation, Release, git_information::BuildTreeState},
};
use sha2::{Digest, Sha256};

pub use check::CheckError;
pub use fetch::FetchError;
pub use slots::{Refusal, Rollback, Slot};
use slots::{SlotError, SlotInfo, Slots, State};

/// Set by the supervisor on the node it runs: the slot the node runs from.
const SLOT_ENV: &str = "METROPOLIS_NODE_SLOT";
/// A supervised node exits with this to be started again (a Reboot).
pub const RESTART_EXIT: u8 = 75;
/// How long a downloaded binary's `--version` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// What the node logs (DN `root.update`) after a failed update, before the
/// reason.
const ROLLED_BACK: &str = "rolled back: ";

/// The version line of this build, as `--version` prints it after the name.
pub const VERSION: &str = env!("METROPOLIS_VERSION");

/// What this process is: its binary's digest and, under a supervisor, its
/// slot; and the update state it started with.
struct Running {
    sha256: String,
    slot: Option<Slot>,
    state: Option<State>,
}

static RUNNING: OnceLock<Running> = OnceLock::new();

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What `start` needs of the command line.
pub struct Start<'a> {
    pub data_dir: &'a Path,
    pub address: IpAddr,
    pub trial_timeout: Duration,
}

/// First thing a node process does. On a node with update slots, the
/// process started by hand becomes the supervisor, runs the node from its
/// slot until it stops and returns the exit code (Some). Otherwise (never
/// updated, or this is the node under a supervisor) it returns None and the
/// caller runs the node.
pub fn start(s: Start<'_>) -> Option<ExitCode> {
    let slot = std::env::var(SLOT_ENV).ok().and_then(|v| Slot::parse(&v));
    let slots = Slots::new(s.data_dir);
    let state = match slots.load() {
        Ok(state) => state,
        Err(e) => {
            tracing::error!("{e}; running the binary that was started, not a slot");
            None
        }
    };
    if slot.is_none() && state.is_some() {
        return Some(supervisor::run(supervisor::Config {
            data_dir: s.data_dir.to_path_buf(),
            address: s.address,
            trial_timeout: s.trial_timeout,
            args: forwarded_args(),
        }));
    }
    let sha256 = match hash_file(Path::new("/proc/self/exe")) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot hash the running binary; its version will not show it");
            String::new()
        }
    };
    announce(slot, state.as_ref(), &sha256);
    let _ = RUNNING.set(Running {
        sha256,
        slot,
        state,
    });
    None
}

/// Logs what runs, and a failed update the operator should hear of (the
/// process that saw it fail was the supervisor, whose log is not served).
fn announce(slot: Option<Slot>, state: Option<&State>, sha256: &str) {
    let short = sha256.get(..12).unwrap_or(sha256);
    match (slot, state) {
        (Some(slot), Some(st)) => {
            let trial = st.trial.is_some_and(|t| t.slot == slot);
            tracing::info!(%slot, sha256 = %short, version = VERSION, trial, "running from update slot {slot}");
        }
        // Not updated yet: nothing to say beyond the version.
        _ => tracing::debug!(sha256 = %short, version = VERSION, "running"),
    }
    if let Some(f) = state.and_then(|s| s.last_failure.as_ref()) {
        let sha = f.sha256.get(..12).unwrap_or(&f.sha256);
        // metroctl quotes what follows ROLLED_BACK to the operator.
        tracing::warn!(
            "update to {sha} (slot {}) {ROLLED_BACK}{}",
            f.slot,
            f.reason
        );
    }
}

/// The node's arguments for its next run: the same, less the Node
/// Parameters and the backup to restore, which only a first start uses.
pub fn forwarded_args() -> Vec<std::ffi::OsString> {
    without_params(std::env::args_os().skip(1))
}

/// Flags of a first start (each with a value).
const FIRST_START_ONLY: [&str; 3] = ["--params", "--restore", "--owner-key"];

fn without_params(mut args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut keep = Vec::new();
    while let Some(a) = args.next() {
        let text = a.to_string_lossy();
        if FIRST_START_ONLY.contains(&text.as_ref()) {
            args.next();
        } else if !FIRST_START_ONLY
            .iter()
            .any(|f| text.starts_with(&format!("{f}=")))
        {
            keep.push(a);
        }
    }
    keep
}

/// A node under a supervisor restarts by exiting: the supervisor starts it
/// again from whichever slot boots next. None when unsupervised.
pub fn restart_supervised() -> Option<ExitCode> {
    RUNNING
        .get()
        .and_then(|r| r.slot)
        .map(|_| ExitCode::from(RESTART_EXIT))
}

/// The version this node reports in its status.
pub fn running_version() -> Version {
    let num = |s: &str| s.parse::<i64>().unwrap_or(0);
    let commit = env!("METROPOLIS_GIT_COMMIT");
    Version {
        release: Some(Release {
            major: num(env!("CARGO_PKG_VERSION_MAJOR")),
            minor: num(env!("CARGO_PKG_VERSION_MINOR")),
            patch: num(env!("CARGO_PKG_VERSION_PATCH")),
        }),
        git_information: (!commit.is_empty()).then(|| GitInformation {
            commit_hash: commit.to_string(),
            commits_since_release: 0,
            build_tree_state: if env!("METROPOLIS_GIT_DIRTY") == "true" {
                BuildTreeState::Dirty
            } else {
                BuildTreeState::Clean
            } as i32,
        }),
        binary_sha256: RUNNING.get().map(|r| r.sha256.clone()).unwrap_or_default(),
    }
}

/// Update metrics, from the state this process started with.
pub fn register_metrics(registry: &prometheus::Registry) -> prometheus::Result<()> {
    let running = RUNNING.get();
    let state = running.and_then(|r| r.state.as_ref());
    let rollbacks = prometheus::IntCounter::new(
        "metropolis_node_update_rollbacks_total",
        "Updates of this node's binary that failed their trial and were rolled back",
    )?;
    rollbacks.inc_by(state.map(|s| s.rollbacks).unwrap_or(0));
    let failed = prometheus::IntGauge::new(
        "metropolis_node_update_last_failed",
        "1 if the last update of this node's binary was rolled back (until one succeeds)",
    )?;
    failed.set(i64::from(state.is_some_and(|s| s.last_failure.is_some())));
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "metropolis_node_binary_info",
            "The running binary: version, SHA-256, update slot (none before the first update)",
        ),
        &["version", "sha256", "slot"],
    )?;
    info.with_label_values(&[
        VERSION,
        running.map(|r| r.sha256.as_str()).unwrap_or_default(),
        running
            .and_then(|r| r.slot)
            .map(Slot::name)
            .unwrap_or("none"),
    ])
    .set(1);
    registry.register(Box::new(rollbacks))?;
    registry.register(Box::new(failed))?;
    registry.register(Box::new(info))?;
    Ok(())
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Why an UpdateNode or a rollback was not done; `node_mgmt` turns it into
/// a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "this node runs the metropolis-node binary, not an OS image: os_image cannot be installed. \
         Set binary_url and binary_sha256 (fields 1000, 1001), e.g. with `metroctl node update --image FILE`"
    )]
    OsImage,
    #[error("another UpdateNode or rollback is in progress on this node")]
    Busy,
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error(
        "the downloaded file's SHA-256 is {got}, not {expected} as requested; nothing was installed"
    )]
    Digest { expected: String, got: String },
    #[error("the new binary was refused, nothing was installed: {0}")]
    Check(#[from] CheckError),
    #[error("{0}")]
    Local(String),
}

impl From<SlotError> for UpdateError {
    fn from(e: SlotError) -> Self {
        UpdateError::Local(e.to_string())
    }
}

/// What a successful UpdateNode asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Restart now, into the new binary.
    Now,
    /// The new binary boots at the next restart.
    NextStart,
}

/// A checked UpdateNode request.
struct Target {
    url: String,
    sha256: String,
    activation: Activation,
}

impl Target {
    fn from_request(req: &UpdateNodeRequest) -> Result<Target, UpdateError> {
        let activation = match ActivationMode::try_from(req.activation_mode) {
            Ok(ActivationMode::Reboot | ActivationMode::Kexec) => Activation::Now,
            Ok(ActivationMode::None) => Activation::NextStart,
            _ => {
                return Err(UpdateError::Invalid(format!(
                    "activation_mode {} is not valid; use ACTIVATION_MODE_NONE, _REBOOT or _KEXEC",
                    req.activation_mode
                )));
            }
        };
        if req.binary_url.is_empty() && req.binary_sha256.is_empty() {
            return Err(match req.os_image {
                Some(_) => UpdateError::OsImage,
                None => UpdateError::Invalid(
                    "binary_url and binary_sha256 must be set (the new binary and its SHA-256)"
                        .into(),
                ),
            });
        }
        if req.os_image.is_some() {
            return Err(UpdateError::Invalid(
                "set binary_url and binary_sha256, not os_image as well".into(),
            ));
        }
        if req.binary_url.is_empty() {
            return Err(UpdateError::Invalid(
                "binary_url must be set with binary_sha256".into(),
            ));
        }
        fetch::parse_url(&req.binary_url)?;
        let sha = req.binary_sha256.trim_start_matches("sha256:");
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(UpdateError::Invalid(
                "binary_sha256 must be 64 hexadecimal digits (the SHA-256 of the binary)".into(),
            ));
        }
        Ok(Target {
            url: req.binary_url.clone(),
            sha256: sha.to_ascii_lowercase(),
            activation,
        })
    }
}

/// NodeManagement's side of updates.
pub struct Updater {
    slots: Slots,
    busy: tokio::sync::Mutex<()>,
    limits: fetch::Limits,
}

impl Updater {
    pub fn new(data_dir: &Path) -> Updater {
        Updater {
            slots: Slots::new(data_dir),
            busy: tokio::sync::Mutex::new(()),
            limits: fetch::Limits::default(),
        }
    }

    /// Downloads, checks and installs the binary `req` names into the slot
    /// that does not boot, and makes it boot next (on trial). Nothing
    /// changes unless every check passed.
    pub async fn update(&self, req: &UpdateNodeRequest) -> Result<Activation, UpdateError> {
        let _busy = self.busy.try_lock().map_err(|_| UpdateError::Busy)?;
        let target = Target::from_request(req)?;
        if let Some(state) = self.slots.load()? {
            state.target()?;
        }
        self.slots.create()?;
        let incoming = self.slots.incoming();
        let _cleanup = RemoveOnDrop(incoming.clone());
        tracing::info!(url = %target.url, "downloading a new node binary");
        let got = fetch::fetch(&target.url, &incoming, &self.limits).await?;
        if got.sha256 != target.sha256 {
            return Err(UpdateError::Digest {
                expected: target.sha256,
                got: got.sha256,
            });
        }
        let (path, sandbox) = (incoming.clone(), self.slots.sandbox());
        let version =
            tokio::task::spawn_blocking(move || check::check_runs(&path, &sandbox, CHECK_TIMEOUT))
                .await
                .map_err(|e| UpdateError::Local(format!("the check did not finish: {e}")))??;
        let slots = self.slots.clone();
        let info = SlotInfo {
            sha256: got.sha256.clone(),
            version: version.clone(),
            good: false,
            failed: None,
        };
        let slot = tokio::task::spawn_blocking(move || install(&slots, &incoming, info))
            .await
            .map_err(|e| UpdateError::Local(format!("the install did not finish: {e}")))??;
        tracing::info!(
            %slot,
            sha256 = %got.sha256,
            bytes = got.bytes,
            %version,
            "installed a new node binary into slot {slot}; it boots {}, on trial",
            match target.activation {
                Activation::Now => "now",
                Activation::NextStart => "at the next restart",
            }
        );
        Ok(target.activation)
    }

    /// Makes the other slot boot next (or gives up the running trial).
    pub fn rollback(&self) -> Result<Rollback, UpdateError> {
        let _busy = self.busy.try_lock().map_err(|_| UpdateError::Busy)?;
        let now = unix_now();
        let r = self.slots.modify(|s: &mut Option<State>| match s {
            None => Err(UpdateError::Refused(Refusal::NeverUpdated)),
            Some(s) => Ok(s.rollback(now)?),
        })?;
        match r {
            Rollback::AbortTrial(slot) => {
                tracing::warn!(%slot, "rolling back by hand: giving up the trial of slot {slot}")
            }
            Rollback::To(slot) => {
                tracing::warn!(%slot, "rolling back by hand: slot {slot} boots next, on trial")
            }
        }
        Ok(r)
    }
}

/// Under the state lock: on the first update, the running binary becomes
/// slot A; then the new one goes into the slot that does not boot.
fn install(slots: &Slots, incoming: &Path, info: SlotInfo) -> Result<Slot, UpdateError> {
    slots.modify(|s: &mut Option<State>| {
        if s.is_none() {
            let running = slots.running_copy();
            let _cleanup = RemoveOnDrop(running.clone());
            let sha256 = copy_running(&running)?;
            slots.install(&running, Slot::A)?;
            *s = Some(State::initial(SlotInfo {
                sha256,
                version: format!("metropolis-node {VERSION}"),
                good: true,
                failed: None,
            }));
        }
        let Some(state) = s.as_mut() else {
            return Err(UpdateError::Local("no update state".into()));
        };
        let slot = state.target()?;
        slots.install(incoming, slot)?;
        state.stage(slot, info);
        Ok(slot)
    })
}

/// Copies the running executable (whatever replaced its path since) to
/// `dest`; returns its SHA-256.
fn copy_running(dest: &Path) -> Result<String, UpdateError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| UpdateError::Local(format!("copying the running binary: {e}"));
    let mut from = std::fs::File::open("/proc/self/exe").map_err(err)?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(dest)
        .map_err(err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = from.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(err)?;
    }
    to.sync_all().map_err(err)?;
    Ok(hex::encode(h.finalize()))
}

/// Removes a temporary file however the operation ends (after a successful
/// install it was renamed away and there is nothing to remove).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::api::OsImageRef;

    fn req(url: &str, sha: &str, mode: ActivationMode) -> UpdateNodeRequest {
        UpdateNodeRequest {
            os_image: None,
            activation_mode: mode as i32,
            binary_url: url.into(),
            binary_sha256: sha.into(),
        }
    }

    #[test]
    fn requests_are_checked_before_anything_happens() {
        let sha = "ab".repeat(32);
        let ok = Target::from_request(&req("http://10.0.0.1:80/x", &sha, ActivationMode::Kexec))
            .expect("valid");
        assert_eq!(ok.activation, Activation::Now);
        let upper = format!("sha256:{}", sha.to_uppercase());
        let t =
            Target::from_request(&req("https://h/x", &upper, ActivationMode::None)).expect("valid");
        assert_eq!(
            (t.sha256.as_str(), t.activation),
            (sha.as_str(), Activation::NextStart)
        );

        let bad = |r: UpdateNodeRequest| match Target::from_request(&r) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted {r:?}"),
        };
        assert!(bad(req("http://h/x", &sha, ActivationMode::Invalid)).contains("activation_mode"));
        let mut r = req("http://h/x", &sha, ActivationMode::Reboot);
        r.activation_mode = 42;
        assert!(bad(r).contains("activation_mode 42"));
        assert!(bad(req("", "", ActivationMode::Reboot)).contains("must be set"));
        assert!(bad(req("ftp://h/x", &sha, ActivationMode::Reboot)).contains("http://"));
        assert!(bad(req("http://h/x", "abc", ActivationMode::Reboot)).contains("64 hexadecimal"));
        assert!(bad(req("", &sha, ActivationMode::Reboot)).contains("binary_url"));
        let image = OsImageRef {
            scheme: "https".into(),
            host: "registry.example".into(),
            repository: "metropolis/node".into(),
            tag: "1.0".into(),
            digest: format!("sha256:{sha}"),
        };
        let mut only_image = req("", "", ActivationMode::Reboot);
        only_image.os_image = Some(image.clone());
        assert!(matches!(
            Target::from_request(&only_image),
            Err(UpdateError::OsImage)
        ));
        let mut both = req("http://h/x", &sha, ActivationMode::Reboot);
        both.os_image = Some(image);
        assert!(bad(both).contains("not os_image as well"));
    }

    #[test]
    fn forwarded_args_drop_the_parameters() {
        let args = [
            "--data-dir",
            "d",
            "--params",
            "p.pb",
            "--params=q.pb",
            "--restore",
            "b.backup",
            "--owner-key=k.pem",
            "--address",
            "::1",
        ];
        let kept = without_params(args.iter().map(std::ffi::OsString::from));
        assert_eq!(kept, ["--data-dir", "d", "--address", "::1"]);
    }
}
