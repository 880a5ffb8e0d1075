//! No orphans: when the supervisor itself is killed outright, every process
//! it started, and every process those started, goes with it; and a new
//! supervisor does not trip over what the killed one left behind.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use aurora_tests::{assert_all_gone, cgroup_support, is_alive};

/// Starts the orphan host and returns it with the pids it reported.
fn start_host() -> (Child, Vec<u32>) {
    let mut host = Command::new(env!("CARGO_BIN_EXE_aurora-orphan-host"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("the orphan host starts");
    let stdout = host.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the host reports its pids");
    let pids: Vec<u32> = line
        .strip_prefix("pids: ")
        .unwrap_or_else(|| panic!("unexpected line from the host: {line:?}"))
        .split_whitespace()
        .map(|pid| pid.parse().expect("pids are numbers"))
        .collect();
    assert_eq!(
        pids.len(),
        5,
        "three plugins, a grandchild, an escaped one: {pids:?}"
    );
    assert!(pids.iter().all(|&pid| is_alive(pid)), "{pids:?}");
    (host, pids)
}

fn sigkill(host: &mut Child) {
    host.kill().expect("SIGKILL is delivered");
    host.wait().expect("the host is reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_supervisor_outright_leaves_no_process_behind() {
    if let Err(why) = cgroup_support(None) {
        // Without a cgroup the plugins themselves still die (parent-death
        // signal) and so do their process groups (the guardian), but a
        // process that left its group cannot be found.
        println!("skipping the escaped process: {why}");
    }
    let (mut host, pids) = start_host();

    let killed_at = Instant::now();
    sigkill(&mut host);
    let survivors_allowed = match cgroup_support(None) {
        Ok(()) => &pids[..],
        Err(_) => &pids[..4],
    };
    assert_all_gone(survivors_allowed).await;
    println!("every process gone {:?} after SIGKILL", killed_at.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_supervisor_cleans_up_after_a_killed_one() {
    if let Err(why) = cgroup_support(None) {
        println!("skipping: {why}");
        return;
    }
    let (mut first, first_pids) = start_host();
    let first_pid = first.id();
    sigkill(&mut first);
    assert_all_gone(&first_pids).await;

    // The second host starts and serves as if nothing had happened...
    let (mut second, second_pids) = start_host();

    // ...and the killed host's cgroups are gone from every hierarchy.
    let prefix = format!("aurora-{first_pid}-");
    let leftovers: Vec<_> = [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/pids",
    ]
    .iter()
    .filter_map(|dir| std::fs::read_dir(dir).ok())
    .flat_map(|entries| entries.flatten())
    .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
    .map(|entry| entry.path())
    .collect();
    assert!(
        leftovers.is_empty(),
        "cgroups of the killed supervisor remain: {leftovers:?}"
    );

    sigkill(&mut second);
    assert_all_gone(&second_pids).await;
}
