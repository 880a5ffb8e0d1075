//! The real `aurora` binary, driven the way a person or a script would.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aurora_tests::{PATIENCE, binary, children_of, is_alive};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn aurora(args: &[&str]) -> Output {
    Command::new(binary("aurora"))
        .args(args)
        .output()
        .expect("aurora runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A config file naming the example plugins by absolute path, in a fresh
/// directory of its own.
fn config_file(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aurora-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("aurora.toml");
    let config = format!(
        "[[plugin]]\nname = \"echo\"\ncommand = {:?}\n\n\
         [[plugin]]\nname = \"misbehave\"\ncommand = {:?}\n",
        binary("aurora-plugin-echo"),
        binary("aurora-plugin-misbehave"),
    );
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn call_prints_the_json_reply() {
    let output = aurora(&["call", "echo", "upper", "\"hello\""]);
    assert!(output.status.success(), "stderr: {}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "\"HELLO\"\n");
}

#[test]
fn call_with_a_config_file() {
    let config = config_file("call");
    let config = config.to_str().unwrap();
    let output = aurora(&["call", "--config", config, "echo", "reverse", "\"abc\""]);
    assert!(output.status.success(), "stderr: {}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "\"cba\"\n");
}

#[test]
fn call_timeout_fails_fast_with_exit_code_3() {
    let started = Instant::now();
    let output = aurora(&["call", "--timeout", "200ms", "echo", "sleep", "600000"]);
    // Far below the ten minutes the sleep asked for; the bound only proves
    // that the timeout, not the sleep, ended the call.
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(
        output.status.code(),
        Some(3),
        "stderr: {}",
        text(&output.stderr)
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains("timed out after 200ms"), "{stderr}");
    assert!(output.stdout.is_empty());
}

#[test]
fn call_to_a_crashing_plugin_reports_its_exit_and_stderr() {
    let output = aurora(&["call", "echo", "crash"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("exited with code 3"), "{stderr}");
    assert!(stderr.contains("crashing on request"), "{stderr}");
}

#[test]
fn bad_requests_exit_with_code_2_and_say_why() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["call", "nobody", "upper", "\"x\""],
            "no plugin named \"nobody\"",
        ),
        (
            &["call", "echo", "shout", "\"x\""],
            "has no method \"shout\"",
        ),
        (&["call", "echo", "upper", "{not json"], "not valid JSON"),
        (
            &["call", "--config", "/nonexistent.toml", "echo", "upper"],
            "cannot read config",
        ),
    ];
    for (args, expected) in cases {
        let output = aurora(args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// Numbers the control sockets of the daemons these tests start.
static NEXT_SOCKET: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `aurora run` in the background, with its stderr read line by line.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        // A control socket of its own, so these daemons can run in parallel
        // with each other and with any daemon on the machine.
        let socket = std::env::temp_dir().join(format!(
            "aurora-cli-{}-{}.sock",
            std::process::id(),
            NEXT_SOCKET.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut child = Command::new(binary("aurora"))
            .args(args)
            .env("AURORA_LOG", "info")
            .env("AURORA_SOCKET", &socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("aurora starts");
        let lines = aurora_tests::stderr_lines(&mut child);
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing `needle`.
    fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => self.seen.push(line),
                Err(_) => break,
            }
        }
        panic!(
            "aurora never logged {needle:?}; it logged:\n{}",
            self.seen.join("\n")
        );
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "aurora did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The plugin processes among the children of `aurora` (the other child is
/// the guardian, a fork of aurora itself).
fn plugins_of(daemon: &Daemon) -> Vec<u32> {
    let own_exe = std::fs::read_link(format!("/proc/{}/exe", daemon.pid())).ok();
    children_of(daemon.pid())
        .into_iter()
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok() != own_exe)
        .collect()
}

/// A test that fails half-way must not leave its daemon running.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn assert_gone_soon(pids: &[u32]) {
    let deadline = Instant::now() + PATIENCE;
    while pids.iter().any(|&pid| is_alive(pid)) {
        assert!(Instant::now() < deadline, "survivors: {pids:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_with_the_embedded_default_serves_the_examples_and_stops_on_sigint() {
    let mut daemon = Daemon::start(&["run"]);
    let line = daemon.wait_for_line("aurora is running");
    assert!(line.contains("ready=2"), "{line}");
    let plugins = plugins_of(&daemon);
    assert_eq!(
        plugins.len(),
        2,
        "expected echo and wordcount, found {plugins:?}"
    );
    let everything = children_of(daemon.pid());

    daemon.signal(Signal::SIGINT);
    let status = daemon.wait();
    assert!(status.success(), "{status:?}");
    assert_gone_soon(&everything);
}

#[test]
fn run_stops_gracefully_on_sigterm() {
    let config = config_file("run");
    let mut daemon = Daemon::start(&["run", "--config", config.to_str().unwrap()]);
    daemon.wait_for_line("aurora is running");
    let plugins = plugins_of(&daemon);
    assert_eq!(plugins.len(), 2, "{plugins:?}");
    let everything = children_of(daemon.pid());

    daemon.signal(Signal::SIGTERM);
    daemon.wait_for_line("every plugin stopped");
    assert!(daemon.wait().success());
    assert_gone_soon(&everything);
}

#[test]
fn killing_aurora_outright_takes_its_plugins_with_it() {
    let config = config_file("kill");
    let mut daemon = Daemon::start(&["run", "--config", config.to_str().unwrap()]);
    daemon.wait_for_line("aurora is running");
    let plugins = plugins_of(&daemon);
    assert_eq!(plugins.len(), 2, "{plugins:?}");
    let everything = children_of(daemon.pid());

    daemon.signal(Signal::SIGKILL);
    daemon.wait();
    assert_gone_soon(&everything);
}
