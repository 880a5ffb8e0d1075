//! What crosses the daemon's control socket: the `aurora` CLI's requests and
//! the daemon's answers.
//!
//! The control socket uses the same frames and body codec as a plugin's
//! socket (`frame.rs`, `codec.rs`) but its own messages. A connection carries
//! one request: the client sends a [`ControlRequest`] and reads
//! [`ControlResponse`]s until the answer is complete. Most answers are one
//! frame; `Logs` sends one `Log` frame per line and then `EndOfLogs`, or,
//! when following, keeps sending lines until the client hangs up.
//!
//! Every request carries [`CONTROL_FINGERPRINT`], the hash of
//! [`CONTROL_SCHEMA`], so a client and daemon from different builds refuse
//! each other with a clear message instead of misreading bytes. Changing a
//! type here changes the bytes, so it must change `CONTROL_SCHEMA` too; the
//! golden-bytes test below fails until it does.

use serde::{Deserialize, Serialize};

use crate::frame::DEFAULT_MAX_FRAME;
use crate::message::{LogLevel, fnv1a};
use crate::payload::Payload;

/// The largest control frame either side accepts.
pub const CONTROL_MAX_FRAME: u32 = DEFAULT_MAX_FRAME;

/// A textual description of every control type, in declaration order.
pub const CONTROL_SCHEMA: &str = "\
ControlRequest{schema:u64,command:ControlCommand};\
ControlCommand=Status|Call{plugin:str,method:str,payload:Payload,timeout_ms:Option<u64>}|\
Start{plugin:str}|Stop{plugin:str}|Restart{plugin:str}|Reload{plugin:Option<str>}|\
Logs{plugin:str,lines:u32,follow:bool}|Shutdown|Versions{plugin:str}|\
Rollback{plugin:str,to:Option<str>};\
ControlResponse=Status(DaemonStatus)|Reply(Payload)|Done{message:str}|Reloaded(ReloadSummary)|\
Log(LogLine)|EndOfLogs|Error(ControlError)|Versions([VersionReport]);\
DaemonStatus{pid:u32,version:str,uptime_ms:u64,config:str,socket:str,plugins:[PluginReport]};\
PluginReport{name:str,state:str,reason:Option<str>,version:Option<str>,\
declared_version:Option<str>,pid:Option<u32>,uptime_ms:Option<u64>,restarts:u64,calls:u64,\
errors:u64,memory_bytes:Option<u64>,cpu_percent:Option<f32>,cpu_time_ms:Option<u64>,lazy:bool,\
idle_timeout_ms:Option<u64>,requires:[str],origin:str};\
ReloadSummary{started:[str],stopped:[str],replaced:[str],restarted:[str],unchanged:[str],\
failed:[str]};\
VersionReport{version:Option<str>,hash:Option<str>,binary:str,source:str,active:bool,\
activated_unix_ms:Option<u64>};\
LogLine{unix_ms:u64,level:LogLevel,source:str,text:str};\
ControlError{kind:ControlErrorKind,message:str};\
ControlErrorKind=Refused|Incompatible|BadRequest|UnknownPlugin|UnknownMethod|Timeout|Failed|\
InvalidConfig;\
Payload{encoding:Encoding,bytes:bytes};Encoding=Bincode|Json;\
LogLevel=Error|Warn|Info|Debug|Trace";

/// FNV-1a (64-bit) of [`CONTROL_SCHEMA`].
pub const CONTROL_FINGERPRINT: u64 = fnv1a(CONTROL_SCHEMA.as_bytes());

/// The one request of a control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRequest {
    /// The client's [`CONTROL_FINGERPRINT`].
    pub schema: u64,
    pub command: ControlCommand,
}

impl ControlRequest {
    /// A request from this build.
    pub fn new(command: ControlCommand) -> ControlRequest {
        ControlRequest {
            schema: CONTROL_FINGERPRINT,
            command,
        }
    }
}

/// What a client asks the daemon to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlCommand {
    /// Report the daemon and every plugin.
    Status,
    /// Call a method; the reply comes back in the payload's encoding.
    Call {
        plugin: String,
        method: String,
        payload: Payload,
        /// The deadline, from when the daemon receives the request; the
        /// plugin's `call_timeout` when `None`.
        timeout_ms: Option<u64>,
    },
    /// Start a stopped, failed or idle plugin now.
    Start { plugin: String },
    /// Stop a plugin; it stays stopped until started.
    Stop { plugin: String },
    /// Stop a plugin if it runs and start it afresh.
    Restart { plugin: String },
    /// Re-read the config and manifests and apply the difference: for one
    /// plugin, or for all when `None`.
    Reload { plugin: Option<String> },
    /// The last `lines` lines of a plugin's log, then, if `follow`, new
    /// lines as they come.
    Logs {
        plugin: String,
        lines: u32,
        follow: bool,
    },
    /// Stop every plugin and exit.
    Shutdown,
    /// The versions a plugin has run, the running one marked.
    Versions { plugin: String },
    /// Go back to an earlier version of a plugin through a safe swap: the
    /// one before the running one, or the one `to` names (a semver version
    /// or a hash prefix).
    Rollback { plugin: String, to: Option<String> },
}

/// One frame of the daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    Status(DaemonStatus),
    /// A call's reply.
    Reply(Payload),
    /// The command was carried out; `message` says what happened.
    Done {
        message: String,
    },
    Reloaded(ReloadSummary),
    /// One line of a plugin's log.
    Log(LogLine),
    /// The backlog of a `Logs` request without `follow` is complete.
    EndOfLogs,
    Error(ControlError),
    /// The answer to `Versions`, the most recently active first.
    Versions(Vec<VersionReport>),
}

/// The daemon and its plugins, as `aurora status` shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    /// The daemon's own version.
    pub version: String,
    pub uptime_ms: u64,
    /// The config file, or `(embedded default)`.
    pub config: String,
    /// The control socket's path.
    pub socket: String,
    /// In start order.
    pub plugins: Vec<PluginReport>,
}

/// One plugin in a [`DaemonStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginReport {
    pub name: String,
    /// `idle`, `starting`, `ready`, `stopping`, `backing-off`, `failed` or
    /// `stopped`.
    pub state: String,
    /// Why it is failed, when it is.
    pub reason: Option<String>,
    /// The version the running process reported.
    pub version: Option<String>,
    /// The version its manifest or config declares.
    pub declared_version: Option<String>,
    pub pid: Option<u32>,
    pub uptime_ms: Option<u64>,
    /// Processes started after the first, less those started by reloads
    /// and rollbacks.
    pub restarts: u64,
    /// Calls made, and how many of them failed, since the daemon started.
    pub calls: u64,
    pub errors: u64,
    /// Resident memory of the process, in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU use since the previous status, in percent of one core.
    pub cpu_percent: Option<f32>,
    /// CPU time the process has used, in milliseconds.
    pub cpu_time_ms: Option<u64>,
    pub lazy: bool,
    pub idle_timeout_ms: Option<u64>,
    /// The plugins it requires.
    pub requires: Vec<String>,
    /// Where it is defined: a manifest, or the config file and line.
    pub origin: String,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadSummary {
    /// New plugins, started.
    pub started: Vec<String>,
    /// Plugins no longer defined, stopped and removed.
    pub stopped: Vec<String>,
    /// Plugins whose definition changed: the old process stopped, a new one
    /// started.
    pub replaced: Vec<String>,
    /// Plugins reloaded by name with an unchanged definition: restarted, so
    /// a new executable on disk takes effect.
    pub restarted: Vec<String>,
    /// Plugins left alone.
    pub unchanged: Vec<String>,
    /// Plugins whose new version was refused (it did not start, greet or
    /// pass its health probe), each as `name: reason`; their old version
    /// keeps serving.
    pub failed: Vec<String>,
}

/// One version of a plugin in the daemon's version store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionReport {
    /// The semver version its processes reported, once one did.
    pub version: Option<String>,
    /// The BLAKE3 hash of its binary, in hex.
    pub hash: Option<String>,
    /// The stored copy that runs.
    pub binary: String,
    /// Where the binary was copied from.
    pub source: String,
    /// Whether it is the version running now.
    pub active: bool,
    /// When it last became the running version, in milliseconds since the
    /// Unix epoch.
    pub activated_unix_ms: Option<u64>,
}

/// One line of a plugin's log: its stdout or stderr, a record it forwarded,
/// or the supervisor's own account of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub level: LogLevel,
    /// `stdout`, `stderr`, `plugin` (a forwarded record) or `aurora`.
    pub source: String,
    pub text: String,
}

/// Why the daemon did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    pub kind: ControlErrorKind,
    pub message: String,
}

/// The broad reason for a [`ControlError`]; the CLI maps it to an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlErrorKind {
    /// The peer may not control this daemon.
    Refused,
    /// Client and daemon come from different builds.
    Incompatible,
    /// The request makes no sense, such as a payload that is not JSON.
    BadRequest,
    UnknownPlugin,
    UnknownMethod,
    /// The call's deadline passed.
    Timeout,
    /// The command was understood and failed: a crashed or failed plugin,
    /// or an error the handler returned.
    Failed,
    /// A reload found problems in the config or manifests; nothing changed.
    InvalidConfig,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameError, FrameReader, encode_frame};

    fn every_command() -> Vec<ControlCommand> {
        vec![
            ControlCommand::Status,
            ControlCommand::Call {
                plugin: "echo".into(),
                method: "upper".into(),
                payload: Payload::json(b"\"x\"".to_vec()),
                timeout_ms: Some(200),
            },
            ControlCommand::Start { plugin: "a".into() },
            ControlCommand::Stop { plugin: "a".into() },
            ControlCommand::Restart { plugin: "a".into() },
            ControlCommand::Reload { plugin: None },
            ControlCommand::Reload {
                plugin: Some("a".into()),
            },
            ControlCommand::Logs {
                plugin: "a".into(),
                lines: 50,
                follow: true,
            },
            ControlCommand::Shutdown,
            ControlCommand::Versions { plugin: "a".into() },
            ControlCommand::Rollback {
                plugin: "a".into(),
                to: Some("1.2.0".into()),
            },
        ]
    }

    fn every_response() -> Vec<ControlResponse> {
        let report = PluginReport {
            name: "echo".into(),
            state: "ready".into(),
            reason: None,
            version: Some("0.1.0".into()),
            declared_version: Some("0.1.0".into()),
            pid: Some(42),
            uptime_ms: Some(1000),
            restarts: 1,
            calls: 10,
            errors: 2,
            memory_bytes: Some(4 << 20),
            cpu_percent: Some(1.5),
            cpu_time_ms: Some(30),
            lazy: false,
            idle_timeout_ms: None,
            requires: vec!["base".into()],
            origin: "/etc/aurora/plugins/echo/plugin.toml".into(),
        };
        vec![
            ControlResponse::Status(DaemonStatus {
                pid: 1,
                version: "0.1.0".into(),
                uptime_ms: 5,
                config: "/etc/aurora/aurora.toml".into(),
                socket: "/run/aurora/control.sock".into(),
                plugins: vec![report],
            }),
            ControlResponse::Reply(Payload::json(b"1".to_vec())),
            ControlResponse::Done {
                message: "stopped".into(),
            },
            ControlResponse::Reloaded(ReloadSummary {
                started: vec!["new".into()],
                ..ReloadSummary::default()
            }),
            ControlResponse::Log(LogLine {
                unix_ms: 1,
                level: LogLevel::Warn,
                source: "stderr".into(),
                text: "careful".into(),
            }),
            ControlResponse::EndOfLogs,
            ControlResponse::Error(ControlError {
                kind: ControlErrorKind::Timeout,
                message: "too slow".into(),
            }),
            ControlResponse::Versions(vec![VersionReport {
                version: Some("1.2.0".into()),
                hash: Some("ab".repeat(32)),
                binary: "/var/lib/aurora/.versions/a/abab/a".into(),
                source: "/usr/lib/aurora/a".into(),
                active: true,
                activated_unix_ms: Some(1),
            }]),
        ]
    }

    async fn read_all<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<T> {
        let mut reader = FrameReader::new(bytes, CONTROL_MAX_FRAME);
        let mut read = Vec::new();
        while let Some(message) = reader.read::<T>().await.unwrap() {
            read.push(message);
        }
        read
    }

    #[tokio::test]
    async fn requests_and_responses_round_trip_back_to_back() {
        let requests: Vec<_> = every_command()
            .into_iter()
            .map(ControlRequest::new)
            .collect();
        let mut bytes = Vec::new();
        for request in &requests {
            encode_frame(request, CONTROL_MAX_FRAME, &mut bytes).unwrap();
        }
        assert_eq!(read_all::<ControlRequest>(&bytes).await, requests);

        let responses = every_response();
        bytes.clear();
        for response in &responses {
            encode_frame(response, CONTROL_MAX_FRAME, &mut bytes).unwrap();
        }
        assert_eq!(read_all::<ControlResponse>(&bytes).await, responses);
    }

    #[tokio::test]
    async fn every_truncation_is_an_error() {
        for response in every_response() {
            let mut bytes = Vec::new();
            encode_frame(&response, CONTROL_MAX_FRAME, &mut bytes).unwrap();
            for cut in 1..bytes.len() {
                let mut reader = FrameReader::new(&bytes[..cut], CONTROL_MAX_FRAME);
                let err = reader.read::<ControlResponse>().await.unwrap_err();
                assert!(
                    matches!(err, FrameError::Truncated { .. }),
                    "{response:?} cut {cut}"
                );
            }
        }
    }

    #[tokio::test]
    async fn garbage_and_hostile_lengths_are_refused() {
        let mut bytes = 8u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xff; 8]);
        let mut reader = FrameReader::new(&bytes[..], CONTROL_MAX_FRAME);
        let err = reader.read::<ControlRequest>().await.unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");

        let bytes = u32::MAX.to_le_bytes();
        let mut reader = FrameReader::new(&bytes[..], CONTROL_MAX_FRAME);
        let err = reader.read::<ControlRequest>().await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn end_of_stream_between_frames_is_clean() {
        assert!(read_all::<ControlResponse>(&[]).await.is_empty());
    }

    #[test]
    fn golden_bytes() {
        // A status request: the fingerprint, then command 0.
        let bytes = crate::codec::encode(&ControlRequest::new(ControlCommand::Status)).unwrap();
        let mut expected = CONTROL_FINGERPRINT.to_le_bytes().to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(bytes, expected);

        // A shutdown is command 7; a stop names its plugin.
        let bytes = crate::codec::encode(&ControlCommand::Shutdown).unwrap();
        assert_eq!(bytes, [7, 0, 0, 0]);
        let bytes = crate::codec::encode(&ControlCommand::Stop { plugin: "a".into() }).unwrap();
        assert_eq!(bytes, [3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, b'a']);

        // Pinned so that a schema edit is deliberate: update this value and
        // PROTOCOL.md together.
        assert_eq!(CONTROL_FINGERPRINT, 0x95fe_051c_24b2_f16e);
    }
}
