//! Runs a downloaded binary's `--version` before it may become a slot.
//!
//! The sandbox keeps a wrong file from doing harm while it is tried, it is
//! no defence against a hostile one (that one the operator vouched for with
//! its digest, and it would run as the node anyway once installed): an
//! empty environment and working directory, no standard input, its own
//! process group killed after the timeout, no new privileges, no file
//! writes (`RLIMIT_FSIZE` 0), no forks for non-root users (`RLIMIT_NPROC`),
//! bounded CPU time, memory and descriptors, and death with the node
//! (`PR_SET_PDEATHSIG`). Reads and the network stay open.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a node binary prints first on `--version`: clap's `NAME VERSION`.
const EXPECTED_PREFIX: &str = "metropolis-node ";
/// Output kept from the check, per stream.
const OUTPUT_MAX: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CheckError {
    #[error("the file is not a program this node can run ({0})")]
    NotAProgram(String),
    #[error("`--version` {0}{1}")]
    Failed(String, String),
    #[error("`--version` did not finish within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error(
        "`--version` printed {0:?}, not a metropolis-node version line: not a metropolis-node binary"
    )]
    NotNode(String),
    #[error("cannot run the check: {0}")]
    Local(String),
}

/// Runs `path --version` in the sandbox (working directory `sandbox`, which
/// should be empty) and returns the version line. Blocks: call it from a
/// blocking thread, which then also stays alive for the child's lifetime
/// (`PR_SET_PDEATHSIG` fires when the forking thread exits).
pub fn check_runs(path: &Path, sandbox: &Path, timeout: Duration) -> Result<String, CheckError> {
    // exec would hand anything else to /bin/sh as a script.
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| CheckError::Local(e.to_string()))?;
    if !(magic[..n].starts_with(b"\x7fELF") || magic[..n].starts_with(b"#!")) {
        return Err(CheckError::NotAProgram(
            "neither an ELF executable nor a script starting with #!".into(),
        ));
    }
    let mut child = spawn_retrying(path, sandbox)?;
    let pid = child.id() as i32;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                kill_group(pid);
                let _ = child.wait();
                return Err(CheckError::Timeout(timeout));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                kill_group(pid);
                let _ = child.wait();
                return Err(CheckError::Local(e.to_string()));
            }
        }
    };
    // Whatever it left behind in its group goes too, so that the pipes
    // close and reading them ends.
    kill_group(pid);
    let stdout = read_bounded(child.stdout.take());
    let stderr = read_bounded(child.stderr.take());
    if !status.success() {
        let how = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "failed".to_string(),
        };
        let said = first_line(&stderr).or_else(|| first_line(&stdout));
        return Err(CheckError::Failed(
            how,
            said.map(|s| format!(": {s}")).unwrap_or_default(),
        ));
    }
    let line = first_line(&stdout).unwrap_or_default();
    if !line.starts_with(EXPECTED_PREFIX) {
        return Err(CheckError::NotNode(line));
    }
    Ok(line)
}

fn first_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(200).collect())
}

/// Reads what a pipe holds, without waiting on writers still alive.
fn read_bounded<R: Read + std::os::fd::AsRawFd>(pipe: Option<R>) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    // SAFETY: fcntl on a descriptor the pipe owns.
    unsafe {
        let fd = pipe.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while out.len() < OUTPUT_MAX {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out.truncate(OUTPUT_MAX);
    out
}

fn kill_group(pid: i32) {
    // SAFETY: signals the process group the child leads (created by
    // process_group(0)); ESRCH when it is gone is fine.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Spawns the check; a freshly written file can briefly be "busy" when
/// another thread forked while its write descriptor was open.
fn spawn_retrying(path: &Path, sandbox: &Path) -> Result<std::process::Child, CheckError> {
    let mut tries = 0;
    loop {
        match sandboxed(path, sandbox).spawn() {
            Ok(child) => return Ok(child),
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(libc::ENOEXEC) => CheckError::NotAProgram("exec format error".into()),
                    Some(libc::EACCES) => {
                        CheckError::NotAProgram("permission denied on exec".into())
                    }
                    Some(libc::ENOENT) => CheckError::NotAProgram(
                        "it, or the interpreter it names, does not exist".into(),
                    ),
                    _ => CheckError::Local(e.to_string()),
                });
            }
        }
    }
}

fn sandboxed(path: &Path, sandbox: &Path) -> Command {
    let mut cmd = Command::new(path);
    cmd.arg("--version")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir(sandbox)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid, setrlimit), allocating
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            let limits = [
                (libc::RLIMIT_FSIZE, 0 as libc::rlim_t),
                (libc::RLIMIT_CPU, 10),
                (libc::RLIMIT_NOFILE, 64),
                (libc::RLIMIT_NPROC, 1),
                (libc::RLIMIT_AS, 4 << 30),
            ];
            for (resource, value) in limits {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        p
    }

    #[test]
    fn accepts_a_node_binary_and_refuses_others() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sandbox = tmp.path().join("sandbox");
        std::fs::create_dir(&sandbox).expect("mkdir");
        let t = Duration::from_secs(10);

        let good = script(tmp.path(), "good", "echo 'metropolis-node 9.9.9'");
        assert_eq!(
            check_runs(&good, &sandbox, t),
            Ok("metropolis-node 9.9.9".into())
        );

        let fails = script(tmp.path(), "fails", "echo 'no such flag' >&2; exit 1");
        assert_eq!(
            check_runs(&fails, &sandbox, t),
            Err(CheckError::Failed(
                "exited with status 1".into(),
                ": no such flag".into()
            ))
        );

        let other = script(tmp.path(), "other", "echo 'bash 5.2'");
        assert!(matches!(
            check_runs(&other, &sandbox, t),
            Err(CheckError::NotNode(_))
        ));

        let data = tmp.path().join("data");
        std::fs::write(&data, [0u8, 1, 2, 3, 0xff, 0x7f]).expect("write");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let r = check_runs(&data, &sandbox, t);
        assert!(matches!(r, Err(CheckError::NotAProgram(_))), "{r:?}");

        let hangs = script(tmp.path(), "hangs", "exec sleep 30");
        let started = Instant::now();
        assert_eq!(
            check_runs(&hangs, &sandbox, Duration::from_millis(300)),
            Err(CheckError::Timeout(Duration::from_millis(300)))
        );
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn the_check_cannot_write_files_or_see_the_environment() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sandbox = tmp.path().join("sandbox");
        std::fs::create_dir(&sandbox).expect("mkdir");
        let target = tmp.path().join("written");
        let writes = script(
            tmp.path(),
            "writes",
            &format!(
                "echo x > {}; echo \"metropolis-node home=$HOME\"",
                target.display()
            ),
        );
        // The write fails (or kills the shell with SIGXFSZ); either way
        // nothing lands on disk, and HOME is not set.
        match check_runs(&writes, &sandbox, Duration::from_secs(10)) {
            Ok(line) => assert_eq!(line, "metropolis-node home="),
            Err(CheckError::Failed(..)) => {}
            Err(e) => panic!("unexpected {e}"),
        }
        let len = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len, 0, "the sandboxed check wrote a file");
    }
}
