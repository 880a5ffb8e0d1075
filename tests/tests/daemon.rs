//! The daemon as a sysadmin runs it: the real `aurora run` with a config, a
//! plugins directory of manifests and the real example plugins, driven by
//! the real CLI over its control socket, signalled like a service, and
//! watched through a notification socket the test binds as systemd would.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aurora_tests::daemon::{Daemon, TestDir, cli_at, daemon_config, manifest_for, text};
use aurora_tests::{PATIENCE, binary, is_alive};
use nix::sys::signal::Signal;

fn echo_manifest(name: &str, extra: &str) -> String {
    manifest_for(name, "aurora-plugin-echo", env!("CARGO_PKG_VERSION"), extra)
}

fn wordcount_manifest(name: &str, extra: &str) -> String {
    manifest_for(
        name,
        "aurora-plugin-wordcount",
        env!("CARGO_PKG_VERSION"),
        extra,
    )
}

/// The index of the first line containing every needle.
fn position(lines: &[String], needles: &[&str]) -> usize {
    lines
        .iter()
        .position(|line| needles.iter().all(|needle| line.contains(needle)))
        .unwrap_or_else(|| panic!("no line with {needles:?} in:\n{}", lines.join("\n")))
}

fn pid_of(plugin: &serde_json::Value) -> u32 {
    plugin["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {plugin:#}")) as u32
}

#[test]
fn plugins_are_discovered_from_manifests_and_called_through_the_daemon() {
    let dir = TestDir::new("discovery");
    dir.manifest("echo", &echo_manifest("echo", ""));
    dir.manifest("tools/wordcount", &wordcount_manifest("wordcount", ""));
    dir.write("plugins/README", "not a manifest");
    let config = dir.write("aurora.toml", &daemon_config(&dir, ""));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running", "ready=2"]);

    let echo = daemon.plugin("echo");
    assert_eq!(echo["state"], "ready", "{echo:#}");
    assert_eq!(echo["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(echo["declared_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        echo["origin"]
            .as_str()
            .unwrap()
            .ends_with("plugins/echo/plugin.toml"),
        "{echo:#}"
    );
    assert!(echo["memory_bytes"].as_u64().unwrap() > 0, "{echo:#}");
    assert!(is_alive(pid_of(&echo)));

    assert_eq!(
        daemon.cli_ok(&["call", "echo", "upper", "\"hello\""]),
        "\"HELLO\"\n"
    );
    let counted = daemon.cli_ok(&["call", "wordcount", "count", "\"a b a\""]);
    assert!(counted.contains("\"words\":3"), "{counted}");

    // Failures keep their exit codes through the daemon.
    let cases: [(&[&str], i32, &str); 5] = [
        (
            &["call", "nobody", "upper", "\"x\""],
            2,
            "no plugin named \"nobody\"",
        ),
        (
            &["call", "echo", "shout", "\"x\""],
            2,
            "has no method \"shout\"",
        ),
        (&["call", "echo", "upper", "{not json"], 2, "not valid JSON"),
        (
            &["call", "--timeout", "200ms", "echo", "sleep", "600000"],
            3,
            "timed out after 200ms",
        ),
        (&["call", "echo", "crash"], 1, "crashing on request"),
    ];
    for (args, code, expected) in cases {
        let output = daemon.cli(args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }

    // The crash cost a restart; the failed calls are counted.
    daemon.wait_for_line(&[
        "plugin{name=echo}",
        "plugin process started",
        "generation=2",
    ]);
    let echo = daemon.plugin("echo");
    assert_eq!(echo["restarts"], 1, "{echo:#}");
    assert!(echo["calls"].as_u64().unwrap() >= 4, "{echo:#}");
    assert!(echo["errors"].as_u64().unwrap() >= 3, "{echo:#}");

    let table = daemon.cli_ok(&["status"]);
    for expected in [
        "PLUGIN",
        "STATE",
        "MEMORY",
        "CPU",
        "echo",
        "wordcount",
        "ready",
    ] {
        assert!(
            table.contains(expected),
            "{expected} missing from:\n{table}"
        );
    }

    let stopped = daemon.cli_ok(&["shutdown"]);
    assert!(stopped.contains("every plugin stopped"), "{stopped}");
    assert!(daemon.wait().success());
    assert!(!daemon.socket.exists(), "the socket outlived the daemon");
}

#[test]
fn dependency_errors_are_reported_together_and_nothing_starts() {
    let dir = TestDir::new("dependencies");
    dir.manifest("echo", &echo_manifest("echo", ""));
    dir.manifest(
        "needs-ghost",
        &echo_manifest("needs-ghost", "[requires]\nghost = \"^1\""),
    );
    dir.manifest(
        "picky",
        &echo_manifest("picky", "[requires]\necho = \">=2\""),
    );
    dir.manifest(
        "chicken",
        &echo_manifest("chicken", "[requires]\negg = \"*\""),
    );
    dir.manifest("egg", &echo_manifest("egg", "[requires]\nchicken = \"*\""));
    dir.manifest(
        "twin-a",
        &manifest_for("twin", "aurora-plugin-echo", "1.0.0", ""),
    );
    dir.manifest(
        "twin-b",
        &manifest_for("twin", "aurora-plugin-echo", "1.1.0", ""),
    );
    let config = dir.write("aurora.toml", &daemon_config(&dir, ""));
    let version = env!("CARGO_PKG_VERSION");
    let expected = [
        format!(
            "plugin \"needs-ghost\" {version} requires \"ghost\" ^1, but no plugin \"ghost\" is defined"
        ),
        format!("plugin \"picky\" {version} requires \"echo\" >=2, but \"echo\" is {version}"),
        format!(
            "dependency cycle: \"chicken\" {version} -> \"egg\" {version} -> \"chicken\" {version}"
        ),
        "plugin \"twin\" 1.1.0 is defined twice".to_owned(),
        "(as \"twin\" 1.0.0)".to_owned(),
    ];

    let check = Command::new(binary("aurora"))
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = text(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{stderr}");
    for expected in &expected {
        assert!(
            stderr.contains(expected.as_str()),
            "{expected:?} not in:\n{stderr}"
        );
    }
    assert!(stderr.contains("4 problems"), "{stderr}");

    let mut daemon = Daemon::start(&dir, &config, &[]);
    let status = daemon.wait();
    let log = daemon.drain().join("\n");
    assert_eq!(status.code(), Some(2), "{log}");
    for expected in &expected {
        assert!(
            log.contains(expected.as_str()),
            "{expected:?} not in:\n{log}"
        );
    }
    assert!(!log.contains("plugin process started"), "{log}");
    assert!(!daemon.socket.exists());
}

#[test]
fn check_prints_every_problem_with_its_file_and_line() {
    let dir = TestDir::new("check");
    dir.manifest(
        "broken",
        "name = \"broken\"\ncommand = \"x\"\nversion = \"one\"\n",
    );
    let config = dir.write(
        "aurora.toml",
        &daemon_config(
            &dir,
            "[[plugin]]\nname = \"a\"\ncommand = \"x\"\ncall_timeout = \"soon\"\n\n\
             [[plugin]]\nname = \"b\"\ncommand = \"y\"\ncolour = \"blue\"\n",
        ),
    );
    let output = Command::new(binary("aurora"))
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let config_name = config.display().to_string();
    // Lines 1 to 5 are the [daemon] table; the mistakes are on 9 and 14.
    assert!(stderr.contains(&format!("{config_name}:9:")), "{stderr}");
    assert!(stderr.contains("soon"), "{stderr}");
    assert!(stderr.contains(&format!("{config_name}:14:")), "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");
    assert!(stderr.contains("broken/plugin.toml"), "{stderr}");
    assert!(stderr.contains("not a semver version"), "{stderr}");

    let good = dir.write("good.toml", &daemon_config(&dir, ""));
    std::fs::remove_dir_all(dir.path.join("plugins")).unwrap();
    dir.manifest("echo", &echo_manifest("echo", ""));
    let output = Command::new(binary("aurora"))
        .args(["check", "--config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("no problems found"));
}

#[test]
fn plugins_start_after_what_they_require_and_stop_before_it() {
    let dir = TestDir::new("order");
    dir.manifest("base", &echo_manifest("base", ""));
    dir.manifest(
        "middle",
        &wordcount_manifest("middle", "[requires]\nbase = \"^0.1\""),
    );
    dir.manifest(
        "top",
        &echo_manifest("top", "[requires]\nmiddle = \"*\"\nbase = \"*\""),
    );
    let config = dir.write("aurora.toml", &daemon_config(&dir, ""));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running", "ready=3"]);

    let lines = daemon.seen.clone();
    let ready = |name: &str| position(&lines, &[&format!("plugin{{name={name}}}"), "plugin ready"]);
    let spawned = |name: &str| {
        position(
            &lines,
            &[&format!("plugin{{name={name}}}"), "plugin process started"],
        )
    };
    assert!(ready("base") < spawned("middle"), "{}", lines.join("\n"));
    assert!(ready("middle") < spawned("top"), "{}", lines.join("\n"));

    let status = daemon.status();
    let order: Vec<&str> = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["base", "middle", "top"]);

    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait().success());
    let lines = daemon.drain();
    let stopping = |name: &str| {
        position(
            &lines,
            &[&format!("plugin{{name={name}}}"), "stopping plugin"],
        )
    };
    assert!(stopping("top") < stopping("middle"), "{}", lines.join("\n"));
    assert!(
        stopping("middle") < stopping("base"),
        "{}",
        lines.join("\n")
    );
}

#[test]
fn a_lazy_plugin_starts_on_its_first_call_and_stops_when_idle() {
    let dir = TestDir::new("lazy");
    dir.manifest(
        "lazy",
        &echo_manifest("lazy", "lazy = true\nidle_timeout = \"1s\""),
    );
    dir.manifest("eager", &wordcount_manifest("eager", ""));
    let config = dir.write("aurora.toml", &daemon_config(&dir, ""));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running", "ready=1", "idle=1"]);

    let lazy = daemon.plugin("lazy");
    assert_eq!(lazy["state"], "idle", "{lazy:#}");
    assert!(lazy["pid"].is_null(), "{lazy:#}");
    assert_eq!(lazy["lazy"], true);

    // The first call starts it and waits for it.
    assert_eq!(
        daemon.cli_ok(&["call", "lazy", "upper", "\"wake\""]),
        "\"WAKE\"\n"
    );
    let ready = daemon.wait_for_line(&["plugin{name=lazy}", "plugin ready"]);
    let pid: u32 = ready
        .split("pid=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {ready}"));

    // A second of no calls stops it, and the process is gone.
    daemon.wait_for_line(&["plugin{name=lazy}", "no calls for the idle timeout"]);
    daemon.wait_for_line(&["plugin{name=lazy}", "plugin idle"]);
    let lazy = daemon.plugin("lazy");
    assert_eq!(lazy["state"], "idle", "{lazy:#}");
    assert!(
        !is_alive(pid),
        "the idle plugin's process {pid} is still alive"
    );

    // And the next call brings it back.
    assert_eq!(
        daemon.cli_ok(&["call", "lazy", "reverse", "\"ab\""]),
        "\"ba\"\n"
    );
    assert_eq!(daemon.plugin("eager")["restarts"], 0);
}

#[test]
fn every_control_command_works_against_a_running_daemon() {
    let dir = TestDir::new("commands");
    dir.manifest("echo", &echo_manifest("echo", ""));
    dir.manifest("wordcount", &wordcount_manifest("wordcount", ""));
    let config = dir.write("aurora.toml", &daemon_config(&dir, ""));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running", "ready=2"]);
    let first_pid = pid_of(&daemon.plugin("echo"));

    // stop, and calls fail fast; start brings it back.
    assert!(daemon.cli_ok(&["stop", "echo"]).contains("echo stopped"));
    assert_eq!(daemon.plugin("echo")["state"], "stopped");
    assert!(!is_alive(first_pid));
    let output = daemon.cli(&["call", "echo", "upper", "\"x\""]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("is stopped"));
    assert!(
        daemon
            .cli_ok(&["start", "echo"])
            .contains("echo started (pid")
    );
    assert!(daemon.cli_ok(&["start", "echo"]).contains("already ready"));
    let second_pid = pid_of(&daemon.plugin("echo"));
    assert_ne!(second_pid, first_pid);

    // restart gives a new process.
    assert!(
        daemon
            .cli_ok(&["restart", "echo"])
            .contains("echo restarted")
    );
    let third_pid = pid_of(&daemon.plugin("echo"));
    assert_ne!(third_pid, second_pid);

    // reload of one unchanged plugin restarts it; a whole reload of an
    // unchanged config changes nothing.
    let reloaded = daemon.cli_ok(&["reload", "echo"]);
    assert!(reloaded.contains("restarted: echo"), "{reloaded}");
    let fourth_pid = pid_of(&daemon.plugin("echo"));
    assert_ne!(fourth_pid, third_pid);
    let reloaded = daemon.cli_ok(&["reload"]);
    assert!(reloaded.contains("nothing changed"), "{reloaded}");
    assert_eq!(pid_of(&daemon.plugin("echo")), fourth_pid);

    // logs -n: the latest lines, oldest first, here the end of the swap
    // that reload made: the new process serving, the old one stopped.
    let logs = daemon.cli_ok(&["logs", "echo", "-n", "2"]);
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 2, "{logs}");
    assert!(
        lines[0].contains("aurora: new generation serving")
            && lines[0].contains(&format!("pid={fourth_pid}")),
        "{logs}"
    );
    assert!(
        lines[1].contains(&format!("replaced process stopped pid={third_pid}")),
        "{logs}"
    );

    // logs --follow: new lines arrive as they are written. The backlog's
    // one line proves the follower is subscribed, so the crash that follows
    // is certain to reach it.
    let mut follower = Command::new(binary("aurora"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["logs", "echo", "-n", "1", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (send, followed) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                return;
            }
        }
    });
    let backlog = followed
        .recv_timeout(PATIENCE)
        .expect("the backlog arrives");
    assert!(backlog.contains("replaced process stopped"), "{backlog}");
    let _ = daemon.cli(&["call", "echo", "crash"]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match followed.recv_timeout(left) {
            Ok(line) if line.contains("stderr: echo: crashing on request") => break,
            Ok(line) => seen.push(line),
            Err(_) => panic!("the follower never saw the crash; it saw {seen:#?}"),
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();

    // unknown plugins are usage errors.
    for args in [
        &["stop", "nobody"][..],
        &["logs", "nobody"],
        &["reload", "nobody"],
    ] {
        let output = daemon.cli(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&output.stderr)
        );
        assert!(text(&output.stderr).contains("no plugin named \"nobody\""));
    }

    assert!(daemon.cli_ok(&["shutdown"]).contains("exiting"));
    assert!(daemon.wait().success());
    let output = daemon.cli(&["status"]);
    assert_eq!(output.status.code(), Some(4));
}

#[test]
fn sighup_applies_a_changed_config_and_leaves_the_rest_alone() {
    let dir = TestDir::new("sighup");
    let plugin = |name: &str, binary_name: &str, extra: &str| {
        format!(
            "[[plugin]]\nname = {name:?}\ncommand = {:?}\nhealth_interval = \"off\"\n{extra}\n",
            binary(binary_name)
        )
    };
    let before = [
        plugin("echo", "aurora-plugin-echo", "call_timeout = \"5s\""),
        plugin("stable", "aurora-plugin-wordcount", ""),
        plugin("gone", "aurora-plugin-wordcount", ""),
    ]
    .concat();
    let config = dir.write("aurora.toml", &daemon_config(&dir, &before));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running", "ready=3"]);
    let echo_pid = pid_of(&daemon.plugin("echo"));
    let stable_pid = pid_of(&daemon.plugin("stable"));
    let gone_pid = pid_of(&daemon.plugin("gone"));

    let after = [
        plugin("echo", "aurora-plugin-echo", "call_timeout = \"6s\""),
        plugin("stable", "aurora-plugin-wordcount", ""),
        plugin("fresh", "aurora-plugin-echo", ""),
    ]
    .concat();
    dir.write("aurora.toml", &daemon_config(&dir, &after));
    daemon.signal(Signal::SIGHUP);
    let applied = daemon.wait_for_line(&["applying the reloaded config"]);
    assert!(applied.contains("started=[\"fresh\"]"), "{applied}");
    assert!(applied.contains("stopped=[\"gone\"]"), "{applied}");
    assert!(applied.contains("replaced=[\"echo\"]"), "{applied}");
    daemon.wait_for_line(&["config reloaded"]);

    let status = daemon.status();
    let names: Vec<&str> = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"gone"), "{names:?}");
    assert!(!is_alive(gone_pid));
    assert_eq!(
        pid_of(&daemon.plugin("stable")),
        stable_pid,
        "an unchanged plugin was touched"
    );
    assert_ne!(
        pid_of(&daemon.plugin("echo")),
        echo_pid,
        "a changed plugin kept its process"
    );
    assert_eq!(daemon.plugin("fresh")["state"], "ready");
    assert_eq!(
        daemon.cli_ok(&["call", "fresh", "upper", "\"new\""]),
        "\"NEW\"\n"
    );

    // A broken config is refused whole: nothing changes.
    dir.write("aurora.toml", "[[plugin]]\nname = \"x\"\n");
    let output = daemon.cli(&["reload"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("nothing changed"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(pid_of(&daemon.plugin("stable")), stable_pid);
}

/// Reads datagrams until one contains `needle`, returning everything read.
fn receive_until(socket: &UnixDatagram, needle: &str, received: &mut Vec<String>) {
    let deadline = Instant::now() + PATIENCE;
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buffer) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
                let found = message.contains(needle);
                received.push(message);
                if found {
                    return;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("cannot read the notify socket: {err}"),
        }
    }
    panic!("no {needle:?} on the notify socket; received {received:#?}");
}

#[test]
fn systemd_hears_ready_status_reloads_watchdog_pings_and_stopping() {
    let dir = TestDir::new("notify");
    dir.manifest("echo", &echo_manifest("echo", ""));
    let config = dir.write("aurora.toml", &daemon_config(&dir, ""));
    let notify_path = dir.path.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let mut daemon = Daemon::start(
        &dir,
        &config,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            // 300ms: pings every 150ms.
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let mut received = Vec::new();
    receive_until(&notify, "READY=1", &mut received);
    let ready = received.last().unwrap();
    assert!(ready.contains("STATUS=1 plugin: 1 ready"), "{ready}");
    assert!(
        received
            .iter()
            .any(|m| m.starts_with("STATUS=starting 1 plugin\n")),
        "{received:#?}"
    );
    // Two pings after readiness: the watchdog keeps being fed.
    received.clear();
    receive_until(&notify, "WATCHDOG=1", &mut received);
    receive_until(&notify, "WATCHDOG=1", &mut received);

    // The plugin does not inherit systemd's variables.
    let pid = pid_of(&daemon.plugin("echo"));
    let environment = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environment = String::from_utf8_lossy(&environment);
    assert!(!environment.contains("NOTIFY_SOCKET"), "{environment}");
    assert!(!environment.contains("WATCHDOG_USEC"), "{environment}");

    daemon.signal(Signal::SIGHUP);
    received.clear();
    receive_until(&notify, "RELOADING=1", &mut received);
    assert!(
        received.last().unwrap().contains("MONOTONIC_USEC="),
        "{received:#?}"
    );
    receive_until(&notify, "READY=1", &mut received);

    daemon.signal(Signal::SIGTERM);
    receive_until(&notify, "STOPPING=1", &mut received);
    assert!(daemon.wait().success());
}

#[test]
fn a_plugin_reporting_another_version_than_its_manifest_fails_to_start() {
    let dir = TestDir::new("version");
    dir.manifest(
        "echo",
        &manifest_for(
            "echo",
            "aurora-plugin-echo",
            "9.9.9",
            "[restart]\nmode = \"never\"",
        ),
    );
    let config = dir.write("aurora.toml", &daemon_config(&dir, ""));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["plugin{name=echo}", "plugin failed to start"]);
    daemon.wait_for_line(&["aurora is running"]);

    let echo = daemon.plugin("echo");
    assert_eq!(echo["state"], "failed", "{echo:#}");
    let reason = echo["reason"].as_str().unwrap();
    let expected = format!(
        "plugin reports version \"{}\" but its manifest declares 9.9.9",
        env!("CARGO_PKG_VERSION")
    );
    assert!(reason.contains(&expected), "{reason}");
    let output = daemon.cli(&["call", "echo", "upper", "\"x\""]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("9.9.9"));
}

#[test]
fn without_a_daemon_client_commands_say_so_and_how_to_start_one() {
    let dir = TestDir::new("absent");
    let socket = dir.socket();
    for args in [
        &["status"][..],
        &["stop", "echo"],
        &["logs", "echo"],
        &["shutdown"],
    ] {
        let output = cli_at(&socket, args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "no aurora daemon is running at {}",
                socket.display()
            )),
            "{stderr}"
        );
        assert!(stderr.contains("aurora run"), "{stderr}");
    }
}

#[test]
fn the_socket_is_for_its_owner_and_refuses_other_users() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let nobody = 65534;
    let client_as_nobody = |socket: &std::path::Path| {
        use std::os::unix::process::CommandExt;
        Command::new(binary("aurora"))
            .arg("--socket")
            .arg(socket)
            .arg("status")
            .uid(nobody)
            .gid(nobody)
            .output()
            .unwrap()
    };

    // The default mode keeps others out at the file.
    let dir = TestDir::new("owner");
    dir.manifest("echo", &echo_manifest("echo", ""));
    let config = dir.write("aurora.toml", &daemon_config(&dir, ""));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running"]);
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&daemon.socket)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600);
    let output = client_as_nobody(&daemon.socket);
    assert_eq!(output.status.code(), Some(4), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("not allowed"),
        "{}",
        text(&output.stderr)
    );
    drop(daemon);

    // A socket opened to everyone still checks who connects.
    let dir = TestDir::new("creds");
    dir.manifest("echo", &echo_manifest("echo", ""));
    let config = dir.write(
        "aurora.toml",
        &daemon_config(&dir, "").replace("[daemon]\n", "[daemon]\nsocket_mode = \"0666\"\n"),
    );
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running"]);
    let output = client_as_nobody(&daemon.socket);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("uid 65534 may not control this daemon"),
        "{stderr}"
    );
    assert!(daemon.cli_ok(&["status"]).contains("echo"));
}

#[test]
fn under_journald_lines_carry_a_priority_and_no_timestamp() {
    let dir = TestDir::new("journald");
    dir.manifest("echo", &echo_manifest("echo", ""));
    let config = dir.write("aurora.toml", &daemon_config(&dir, ""));

    // systemd names the stream it connected as stderr by device and inode.
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let stat = nix::sys::stat::fstat(&write_end).unwrap();
    let journal_stream = format!("{}:{}", stat.st_dev, stat.st_ino);
    let mut child = Command::new(binary("aurora"))
        .arg("--socket")
        .arg(dir.socket())
        .args(["run", "--config", config.to_str().unwrap()])
        .env("AURORA_LOG", "info")
        .env("JOURNAL_STREAM", &journal_stream)
        .stdout(Stdio::null())
        .stderr(Stdio::from(write_end))
        .spawn()
        .unwrap();
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        let reader = BufReader::new(std::fs::File::from(read_end));
        for line in reader.lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                return;
            }
        }
    });

    let mut seen = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    let running = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("aurora is running") => break line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("aurora never said it was running; it logged {seen:#?}"),
        }
    };
    assert!(running.starts_with("<6>"), "{running}");
    assert!(!running.starts_with("<6>20"), "a timestamp in {running}");
    assert!(seen.iter().all(|line| line.starts_with('<')), "{seen:#?}");

    assert!(cli_at(&dir.socket(), &["shutdown"]).status.success());
    assert!(child.wait().unwrap().success());
}
