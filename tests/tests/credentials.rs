//! Who a plugin runs as: as root, either the configured unprivileged user or
//! root stripped of every capability; never root with its powers.

use std::os::unix::process::CommandExt;
use std::process::Command;

use aurora_tests::{binary, echo, is_root, pid_of, supervisor_with};

/// The `Uid:` and `CapEff:`/`CapBnd:` lines of a process's status.
fn credentials_of(pid: u32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
            .unwrap_or_default()
    };
    (field("Uid:"), field("CapEff:"), field("CapBnd:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_root_a_plugin_without_a_user_keeps_no_capabilities() {
    if !is_root() {
        println!("skipping: capabilities are only dropped when aurora runs as root");
        return;
    }
    let supervisor = supervisor_with([echo()]).await;
    let (uid, effective, bounding) = credentials_of(pid_of(&supervisor, "echo"));

    assert!(uid.starts_with("0\t"), "uid line: {uid:?}");
    assert_eq!(effective, "0000000000000000");
    assert_eq!(bounding, "0000000000000000");
    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_root_a_plugin_runs_as_its_configured_user() {
    if !is_root() {
        println!("skipping: switching users needs aurora to run as root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a nobody user");
    // The plugin binary must be reachable by that user: a checkout under a
    // private home directory is not, and that is the machine's business.
    let reachable = Command::new(binary("aurora-plugin-echo"))
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .output();
    if let Err(err) = reachable {
        println!("skipping: user nobody cannot run the plugin binary here: {err}");
        return;
    }

    let mut spec = echo();
    spec.permissions.user = Some("nobody".to_owned());
    let supervisor = supervisor_with([spec]).await;
    let (uid, effective, _) = credentials_of(pid_of(&supervisor, "echo"));

    let expected = nobody.uid.as_raw().to_string();
    assert!(
        uid.split_whitespace().all(|id| id == expected),
        "uid line: {uid:?}"
    );
    assert_eq!(effective, "0000000000000000");
    let loud: String = supervisor.call("echo", "upper", "as nobody").await.unwrap();
    assert_eq!(loud, "AS NOBODY");
    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_fails_the_start_with_its_name() {
    if !is_root() {
        println!("skipping: users are only looked up when aurora runs as root");
        return;
    }
    let mut spec = echo();
    spec.permissions.user = Some("no-such-user-here".to_owned());
    spec.restart.max_restarts = 0;
    let supervisor = aurora_supervisor::Supervisor::new();
    supervisor.add(spec).unwrap();

    let err = supervisor
        .wait_ready("echo", aurora_tests::PATIENCE)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown user \"no-such-user-here\""),
        "{err}"
    );
}
