//! Running etcd as a supervised child process.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backon::{BackoffBuilder, ExponentialBuilder};
use metropolis_store::EtcdStore;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::config::{DATA_DIR, PID_FILE, client_socket_path, command_line, write_atomic};
use super::wal::reset_unbootstrapped;
use crate::logtree::{LogTree, RawWriter};

/// The log tree DN of etcd's own output.
pub const LOG_DN: &str = "root.consensus.etcd";

/// How long [`Etcd::start`] waits for the client socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Etcd::stop`] lets etcd shut down after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Restart delays: 250 ms, doubling up to 10 s ...
const RESTART_MIN_DELAY: Duration = Duration::from_millis(250);
const RESTART_MAX_DELAY: Duration = Duration::from_secs(10);
/// ... back to the shortest after a run at least this long, so that an etcd
/// that crashes once a day is not restarted 10 s late forever after.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// After etcd exits, how long to wait for the rest of its output. Only a
/// grandchild holding the pipes open could make this matter.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Output kept for error messages: the last bytes of the current run...
const TAIL_BYTES: usize = 16 * 1024;
/// ... of which this many lines are shown.
const TAIL_LINES: usize = 20;

/// A running, supervised etcd.
#[derive(Debug)]
pub struct Etcd {
    socket: PathBuf,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// What the supervisor task shares with the [`Etcd`] handle.
#[derive(Debug)]
struct Shared {
    /// PID of the running etcd, 0 if none.
    pid: AtomicU32,
    /// The end of the current run's output.
    tail: Mutex<VecDeque<u8>>,
}

impl Shared {
    fn clear_tail(&self) {
        self.tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn push_tail(&self, data: &[u8]) {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        tail.extend(data);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }

    /// The last [`TAIL_LINES`] lines of output, for error messages.
    fn tail_text(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        let (a, b) = tail.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let shown = &lines[lines.len().saturating_sub(TAIL_LINES)..];
        if shown.is_empty() {
            "(no output)".into()
        } else {
            shown.join("\n")
        }
    }
}

/// What the supervisor reports to [`Etcd::start`] while it waits.
#[derive(Debug, Default, Clone)]
struct Progress {
    /// Why the first run ended, with the end of its output.
    first_exit: Option<(String, String)>,
}

/// Everything one run of etcd needs.
struct Supervisor {
    dir: PathBuf,
    socket: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
    logs: Arc<LogTree>,
    shared: Arc<Shared>,
    spawner: Spawner,
    progress: watch::Sender<Progress>,
}

enum RunEnd {
    /// [`Etcd::stop`] (or dropping the handle) ended it.
    Stopped,
    /// etcd exited, or could not be started; why.
    Exited(String),
}

impl Etcd {
    /// Starts etcd from the configuration [`configure`] wrote into `dir`,
    /// and keeps it running: its output goes into `logs` under [`LOG_DN`],
    /// and whenever it exits it is started again after a delay (250 ms,
    /// doubling up to 10 s, back to 250 ms after a run of 30 s), each exit
    /// logged with its status.
    ///
    /// Returns once the client socket accepts connections (etcd listens
    /// before it has joined its cluster, so this does not wait for a
    /// quorum). Fails, with the end of etcd's output, if the first etcd exits
    /// or the socket does not accept within 30 s; nothing keeps running then.
    pub async fn start(dir: &Path, binary: &Path, logs: Arc<LogTree>) -> anyhow::Result<Etcd> {
        let dir = std::path::absolute(dir)
            .with_context(|| format!("resolving etcd directory {}", dir.display()))?;
        let socket = client_socket_path(&dir)?;
        let args = command_line(&dir)?;
        let binary = std::path::absolute(binary)
            .with_context(|| format!("resolving {}", binary.display()))?;
        // Fail on a bad DN now, not in every run.
        drop(logs.raw_writer(LOG_DN)?);

        let shared = Arc::new(Shared {
            pid: AtomicU32::new(0),
            tail: Mutex::new(VecDeque::new()),
        });
        let (progress_tx, mut progress) = watch::channel(Progress::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let supervisor = Supervisor {
            dir,
            socket: socket.clone(),
            binary,
            args,
            logs,
            shared: shared.clone(),
            spawner: Spawner::new()?,
            progress: progress_tx,
        };
        let etcd = Etcd {
            socket,
            shared,
            stop: stop_tx,
            task: tokio::spawn(supervisor.run(stop_rx)),
        };

        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if UnixStream::connect(&etcd.socket).await.is_ok() {
                tracing::info!(socket = %etcd.socket.display(), "etcd accepts client connections");
                return Ok(etcd);
            }
            // Not in the `if let`: the borrow would live across the await below.
            let first_exit = progress.borrow_and_update().first_exit.clone();
            if let Some((why, output)) = first_exit {
                etcd.stop().await;
                bail!("etcd exited during startup ({why}); its last output:\n{output}");
            }
            if tokio::time::Instant::now() >= deadline {
                let output = etcd.shared.tail_text();
                let socket = etcd.socket.display().to_string();
                etcd.stop().await;
                bail!(
                    "etcd did not accept connections on {socket} within {}s; its last output:\n\
                     {output}",
                    READY_TIMEOUT.as_secs()
                );
            }
            // Poll the socket; wake early if the run ends.
            if let Ok(Err(_)) =
                tokio::time::timeout(Duration::from_millis(50), progress.changed()).await
            {
                // Only a panic ends the supervisor before stop().
                let output = etcd.shared.tail_text();
                etcd.stop().await;
                bail!("the etcd supervisor ended unexpectedly; etcd's last output:\n{output}");
            }
        }
    }

    /// The client socket (`<dir>/client.sock:0`, absolute); etcd clients
    /// connect to `unix://<this path>`.
    #[cfg_attr(
        not(test),
        allow(dead_code, reason = "the daemon connects through connect()")
    )]
    pub fn client_socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// A client of this member, once it serves clients. A learner does not
    /// until it has caught up and been promoted, and a member of a cluster
    /// without quorum not until it has one: this waits for as long as that
    /// takes (callers bound it).
    pub fn connect(&self) -> impl Future<Output = Arc<EtcdStore>> + Send + 'static {
        connect(self.socket.clone())
    }

    /// The PID of the etcd process running now, if one is.
    #[cfg_attr(
        not(test),
        allow(dead_code, reason = "the daemon has no use for it yet; tests do")
    )]
    pub fn pid(&self) -> Option<u32> {
        match self.shared.pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// Stops etcd (SIGTERM, then SIGKILL after 5 s) and supervising it.
    /// Returns once the process is gone. Dropping the handle stops etcd the
    /// same way, in the background.
    pub async fn stop(self) {
        let Etcd { stop, task, .. } = self;
        // The supervisor may be gone already (it panicked); then so is etcd.
        let _ = stop.send(());
        if let Err(e) = task.await {
            tracing::error!(error = %e, "etcd supervisor failed");
        }
    }
}

/// See [`Etcd::connect`].
async fn connect(socket: PathBuf) -> Arc<EtcdStore> {
    let mut delay = Duration::from_millis(100);
    let mut next_report = Instant::now() + Duration::from_secs(5);
    loop {
        match EtcdStore::connect_unix(&socket).await {
            Ok(store) => return store,
            Err(e) => {
                if Instant::now() >= next_report {
                    tracing::info!(error = %e, "waiting for this node's etcd member to serve (a new member serves once it has caught up and was promoted)");
                    next_report += Duration::from_secs(30);
                }
                tokio::time::sleep(delay).await;
                // Often: every moment between etcd serving and the node noticing
                // is a moment without a curator.
                delay = (delay * 2).min(Duration::from_millis(250));
            }
        }
    }
}

impl Supervisor {
    async fn run(self, mut stop: oneshot::Receiver<()>) {
        let mut delays = restart_backoff();
        loop {
            let started = Instant::now();
            let why = match self.run_once(&mut stop).await {
                RunEnd::Stopped => break,
                RunEnd::Exited(why) => why,
            };
            let ran_for = started.elapsed();
            if ran_for >= BACKOFF_RESET_AFTER {
                delays = restart_backoff();
            }
            let delay = delays.next().unwrap_or(RESTART_MAX_DELAY);
            let output = self.shared.tail_text();
            tracing::warn!(
                status = %why,
                ran_for = ?ran_for,
                restart_in = ?delay,
                last_output = output.lines().last().unwrap_or_default(),
                "etcd exited; restarting it"
            );
            self.progress.send_modify(|p| {
                p.first_exit.get_or_insert((why, output));
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = &mut stop => break,
            }
        }
        remove_if_exists(&self.dir.join(PID_FILE));
    }

    /// Runs etcd once, until it exits or `stop` fires. Never polls `stop`
    /// after it has fired (a oneshot receiver must not be).
    async fn run_once(&self, stop: &mut oneshot::Receiver<()>) -> RunEnd {
        self.shared.clear_tail();
        reset_unbootstrapped(&self.dir.join(DATA_DIR));
        // etcd replaces it itself, but a stale socket left by a killed etcd
        // would look like a live one to anyone who only checks that it exists.
        remove_if_exists(&self.socket);
        let mut child = match self.spawner.spawn(self.command()).await {
            Ok(child) => child,
            Err(e) => return RunEnd::Exited(format!("cannot run {}: {e}", self.binary.display())),
        };
        let pid = child.id().unwrap_or(0);
        self.shared.pid.store(pid, Ordering::SeqCst);
        if let Err(e) = write_atomic(&self.dir, PID_FILE, format!("{pid}\n").as_bytes(), 0o644) {
            tracing::warn!(error = %format!("{e:#}"), "cannot record etcd's PID");
        }
        tracing::info!(pid, "etcd started");

        let mut pumps = Vec::new();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            match self.logs.raw_writer(LOG_DN) {
                Ok(writer) => pumps.push(tokio::spawn(pump(out, writer, self.shared.clone()))),
                Err(e) => tracing::error!(error = %e, "cannot log etcd's output"),
            }
        }

        let status = tokio::select! {
            status = child.wait() => status,
            _ = stop => {
                terminate(&mut child, pid).await;
                self.shared.pid.store(0, Ordering::SeqCst);
                drain(pumps).await;
                return RunEnd::Stopped;
            }
        };
        self.shared.pid.store(0, Ordering::SeqCst);
        // The reason etcd gives for exiting is its last line.
        drain(pumps).await;
        RunEnd::Exited(match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("cannot wait for it: {e}"),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the node's terminal must not
            // take etcd down under a curator that is still shutting down;
            // the node stops etcd itself, last.
            .process_group(0)
            .kill_on_drop(true);
        for (name, _) in std::env::vars_os() {
            if name.as_encoded_bytes().starts_with(b"ETCD_") {
                cmd.env_remove(name);
            }
        }
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe calls (prctl, getppid), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                // If the node dies without stopping etcd (SIGKILL, OOM
                // killer, abort), an orphaned etcd would keep the peer port
                // and the data directory's lock, and the restarted node's
                // own etcd could not start; it would also keep voting in the
                // cluster for a node that is down. The kernel kills it with
                // the node instead. (The signal fires when the forking
                // *thread* exits, hence the dedicated spawner thread.)
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The node may have died between fork and prctl.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        cmd
    }
}

fn restart_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(RESTART_MIN_DELAY)
        .with_max_delay(RESTART_MAX_DELAY)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// SIGTERM, up to [`STOP_GRACE`] to exit, then SIGKILL.
async fn terminate(child: &mut Child, pid: u32) {
    // The child is not reaped until `wait` below returns, so `pid` cannot
    // belong to another process yet.
    if let Ok(pid) = libc::pid_t::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill has no memory effects.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(status)) => tracing::info!(%status, "etcd stopped"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot wait for etcd to stop"),
        Err(_) => {
            tracing::warn!(
                grace = ?STOP_GRACE,
                "etcd did not stop after SIGTERM; killing it"
            );
            if let Err(e) = child.kill().await {
                tracing::error!(error = %e, "cannot kill etcd");
            }
        }
    }
}

/// Copies one of etcd's output pipes into the log tree and the tail.
async fn pump(mut out: impl AsyncRead + Unpin, mut writer: RawWriter, shared: Arc<Shared>) {
    let mut chunk = vec![0u8; 8192];
    loop {
        match out.read(&mut chunk).await {
            Ok(0) => return,
            Ok(n) => {
                shared.push_tail(&chunk[..n]);
                // Cannot fail: the writer only appends to memory.
                let _ = writer.write_all(&chunk[..n]);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read etcd's output");
                return;
            }
        }
    }
}

/// Waits for the pumps to reach the end of etcd's output, for a while.
async fn drain(pumps: Vec<JoinHandle<()>>) {
    for pump in pumps {
        match tokio::time::timeout(OUTPUT_DRAIN, pump).await {
            Ok(_) => {}
            Err(_) => tracing::warn!("etcd's output pipe is still open after it exited"),
        }
    }
}

fn remove_if_exists(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove"),
    }
}

type SpawnRequest = (Command, oneshot::Sender<io::Result<Child>>);

/// Forks etcd from one thread that lives as long as its supervisor.
///
/// `PR_SET_PDEATHSIG` fires when the thread that forked the child exits, not
/// the process. Tokio's threads come and go (blocking-pool threads retire
/// when idle, a worker that ran `block_in_place` may end up as one), and etcd
/// would be killed for no visible reason whenever the thread that happened
/// to start it retired.
struct Spawner {
    requests: std::sync::mpsc::Sender<SpawnRequest>,
}

impl Spawner {
    fn new() -> anyhow::Result<Spawner> {
        let (requests, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        // Children register with the runtime's process driver (SIGCHLD).
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                // Ends when the supervisor drops its sender, after its
                // last child has been reaped.
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .context("starting the etcd spawner thread")?;
        Ok(Spawner { requests })
    }

    async fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (reply, child) = oneshot::channel();
        let gone = || io::Error::other("the etcd spawner thread is gone");
        self.requests.send((cmd, reply)).map_err(|_| gone())?;
        child.await.map_err(|_| gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::config::{PEER_KEY_FILE, configure, is_configured};
    use crate::consensus::testing::*;
    use metropolis_identity::CertificateAuthority;
    use metropolis_store::{EtcdStore, Op, Store, Txn};
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn single_member_starts_logs_and_stops() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        assert!(!is_configured(&m.dir));
        m.configure_alone(&ca);
        assert!(is_configured(&m.dir));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&m.dir), 0o700);
        assert_eq!(mode(&m.dir.join(PEER_KEY_FILE)), 0o600);

        let logs = LogTree::new();
        let etcd = Etcd::start(&m.dir, &binary, logs.clone()).await.unwrap();
        let socket = etcd.client_socket();
        assert_eq!(socket, m.dir.join("client.sock:0"));
        UnixStream::connect(&socket).await.unwrap();
        let pid = etcd.pid().expect("etcd runs");
        assert_eq!(pid_file(&m.dir), Some(pid));
        eventually(30, "a healthy single-member cluster", || healthy(&socket)).await;
        let lines = etcd_lines(&logs);
        assert!(
            lines.iter().any(|l| l.contains("elected leader")),
            "etcd's log under {LOG_DN}:\n{}",
            lines.join("\n")
        );
        // zap JSON, one entry per line.
        assert!(lines.iter().all(|l| l.starts_with('{')), "{lines:#?}");

        etcd.stop().await;
        assert!(!is_alive(pid), "etcd {pid} still runs after stop()");
        assert!(!m.dir.join(PID_FILE).exists());
        assert!(UnixStream::connect(&socket).await.is_err());
        // The log tree got the shutdown too.
        let lines = etcd_lines(&logs);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("SIGTERM") || l.contains("stopping")),
            "{lines:#?}"
        );

        // And it starts again from the same directory, keeping its data.
        let etcd = Etcd::start(&m.dir, &binary, LogTree::new()).await.unwrap();
        eventually(30, "healthy after a restart", || healthy(&socket)).await;
        etcd.stop().await;
    }

    #[tokio::test]
    async fn killed_etcd_is_restarted() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        m.configure_alone(&ca);
        let etcd = Etcd::start(&m.dir, &binary, LogTree::new()).await.unwrap();
        let socket = etcd.client_socket();
        for _ in 0..2 {
            let old = etcd.pid().unwrap();
            assert_eq!(pid_file(&m.dir), Some(old));
            // As a test or an operator would: by the PID in etcd.pid.
            // SAFETY: kill has no memory effects.
            let rc = unsafe { libc::kill(libc::pid_t::try_from(old).unwrap(), libc::SIGKILL) };
            assert_eq!(rc, 0);
            eventually(15, "a new etcd process", || {
                let pid = etcd.pid();
                async move { pid.is_some_and(|p| p != old) }
            })
            .await;
            let new = etcd.pid().unwrap();
            assert_eq!(pid_file(&m.dir), Some(new));
            assert!(!is_alive(old));
            eventually(30, "the restarted etcd healthy", || healthy(&socket)).await;
        }
        let last = etcd.pid().unwrap();
        etcd.stop().await;
        assert!(!is_alive(last));
    }

    /// Set for the child test process of [`etcd_dies_with_the_node`].
    const NODE_DIR_ENV: &str = "METROPOLIS_TEST_CONSENSUS_NODE_DIR";

    /// A stand-in for the node process: starts etcd from the directory in
    /// [`NODE_DIR_ENV`], prints its PID and waits to be killed. Does nothing
    /// when run on its own.
    #[tokio::test]
    #[ignore = "the child process of etcd_dies_with_the_node"]
    async fn node_process() {
        let Some(dir) = std::env::var_os(NODE_DIR_ENV) else {
            return;
        };
        let etcd = Etcd::start(Path::new(&dir), &etcd_binary(), LogTree::new())
            .await
            .unwrap();
        println!("ETCD_PID={}", etcd.pid().unwrap());
        std::future::pending::<()>().await;
    }

    #[tokio::test]
    async fn etcd_dies_with_the_node() {
        use std::io::BufRead as _;

        etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        m.configure_alone(&ca);
        let mut node = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "consensus::supervisor::tests::node_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(NODE_DIR_ENV, &m.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = node.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                // libtest's "test ... " has no newline of its own.
                if let Some((_, pid)) = line.split_once("ETCD_PID=") {
                    let _ = tx.send(pid.trim().parse::<u32>().unwrap());
                }
            }
        });
        let etcd_pid = rx.recv_timeout(Duration::from_secs(30));
        // The node dies as abruptly as it can: no chance to stop etcd.
        node.kill().unwrap();
        node.wait().unwrap();
        let etcd_pid = etcd_pid.expect("the node process reports etcd's PID within 30s");
        eventually(
            10,
            "etcd gone after the node was SIGKILLed",
            || async move { !is_alive(etcd_pid) },
        )
        .await;
    }

    #[tokio::test]
    async fn two_members_form_a_cluster_over_mutual_tls() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let (a, b) = (Member::new(), Member::new());
        let cluster = vec![(a.name.clone(), a.url()), (b.name.clone(), b.url())];
        configure(&a.dir, &a.config(&ca, cluster.clone()), &a.key).unwrap();
        configure(&b.dir, &b.config(&ca, cluster), &b.key).unwrap();
        let (logs_a, logs_b) = (LogTree::new(), LogTree::new());
        let (ea, eb) = tokio::join!(
            Etcd::start(&a.dir, &binary, logs_a.clone()),
            Etcd::start(&b.dir, &binary, logs_b.clone()),
        );
        let (ea, eb) = (ea.unwrap(), eb.unwrap());
        let (sa, sb) = (ea.client_socket(), eb.client_socket());

        // /health is true only with a leader, i.e. after the peers have
        // talked to each other over TLS.
        eventually(30, "member A healthy", || healthy(&sa)).await;
        eventually(30, "member B healthy", || healthy(&sb)).await;
        for (name, logs) in [("A", &logs_a), ("B", &logs_b)] {
            let lines = etcd_lines(logs);
            assert!(
                lines.iter().any(|l| l.contains("elected leader")),
                "member {name}'s log:\n{}",
                lines.join("\n")
            );
        }

        // A write through one member is read (linearizably) through the
        // other, by the store client the curator uses.
        let (store_a, store_b) = (
            EtcdStore::connect_unix(&sa).await.unwrap(),
            EtcdStore::connect_unix(&sb).await.unwrap(),
        );
        let put = Txn::new().and_then(Op::put(b"metropolis".to_vec(), b"replicated".to_vec()));
        assert!(store_a.txn(put).await.unwrap().succeeded);
        let got = store_b.get(b"metropolis").await.unwrap().expect("the key");
        assert_eq!(got.value, b"replicated");
        drop((store_a, store_b));

        let (pa, pb) = (ea.pid().unwrap(), eb.pid().unwrap());
        tokio::join!(ea.stop(), eb.stop());
        assert!(!is_alive(pa) && !is_alive(pb));
    }

    #[tokio::test]
    async fn etcd_exiting_during_startup_is_reported_with_its_output() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let mut m = Member::new();
        // TEST-NET-1: not an address of this machine, so etcd cannot listen.
        m.address = "192.0.2.1".parse().unwrap();
        m.configure_alone(&ca);
        let err = Etcd::start(&m.dir, &binary, LogTree::new())
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("etcd exited during startup"), "{msg}");
        assert!(msg.contains("192.0.2.1"), "{msg}");
        assert!(msg.contains("cannot assign requested address"), "{msg}");
        assert!(!m.dir.join(PID_FILE).exists());
    }
}
