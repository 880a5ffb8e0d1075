//! Stopping: graceful shutdown, dropping the supervisor, and the promise that
//! no process Aurora started outlives it.

use aurora_tests::{assert_all_gone, echo, is_alive, misbehave, pid_of, supervisor_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reaps_plugins_and_their_children() {
    let supervisor = supervisor_with([echo(), misbehave()]).await;
    let grandchild: u32 = supervisor
        .call("misbehave", "spawn_grandchild", &())
        .await
        .unwrap();
    let pids = [
        pid_of(&supervisor, "echo"),
        pid_of(&supervisor, "misbehave"),
        grandchild,
    ];
    assert!(pids.iter().all(|&pid| is_alive(pid)));

    supervisor.shutdown().await;

    // The plugins are reaped before shutdown returns; the grandchild was
    // killed with the plugin's process group and is reaped by init.
    assert!(
        !is_alive(pids[0]) && !is_alive(pids[1]),
        "plugins alive after shutdown"
    );
    assert_all_gone(&pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_supervisor_kills_everything() {
    let supervisor = supervisor_with([echo(), misbehave()]).await;
    let grandchild: u32 = supervisor
        .call("misbehave", "spawn_grandchild", &())
        .await
        .unwrap();
    let pids = [
        pid_of(&supervisor, "echo"),
        pid_of(&supervisor, "misbehave"),
        grandchild,
    ];

    drop(supervisor);

    assert_all_gone(&pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_plugin_can_be_started_again() {
    let supervisor = supervisor_with([echo()]).await;
    let pid = pid_of(&supervisor, "echo");

    supervisor.stop("echo").await.unwrap();
    assert!(!is_alive(pid));
    let err = supervisor
        .call::<_, String>("echo", "upper", "x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, aurora_supervisor::CallError::PluginStopped { .. }),
        "{err}"
    );

    supervisor.restart("echo").await.unwrap();
    let loud: String = supervisor.call("echo", "upper", "x").await.unwrap();
    assert_eq!(loud, "X");
    supervisor.shutdown().await;
}
