//! The daemon's own settings: where it keeps its socket and state, where it
//! looks for plugins, who may control it, and how it logs.
//!
//! Every setting has a default that depends on who runs the daemon. As root
//! (a system service) the paths are the FHS ones: `/run/aurora`,
//! `/var/lib/aurora`, `/etc/aurora/plugins`. As anyone else they follow the
//! XDG base directories, so a developer can run `aurora run` without
//! touching system paths and two users never share a socket.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::daemon::document::Problem;

/// The file name of the control socket inside the runtime directory.
pub const SOCKET_NAME: &str = "control.sock";

/// The file name of a plugin manifest in the plugins directory.
pub const MANIFEST_NAME: &str = "plugin.toml";

/// Lines of log kept per plugin for `aurora logs`, unless configured.
pub const DEFAULT_LOG_LINES: usize = 1000;

/// The environment variable that overrides the control socket's path, for
/// the daemon and its clients alike.
pub const SOCKET_ENV: &str = "AURORA_SOCKET";

/// The `[daemon]` table as written in the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DaemonSection {
    runtime_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    plugins_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    /// Octal, as a string: `"0600"`.
    socket_mode: Option<String>,
    socket_group: Option<String>,
    log: Option<String>,
    log_format: Option<String>,
    log_lines: Option<usize>,
    /// Versions of each plugin kept in the version store.
    keep_versions: Option<usize>,
    /// Whether a changed plugin binary or manifest is reloaded by itself.
    watch: Option<bool>,
}

/// How the daemon writes its own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines for people; under systemd, without timestamps and with a
    /// syslog priority prefix that journald understands.
    Human,
    /// One JSON object per line.
    Json,
}

/// The group allowed to use the control socket besides its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    pub name: String,
    pub gid: u32,
}

/// The daemon's settings with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Holds the control socket; created owner-only if missing.
    pub runtime_dir: PathBuf,
    /// Holds one directory per plugin, passed to it as `AURORA_STATE_DIR`.
    pub state_dir: PathBuf,
    /// Searched for `plugin.toml` manifests.
    pub plugins_dir: PathBuf,
    /// Whether `plugins_dir` was configured: a configured directory must
    /// exist, a default one may not.
    pub plugins_dir_required: bool,
    pub socket: PathBuf,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    pub socket_group: Option<SocketGroup>,
    /// A tracing filter such as `info` or `aurora_supervisor=debug`.
    pub log_filter: Option<String>,
    pub log_format: Option<LogFormat>,
    /// Lines kept per plugin for `aurora logs`.
    pub log_lines: usize,
    /// Versions of each plugin kept in the version store, under
    /// `state_dir/.versions`.
    pub keep_versions: usize,
    /// Whether plugin binaries and manifests are watched, and a change
    /// reloads the plugin.
    pub watch: bool,
}

/// Where the config came from, which decides some defaults.
#[derive(Debug, Clone, Copy)]
pub enum ConfigSource<'a> {
    /// A file: relative paths and the default plugins directory are taken
    /// from its directory.
    File(&'a Path),
    /// The embedded default: nothing to be relative to.
    Embedded,
}

impl DaemonSection {
    /// Fills in the defaults.
    ///
    /// # Errors
    ///
    /// A problem for a mode that is not octal permission bits or a group
    /// that does not exist.
    pub(crate) fn resolve(self, source: ConfigSource<'_>) -> Result<DaemonSettings, Vec<Problem>> {
        let (file, base) = match source {
            ConfigSource::File(path) => (
                path.display().to_string(),
                Some(path.parent().map(Path::to_owned).unwrap_or_default()),
            ),
            ConfigSource::Embedded => ("(embedded default)".to_owned(), None),
        };
        let anchor = |path: PathBuf| match &base {
            Some(base) => crate::daemon::document::anchored(base, path),
            None => path,
        };
        let mut problems = Vec::new();
        let mut problem = |message: String| problems.push(Problem::in_file(&file, message));

        let runtime_dir = self
            .runtime_dir
            .map(anchor)
            .unwrap_or_else(default_runtime_dir);
        let state_dir = self.state_dir.map(anchor).unwrap_or_else(default_state_dir);
        let plugins_dir_required = self.plugins_dir.is_some();
        let plugins_dir = match (self.plugins_dir, &base) {
            (Some(dir), _) => anchor(dir),
            (None, Some(base)) => base.join("plugins"),
            (None, None) => default_plugins_dir(),
        };
        let socket = match std::env::var_os(SOCKET_ENV) {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => self
                .socket
                .map(anchor)
                .unwrap_or_else(|| runtime_dir.join(SOCKET_NAME)),
        };

        let socket_group = match self.socket_group {
            Some(name) => match group_id(&name) {
                Some(gid) => Some(SocketGroup { name, gid }),
                None => {
                    problem(format!("daemon.socket_group: no group named {name:?}"));
                    None
                }
            },
            None => None,
        };
        let default_mode = if socket_group.is_some() { 0o660 } else { 0o600 };
        let socket_mode = match self.socket_mode {
            Some(text) => match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
                Ok(mode) if mode <= 0o777 => mode,
                _ => {
                    problem(format!(
                        "daemon.socket_mode: {text:?} is not octal permission bits such as \"0660\""
                    ));
                    default_mode
                }
            },
            None => default_mode,
        };

        let log_format = match self.log_format.as_deref() {
            None => None,
            Some("human") => Some(LogFormat::Human),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                problem(format!(
                    "daemon.log_format: {other:?} is neither \"human\" nor \"json\""
                ));
                None
            }
        };
        let log_lines = self.log_lines.unwrap_or(DEFAULT_LOG_LINES);
        if log_lines == 0 {
            problem("daemon.log_lines must be at least 1".to_owned());
        }

        let keep_versions = self.keep_versions.unwrap_or(crate::store::DEFAULT_KEEP);
        if keep_versions == 0 {
            problem("daemon.keep_versions must be at least 1".to_owned());
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(DaemonSettings {
            keep_versions,
            watch: self.watch.unwrap_or(true),
            runtime_dir,
            state_dir,
            plugins_dir,
            plugins_dir_required,
            socket,
            socket_mode,
            socket_group,
            log_filter: self.log,
            log_format,
            log_lines: log_lines.max(1),
        })
    }
}

/// The control socket a client uses when told nothing: `AURORA_SOCKET`, else
/// the daemon's default.
pub fn default_socket() -> PathBuf {
    match std::env::var_os(SOCKET_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => default_runtime_dir().join(SOCKET_NAME),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn env_dir(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
}

fn default_runtime_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/aurora");
    }
    match env_dir("XDG_RUNTIME_DIR") {
        Some(dir) => dir.join("aurora"),
        None => std::env::temp_dir().join(format!("aurora-{}", nix::unistd::geteuid())),
    }
}

fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/aurora");
    }
    if let Some(dir) = env_dir("XDG_STATE_HOME") {
        return dir.join("aurora");
    }
    match env_dir("HOME") {
        Some(home) => home.join(".local/state/aurora"),
        None => default_runtime_dir().join("state"),
    }
}

fn default_plugins_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/etc/aurora/plugins");
    }
    if let Some(dir) = env_dir("XDG_CONFIG_HOME") {
        return dir.join("aurora/plugins");
    }
    match env_dir("HOME") {
        Some(home) => home.join(".config/aurora/plugins"),
        None => PathBuf::from("/etc/aurora/plugins"),
    }
}

/// The id of group `name`, which may also be written as a number.
fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut group = empty_group();
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is a
    // NUL-terminated string we own, `group` and `found` are live locals, and
    // the buffer's length is passed with it. getgrnam_r writes only within
    // them, and `found` is either null or points at `group`.
    let status = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() {
        return None;
    }
    Some(group.gr_gid)
}

fn empty_group() -> libc::group {
    libc::group {
        gr_name: std::ptr::null_mut(),
        gr_passwd: std::ptr::null_mut(),
        gr_gid: 0,
        gr_mem: std::ptr::null_mut(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_config_file() {
        let section = DaemonSection::default();
        let settings = section
            .resolve(ConfigSource::File(Path::new("/etc/aurora/aurora.toml")))
            .unwrap();
        assert_eq!(settings.plugins_dir, Path::new("/etc/aurora/plugins"));
        assert!(!settings.plugins_dir_required);
        assert_eq!(settings.socket_mode, 0o600);
        assert_eq!(settings.log_lines, DEFAULT_LOG_LINES);
        assert_eq!(settings.keep_versions, crate::store::DEFAULT_KEEP);
        assert!(settings.watch);
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_directory() {
        let section: DaemonSection = toml::from_str(
            "runtime_dir = \"run\"\nplugins_dir = \"more\"\nsocket_mode = \"0640\"\n",
        )
        .unwrap();
        let settings = section
            .resolve(ConfigSource::File(Path::new("/srv/a/aurora.toml")))
            .unwrap();
        assert_eq!(settings.runtime_dir, Path::new("/srv/a/run"));
        assert_eq!(settings.plugins_dir, Path::new("/srv/a/more"));
        assert!(settings.plugins_dir_required);
        assert_eq!(settings.socket_mode, 0o640);
    }

    #[test]
    fn a_group_opens_the_socket_to_it() {
        let section: DaemonSection = toml::from_str("socket_group = \"0\"\n").unwrap();
        let settings = section.resolve(ConfigSource::Embedded).unwrap();
        assert_eq!(settings.socket_mode, 0o660);
        assert_eq!(settings.socket_group.unwrap().gid, 0);
    }

    #[test]
    fn bad_settings_are_all_reported() {
        let section: DaemonSection = toml::from_str(
            "socket_mode = \"rw\"\nsocket_group = \"no-such-group-here\"\nlog_format = \"xml\"\n",
        )
        .unwrap();
        let problems = section.resolve(ConfigSource::Embedded).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
