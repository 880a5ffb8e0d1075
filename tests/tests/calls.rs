//! Calls that go right: round trips, multiplexing, concurrency, both
//! encodings, and the errors a caller gets for asking the wrong thing.

use std::time::Duration;

use aurora_supervisor::{CallError, ErrorKind, Payload};
use aurora_tests::{echo, misbehave, pid_of, supervisor_with};
use serde_bytes::ByteBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_round_trip() {
    let supervisor = supervisor_with([echo()]).await;

    let loud: String = supervisor.call("echo", "upper", "hello").await.unwrap();
    assert_eq!(loud, "HELLO");
    let backwards: String = supervisor.call("echo", "reverse", "abc").await.unwrap();
    assert_eq!(backwards, "cba");

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_payloads_get_json_replies() {
    let supervisor = supervisor_with([echo()]).await;

    let request = Payload::json(br#""hello""#.to_vec());
    let reply = supervisor
        .call_raw("echo", "upper", request, None)
        .await
        .unwrap();
    assert_eq!(reply, Payload::json(br#""HELLO""#.to_vec()));

    supervisor.shutdown().await;
}

/// Payloads on both sides of every size the frame code treats differently
/// (copied, read into a buffer of their own, written from where they lie,
/// larger than the buffer kept for reuse) come back byte for byte, also
/// when callers of different sizes interleave on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_of_every_size_come_back_intact() {
    let supervisor = supervisor_with([echo()]).await;
    let sizes = [
        0,
        16,
        4095,
        4096,
        16 * 1024 - 1,
        16 * 1024,
        64 * 1024,
        3 << 20,
    ];

    let mut calls = tokio::task::JoinSet::new();
    for (caller, &size) in sizes.iter().enumerate() {
        let supervisor = supervisor.clone();
        calls.spawn(async move {
            for round in 0..4u8 {
                let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8 ^ round).collect();
                let sent = ByteBuf::from(sent);
                let got: ByteBuf = supervisor.call("echo", "bytes", &sent).await.unwrap();
                assert!(
                    got == sent,
                    "caller {caller}, {size} bytes: the payload changed"
                );

                if size > 64 * 1024 {
                    // JSON arrays of millions of numbers only slow the test.
                    continue;
                }
                let json = Payload::json(serde_json::to_vec(&sent).unwrap());
                let reply = supervisor.call_raw("echo", "bytes", json.clone(), None);
                let reply = reply.await.unwrap();
                let got: Vec<u8> = serde_json::from_slice(&reply.bytes).unwrap();
                assert!(
                    got == *sent,
                    "caller {caller}, {size} bytes as JSON changed"
                );
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_call_completes_while_a_slow_one_is_in_flight() {
    let supervisor = supervisor_with([echo()]).await;

    // The sleep cannot finish during the test; the upper call must still be
    // answered, which shows calls are multiplexed rather than queued.
    let slow = {
        let supervisor = supervisor.clone();
        tokio::spawn(async move { supervisor.call::<u64, u64>("echo", "sleep", &600_000).await })
    };
    let loud: String = supervisor
        .call("echo", "upper", "still here")
        .await
        .unwrap();
    assert_eq!(loud, "STILL HERE");
    assert!(!slow.is_finished());

    slow.abort();
    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_callers_each_get_their_own_reply() {
    let supervisor = supervisor_with([echo()]).await;

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..500u32 {
        let supervisor = supervisor.clone();
        calls.spawn(async move {
            let text = format!("caller {i}");
            let reply: String = supervisor.call("echo", "upper", &text).await.unwrap();
            (text, reply)
        });
    }
    let mut answered = 0;
    while let Some(joined) = calls.join_next().await {
        let (text, reply) = joined.unwrap();
        assert_eq!(reply, text.to_uppercase());
        answered += 1;
    }
    assert_eq!(answered, 500);

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_makes_callers_wait_not_fail() {
    let mut spec = echo();
    spec.max_concurrent_calls = 2;
    let supervisor = supervisor_with([spec]).await;

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let supervisor = supervisor.clone();
        calls.spawn(async move { supervisor.call::<u64, u64>("echo", "sleep", &20).await });
    }
    while let Some(joined) = calls.join_next().await {
        assert_eq!(joined.unwrap().unwrap(), 20);
    }

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_for_the_wrong_thing_gets_a_clear_error() {
    let supervisor = supervisor_with([echo()]).await;

    let err = supervisor
        .call::<_, String>("nobody", "upper", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::UnknownPlugin { .. }), "{err}");

    let err = supervisor
        .call::<_, String>("echo", "shout", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::UnknownMethod { .. }), "{err}");
    assert!(
        err.to_string().contains("upper"),
        "available methods not listed: {err}"
    );

    // A request of the wrong type is refused by the plugin, which lives on.
    let pid = pid_of(&supervisor, "echo");
    let err = supervisor
        .call::<_, String>("echo", "sleep", "not a number")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Remote {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(pid_of(&supervisor, "echo"), pid);

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_before_it_is_sent() {
    let mut spec = echo();
    spec.max_frame = 64 * 1024;
    let supervisor = supervisor_with([spec]).await;
    let pid = pid_of(&supervisor, "echo");

    let big = "x".repeat(100 * 1024);
    let err = supervisor
        .call::<_, String>("echo", "upper", &big)
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::RequestTooLarge { .. }), "{err}");

    let small: String = supervisor.call("echo", "upper", "fine").await.unwrap();
    assert_eq!(small, "FINE");
    assert_eq!(
        pid_of(&supervisor, "echo"),
        pid,
        "a refused request must not cost a restart"
    );

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_only_its_call() {
    let supervisor = supervisor_with([misbehave()]).await;
    let pid = pid_of(&supervisor, "misbehave");

    let err = supervisor
        .call::<_, ()>("misbehave", "panic", &())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Remote {
                kind: ErrorKind::Panicked,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("panicking on request"), "{err}");

    let alive: String = supervisor.call("misbehave", "ok", "alive").await.unwrap();
    assert_eq!(alive, "alive");
    assert_eq!(pid_of(&supervisor, "misbehave"), pid);

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_floods_do_not_disturb_calls() {
    let supervisor = supervisor_with([misbehave()]).await;

    let lines: u64 = supervisor
        .call("misbehave", "flood", &20_000u64)
        .await
        .unwrap();
    assert_eq!(lines, 20_000);
    let alive: String = supervisor
        .call("misbehave", "ok", "after the flood")
        .await
        .unwrap();
    assert_eq!(alive, "after the flood");

    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_call_timeout_overrides_the_default() {
    let supervisor = supervisor_with([echo()]).await;

    let err = supervisor
        .call_with_timeout::<u64, u64>("echo", "sleep", &600_000, Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err}");
    // The plugin honoured the cancellation, so it is not judged stuck: a
    // call that outlasts the cancel grace period completes on the same process.
    let pid = pid_of(&supervisor, "echo");
    let slept: u64 = supervisor.call("echo", "sleep", &1_000u64).await.unwrap();
    assert_eq!(slept, 1_000);
    assert_eq!(pid_of(&supervisor, "echo"), pid);

    supervisor.shutdown().await;
}
