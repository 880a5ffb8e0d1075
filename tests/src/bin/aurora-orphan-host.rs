//! A host for the orphan tests: a supervisor with plugins that have started
//! processes of their own, one of which escaped the plugin's process group.
//! It prints every pid involved on one line, `pids: ...`, then waits to be
//! killed; the tests kill it with SIGKILL and check that nothing survives.

use std::path::PathBuf;
use std::time::Duration;

use aurora_supervisor::{PluginSpec, Supervisor};

fn beside_me(binary: &str) -> PathBuf {
    let me = std::env::current_exe().expect("a process knows its own path");
    me.with_file_name(binary)
}

fn misbehave(name: &str) -> PluginSpec {
    let mut spec = PluginSpec::new(name, beside_me("aurora-plugin-misbehave"));
    spec.permissions.execute = vec!["/usr/bin".into(), "/bin".into()];
    spec.health_interval = None;
    spec
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let supervisor = Supervisor::new();
    supervisor
        .add(PluginSpec::new("echo", beside_me("aurora-plugin-echo")))
        .unwrap();
    supervisor.add(misbehave("grandparent")).unwrap();
    supervisor.add(misbehave("escaper")).unwrap();
    for name in ["echo", "grandparent", "escaper"] {
        supervisor
            .wait_ready(name, Duration::from_secs(30))
            .await
            .unwrap();
    }

    let grandchild: u32 = supervisor
        .call("grandparent", "spawn_grandchild", &())
        .await
        .unwrap();
    let escaped: u32 = supervisor.call("escaper", "escape", &()).await.unwrap();
    let mut pids: Vec<u32> = supervisor.statuses().iter().filter_map(|s| s.pid).collect();
    pids.extend([grandchild, escaped]);

    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("pids: {}", pids.join(" "));
    std::future::pending::<()>().await;
}
