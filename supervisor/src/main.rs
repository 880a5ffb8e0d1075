//! `aurora`: run the supervisor in the foreground, or make one call to a
//! plugin from the command line.
//!
//! Exit codes: 0 success; 1 the call or the supervisor failed; 2 bad usage,
//! config or input (unknown plugin or method, invalid JSON); 3 the call
//! timed out.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use aurora_supervisor::config::Config;
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
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Log filter, such as `info` or `aurora_supervisor=debug` (default: the
    /// AURORA_LOG variable, else `info` for run and `error` for call).
    #[arg(long, global = true)]
    log: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor with the plugins of a config until Ctrl-C or SIGTERM.
    Run {
        /// The config file; without one, the embedded default serves the
        /// example plugins.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Start one plugin, make one call with a JSON request, print the JSON
    /// reply, and stop.
    Call {
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
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Run { .. } => "info",
        Command::Call { .. } => "error",
    };
    init_logging(cli.log_format, cli.log.as_deref(), default_filter);

    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aurora: {err:#}");
            match err.downcast_ref::<Refusal>() {
                Some(Refusal::Usage(_)) => ExitCode::from(2),
                Some(Refusal::Timeout(_)) => ExitCode::from(3),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn init_logging(format: LogFormat, flag: Option<&str>, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = flag
        .map(str::to_owned)
        .or_else(|| std::env::var("AURORA_LOG").ok())
        .unwrap_or_else(|| default_filter.to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|err| {
        eprintln!("aurora: ignoring log filter {filter:?}: {err}");
        EnvFilter::new(default_filter)
    });
    let colour = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match command {
        Command::Run { config } => runtime.block_on(serve(load_config(config)?)),
        Command::Call {
            config,
            timeout,
            plugin,
            method,
            json,
        } => {
            let config = load_config(config)?;
            runtime.block_on(call_once(
                config,
                timeout,
                &plugin,
                &method,
                json.as_deref(),
            ))
        }
    }
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let config = match path {
        Some(path) => Config::load(&path),
        None => Config::embedded_default(),
    };
    config.map_err(|err| Refusal::Usage(err.to_string()).into())
}

/// `aurora run`: start every plugin, then wait for a signal to stop.
async fn serve(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;

    let supervisor = Supervisor::new();
    for spec in &config.plugins {
        supervisor.add(spec.clone())?;
    }
    for spec in &config.plugins {
        match supervisor
            .wait_ready(&spec.name, spec.handshake_timeout * 2)
            .await
        {
            Ok(()) => {}
            Err(err) => tracing::warn!(%err, "plugin not ready yet; it keeps restarting by policy"),
        }
    }
    let ready = supervisor
        .statuses()
        .iter()
        .filter(|s| s.state.name() == "ready")
        .count();
    tracing::info!(
        ready,
        total = config.plugins.len(),
        "aurora is running; Ctrl-C stops it"
    );

    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received; stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT received; stopping"),
    }
    supervisor.shutdown().await;
    tracing::info!("every plugin stopped");
    Ok(())
}

/// `aurora call`: one plugin, one call, one reply on stdout.
async fn call_once(
    config: Config,
    timeout: Option<Duration>,
    plugin: &str,
    method: &str,
    json: Option<&str>,
) -> anyhow::Result<()> {
    let Some(spec) = config.plugin(plugin) else {
        let known: Vec<&str> = config.plugins.iter().map(|p| p.name.as_str()).collect();
        let message = format!(
            "no plugin named {plugin:?}; the config has: {}",
            known.join(", ")
        );
        return Err(Refusal::Usage(message).into());
    };
    let request = json.unwrap_or("null");
    if let Err(err) = serde_json::from_str::<serde::de::IgnoredAny>(request) {
        return Err(Refusal::Usage(format!("the request is not valid JSON: {err}")).into());
    }

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

/// Prints the reply; a closed stdout (`aurora call ... | head -c0`) is not an
/// error worth reporting.
fn print_reply(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(bytes)
        .and_then(|()| stdout.write_all(b"\n"));
    match written.and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(err).context("cannot write the reply")
        }
        _ => Ok(()),
    }
}
