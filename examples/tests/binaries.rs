//! The example binaries on their own: each plugin refuses to run outside a
//! supervisor with a message that says what it is, and the embedding host
//! runs its whole demonstration against the real plugins.

use std::process::Command;

#[test]
fn plugins_started_by_hand_explain_themselves() {
    let plugins = [
        env!("CARGO_BIN_EXE_aurora-plugin-echo"),
        env!("CARGO_BIN_EXE_aurora-plugin-wordcount"),
        env!("CARGO_BIN_EXE_aurora-plugin-misbehave"),
        env!("CARGO_BIN_EXE_aurora-plugin-versioned"),
    ];
    for plugin in plugins {
        let output = Command::new(plugin).output().expect("plugin runs");
        assert_eq!(output.status.code(), Some(1), "{plugin}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("started by the aurora supervisor"),
            "{plugin}: {stderr}"
        );
    }
}

#[test]
fn the_embedding_host_survives_a_crash_and_shuts_down() {
    let output = Command::new(env!("CARGO_BIN_EXE_aurora-embed-host"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for expected in [
        "echo.upper -> HELLO FROM THE HOST",
        "wordcount.count -> 12 words, 2 lines, top word Some((\"the\", 3))",
        "echo.crash -> crashed: exited with code 3",
        "echo.upper -> STILL SERVING",
        "shut down cleanly",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
}
