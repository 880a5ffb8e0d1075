//! Helpers for tests of the daemon: a temporary directory per test, config
//! and manifest files in it, the real `aurora run` in the background with a
//! control socket of its own, and the CLI pointed at that socket.
//!
//! Nothing here sleeps to synchronise: tests wait for the daemon's log lines
//! or for the CLI's answers, within [`PATIENCE`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{PATIENCE, binary};

/// A directory of its own for one test, removed when the test passes.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    /// A fresh, empty directory named after the test.
    ///
    /// # Panics
    ///
    /// When the directory cannot be made.
    pub fn new(test: &str) -> TestDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "aurora-daemon-{}-{}-{test}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("the temporary directory can be made");
        // Readable by everyone, so tests that run a client as another user
        // reach the socket and meet its own permissions.
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        TestDir { path }
    }

    /// Writes `text` to `name` inside the directory and returns its path.
    ///
    /// # Panics
    ///
    /// When the file cannot be written.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("the file's directory can be made");
        }
        std::fs::write(&path, text).expect("the file can be written");
        path
    }

    /// Writes a manifest `plugins/<dir>/plugin.toml`.
    pub fn manifest(&self, dir: &str, text: &str) -> PathBuf {
        self.write(&format!("plugins/{dir}/plugin.toml"), text)
    }

    /// The control socket tests give the daemon.
    pub fn socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A manifest for one of the example plugins, by its binary's name.
pub fn manifest_for(name: &str, binary_name: &str, version: &str, extra: &str) -> String {
    format!(
        "name = {name:?}\nversion = {version:?}\ncommand = {:?}\n\
         handshake_timeout = \"20s\"\nhealth_interval = \"off\"\n{extra}\n",
        binary(binary_name)
    )
}

/// A config whose `[daemon]` table keeps every path inside `dir`; the
/// plugins directory is made if missing.
pub fn daemon_config(dir: &TestDir, rest: &str) -> String {
    std::fs::create_dir_all(dir.path.join("plugins")).expect("the plugins directory can be made");
    format!(
        "[daemon]\nplugins_dir = \"plugins\"\nstate_dir = {:?}\nruntime_dir = {:?}\n\n{rest}",
        dir.path.join("state"),
        dir.path.join("run"),
    )
}

/// `aurora run` in the background with its stderr read line by line.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far, for failure messages.
    pub seen: Vec<String>,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `aurora run --config config` with a control socket in `dir`
    /// and `env` added to its environment.
    ///
    /// # Panics
    ///
    /// When `aurora` cannot be started.
    pub fn start(dir: &TestDir, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let socket = dir.socket();
        let mut command = Command::new(binary("aurora"));
        command
            .arg("--socket")
            .arg(&socket)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("AURORA_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("aurora starts");
        let lines = crate::stderr_lines(&mut child);
        Daemon {
            child,
            lines,
            seen: Vec::new(),
            socket,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line that contains every one of `needles`.
    ///
    /// # Panics
    ///
    /// After [`PATIENCE`] without one, printing everything logged.
    pub fn wait_for_line(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().all(|needle| line.contains(needle)) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "aurora never logged a line with {needles:?}; it logged:\n{}",
            self.seen.join("\n")
        );
    }

    /// The lines logged so far plus whatever arrives until the daemon exits.
    pub fn drain(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(PATIENCE) {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    /// Runs the CLI against this daemon's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_at(&self.socket, args)
    }

    /// Runs the CLI and returns its stdout, failing the test (with the
    /// daemon's log) when it does not succeed.
    ///
    /// # Panics
    ///
    /// When the command fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "aurora {args:?} failed with {:?}:\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            output.status.code(),
            text(&output.stdout),
            text(&output.stderr),
            self.seen.join("\n")
        );
        text(&output.stdout)
    }

    /// `aurora status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let json = self.cli_ok(&["status", "--json"]);
        serde_json::from_str(&json).expect("status --json prints JSON")
    }

    /// The status of plugin `name`.
    ///
    /// # Panics
    ///
    /// When the daemon does not report it.
    pub fn plugin(&self, name: &str) -> serde_json::Value {
        let status = self.status();
        status["plugins"]
            .as_array()
            .and_then(|plugins| plugins.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no plugin {name} in {status:#}"))
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("aurora can be signalled");
    }

    /// Waits for the daemon to exit.
    ///
    /// # Panics
    ///
    /// When it is still running after [`PATIENCE`].
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("aurora can be waited for") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "aurora did not exit; it logged:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the CLI with `--socket socket`.
///
/// # Panics
///
/// When `aurora` cannot be run.
pub fn cli_at(socket: &Path, args: &[&str]) -> Output {
    Command::new(binary("aurora"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("aurora runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
