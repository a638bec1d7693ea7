//! The A/B slots in the data directory and the state that says which one
//! boots.
//!
//! Layout of `<data-dir>/update/` (owner-only):
//! - `a`, `b`: the two slot binaries (mode 0500), each written under another
//!   name, fsynced and renamed into place: a slot file is always whole.
//! - `state.json`: [`State`], written the same way; it names a slot only
//!   after that slot's file was renamed into place.
//! - `lock`: `flock`ed around every read-modify-write of the state (the
//!   supervisor and the node it runs both change it).
//! - `incoming`: a download in progress; `sandbox/`: the empty working
//!   directory of the `--version` check.
//!
//! Boot rule (as upstream's A/B loader): `active` boots, unless `next` is
//! set; `next` is one-shot — the boot that takes it turns it into `trial`
//! first, so any later start that still finds the trial unconfirmed (the
//! node stopped or was killed during it) boots `active` again.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The update directory inside the data directory.
pub const DIR: &str = "update";
const STATE: &str = "state.json";
const LOCK: &str = "lock";

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The slot's file name, and how the node reports it.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SlotInfo {
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// The first line its `--version` printed.
    pub version: String,
    /// It ran HEALTHY at least once (or it is the binary that was running
    /// when the first update copied it in).
    pub good: bool,
    /// Why its trial failed; such a slot is never booted again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Trial {
    pub slot: Slot,
    /// Unix time the trial began; its bound counts from here across restarts
    /// of the node within the trial.
    pub started_unix: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Failure {
    pub slot: Slot,
    pub sha256: String,
    pub reason: String,
    pub at_unix: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct State {
    pub active: Slot,
    #[serde(default)]
    pub next: Option<Slot>,
    #[serde(default)]
    pub trial: Option<Trial>,
    #[serde(default)]
    pub a: Option<SlotInfo>,
    #[serde(default)]
    pub b: Option<SlotInfo>,
    /// Trials that failed, over the life of the data directory.
    #[serde(default)]
    pub rollbacks: u64,
    /// The last failed trial, until an update succeeds.
    #[serde(default)]
    pub last_failure: Option<Failure>,
}

/// Why a change of the slots is refused; the caller says it to the operator.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    #[error(
        "the last update (slot {0}) is still on trial; wait until it is HEALTHY or rolled back"
    )]
    OnTrial(Slot),
    #[error("this node was never updated: it has no previous binary to roll back to")]
    NeverUpdated,
    #[error(
        "slot {0} holds a binary that never ran HEALTHY here; activate it with a reboot, or replace it with `metroctl node update`"
    )]
    NotProven(Slot),
    #[error("slot {0} failed its trial ({1}); there is nothing good to roll back to")]
    Failed(Slot, String),
}

/// What a start boots.
#[derive(Debug, Clone, PartialEq)]
pub struct Boot {
    pub slot: Slot,
    /// Set while the slot is on trial.
    pub trial: Option<Trial>,
    /// A trial that this start found interrupted and failed.
    pub interrupted: Option<Failure>,
}

/// What a hand rollback does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rollback {
    /// The running trial is given up: the active slot boots again.
    AbortTrial(Slot),
    /// The other slot boots next, on trial.
    To(Slot),
}

impl State {
    /// The state after the first update copied the running binary into A.
    pub fn initial(running: SlotInfo) -> State {
        State {
            active: Slot::A,
            next: None,
            trial: None,
            a: Some(SlotInfo {
                good: true,
                failed: None,
                ..running
            }),
            b: None,
            rollbacks: 0,
            last_failure: None,
        }
    }

    pub fn info(&self, slot: Slot) -> Option<&SlotInfo> {
        match slot {
            Slot::A => self.a.as_ref(),
            Slot::B => self.b.as_ref(),
        }
    }

    fn info_mut(&mut self, slot: Slot) -> &mut Option<SlotInfo> {
        match slot {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }

    /// The slot a new binary goes into: the one that does not boot. Refused
    /// during a trial (the other slot is the fallback then).
    pub fn target(&self) -> Result<Slot, Refusal> {
        match self.trial {
            Some(t) => Err(Refusal::OnTrial(t.slot)),
            None => Ok(self.active.other()),
        }
    }

    /// Records a binary installed into `slot` (by [`State::target`]) and
    /// makes it boot next, on trial.
    pub fn stage(&mut self, slot: Slot, info: SlotInfo) {
        *self.info_mut(slot) = Some(SlotInfo {
            good: false,
            failed: None,
            ..info
        });
        self.next = Some(slot);
    }

    /// Decides what a start boots. `fresh` is a start of the supervisor
    /// itself (not a restart of the node it runs): a trial it finds is one
    /// whose node stopped before proving itself, and it fails.
    pub fn begin(&mut self, fresh: bool, now_unix: u64) -> Boot {
        let mut interrupted = None;
        if fresh && self.trial.is_some() {
            interrupted = self.fail(
                "the node stopped before the new binary became HEALTHY".into(),
                now_unix,
            );
        }
        if let Some(next) = self.next.take() {
            match self.info(next) {
                Some(info) if info.failed.is_none() => {
                    self.trial = Some(Trial {
                        slot: next,
                        started_unix: now_unix,
                    });
                }
                // A slot is staged only with its info; a failed one is never
                // tried again.
                _ => {}
            }
        }
        Boot {
            slot: self.trial.map(|t| t.slot).unwrap_or(self.active),
            trial: self.trial,
            interrupted,
        }
    }

    /// The trial of `slot` succeeded: it boots from now on.
    pub fn confirm(&mut self, slot: Slot) -> bool {
        if self.trial.map(|t| t.slot) != Some(slot) {
            return false;
        }
        self.trial = None;
        self.active = slot;
        if let Some(info) = self.info_mut(slot) {
            info.good = true;
        }
        self.last_failure = None;
        true
    }

    /// The running trial failed: the active slot boots again.
    pub fn fail(&mut self, reason: String, now_unix: u64) -> Option<Failure> {
        let trial = self.trial.take()?;
        let sha256 = match self.info_mut(trial.slot) {
            Some(info) => {
                info.failed = Some(reason.clone());
                info.sha256.clone()
            }
            None => String::new(),
        };
        self.rollbacks += 1;
        let failure = Failure {
            slot: trial.slot,
            sha256,
            reason,
            at_unix: now_unix,
        };
        self.last_failure = Some(failure.clone());
        Some(failure)
    }

    /// A rollback by hand: give up the running trial, or boot the other
    /// slot next if it ran HEALTHY before.
    pub fn rollback(&mut self, now_unix: u64) -> Result<Rollback, Refusal> {
        if let Some(t) = self.trial {
            self.fail("rolled back by hand during its trial".into(), now_unix);
            return Ok(Rollback::AbortTrial(t.slot));
        }
        let to = self.active.other();
        match self.info(to) {
            None => Err(Refusal::NeverUpdated),
            Some(info) => match &info.failed {
                Some(why) => Err(Refusal::Failed(to, why.clone())),
                None if !info.good => Err(Refusal::NotProven(to)),
                None => {
                    self.next = Some(to);
                    Ok(Rollback::To(to))
                }
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is corrupt ({detail}); remove the directory {} to run the binary you start",
        path.display(),
        path.parent().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    Corrupt { path: PathBuf, detail: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SlotError {
    let path = path.to_path_buf();
    move |source| SlotError::Io { what, path, source }
}

/// The update directory of one data directory.
#[derive(Clone, Debug)]
pub struct Slots {
    dir: PathBuf,
}

impl Slots {
    pub fn new(data_dir: &Path) -> Slots {
        Slots {
            dir: data_dir.join(DIR),
        }
    }

    pub fn path(&self, slot: Slot) -> PathBuf {
        self.dir.join(slot.name())
    }

    pub fn incoming(&self) -> PathBuf {
        self.dir.join("incoming")
    }

    /// Where the first update copies the running binary before it becomes
    /// slot A.
    pub fn running_copy(&self) -> PathBuf {
        self.dir.join("running")
    }

    pub fn sandbox(&self) -> PathBuf {
        self.dir.join("sandbox")
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// Creates the directory tree (owner-only).
    pub fn create(&self) -> Result<(), SlotError> {
        for d in [self.dir.clone(), self.sandbox()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(io("creating", &d))?;
        }
        Ok(())
    }

    /// The state, if this node was ever updated.
    pub fn load(&self) -> Result<Option<State>, SlotError> {
        let path = self.state_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| SlotError::Corrupt {
                    path,
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &path)(e)),
        }
    }

    /// Reads, changes and writes the state under the lock. `f` returning an
    /// error leaves the state as it was.
    pub fn modify<R, E: From<SlotError>>(
        &self,
        f: impl FnOnce(&mut Option<State>) -> Result<R, E>,
    ) -> Result<R, E> {
        self.create()?;
        let lock_path = self.dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io("opening", &lock_path))?;
        // SAFETY: flock on a descriptor we own; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io("locking", &lock_path)(std::io::Error::last_os_error()).into());
        }
        let before = self.load()?;
        let mut state = before.clone();
        let out = f(&mut state)?;
        if state != before {
            match &state {
                Some(s) => {
                    let bytes = serde_json::to_vec_pretty(s).map_err(|e| SlotError::Corrupt {
                        path: self.state_path(),
                        detail: e.to_string(),
                    })?;
                    self.write_atomic(STATE, &bytes, 0o600)?;
                }
                None => {
                    let p = self.state_path();
                    fs::remove_file(&p).map_err(io("removing", &p))?;
                }
            }
        }
        Ok(out)
    }

    fn write_atomic(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), SlotError> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        f.write_all(contents)
            .and_then(|_| f.sync_all())
            .map_err(io("writing", &tmp))?;
        drop(f);
        self.rename_into(&tmp, name)
    }

    /// Moves a finished, fsynced file into `slot` (mode 0500).
    pub fn install(&self, from: &Path, slot: Slot) -> Result<(), SlotError> {
        fs::set_permissions(from, fs::Permissions::from_mode(0o500))
            .map_err(io("setting permissions of", from))?;
        File::open(from)
            .and_then(|f| f.sync_all())
            .map_err(io("syncing", from))?;
        self.rename_into(from, slot.name())
    }

    fn rename_into(&self, from: &Path, name: &str) -> Result<(), SlotError> {
        let to = self.dir.join(name);
        fs::rename(from, &to).map_err(io("renaming into", &to))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(sha: &str) -> SlotInfo {
        SlotInfo {
            sha256: sha.into(),
            version: "metropolis-node 0.1.0".into(),
            good: false,
            failed: None,
        }
    }

    #[test]
    fn an_update_is_tried_once_then_confirmed() {
        let mut s = State::initial(info("old"));
        assert_eq!(s.a.as_ref().map(|i| i.good), Some(true));
        let slot = s.target().expect("target");
        assert_eq!(slot, Slot::B);
        s.stage(slot, info("new"));
        let boot = s.begin(true, 100);
        assert_eq!(boot.slot, Slot::B);
        assert_eq!(
            boot.trial,
            Some(Trial {
                slot: Slot::B,
                started_unix: 100
            })
        );
        assert_eq!(s.next, None, "next is one-shot");
        assert_eq!(s.target(), Err(Refusal::OnTrial(Slot::B)));
        // A restart of the node within the trial keeps trying it.
        assert_eq!(s.begin(false, 110).slot, Slot::B);
        assert!(s.confirm(Slot::B));
        assert_eq!(s.active, Slot::B);
        assert_eq!(s.begin(true, 200).slot, Slot::B);
        assert_eq!(s.b.as_ref().map(|i| i.good), Some(true));
    }

    #[test]
    fn a_trial_found_at_a_fresh_start_failed() {
        let mut s = State::initial(info("old"));
        s.stage(Slot::B, info("new"));
        s.begin(true, 100);
        // The node was killed during its trial; the next start boots A.
        let boot = s.begin(true, 150);
        assert_eq!(boot.slot, Slot::A);
        assert_eq!(boot.trial, None);
        let f = boot.interrupted.expect("failure");
        assert_eq!((f.slot, f.sha256.as_str()), (Slot::B, "new"));
        assert_eq!(s.rollbacks, 1);
        assert!(s.b.as_ref().and_then(|i| i.failed.as_ref()).is_some());
        assert!(!s.confirm(Slot::B), "no trial to confirm any more");
        // A failed slot is neither tried again nor a rollback target.
        s.next = Some(Slot::B);
        assert_eq!(s.begin(false, 160).slot, Slot::A);
        assert!(matches!(s.rollback(170), Err(Refusal::Failed(Slot::B, _))));
    }

    #[test]
    fn failing_a_trial_keeps_the_active_slot_and_counts() {
        let mut s = State::initial(info("old"));
        s.stage(Slot::B, info("bad"));
        s.begin(true, 1);
        let f = s.fail("did not become HEALTHY within 60s".into(), 61);
        assert_eq!(f.map(|f| f.slot), Some(Slot::B));
        assert_eq!(s.active, Slot::A);
        assert_eq!(s.begin(false, 62).slot, Slot::A);
        assert_eq!(s.rollbacks, 1);
        assert!(s.last_failure.is_some());
        // The next update replaces the failed binary and clears the failure
        // once it is confirmed.
        let slot = s.target().expect("target");
        s.stage(slot, info("good"));
        s.begin(true, 70);
        assert!(s.confirm(Slot::B));
        assert_eq!(s.last_failure, None);
        assert_eq!(s.rollbacks, 1);
    }

    #[test]
    fn rollback_by_hand() {
        let mut s = State::initial(info("old"));
        assert_eq!(s.rollback(1), Err(Refusal::NeverUpdated));
        s.stage(Slot::B, info("new"));
        // Staged but never run: not a place to roll back to.
        s.next = None;
        s.active = Slot::A;
        assert_eq!(s.rollback(1), Err(Refusal::NotProven(Slot::B)));
        s.stage(Slot::B, info("new"));
        s.begin(true, 2);
        // During the trial a rollback gives the trial up.
        assert_eq!(s.rollback(3), Ok(Rollback::AbortTrial(Slot::B)));
        assert_eq!(s.begin(false, 4).slot, Slot::A);
        // After a confirmed update, back to the previous binary, on trial.
        s.stage(Slot::B, info("newer"));
        s.begin(true, 5);
        assert!(s.confirm(Slot::B));
        assert_eq!(s.rollback(6), Ok(Rollback::To(Slot::A)));
        let boot = s.begin(false, 7);
        assert_eq!(boot.slot, Slot::A);
        assert!(boot.trial.is_some());
    }

    #[test]
    fn state_is_written_atomically_and_read_back() {
        let tmp = tempfile::tempdir().expect("tmp");
        let slots = Slots::new(tmp.path());
        assert_eq!(slots.load().expect("load"), None);
        let f = tmp.path().join("bin");
        fs::write(&f, b"#!/bin/sh\n").expect("write");
        slots.create().expect("create");
        slots.install(&f, Slot::B).expect("install");
        assert!(!f.exists());
        let mode = fs::metadata(slots.path(Slot::B))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o500);
        slots
            .modify(|s| {
                *s = Some(State::initial(info("x")));
                Ok::<_, SlotError>(())
            })
            .expect("modify");
        let back = slots.load().expect("load").expect("state");
        assert_eq!(back.active, Slot::A);
        // A refused change leaves the file alone.
        let r: Result<(), SlotError> = slots.modify(|s| {
            s.as_mut().expect("state").active = Slot::B;
            Err(SlotError::Corrupt {
                path: PathBuf::new(),
                detail: "refused".into(),
            })
        });
        assert!(r.is_err());
        assert_eq!(slots.load().expect("load").map(|s| s.active), Some(Slot::A));
        fs::write(tmp.path().join(DIR).join(STATE), b"{").expect("corrupt");
        assert!(matches!(slots.load(), Err(SlotError::Corrupt { .. })));
    }
}
