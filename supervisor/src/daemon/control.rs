//! The control socket: who may connect, and how each request is served.
//!
//! The socket is a Unix-domain socket (through `interprocess`) created with
//! owner-only permissions unless a group is configured, in a runtime
//! directory that is itself closed to others. The file mode is the first
//! gate; the peer's credentials, read from the kernel, are the second: root,
//! the daemon's own user and members of the configured group are served,
//! everyone else is refused with a reason.
//!
//! Each connection is its own task and carries one request. Requests that
//! change what runs as a whole (reload, shutdown) are handed to the main
//! loop; the rest are served here.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use aurora_protocol::control::{
    CONTROL_FINGERPRINT, CONTROL_MAX_FRAME, ControlCommand, ControlError, ControlErrorKind,
    ControlRequest, ControlResponse, DaemonStatus, LogLine, PluginReport, VersionReport,
};
use aurora_protocol::{Encoding, FrameError, FrameReader, LogLevel, Payload, encode_frame};
use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{broadcast, oneshot};
use tracing::Instrument;

use super::settings::DaemonSettings;
use super::{Command, DaemonError, Shared, is_running};
use crate::error::CallError;
use crate::plugin::PluginState;

/// How long a client has to send its request after connecting.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// How long `start` and `restart` wait for the plugin to be ready before
/// answering, beyond its handshake timeout.
const START_MARGIN: Duration = Duration::from_secs(5);

/// Creates the runtime directory: owner-only, or open to the socket's group
/// when one is configured (the socket's own mode still applies).
pub(crate) fn prepare_runtime_dir(settings: &DaemonSettings) -> Result<(), DaemonError> {
    let dir = settings
        .socket
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(&settings.runtime_dir);
    let mode = if settings.socket_group.is_some() {
        0o750
    } else {
        0o700
    };
    let existed = dir.is_dir();
    super::prepare_dir(dir, mode)?;
    let ours = dir == settings.runtime_dir;
    if !existed
        && ours
        && let Some(group) = &settings.socket_group
    {
        std::os::unix::fs::chown(dir, None, Some(group.gid)).map_err(|source| {
            DaemonError::Directory {
                path: dir.to_owned(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Binds the control socket, refusing to displace a live daemon and
/// clearing a stale socket file left by one that died.
pub(crate) fn bind(settings: &DaemonSettings) -> Result<Listener, DaemonError> {
    let socket = &settings.socket;
    let listen_error = |reason: String| DaemonError::Listen {
        socket: socket.clone(),
        reason,
    };

    if let Ok(metadata) = std::fs::symlink_metadata(socket) {
        if !metadata.file_type().is_socket() {
            return Err(listen_error(
                "the path exists and is not a socket; remove it or choose another".to_owned(),
            ));
        }
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(_) => {
                return Err(DaemonError::AlreadyRunning {
                    socket: socket.clone(),
                });
            }
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %socket.display(), "removing a stale control socket");
                std::fs::remove_file(socket).map_err(|err| {
                    listen_error(format!("cannot remove the stale socket: {err}"))
                })?;
            }
            Err(err) => return Err(listen_error(format!("cannot check the old socket: {err}"))),
        }
    }

    let name = socket
        .as_path()
        .to_fs_name::<GenericFilePath>()
        .map_err(|err| listen_error(err.to_string()))?;
    let listener = ListenerOptions::new()
        .name(name)
        .mode(settings.socket_mode as libc::mode_t)
        .reclaim_name(true)
        .create_tokio()
        .map_err(|err| listen_error(err.to_string()))?;
    if let Some(group) = &settings.socket_group {
        std::os::unix::fs::chown(socket, None, Some(group.gid))
            .map_err(|err| listen_error(format!("cannot give the socket to its group: {err}")))?;
    }
    // The mode set before bind was narrowed by the umask, which is never
    // wider than asked; now set exactly what was configured.
    let mode = settings.socket_mode & 0o777;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .map_err(|err| listen_error(format!("cannot set the socket's mode: {err}")))?;
    tracing::info!(socket = %socket.display(), mode = %format!("{mode:o}"), "control socket ready");
    Ok(listener)
}

/// Accepts connections until the daemon stops.
pub(crate) async fn serve(listener: Listener, shared: Arc<Shared>) {
    let mut stopping = shared.stopping.clone();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let shared = Arc::clone(&shared);
                    let span = tracing::debug_span!("control");
                    connections.spawn(handle(stream, shared).instrument(span));
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot accept a control connection");
                    // Out of file descriptors, usually: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = stopped(&mut stopping) => break,
            Some(_) = connections.join_next() => {}
        }
    }
    // Connections still running finish their answers (a shutdown request
    // waits for its reply); the daemon bounds how long it waits for this.
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// The answers of one connection.
struct Answer {
    writer: WriteHalf<Stream>,
    buffer: Vec<u8>,
}

impl Answer {
    async fn send(&mut self, response: &ControlResponse) -> Result<(), FrameError> {
        self.buffer.clear();
        encode_frame(response, CONTROL_MAX_FRAME, &mut self.buffer)?;
        self.writer.write_all(&self.buffer).await?;
        Ok(())
    }

    async fn error(&mut self, kind: ControlErrorKind, message: impl Into<String>) {
        let error = ControlError {
            kind,
            message: message.into(),
        };
        let _ = self.send(&ControlResponse::Error(error)).await;
    }
}

async fn handle(stream: Stream, shared: Arc<Shared>) {
    let peer = stream.peer_creds();
    let (reader, writer) = tokio::io::split(stream);
    let mut answer = Answer {
        writer,
        buffer: Vec::new(),
    };
    let mut reader = FrameReader::new(reader, CONTROL_MAX_FRAME);
    let received = tokio::time::timeout(REQUEST_WAIT, reader.read::<ControlRequest>()).await;
    // The request is read even from a peer about to be refused, so that its
    // write completes and it reads the reason rather than a broken pipe.
    if let Err(reason) = check_peer(peer, &shared.settings) {
        tracing::warn!(%reason, "control connection refused");
        answer.error(ControlErrorKind::Refused, reason).await;
        return;
    }
    let request = match received {
        Ok(Ok(Some(request))) => request,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(FrameError::Malformed(err))) => {
            let message = format!(
                "the daemon cannot read this request ({err}); the aurora client and daemon are \
                 probably different versions"
            );
            answer.error(ControlErrorKind::Incompatible, message).await;
            return;
        }
        Ok(Err(err)) => {
            tracing::debug!(%err, "broken control request");
            return;
        }
    };
    if request.schema != CONTROL_FINGERPRINT {
        let message = format!(
            "the aurora client (control schema {:#018x}) and daemon ({CONTROL_FINGERPRINT:#018x}) \
             are different versions; use the aurora binary the daemon runs",
            request.schema
        );
        answer.error(ControlErrorKind::Incompatible, message).await;
        return;
    }
    tracing::debug!(command = ?request.command, "control request");

    let outcome = match request.command {
        ControlCommand::Status => status(&shared).await.map(ControlResponse::Status),
        ControlCommand::Call {
            plugin,
            method,
            payload,
            timeout_ms,
        } => call(&shared, &plugin, &method, payload, timeout_ms).await,
        ControlCommand::Start { plugin } => start(&shared, &plugin, false).await,
        ControlCommand::Restart { plugin } => start(&shared, &plugin, true).await,
        ControlCommand::Stop { plugin } => stop(&shared, &plugin).await,
        ControlCommand::Reload { plugin } => reload(&shared, plugin).await,
        ControlCommand::Logs {
            plugin,
            lines,
            follow,
        } => {
            logs(&shared, &plugin, lines, follow, &mut answer, &mut reader).await;
            return;
        }
        ControlCommand::Shutdown => shutdown(&shared).await,
        ControlCommand::Versions { plugin } => versions(&shared, &plugin).await,
        ControlCommand::Rollback { plugin, to } => rollback(&shared, &plugin, to).await,
    };
    match outcome {
        Ok(response) => {
            let _ = answer.send(&response).await;
        }
        Err(error) => {
            let _ = answer.send(&ControlResponse::Error(error)).await;
        }
    }
    let _ = answer.writer.shutdown().await;
}

/// Root, the daemon's own user, and members of the socket's group.
fn check_peer(
    peer: io::Result<interprocess::local_socket::PeerCreds>,
    settings: &DaemonSettings,
) -> Result<(), String> {
    let peer = peer.map_err(|err| format!("cannot read the peer's credentials: {err}"))?;
    let Some(uid) = peer.euid() else {
        return Err("the peer's user is unknown".to_owned());
    };
    let ours = nix::unistd::geteuid().as_raw();
    if uid == 0 || uid == ours {
        return Ok(());
    }
    if let Some(group) = &settings.socket_group {
        let in_group = peer.egid() == Some(group.gid)
            || peer
                .pid()
                .is_some_and(|pid| supplementary_groups(pid as u32).contains(&group.gid));
        if in_group {
            return Ok(());
        }
    }
    let allowed = match &settings.socket_group {
        Some(group) => format!("root, uid {ours} and group {}", group.name),
        None => format!("root and uid {ours}"),
    };
    Err(format!(
        "uid {uid} may not control this daemon; only {allowed} may"
    ))
}

/// The supplementary groups of process `pid`, from `/proc`.
fn supplementary_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|gid| gid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn failure(kind: ControlErrorKind, message: impl Into<String>) -> ControlError {
    ControlError {
        kind,
        message: message.into(),
    }
}

fn unknown_plugin(plugin: &str, shared: &Shared) -> ControlError {
    let plan = shared.plan();
    let known: Vec<&str> = plan.names().collect();
    let known = if known.is_empty() {
        "it runs none".to_owned()
    } else {
        format!("it runs: {}", known.join(", "))
    };
    failure(
        ControlErrorKind::UnknownPlugin,
        format!("no plugin named {plugin:?}; {known}"),
    )
}

async fn status(shared: &Shared) -> Result<DaemonStatus, ControlError> {
    let plan = shared.plan();
    let statuses = shared.supervisor.statuses();
    let pids: Vec<u32> = statuses.iter().filter_map(|s| s.pid).collect();
    let samples = shared.stats.sample(&pids).await;

    // Plan order first (start order), then anything left over, such as a
    // plugin a reload removed that is still stopping.
    let mut ordered: Vec<_> = plan
        .plugins
        .iter()
        .filter_map(|p| statuses.iter().find(|s| s.name == p.spec.name))
        .collect();
    ordered.extend(statuses.iter().filter(|s| plan.get(&s.name).is_none()));

    let plugins = ordered
        .into_iter()
        .map(|status| {
            let definition = plan.get(&status.name);
            let sample = status.pid.and_then(|pid| samples.get(&pid));
            PluginReport {
                name: status.name.clone(),
                state: status.state.name().to_owned(),
                reason: match &status.state {
                    PluginState::Failed { reason } => Some(reason.clone()),
                    _ => None,
                },
                version: status.version.clone(),
                declared_version: definition
                    .and_then(|d| d.spec.version.as_ref())
                    .map(ToString::to_string),
                pid: status.pid,
                uptime_ms: status.uptime.map(millis),
                // Reloads start processes too, but they are not restarts.
                restarts: status
                    .generation
                    .saturating_sub(1)
                    .saturating_sub(status.reloads),
                calls: status.calls,
                errors: status.errors,
                memory_bytes: sample.map(|s| s.memory_bytes),
                cpu_percent: sample.map(|s| s.cpu_percent),
                cpu_time_ms: sample.map(|s| s.cpu_time_ms),
                lazy: definition.is_some_and(|d| d.spec.lazy),
                idle_timeout_ms: definition.and_then(|d| d.spec.idle_timeout).map(millis),
                requires: definition
                    .map(|d| d.requires.iter().map(|r| r.name.clone()).collect())
                    .unwrap_or_default(),
                origin: definition.map(|d| d.origin.to_string()).unwrap_or_default(),
            }
        })
        .collect();

    Ok(DaemonStatus {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_ms: millis(shared.started.elapsed()),
        config: shared.source.clone(),
        socket: shared.settings.socket.display().to_string(),
        plugins,
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

async fn call(
    shared: &Shared,
    plugin: &str,
    method: &str,
    payload: Payload,
    timeout_ms: Option<u64>,
) -> Result<ControlResponse, ControlError> {
    if payload.encoding == Encoding::Json
        && let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(&payload.bytes)
    {
        return Err(failure(
            ControlErrorKind::BadRequest,
            format!("the request is not valid JSON: {err}"),
        ));
    }
    let timeout = timeout_ms.map(Duration::from_millis);
    match shared
        .supervisor
        .call_raw(plugin, method, payload, timeout)
        .await
    {
        Ok(reply) => Ok(ControlResponse::Reply(reply)),
        Err(CallError::UnknownPlugin { .. }) => Err(unknown_plugin(plugin, shared)),
        Err(err) => {
            let kind = match &err {
                CallError::UnknownMethod { .. } => ControlErrorKind::UnknownMethod,
                CallError::Timeout { .. } => ControlErrorKind::Timeout,
                _ => ControlErrorKind::Failed,
            };
            Err(failure(kind, err.to_string()))
        }
    }
}

/// `start` (only if not running) and `restart` (in any case): start the
/// plugin and wait until it is ready or has failed.
async fn start(
    shared: &Shared,
    plugin: &str,
    even_if_running: bool,
) -> Result<ControlResponse, ControlError> {
    let Some(before) = shared.supervisor.status(plugin) else {
        return Err(unknown_plugin(plugin, shared));
    };
    if !even_if_running && is_running(&before.state) {
        let message = match before.pid {
            Some(pid) => format!("{plugin} is already {} (pid {pid})", before.state.name()),
            None => format!("{plugin} is already {}", before.state.name()),
        };
        return Ok(ControlResponse::Done { message });
    }

    let patience = shared.supervisor.spec(plugin).map_or(START_MARGIN, |spec| {
        spec.handshake_timeout * 2 + START_MARGIN
    });
    shared
        .supervisor
        .restart(plugin)
        .await
        .map_err(|_| unknown_plugin(plugin, shared))?;
    match shared.supervisor.wait_ready(plugin, patience).await {
        Ok(()) => {
            let after = shared.supervisor.status(plugin);
            let pid = after.as_ref().and_then(|s| s.pid);
            let verb = if even_if_running {
                "restarted"
            } else {
                "started"
            };
            let message = match pid {
                Some(pid) => format!("{plugin} {verb} (pid {pid})"),
                None => format!("{plugin} {verb}"),
            };
            Ok(ControlResponse::Done { message })
        }
        Err(err) => Err(failure(ControlErrorKind::Failed, err.to_string())),
    }
}

async fn stop(shared: &Shared, plugin: &str) -> Result<ControlResponse, ControlError> {
    shared
        .supervisor
        .stop(plugin)
        .await
        .map_err(|_| unknown_plugin(plugin, shared))?;
    Ok(ControlResponse::Done {
        message: format!("{plugin} stopped"),
    })
}

async fn reload(shared: &Shared, plugin: Option<String>) -> Result<ControlResponse, ControlError> {
    let (reply, answer) = oneshot::channel();
    let gone = || failure(ControlErrorKind::Failed, "the daemon is shutting down");
    shared
        .commands
        .send(Command::Reload { plugin, reply })
        .await
        .map_err(|_| gone())?;
    let summary = answer.await.map_err(|_| gone())??;
    Ok(ControlResponse::Reloaded(summary))
}

async fn versions(shared: &Shared, plugin: &str) -> Result<ControlResponse, ControlError> {
    let versions = shared
        .supervisor
        .versions(plugin)
        .await
        .map_err(|_| unknown_plugin(plugin, shared))?;
    let reports = versions
        .into_iter()
        .map(|version| VersionReport {
            version: version.version,
            hash: version.hash,
            binary: version.binary.display().to_string(),
            source: version.source.display().to_string(),
            active: version.active,
            activated_unix_ms: version.activated.and_then(|at| {
                let since_epoch = at.duration_since(std::time::UNIX_EPOCH).ok()?;
                Some(millis(since_epoch))
            }),
        })
        .collect();
    Ok(ControlResponse::Versions(reports))
}

/// A rollback is a swap inside the plugin's task, which orders it with any
/// reload of the same plugin; the plan is left alone, so the next reload
/// of a changed definition moves forward again.
async fn rollback(
    shared: &Shared,
    plugin: &str,
    to: Option<String>,
) -> Result<ControlResponse, ControlError> {
    if shared.supervisor.status(plugin).is_none() {
        return Err(unknown_plugin(plugin, shared));
    }
    match shared.supervisor.rollback(plugin, to.as_deref()).await {
        Ok(done) => {
            let version = done.version.as_deref().unwrap_or("the earlier version");
            let mut message = format!("{plugin} rolled back to {version}");
            if let Some(pid) = done.pid {
                message.push_str(&format!(" (pid {pid})"));
            }
            if let Some(replaced) = done.replaced {
                message.push_str(&format!("; pid {replaced} finished its calls and stopped"));
            }
            Ok(ControlResponse::Done { message })
        }
        Err(err) => Err(failure(ControlErrorKind::Failed, err.to_string())),
    }
}

async fn shutdown(shared: &Shared) -> Result<ControlResponse, ControlError> {
    let (reply, done) = oneshot::channel();
    let gone = || {
        failure(
            ControlErrorKind::Failed,
            "the daemon is already shutting down",
        )
    };
    shared
        .commands
        .send(Command::Shutdown { reply })
        .await
        .map_err(|_| gone())?;
    done.await.map_err(|_| gone())?;
    Ok(ControlResponse::Done {
        message: "every plugin stopped; the daemon is exiting".to_owned(),
    })
}

/// Sends the backlog, then, when following, new lines until the client
/// hangs up or the daemon stops.
async fn logs(
    shared: &Shared,
    plugin: &str,
    lines: u32,
    follow: bool,
    answer: &mut Answer,
    reader: &mut FrameReader<ReadHalf<Stream>>,
) {
    let known = shared.plan().get(plugin).is_some() || shared.supervisor.status(plugin).is_some();
    if !known {
        let error = unknown_plugin(plugin, shared);
        let _ = answer.send(&ControlResponse::Error(error)).await;
        return;
    }
    let (backlog, mut live) = shared.logs.tail_and_follow(plugin, lines as usize);
    for line in backlog {
        if answer.send(&ControlResponse::Log(line)).await.is_err() {
            return;
        }
    }
    if !follow {
        let _ = answer.send(&ControlResponse::EndOfLogs).await;
        let _ = answer.writer.shutdown().await;
        return;
    }

    let mut stopping = shared.stopping.clone();
    loop {
        tokio::select! {
            received = live.recv() => {
                let line = match received {
                    Ok((name, line)) if name == plugin => line,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => LogLine {
                        unix_ms: 0,
                        level: LogLevel::Warn,
                        source: "aurora".to_owned(),
                        text: format!("{missed} lines skipped: the reader fell behind"),
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if answer.send(&ControlResponse::Log(line)).await.is_err() {
                    return;
                }
            }
            // The client sends nothing after its request: any read that
            // ends means it hung up.
            _ = reader.read::<ControlRequest>() => return,
            () = stopped(&mut stopping) => {
                let _ = answer.send(&ControlResponse::EndOfLogs).await;
                return;
            }
        }
    }
}

/// Resolves once the daemon has begun to stop (or is gone).
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stopping| *stopping).await;
}
