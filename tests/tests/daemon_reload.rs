//! Hot reload through the real daemon: a binary copied over the watched
//! path is picked up by itself, `aurora versions` and `aurora rollback`
//! drive the version store, and a broken build is refused whichever way it
//! arrives.

use aurora_tests::daemon::{Daemon, TestDir, daemon_config, text};
use aurora_tests::stamp_build;

/// The version the versioned plugin reports through the daemon.
fn served_version(daemon: &Daemon) -> String {
    let reply = daemon.cli_ok(&["call", "versioned", "version"]);
    let served: serde_json::Value = serde_json::from_str(&reply).expect("a JSON reply");
    served["version"].as_str().expect("a version").to_owned()
}

#[test]
fn a_binary_copied_over_the_watched_path_is_reloaded_and_can_be_rolled_back() {
    let dir = TestDir::new("watch-reload");
    std::fs::create_dir_all(dir.path.join("bin")).unwrap();
    let binary = dir.path.join("bin/versioned");
    stamp_build(&binary, "1.0.0", "healthy");
    let plugin = format!(
        "[[plugin]]\nname = \"versioned\"\ncommand = {binary:?}\nhealth_interval = \"off\"\n\
         health_method = \"health\"\nhandshake_timeout = \"20s\"\n"
    );
    let config = dir.write("aurora.toml", &daemon_config(&dir, &plugin));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running", "ready=1"]);
    assert_eq!(served_version(&daemon), "1.0.0");

    // A deploy that copies the new build over the old file in place: the
    // watcher waits for the copy to settle, then swaps.
    let staging = dir.path.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    stamp_build(&staging.join("versioned"), "2.0.0", "healthy");
    std::fs::copy(staging.join("versioned"), &binary).unwrap();
    daemon.wait_for_line(&["reloaded after a change on disk", "versioned"]);
    assert_eq!(served_version(&daemon), "2.0.0");

    let listed = daemon.cli_ok(&["versions", "versioned"]);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(lines[1].starts_with("* 2.0.0"), "{listed}");
    assert!(lines[2].starts_with("  1.0.0"), "{listed}");

    let rolled = daemon.cli_ok(&["rollback", "versioned"]);
    assert!(rolled.contains("rolled back to 1.0.0"), "{rolled}");
    assert_eq!(served_version(&daemon), "1.0.0");
    let forward = daemon.cli_ok(&["rollback", "versioned", "--to", "2.0.0"]);
    assert!(forward.contains("rolled back to 2.0.0"), "{forward}");
    assert_eq!(served_version(&daemon), "2.0.0");

    // A broken build renamed into place is refused; 2.0.0 keeps serving.
    stamp_build(&binary, "3.0.0", "exit-at-start");
    daemon.wait_for_line(&["reload after a change on disk failed", "versioned"]);
    assert_eq!(served_version(&daemon), "2.0.0");

    // So is the same build asked for by name, with a failing exit code.
    let refused = daemon.cli(&["reload", "versioned"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stdout));
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("old one keeps serving"), "{stderr}");
    assert_eq!(served_version(&daemon), "2.0.0");

    // Four swaps, two refused: none of them is a restart.
    assert_eq!(daemon.plugin("versioned")["restarts"], 0);

    let unknown = daemon.cli(&["rollback", "versioned", "--to", "9.9.9"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown.stderr).contains("9.9.9"));
}

#[test]
fn a_plugin_running_as_another_user_runs_its_stored_binary() {
    if !aurora_tests::is_root() {
        println!("skipping: switching users needs aurora to run as root");
        return;
    }
    let dir = TestDir::new("store-as-nobody");
    // The daemon's state directory (and so the store) lives in the test's
    // directory; an older owner-only state directory is opened for search.
    std::fs::create_dir_all(dir.path.join("state")).unwrap();
    let owner_only = std::os::unix::fs::PermissionsExt::from_mode(0o700);
    std::fs::set_permissions(dir.path.join("state"), owner_only).unwrap();
    std::fs::create_dir_all(dir.path.join("bin")).unwrap();
    let binary = dir.path.join("bin/versioned");
    stamp_build(&binary, "1.0.0", "healthy");
    let plugin = format!(
        "[[plugin]]\nname = \"versioned\"\ncommand = {binary:?}\nhealth_interval = \"off\"\n\
         handshake_timeout = \"20s\"\n[plugin.permissions]\nuser = \"nobody\"\n"
    );
    let config = dir.write("aurora.toml", &daemon_config(&dir, &plugin));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running"]);
    assert_eq!(served_version(&daemon), "1.0.0");
    let listed = daemon.cli_ok(&["versions", "versioned"]);
    assert!(listed.contains("* 1.0.0"), "{listed}");
}

#[test]
fn sighup_swaps_a_changed_plugin_while_calls_go_on() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let dir = TestDir::new("sighup-swap");
    std::fs::create_dir_all(dir.path.join("bin")).unwrap();
    let binary = dir.path.join("bin/versioned");
    stamp_build(&binary, "1.0.0", "healthy");
    let plugin = |timeout: &str| {
        format!(
            "[[plugin]]\nname = \"versioned\"\ncommand = {binary:?}\nhealth_interval = \"off\"\n\
             call_timeout = {timeout:?}\n"
        )
    };
    let config = dir.write("aurora.toml", &daemon_config(&dir, &plugin("5s")));
    let mut daemon = Daemon::start(&dir, &config, &[]);
    daemon.wait_for_line(&["aurora is running", "ready=1"]);
    let before = daemon.plugin("versioned")["pid"].clone();

    // One caller, through the CLI, for as long as the reload takes.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let caller = {
        let socket = daemon.socket.clone();
        let (stop, calls) = (Arc::clone(&stop), Arc::clone(&calls));
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let output =
                    aurora_tests::daemon::cli_at(&socket, &["call", "versioned", "version"]);
                if !output.status.success() {
                    failures.push(text(&output.stderr));
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            failures
        })
    };
    let made = |n| {
        let calls = Arc::clone(&calls);
        move || calls.load(Ordering::Relaxed) >= n
    };
    wait_until_true(made(3));
    dir.write("aurora.toml", &daemon_config(&dir, &plugin("6s")));
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let applied = daemon.wait_for_line(&["applying the reloaded config"]);
    assert!(applied.contains("replaced=[\"versioned\"]"), "{applied}");
    daemon.wait_for_line(&["config reloaded"]);
    let after_reload = calls.load(Ordering::Relaxed);
    wait_until_true(made(after_reload + 3));
    stop.store(true, Ordering::Relaxed);

    let failures = caller.join().unwrap();
    assert!(failures.is_empty(), "calls failed: {failures:?}");
    assert_ne!(daemon.plugin("versioned")["pid"], before);
}

/// Polls `condition` until it holds, for up to `PATIENCE`.
fn wait_until_true(condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + aurora_tests::PATIENCE;
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "gave up waiting");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
