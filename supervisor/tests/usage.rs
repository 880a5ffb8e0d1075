//! The `aurora` binary's command-line surface: help, version and usage
//! errors. (Calls and the daemon are exercised in the workspace's `tests/`
//! package; having a test here also makes `cargo test` build `aurora`.)

use std::process::Command;

fn aurora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_aurora"))
        .args(args)
        .output()
        .expect("aurora runs")
}

#[test]
fn help_lists_the_commands() {
    let output = aurora(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for command in ["run", "call"] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}

#[test]
fn version_is_the_crate_version() {
    let output = aurora(&["--version"]);
    assert!(output.status.success());
    let version = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        version.trim(),
        format!("aurora {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_with_code_2() {
    for args in [
        &["frobnicate"][..],
        &["call"],
        &["call", "--timeout", "soon", "echo", "upper"],
    ] {
        let output = aurora(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!output.stderr.is_empty(), "{args:?} printed no reason");
    }
}
