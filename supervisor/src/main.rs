//! `aurora`: run the daemon, check a config, or drive a running daemon
//! from the shell.
//!
//! Exit codes: 0 success; 1 the command failed (a failed call, a plugin
//! that would not start, a daemon that could not run); 2 bad usage, config
//! or input (unknown plugin or method, invalid JSON, problems found by
//! `check`); 3 a call timed out; 4 no daemon could be reached (none is
//! running, or the socket's permissions keep the caller out).

mod cli;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use aurora_protocol::control::{ControlCommand, ControlErrorKind, ControlResponse};
use aurora_supervisor::daemon::client::{self, ClientError};
use aurora_supervisor::daemon::document::Problem;
use aurora_supervisor::daemon::logs::LogStore;
use aurora_supervisor::daemon::notify::Notifier;
use aurora_supervisor::daemon::settings::{LogFormat, default_socket};
use aurora_supervisor::daemon::{self, DaemonOptions, Loaded};
use aurora_supervisor::{CallError, Payload, Supervisor};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "aurora",
    version,
    about = "Run untrusted plugins as supervised processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr (default: the config's `log_format`, else human;
    /// under systemd, human lines carry no timestamps).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatFlag>,
    /// Log filter, such as `info` or `aurora_supervisor=debug` (default: the
    /// AURORA_LOG variable, else the config's `log`, else `info` for run and
    /// `error` for the other commands).
    #[arg(long, global = true)]
    log: Option<String>,
    /// The daemon's control socket (default: the AURORA_SOCKET variable,
    /// else /run/aurora/control.sock as root and
    /// $XDG_RUNTIME_DIR/aurora/control.sock otherwise).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: start the plugins of the config and the plugins
    /// directory, serve the control socket, stop on SIGTERM or SIGINT,
    /// reload on SIGHUP.
    Run {
        /// The config file; without one, the embedded default serves the
        /// example plugins.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check the config and every manifest, print every problem, start
    /// nothing.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show the daemon and each plugin: state, version, pid, uptime,
    /// restarts, calls, errors, memory and CPU.
    Status {
        /// Print the daemon's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Call a method with a JSON request and print the JSON reply. Goes
    /// through the running daemon; with `--config`, starts the plugin itself
    /// for this one call instead.
    Call {
        /// Start the plugin from this config for one call, without a daemon.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The call's deadline, such as `200ms` or `5s` (default: the plugin's
        /// call_timeout).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        plugin: String,
        method: String,
        /// The request as JSON; `null` when left out.
        json: Option<String>,
    },
    /// Start a stopped, failed or idle plugin and wait until it is ready.
    Start { plugin: String },
    /// Stop a plugin; it stays stopped until started.
    Stop { plugin: String },
    /// Stop a plugin if it runs and start it afresh.
    Restart { plugin: String },
    /// Re-read the config and manifests and apply the difference (like
    /// SIGHUP); with a plugin, only for it, swapping its process even if its
    /// definition is unchanged, to pick up a new binary. A changed plugin's
    /// new process starts beside the old one, which serves until the new
    /// one is ready and then finishes its calls; no call fails.
    Reload { plugin: Option<String> },
    /// List the versions of a plugin kept in the version store; `*` marks
    /// the one running.
    Versions {
        plugin: String,
        /// Print the daemon's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Go back to an earlier version of a plugin, through the same safe
    /// swap as reload.
    Rollback {
        plugin: String,
        /// The version to run (a semver version or a hash prefix); the one
        /// before the running one when left out.
        #[arg(long)]
        to: Option<String>,
    },
    /// Print a plugin's recent log lines: its stdout, stderr, forwarded
    /// records and lifecycle.
    Logs {
        plugin: String,
        /// How many lines.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: u32,
        /// Keep printing new lines until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
    /// Stop every plugin and the daemon.
    Shutdown,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatFlag {
    Human,
    Json,
}

/// An outcome that maps to an exit code other than 1.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unreachable(String),
}

fn main() -> ExitCode {
    // SAFETY: nothing else runs yet: the runtime and every other thread are
    // created later, in `run`.
    let notifier = unsafe { Notifier::take_from_env() };
    let cli = Cli::parse();

    match run(cli, notifier) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aurora: {err:#}");
            match err.downcast_ref::<Refusal>() {
                Some(Refusal::Usage(_)) => ExitCode::from(2),
                Some(Refusal::Timeout(_)) => ExitCode::from(3),
                Some(Refusal::Unreachable(_)) => ExitCode::from(4),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli, notifier: Notifier) -> anyhow::Result<()> {
    let Cli {
        command,
        log_format,
        log,
        socket,
    } = cli;
    let flag_format = log_format.map(|format| match format {
        LogFormatFlag::Human => LogFormat::Human,
        LogFormatFlag::Json => LogFormat::Json,
    });
    let filter_from_env = log.or_else(|| std::env::var("AURORA_LOG").ok());

    if let Command::Run { config } = command {
        return run_daemon(config, socket, notifier, flag_format, filter_from_env);
    }
    let filter = filter_from_env.unwrap_or_else(|| "error".to_owned());
    cli::logging::init(
        flag_format.unwrap_or(LogFormat::Human),
        &filter,
        "error",
        None,
    );

    let socket = socket.unwrap_or_else(default_socket);
    let runtime = runtime()?;
    match command {
        Command::Run { .. } => unreachable!("handled above"),
        Command::Check { config } => check(config.as_deref()),
        Command::Status { json } => runtime.block_on(status(&socket, json)),
        Command::Call {
            config: Some(config),
            timeout,
            plugin,
            method,
            json,
        } => {
            let loaded = load_or_refuse(Some(&config))?;
            runtime.block_on(call_once(
                &loaded,
                timeout,
                &plugin,
                &method,
                json.as_deref(),
                None,
            ))
        }
        Command::Call {
            config: None,
            timeout,
            plugin,
            method,
            json,
        } => runtime.block_on(call(&socket, timeout, &plugin, &method, json.as_deref())),
        Command::Start { plugin } => {
            runtime.block_on(simple(&socket, ControlCommand::Start { plugin }))
        }
        Command::Stop { plugin } => {
            runtime.block_on(simple(&socket, ControlCommand::Stop { plugin }))
        }
        Command::Restart { plugin } => {
            runtime.block_on(simple(&socket, ControlCommand::Restart { plugin }))
        }
        Command::Reload { plugin } => {
            runtime.block_on(simple(&socket, ControlCommand::Reload { plugin }))
        }
        Command::Logs {
            plugin,
            lines,
            follow,
        } => runtime.block_on(logs(&socket, plugin, lines, follow)),
        Command::Shutdown => runtime.block_on(simple(&socket, ControlCommand::Shutdown)),
        Command::Versions { plugin, json } => runtime.block_on(versions(&socket, plugin, json)),
        Command::Rollback { plugin, to } => {
            runtime.block_on(simple(&socket, ControlCommand::Rollback { plugin, to }))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Loads the config and manifests, or refuses with every problem.
fn load_or_refuse(config: Option<&Path>) -> anyhow::Result<Loaded> {
    daemon::load(config)
        .map_err(|problems| Refusal::Usage(problem_list(&problems, "nothing was started")).into())
}

/// Every problem, one a line, after their count and `outcome`.
fn problem_list(problems: &[Problem], outcome: &str) -> String {
    let count = problems.len();
    let plural = if count == 1 { "" } else { "s" };
    let mut text = format!("{count} problem{plural} in the config and manifests; {outcome}:");
    for problem in problems {
        text.push_str("\n  ");
        text.push_str(&problem.to_string());
    }
    text
}

/// `aurora run`.
fn run_daemon(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    notifier: Notifier,
    flag_format: Option<LogFormat>,
    filter_from_env: Option<String>,
) -> anyhow::Result<()> {
    let loaded = match daemon::load(config.as_deref()) {
        Ok(loaded) => loaded,
        Err(problems) => {
            notifier.status("refusing to start: the config has problems");
            let list = problem_list(&problems, "nothing was started");
            return Err(Refusal::Usage(list).into());
        }
    };
    let settings = &loaded.settings;
    let format = flag_format
        .or(settings.log_format)
        .unwrap_or(LogFormat::Human);
    let filter = filter_from_env
        .or_else(|| settings.log_filter.clone())
        .unwrap_or_else(|| "info".to_owned());
    let logs = LogStore::new(settings.log_lines);
    cli::logging::init(format, &filter, "info", Some(&logs));

    let options = DaemonOptions {
        config,
        socket,
        notifier,
        logs,
    };
    let runtime = runtime()?;
    runtime
        .block_on(daemon::run(loaded, options))
        .map_err(anyhow::Error::from)
}

/// `aurora check`.
fn check(config: Option<&Path>) -> anyhow::Result<()> {
    let loaded = daemon::load(config).map_err(|problems| {
        Refusal::Usage(problem_list(&problems, "the daemon would not start"))
    })?;
    let plan = &loaded.plan;
    let mut out = format!(
        "{}: {} plugin{}, {} from manifests under {}\n",
        loaded.source,
        plan.plugins.len(),
        if plan.plugins.len() == 1 { "" } else { "s" },
        loaded.manifests.len(),
        loaded.settings.plugins_dir.display()
    );
    for definition in &plan.plugins {
        let spec = &definition.spec;
        let version = spec
            .version
            .as_ref()
            .map_or_else(String::new, |v| format!(" {v}"));
        let lazy = if spec.lazy { ", lazy" } else { "" };
        let requires: Vec<String> = definition
            .requires
            .iter()
            .map(|r| format!("{} {}", r.name, r.versions))
            .collect();
        let requires = if requires.is_empty() {
            String::new()
        } else {
            format!(", requires {}", requires.join(", "))
        };
        out.push_str(&format!(
            "  {}{version} ({}{lazy}{requires})\n",
            spec.name, definition.origin
        ));
    }
    out.push_str("no problems found\n");
    print_out(out.as_bytes())
}

/// Turns a client error into the refusal that gives its exit code.
fn client_failure(err: ClientError) -> anyhow::Error {
    let message = err.to_string();
    let refusal = match &err {
        ClientError::NotRunning { .. }
        | ClientError::PermissionDenied { .. }
        | ClientError::Connect { .. } => Refusal::Unreachable(message),
        ClientError::Refused(error) => match error.kind {
            ControlErrorKind::UnknownPlugin
            | ControlErrorKind::UnknownMethod
            | ControlErrorKind::BadRequest
            | ControlErrorKind::InvalidConfig => Refusal::Usage(message),
            ControlErrorKind::Timeout => Refusal::Timeout(message),
            ControlErrorKind::Refused => Refusal::Unreachable(message),
            ControlErrorKind::Incompatible | ControlErrorKind::Failed => {
                return anyhow::Error::from(err);
            }
        },
        _ => return anyhow::Error::from(err),
    };
    refusal.into()
}

/// Sends `command` and prints the one answer.
async fn simple(socket: &Path, command: ControlCommand) -> anyhow::Result<()> {
    let response = client::send(socket, command)
        .await
        .map_err(client_failure)?
        .single()
        .await
        .map_err(client_failure)?;
    let (text, refused) = match response {
        ControlResponse::Done { message } => (format!("{message}\n"), 0),
        ControlResponse::Reloaded(summary) => {
            let text = cli::output::reload_summary(&summary);
            (text, summary.failed.len())
        }
        other => anyhow::bail!("the daemon gave an unexpected answer: {other:?}"),
    };
    print_out(text.as_bytes())?;
    if refused > 0 {
        let plural = if refused == 1 { "" } else { "s" };
        anyhow::bail!("{refused} plugin{plural} kept the old version: the new one was refused");
    }
    Ok(())
}

/// `aurora versions`.
async fn versions(socket: &Path, plugin: String, json: bool) -> anyhow::Result<()> {
    let response = client::send(socket, ControlCommand::Versions { plugin })
        .await
        .map_err(client_failure)?
        .single()
        .await
        .map_err(client_failure)?;
    let ControlResponse::Versions(versions) = response else {
        anyhow::bail!("the daemon gave an unexpected answer: {response:?}");
    };
    let text = if json {
        let mut text = serde_json::to_string_pretty(&versions).context("cannot print JSON")?;
        text.push('\n');
        text
    } else {
        cli::output::version_table(&versions)
    };
    print_out(text.as_bytes())
}

async fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let response = client::send(socket, ControlCommand::Status)
        .await
        .map_err(client_failure)?
        .single()
        .await
        .map_err(client_failure)?;
    let ControlResponse::Status(status) = response else {
        anyhow::bail!("the daemon gave an unexpected answer: {response:?}");
    };
    let text = if json {
        let mut text = serde_json::to_string_pretty(&status).context("cannot print JSON")?;
        text.push('\n');
        text
    } else {
        cli::output::status_table(&status)
    };
    print_out(text.as_bytes())
}

fn check_json(request: &str) -> anyhow::Result<()> {
    match serde_json::from_str::<serde::de::IgnoredAny>(request) {
        Ok(_) => Ok(()),
        Err(err) => Err(Refusal::Usage(format!("the request is not valid JSON: {err}")).into()),
    }
}

/// `aurora call` through the daemon. With no daemon running it falls back
/// to the one-shot form with the embedded default config, as `aurora call`
/// did before there was a daemon, so existing scripts keep working.
async fn call(
    socket: &Path,
    timeout: Option<Duration>,
    plugin: &str,
    method: &str,
    json: Option<&str>,
) -> anyhow::Result<()> {
    let request = json.unwrap_or("null");
    check_json(request)?;
    let command = ControlCommand::Call {
        plugin: plugin.to_owned(),
        method: method.to_owned(),
        payload: Payload::json(request.as_bytes().to_vec()),
        timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
    };
    let response = match client::send(socket, command).await {
        Ok(response) => response.single().await,
        Err(ClientError::NotRunning { socket }) => {
            let loaded = load_or_refuse(None)?;
            let note = format!(
                "no daemon is running at {}, so the embedded default config was used",
                socket.display()
            );
            return call_once(&loaded, timeout, plugin, method, json, Some(&note)).await;
        }
        Err(err) => Err(err),
    };
    match response.map_err(client_failure)? {
        ControlResponse::Reply(reply) => print_reply(&reply.bytes),
        other => anyhow::bail!("the daemon gave an unexpected answer: {other:?}"),
    }
}

/// `aurora call --config`: one plugin, one call, one reply on stdout, no
/// daemon. `note` explains, in an unknown-plugin error, why this config.
async fn call_once(
    loaded: &Loaded,
    timeout: Option<Duration>,
    plugin: &str,
    method: &str,
    json: Option<&str>,
    note: Option<&str>,
) -> anyhow::Result<()> {
    let Some(definition) = loaded.plan.get(plugin) else {
        let known: Vec<&str> = loaded.plan.names().collect();
        let mut message = format!(
            "no plugin named {plugin:?}; the config has: {}",
            known.join(", ")
        );
        if let Some(note) = note {
            message.push_str(&format!(" ({note})"));
        }
        return Err(Refusal::Usage(message).into());
    };
    let spec = &definition.spec;
    let request = json.unwrap_or("null");
    check_json(request)?;

    let supervisor = Supervisor::new();
    supervisor.add(spec.clone())?;
    let outcome = async {
        supervisor
            .wait_ready(plugin, spec.handshake_timeout)
            .await?;
        let payload = Payload::json(request.as_bytes().to_vec());
        let reply = supervisor.call_raw(plugin, method, payload, timeout).await;
        Ok::<_, anyhow::Error>(reply)
    }
    .await;
    supervisor.shutdown().await;

    let reply = outcome?.map_err(|err| match err {
        CallError::UnknownMethod { .. } => anyhow::Error::from(Refusal::Usage(err.to_string())),
        CallError::Timeout { .. } => Refusal::Timeout(err.to_string()).into(),
        other => other.into(),
    })?;
    print_reply(&reply.bytes)
}

async fn logs(socket: &Path, plugin: String, lines: u32, follow: bool) -> anyhow::Result<()> {
    let command = ControlCommand::Logs {
        plugin,
        lines,
        follow,
    };
    let mut response = client::send(socket, command)
        .await
        .map_err(client_failure)?;
    while let Some(answer) = response.next().await.map_err(client_failure)? {
        match answer {
            ControlResponse::Log(line) => {
                let mut text = cli::output::log_line(&line);
                text.push('\n');
                if !write_out(text.as_bytes())? {
                    return Ok(());
                }
            }
            ControlResponse::EndOfLogs => return Ok(()),
            other => anyhow::bail!("the daemon gave an unexpected answer: {other:?}"),
        }
    }
    Ok(())
}

/// Prints the reply; a closed stdout (`aurora call ... | head -c0`) is not an
/// error worth reporting.
fn print_reply(bytes: &[u8]) -> anyhow::Result<()> {
    let mut line = bytes.to_vec();
    line.push(b'\n');
    print_out(&line)
}

fn print_out(bytes: &[u8]) -> anyhow::Result<()> {
    write_out(bytes).map(|_| ())
}

/// Writes to stdout; `false` when the reader has gone away, which ends the
/// command cleanly.
fn write_out(bytes: &[u8]) -> anyhow::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(err) => Err(err).context("cannot write to stdout"),
    }
}
