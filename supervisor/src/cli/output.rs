//! What the client commands print: the status table, reload summaries and
//! log lines. Plain text for people; `status --json` prints the daemon's
//! report as it is.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use aurora_protocol::LogLevel;
use aurora_protocol::control::{DaemonStatus, LogLine, ReloadSummary, VersionReport};

/// `aurora status`: a header line, one row per plugin, then the reason of
/// each failed plugin.
pub fn status_table(status: &DaemonStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "aurora {} (pid {}), up {}, config {}, socket {}",
        status.version,
        status.pid,
        short_duration(status.uptime_ms),
        status.config,
        status.socket
    );
    if status.plugins.is_empty() {
        out.push_str("no plugins\n");
        return out;
    }

    let header = [
        "PLUGIN", "STATE", "VERSION", "PID", "UPTIME", "RESTARTS", "CALLS", "ERRORS", "MEMORY",
        "CPU",
    ];
    let rows: Vec<[String; 10]> = status
        .plugins
        .iter()
        .map(|p| {
            let state = if p.lazy && p.state == "idle" {
                "idle (lazy)".to_owned()
            } else {
                p.state.clone()
            };
            [
                p.name.clone(),
                state,
                p.version
                    .clone()
                    .or_else(|| p.declared_version.clone())
                    .unwrap_or_else(|| "-".to_owned()),
                p.pid.map_or_else(|| "-".to_owned(), |pid| pid.to_string()),
                p.uptime_ms.map_or_else(|| "-".to_owned(), short_duration),
                p.restarts.to_string(),
                p.calls.to_string(),
                p.errors.to_string(),
                p.memory_bytes.map_or_else(|| "-".to_owned(), bytes),
                p.cpu_percent
                    .map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.1}%")),
            ]
        })
        .collect();
    write_table(&mut out, header, &rows);
    for plugin in &status.plugins {
        if let Some(reason) = &plugin.reason {
            let _ = writeln!(out, "\n{} failed: {reason}", plugin.name);
        }
    }
    out
}

/// `aurora reload`: what changed, one line per kind of change.
pub fn reload_summary(summary: &ReloadSummary) -> String {
    let mut out = String::new();
    for (what, names) in [
        ("started", &summary.started),
        ("stopped", &summary.stopped),
        ("replaced", &summary.replaced),
        ("restarted", &summary.restarted),
    ] {
        if !names.is_empty() {
            let _ = writeln!(out, "{what}: {}", names.join(", "));
        }
    }
    for refused in &summary.failed {
        let _ = writeln!(out, "refused, old version kept: {refused}");
    }
    let unchanged = summary.unchanged.len();
    if out.is_empty() {
        let _ = writeln!(out, "nothing changed ({unchanged} plugins unchanged)");
    } else if unchanged > 0 {
        let _ = writeln!(out, "unchanged: {unchanged} plugins");
    }
    out
}

/// `aurora versions`: one row per stored version, the running one marked
/// with `*`, the most recently active first.
pub fn version_table(versions: &[VersionReport]) -> String {
    if versions.is_empty() {
        return "no versions stored yet\n".to_owned();
    }
    let rows: Vec<[String; 4]> = versions
        .iter()
        .map(|v| {
            let mark = if v.active { "*" } else { " " };
            [
                format!("{mark} {}", v.version.as_deref().unwrap_or("-")),
                v.hash.as_deref().map_or_else(
                    || "-".to_owned(),
                    |hash| hash[..12.min(hash.len())].to_owned(),
                ),
                v.activated_unix_ms.map_or_else(
                    || "-".to_owned(),
                    |ms| {
                        let at = UNIX_EPOCH + Duration::from_millis(ms);
                        humantime::format_rfc3339_seconds(at).to_string()
                    },
                ),
                v.source.clone(),
            ]
        })
        .collect();
    let mut out = String::new();
    write_table(
        &mut out,
        ["  VERSION", "HASH", "LAST ACTIVE", "SOURCE"],
        &rows,
    );
    out
}

/// Appends `header` and `rows` as left-aligned columns two spaces apart,
/// each as wide as its widest cell.
fn write_table<const N: usize>(out: &mut String, header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: [&str; N]| {
        let mut text = String::new();
        for (cell, width) in cells.iter().zip(widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
}

/// One line of `aurora logs`: time, level, source, text.
pub fn log_line(line: &LogLine) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(line.unix_ms);
    let level = match line.level {
        LogLevel::Error => "ERROR",
        LogLevel::Warn => "WARN",
        LogLevel::Info => "INFO",
        LogLevel::Debug => "DEBUG",
        LogLevel::Trace => "TRACE",
    };
    format!(
        "{} {level:<5} {}: {}",
        humantime::format_rfc3339_millis(time),
        line.source,
        line.text
    )
}

/// A duration to the second, such as `3h 2m 1s`.
fn short_duration(millis: u64) -> String {
    let seconds = Duration::from_secs(millis / 1000);
    if seconds.is_zero() {
        return format!("{millis}ms");
    }
    humantime::format_duration(seconds).to_string()
}

fn bytes(count: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use aurora_protocol::control::PluginReport;

    use super::*;

    fn report(name: &str, state: &str) -> PluginReport {
        PluginReport {
            name: name.into(),
            state: state.into(),
            reason: None,
            version: None,
            declared_version: Some("1.0.0".into()),
            pid: None,
            uptime_ms: None,
            restarts: 0,
            calls: 0,
            errors: 0,
            memory_bytes: None,
            cpu_percent: None,
            cpu_time_ms: None,
            lazy: false,
            idle_timeout_ms: None,
            requires: Vec::new(),
            origin: String::new(),
        }
    }

    #[test]
    fn the_table_lines_up_and_explains_failures() {
        let mut echo = report("echo", "ready");
        echo.pid = Some(4242);
        echo.memory_bytes = Some(3 * 1024 * 1024 + 512 * 1024);
        echo.cpu_percent = Some(0.25);
        let mut broken = report("a-long-name", "failed");
        broken.reason = Some("exited with code 3".into());
        let status = DaemonStatus {
            pid: 1,
            version: "0.1.0".into(),
            uptime_ms: 61_000,
            config: "aurora.toml".into(),
            socket: "control.sock".into(),
            plugins: vec![echo, broken],
        };
        let table = status_table(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("up 1m 1s"), "{table}");
        assert!(lines[1].starts_with("PLUGIN       STATE"), "{table}");
        assert!(
            lines[2].contains("4242") && lines[2].contains("3.5 MiB"),
            "{table}"
        );
        assert!(
            lines[2].contains("0.2%") || lines[2].contains("0.3%"),
            "{table}"
        );
        assert!(
            table.contains("a-long-name failed: exited with code 3"),
            "{table}"
        );
    }

    #[test]
    fn versions_mark_the_running_one() {
        let report = |version: &str, active| VersionReport {
            version: Some(version.into()),
            hash: Some("0123456789abcdef".repeat(4)),
            binary: "/var/lib/aurora/.versions/p/0123/p".into(),
            source: "/usr/lib/aurora/p".into(),
            active,
            activated_unix_ms: Some(0),
        };
        let table = version_table(&[report("2.0.0", true), report("1.0.0", false)]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("  VERSION"), "{table}");
        assert!(
            lines[1].starts_with("* 2.0.0") && lines[1].contains("0123456789ab "),
            "{table}"
        );
        assert!(lines[2].starts_with("  1.0.0"), "{table}");
        assert!(lines[2].contains("1970-01-01T00:00:00Z"), "{table}");
    }

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(short_duration(250), "250ms");
        assert_eq!(short_duration(3_723_000), "1h 2m 3s");
    }
}
