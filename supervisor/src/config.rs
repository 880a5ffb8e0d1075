//! The TOML config that `aurora` reads, and its embedded default.
//!
//! A config is a list of plugins; every field but `name` and `command` is
//! optional and falls back to [`PluginSpec::new`]'s defaults:
//!
//! ```toml
//! [[plugin]]
//! name = "echo"
//! command = "aurora-plugin-echo"   # next to `aurora`, relative to this file, or on PATH
//! call_timeout = "5s"
//!
//! [plugin.restart]
//! mode = "on-failure"              # never | on-failure | always
//! max_restarts = 5
//! window = "1m"
//! ```
//!
//! Durations are written the way people write them: `250ms`, `5s`, `1m 30s`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::spec::{Enforcement, PluginSpec, RestartMode, RestartPolicy, RollbackPolicy};

/// The config used when none is given: the example plugins, found next to
/// the `aurora` binary.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// A parsed config: the plugins, in the order they were listed.
#[derive(Debug, Clone)]
pub struct Config {
    pub plugins: Vec<PluginSpec>,
}

impl Config {
    /// Reads the config at `path`; relative plugin paths are taken from the
    /// file's directory.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] when the file cannot be read,
    /// [`ConfigError::Invalid`] (with line and column where TOML knows them)
    /// when it does not describe valid plugins.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        Config::parse(&text, &path.display().to_string(), &base)
    }

    /// The embedded default config, with plugins found next to the running
    /// executable.
    ///
    /// # Errors
    ///
    /// Only if the embedded text is broken, which a unit test rules out.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG, "(embedded default)", &executable_dir())
    }

    /// Parses config `text`; `origin` names it in errors and `base` anchors
    /// relative plugin paths.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for a syntax error, an unknown field, a bad
    /// value or a repeated plugin name.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
        // One parser for the whole file, shared with the daemon, which also
        // reads the `[daemon]` section and wants every problem, not the first.
        match crate::daemon::document::parse(text, origin, base) {
            Ok(document) => Ok(Config {
                plugins: document.plugins.into_iter().map(|p| p.spec).collect(),
            }),
            Err(problems) => {
                let messages: Vec<String> = problems.iter().map(|p| p.without_file()).collect();
                Err(ConfigError::Invalid {
                    origin: origin.to_owned(),
                    message: messages.join("; "),
                })
            }
        }
    }

    /// The plugin called `name`.
    pub fn plugin(&self, name: &str) -> Option<&PluginSpec> {
        self.plugins.iter().find(|p| p.name == name)
    }
}

/// The directory of the running executable, where the example plugins are
/// built beside `aurora`.
pub(crate) fn executable_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
        .unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PluginEntry {
    pub(crate) name: String,
    pub(crate) command: PathBuf,
    /// The semver version the plugin must report; required in manifests.
    pub(crate) version: Option<String>,
    /// Whether the process waits for the first call.
    pub(crate) lazy: Option<bool>,
    /// A duration, or `"off"`.
    pub(crate) idle_timeout: Option<String>,
    /// Other plugins this one needs: name to semver range. Read (and
    /// taken) by the daemon's resolver before `into_spec`.
    #[serde(default)]
    pub(crate) requires: BTreeMap<String, String>,
    /// The range of Aurora protocol versions the plugin speaks; taken by the
    /// resolver like `requires`.
    pub(crate) protocol: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration")]
    call_timeout: Option<Duration>,
    max_concurrent_calls: Option<usize>,
    max_frame: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    handshake_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    cancel_grace: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    stop_timeout: Option<Duration>,
    /// A duration, or `"off"`.
    health_interval: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    health_timeout: Option<Duration>,
    log_level: Option<String>,
    /// The method a new version must answer before a reload routes calls
    /// to it.
    health_method: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    drain_timeout: Option<Duration>,
    #[serde(default)]
    restart: RestartEntry,
    #[serde(default)]
    rollback: RollbackEntry,
    #[serde(default)]
    limits: LimitsEntry,
    #[serde(default)]
    permissions: PermissionsEntry,
}

/// `[plugin.limits]`: each a number, a size such as `"256MiB"`, or
/// `"unlimited"`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsEntry {
    memory: Option<LimitValue>,
    cpu_seconds: Option<LimitValue>,
    open_files: Option<LimitValue>,
    processes: Option<LimitValue>,
    file_size: Option<LimitValue>,
    core_dumps: Option<bool>,
}

/// `[plugin.permissions]`: lists replace the defaults' lists rather than
/// adding to them, so an entry says exactly what it grants.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PermissionsEntry {
    read: Option<Vec<PathBuf>>,
    write: Option<Vec<PathBuf>>,
    execute: Option<Vec<PathBuf>>,
    connect_tcp: Option<Vec<u16>>,
    bind_tcp: Option<Vec<u16>>,
    pass_env: Option<Vec<String>>,
    user: Option<String>,
    group: Option<String>,
    enforce: Option<Enforcement>,
}

/// A limit as written: a count, a size with a unit, or no limit.
#[derive(Deserialize)]
#[serde(untagged)]
enum LimitValue {
    Number(u64),
    Text(String),
}

impl LimitValue {
    /// `None` for unlimited.
    fn resolve(self, field: &str) -> Result<Option<u64>, String> {
        let text = match self {
            LimitValue::Number(n) => return Ok(Some(n)),
            LimitValue::Text(text) => text,
        };
        if text == "unlimited" {
            return Ok(None);
        }
        parse_size(&text).map(Some).ok_or_else(|| {
            format!(
                "{field} = {text:?} is not a number, a size such as \"256MiB\", or \"unlimited\""
            )
        })
    }
}

/// Parses `"512"`, `"64KiB"`, `"256MiB"`, `"1GiB"` (and KB/MB/GB, which are
/// read as powers of 1024 too: limits are about memory pages, not disks).
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        "T" | "TB" | "TiB" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(scale)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestartEntry {
    mode: Option<RestartMode>,
    max_restarts: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    window: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    backoff_initial: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    backoff_max: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    reset_after: Option<Duration>,
}

/// `[plugin.rollback]`: when a freshly reloaded version is given up for
/// the previous one.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackEntry {
    crashes: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    window: Option<Duration>,
}

/// The smallest frame limit accepted: enough for a hello with many methods.
const MIN_MAX_FRAME: u32 = 4096;

impl PluginEntry {
    /// The spec this entry describes, starting from `template` (the
    /// config's `[defaults]`) for every field the entry leaves out.
    pub(crate) fn into_spec(
        self,
        base: &Path,
        template: &PluginSpec,
    ) -> Result<PluginSpec, String> {
        let name = self.name;
        let mut spec = PluginSpec {
            name: name.clone(),
            command: resolve_command(&self.command, base),
            ..template.clone()
        };
        spec.args = self.args;
        spec.env.extend(self.env);
        if let Some(cwd) = self.cwd {
            spec.cwd = Some(base.join(cwd));
        }
        set(&mut spec.lazy, self.lazy);
        if let Some(interval) = self.idle_timeout {
            spec.idle_timeout = match interval.as_str() {
                "off" => None,
                text => Some(parse_duration(text).map_err(|e| format!("plugin {name:?}: {e}"))?),
            };
        }
        if let Some(version) = self.version {
            let parsed = semver::Version::parse(&version).map_err(|err| {
                format!("plugin {name:?}: version {version:?} is not a semver version: {err}")
            })?;
            spec.version = Some(parsed);
        }

        set(&mut spec.call_timeout, self.call_timeout);
        set(&mut spec.handshake_timeout, self.handshake_timeout);
        set(&mut spec.cancel_grace, self.cancel_grace);
        set(&mut spec.stop_timeout, self.stop_timeout);
        set(&mut spec.health_timeout, self.health_timeout);
        if let Some(level) = self.log_level {
            if level.parse::<tracing::Level>().is_err() {
                return Err(format!(
                    "plugin {name:?}: log_level {level:?} is not a level"
                ));
            }
            spec.log_level = level;
        }
        if let Some(interval) = self.health_interval {
            spec.health_interval = match interval.as_str() {
                "off" => None,
                text => Some(parse_duration(text).map_err(|e| format!("plugin {name:?}: {e}"))?),
            };
        }
        if let Some(limit) = self.max_concurrent_calls {
            if limit == 0 {
                return Err(format!(
                    "plugin {name:?}: max_concurrent_calls must be at least 1"
                ));
            }
            spec.max_concurrent_calls = limit;
        }
        if let Some(limit) = self.max_frame {
            if limit < MIN_MAX_FRAME {
                return Err(format!(
                    "plugin {name:?}: max_frame must be at least {MIN_MAX_FRAME}"
                ));
            }
            spec.max_frame = limit;
        }

        if let Some(method) = self.health_method {
            spec.health_method = Some(method);
        }
        set(&mut spec.drain_timeout, self.drain_timeout);
        let rollback: &mut RollbackPolicy = &mut spec.rollback;
        set(&mut rollback.crashes, self.rollback.crashes);
        set(&mut rollback.window, self.rollback.window);

        let restart = self.restart;
        let policy: &mut RestartPolicy = &mut spec.restart;
        set(&mut policy.mode, restart.mode);
        set(&mut policy.max_restarts, restart.max_restarts);
        set(&mut policy.window, restart.window);
        set(&mut policy.backoff_initial, restart.backoff_initial);
        set(&mut policy.backoff_max, restart.backoff_max);
        set(&mut policy.reset_after, restart.reset_after);

        let in_plugin = |e: String| format!("plugin {name:?}: {e}");
        let limits = self.limits;
        let resolve = |value: Option<LimitValue>, field: &str, current: Option<u64>| {
            value.map_or(Ok(current), |v| v.resolve(field).map_err(in_plugin))
        };
        spec.limits.memory = resolve(limits.memory, "memory", spec.limits.memory)?;
        spec.limits.cpu_seconds =
            resolve(limits.cpu_seconds, "cpu_seconds", spec.limits.cpu_seconds)?;
        spec.limits.open_files = resolve(limits.open_files, "open_files", spec.limits.open_files)?;
        spec.limits.processes = resolve(limits.processes, "processes", spec.limits.processes)?;
        spec.limits.file_size = resolve(limits.file_size, "file_size", spec.limits.file_size)?;
        set(&mut spec.limits.core_dumps, limits.core_dumps);

        let granted = self.permissions;
        let anchor = |paths: Vec<PathBuf>| paths.into_iter().map(|p| base.join(p)).collect();
        let permissions = &mut spec.permissions;
        set(&mut permissions.read, granted.read.map(anchor));
        set(&mut permissions.write, granted.write.map(anchor));
        set(&mut permissions.execute, granted.execute.map(anchor));
        set(&mut permissions.connect_tcp, granted.connect_tcp);
        set(&mut permissions.bind_tcp, granted.bind_tcp);
        set(&mut permissions.pass_env, granted.pass_env);
        set(&mut permissions.enforce, granted.enforce);
        if granted.user.is_some() {
            permissions.user = granted.user;
        }
        if granted.group.is_some() {
            permissions.group = granted.group;
        }
        Ok(spec)
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

/// Finds a plugin executable: absolute paths as given, paths with a slash
/// relative to `base`, bare names beside `aurora` if there, else on PATH.
pub(crate) fn resolve_command(command: &Path, base: &Path) -> PathBuf {
    if command.is_absolute() {
        return command.to_owned();
    }
    if command.components().count() > 1 {
        return base.join(command);
    }
    let beside = executable_dir().join(command);
    if beside.is_file() {
        return beside;
    }
    command.to_owned()
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("{text:?} is not a duration: {err}"))
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/aurora"))
    }

    #[test]
    fn the_embedded_default_parses() {
        let config = Config::embedded_default().unwrap();
        assert!(config.plugin("echo").is_some());
    }

    #[test]
    fn the_documented_example_parses_with_every_field() {
        let text = include_str!("../../examples/aurora.toml");
        let config = parse(text).unwrap();
        let echo = config.plugin("echo").unwrap();
        assert_eq!(
            echo.env.get("ECHO_GREETING").map(String::as_str),
            Some("hi")
        );
        assert_eq!(echo.restart.window, Duration::from_secs(60));
        assert_eq!(echo.limits, crate::Limits::default());
        assert_eq!(echo.permissions, crate::Permissions::default());
        assert!(config.plugin("wordcount").is_some());
    }

    #[test]
    fn limits_and_permissions_override_the_defaults() {
        let config = parse(
            r#"
            [[plugin]]
            name = "a"
            command = "x"
            [plugin.limits]
            memory = "256MiB"
            cpu_seconds = 5
            processes = "unlimited"
            [plugin.permissions]
            read = ["data", "/srv/shared"]
            connect_tcp = [5432]
            user = "nobody"
            enforce = "strict"
            "#,
        )
        .unwrap();
        let spec = config.plugin("a").unwrap();
        assert_eq!(spec.limits.memory, Some(256 << 20));
        assert_eq!(spec.limits.cpu_seconds, Some(5));
        assert_eq!(spec.limits.processes, None);
        assert_eq!(spec.limits.open_files, crate::Limits::default().open_files);
        assert_eq!(
            spec.permissions.read,
            [Path::new("/etc/aurora/data"), Path::new("/srv/shared")]
        );
        assert_eq!(spec.permissions.connect_tcp, [5432]);
        assert_eq!(spec.permissions.user.as_deref(), Some("nobody"));
        assert_eq!(spec.permissions.enforce, crate::Enforcement::Strict);
        assert_eq!(
            spec.permissions.pass_env,
            crate::Permissions::default().pass_env
        );

        let err = parse(
            "[[plugin]]\nname = \"a\"\ncommand = \"x\"\n[plugin.limits]\nmemory = \"lots\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("memory = \"lots\""), "{err}");
    }

    #[test]
    fn sizes_read_as_powers_of_1024() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64KiB"), Some(64 << 10));
        assert_eq!(parse_size("1 GiB"), Some(1 << 30));
        assert_eq!(parse_size("2MB"), Some(2 << 20));
        assert_eq!(parse_size("many"), None);
        assert_eq!(parse_size("9GiBs"), None);
    }

    #[test]
    fn fields_override_defaults_and_the_rest_stay() {
        let config = parse(
            r#"
            [[plugin]]
            name = "a"
            command = "bin/a"
            call_timeout = "250ms"
            health_interval = "off"
            health_method = "ping"
            drain_timeout = "5s"
            [plugin.restart]
            mode = "always"
            window = "1m 30s"
            [plugin.rollback]
            crashes = 2
            "#,
        )
        .unwrap();
        let spec = config.plugin("a").unwrap();
        assert_eq!(spec.command, Path::new("/etc/aurora/bin/a"));
        assert_eq!(spec.call_timeout, Duration::from_millis(250));
        assert_eq!(spec.health_interval, None);
        assert_eq!(spec.restart.mode, RestartMode::Always);
        assert_eq!(spec.restart.window, Duration::from_secs(90));
        assert_eq!(spec.health_method.as_deref(), Some("ping"));
        assert_eq!(spec.drain_timeout, Duration::from_secs(5));
        assert_eq!(spec.rollback.crashes, 2);
        let defaults = PluginSpec::new("a", "x");
        assert_eq!(spec.rollback.window, defaults.rollback.window);
        assert_eq!(spec.stop_timeout, defaults.stop_timeout);
        assert_eq!(spec.restart.max_restarts, defaults.restart.max_restarts);
    }

    #[test]
    fn errors_name_the_problem_and_its_place() {
        let cases = [
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"x\"\ncall_timout = \"1s\"\n",
                "call_timout",
            ),
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"x\"\ncall_timeout = \"soon\"\n",
                "soon",
            ),
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"x\"\n[[plugin]]\nname = \"a\"\ncommand = \"y\"\n",
                "defined twice",
            ),
            ("[[plugin]]\nname = \"a\"\n", "command"),
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"x\"\nmax_frame = 10\n",
                "max_frame",
            ),
            ("[[plugin]\n", "line 1"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
            assert!(err.contains("test.toml"), "origin missing from {err:?}");
        }
    }
}
