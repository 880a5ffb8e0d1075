//! Plugins that fail: hangs, crashes, broken frames, restart budgets. Each
//! test checks both what the caller is told and that the plugin comes back
//! (or, past its budget, stays failed and says why).

use std::time::Duration;

use aurora_supervisor::{CallError, EventKind, ExitReason, PluginState, Supervisor};
use aurora_tests::{
    PATIENCE, assert_all_gone, echo, misbehave, pid_of, supervisor_with, wait_for_event,
};

/// Waits until `plugin` is ready on a process other than `old_pid`.
async fn wait_for_replacement(supervisor: &Supervisor, plugin: &str, old_pid: u32) -> u32 {
    let replaced = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(status) = supervisor.status(plugin)
                && status.state == PluginState::Ready
                && status.pid.is_some_and(|pid| pid != old_pid)
            {
                return status.pid.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    match replaced.await {
        Ok(pid) => pid,
        Err(_) => panic!(
            "{plugin} was not replaced; status: {:#?}",
            supervisor.status(plugin)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_plugin_times_out_then_is_killed_and_restarted() {
    let supervisor = supervisor_with([misbehave()]).await;
    let mut events = supervisor.subscribe();
    let pid = pid_of(&supervisor, "misbehave");

    let err = supervisor
        .call_with_timeout::<_, ()>("misbehave", "hang", &(), Some(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err}");

    let kind = wait_for_event(&mut events, "misbehave", |k| {
        matches!(k, EventKind::Unresponsive { .. })
    })
    .await;
    let EventKind::Unresponsive { pid: stuck, reason } = kind else {
        unreachable!()
    };
    assert_eq!(stuck, pid);
    assert!(reason.contains("cancelled"), "{reason}");

    let new_pid = wait_for_replacement(&supervisor, "misbehave", pid).await;
    assert_all_gone(&[pid]).await;
    let alive: String = supervisor.call("misbehave", "ok", "back").await.unwrap();
    assert_eq!(alive, "back");
    assert_eq!(pid_of(&supervisor, "misbehave"), new_pid);

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_ignoring_cancellation_is_killed_after_the_grace_period() {
    let supervisor = supervisor_with([misbehave()]).await;
    let mut events = supervisor.subscribe();
    let pid = pid_of(&supervisor, "misbehave");

    let err = supervisor
        .call_with_timeout::<u64, u64>(
            "misbehave",
            "ignore_cancel",
            &600_000,
            Some(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err}");

    wait_for_event(&mut events, "misbehave", |k| {
        matches!(k, EventKind::Unresponsive { .. })
    })
    .await;
    wait_for_replacement(&supervisor, "misbehave", pid).await;

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_call_reports_the_exit_code_and_stderr() {
    let supervisor = supervisor_with([echo()]).await;
    let pid = pid_of(&supervisor, "echo");

    let err = supervisor
        .call::<_, ()>("echo", "crash", &())
        .await
        .unwrap_err();
    let CallError::PluginCrashed { crash, .. } = &err else {
        panic!("expected a crash, got {err}");
    };
    assert_eq!(crash.exit, Some(ExitReason::Code(3)));
    assert!(
        crash
            .stderr_tail
            .iter()
            .any(|line| line.contains("crashing on request")),
        "stderr tail: {:?}",
        crash.stderr_tail
    );
    assert!(err.to_string().contains("exited with code 3"), "{err}");

    wait_for_replacement(&supervisor, "echo", pid).await;
    let loud: String = supervisor.call("echo", "upper", "again").await.unwrap();
    assert_eq!(loud, "AGAIN");

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_by_signal_is_reported_as_such() {
    let supervisor = supervisor_with([misbehave()]).await;

    let err = supervisor
        .call::<_, ()>("misbehave", "abort", &())
        .await
        .unwrap_err();
    let CallError::PluginCrashed { crash, .. } = &err else {
        panic!("expected a crash, got {err}");
    };
    assert_eq!(crash.exit, Some(ExitReason::Signal(libc_sigabrt())));
    assert!(err.to_string().contains("SIGABRT"), "{err}");

    supervisor.shutdown().await;
}

fn libc_sigabrt() -> i32 {
    nix::sys::signal::Signal::SIGABRT as i32
}

/// Each of these corrupts the byte stream; the caller must hear why, and the
/// plugin must come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_frames_cost_a_restart_and_say_why() {
    let cases = [
        ("garbage", "malformed frame"),
        ("huge_frame", "exceeds the limit"),
        ("close_mid_frame", "inside a frame"),
    ];
    let supervisor = supervisor_with([misbehave()]).await;
    for (method, expected) in cases {
        let pid = pid_of(&supervisor, "misbehave");
        let err = supervisor
            .call::<_, ()>("misbehave", method, &())
            .await
            .unwrap_err();
        assert!(
            matches!(err, CallError::PluginCrashed { .. }),
            "{method}: {err}"
        );
        assert!(err.to_string().contains(expected), "{method}: {err}");

        wait_for_replacement(&supervisor, "misbehave", pid).await;
        assert_all_gone(&[pid]).await;
        let alive: String = supervisor.call("misbehave", "ok", method).await.unwrap();
        assert_eq!(alive, method);
    }
    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_back_off_then_give_up_and_calls_fail_fast() {
    let mut spec = echo();
    spec.restart.max_restarts = 2;
    spec.restart.window = Duration::from_secs(600);
    let supervisor = supervisor_with([spec]).await;
    let mut events = supervisor.subscribe();

    let mut delays = Vec::new();
    for _ in 0..2 {
        let pid = pid_of(&supervisor, "echo");
        supervisor
            .call::<_, ()>("echo", "crash", &())
            .await
            .unwrap_err();
        let kind = wait_for_event(&mut events, "echo", |k| {
            matches!(k, EventKind::BackingOff { .. })
        })
        .await;
        let EventKind::BackingOff { delay, .. } = kind else {
            unreachable!()
        };
        delays.push(delay);
        wait_for_replacement(&supervisor, "echo", pid).await;
    }
    // Jitter keeps each delay within [half, full] of 10ms, 20ms, ...
    assert!(delays[0] >= Duration::from_millis(5) && delays[0] <= Duration::from_millis(10));
    assert!(delays[1] >= Duration::from_millis(10) && delays[1] <= Duration::from_millis(20));

    supervisor
        .call::<_, ()>("echo", "crash", &())
        .await
        .unwrap_err();
    let kind = wait_for_event(&mut events, "echo", |k| {
        matches!(k, EventKind::Failed { .. })
    })
    .await;
    let EventKind::Failed { reason } = kind else {
        unreachable!()
    };
    assert!(reason.contains("restarted 2 times"), "{reason}");
    assert!(reason.contains("exited with code 3"), "{reason}");

    let err = supervisor
        .call::<_, String>("echo", "upper", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::PluginFailed { .. }), "{err}");
    assert!(err.to_string().contains("restarted 2 times"), "{err}");

    // An explicit restart forgives the past.
    supervisor.restart("echo").await.unwrap();
    let loud: String = supervisor.call("echo", "upper", "revived").await.unwrap();
    assert_eq!(loud, "REVIVED");

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_never_answers_pings_is_restarted() {
    let mut spec = misbehave();
    spec.health_interval = Some(Duration::from_millis(100));
    spec.health_timeout = Duration::from_millis(300);
    let supervisor = supervisor_with([spec]).await;
    let mut events = supervisor.subscribe();
    let pid = pid_of(&supervisor, "misbehave");

    // The hang blocks the plugin's only thread, pings included; the call's
    // own deadline is far away, so the health check is what notices.
    let caller = {
        let supervisor = supervisor.clone();
        tokio::spawn(async move { supervisor.call::<_, ()>("misbehave", "hang", &()).await })
    };
    let kind = wait_for_event(&mut events, "misbehave", |k| {
        matches!(k, EventKind::Unresponsive { .. })
    })
    .await;
    let EventKind::Unresponsive { reason, .. } = kind else {
        unreachable!()
    };
    assert!(reason.contains("ping"), "{reason}");

    let err = caller.await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::PluginCrashed { .. }), "{err}");
    wait_for_replacement(&supervisor, "misbehave", pid).await;

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_binary_fails_with_the_path_and_the_reason() {
    let mut spec = echo();
    spec.command = "/nonexistent/aurora-plugin".into();
    spec.restart.max_restarts = 1;
    let supervisor = Supervisor::new();
    supervisor.add(spec).unwrap();

    let err = supervisor.wait_ready("echo", PATIENCE).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("/nonexistent/aurora-plugin"), "{message}");
    assert!(message.contains("No such file"), "{message}");

    let err = supervisor
        .call::<_, String>("echo", "upper", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::PluginFailed { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_never_says_hello_fails_its_handshake() {
    let mut spec = echo();
    spec.command = "/bin/sleep".into();
    spec.args = vec!["600".into()];
    spec.handshake_timeout = Duration::from_millis(200);
    spec.restart.max_restarts = 0;
    let supervisor = Supervisor::new();
    supervisor.add(spec).unwrap();

    let err = supervisor.wait_ready("echo", PATIENCE).await.unwrap_err();
    assert!(
        err.to_string().contains("no handshake within 200ms"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_exit_under_never_leaves_the_plugin_stopped() {
    let mut spec = misbehave();
    spec.restart.mode = aurora_supervisor::RestartMode::Never;
    let supervisor = supervisor_with([spec]).await;
    let mut events = supervisor.subscribe();

    let err = supervisor
        .call::<_, ()>("misbehave", "exit", &0u8)
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::PluginCrashed { .. }), "{err}");
    wait_for_event(&mut events, "misbehave", |k| {
        matches!(k, EventKind::Stopped { .. })
    })
    .await;

    let err = supervisor
        .call::<_, String>("misbehave", "ok", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::PluginStopped { .. }), "{err}");
}
