//! Reading one TOML file, the config or a plugin's manifest, into plugin
//! definitions and daemon settings.
//!
//! Parsing goes through toml's spanned document tree rather than straight
//! into structs so that each `[[plugin]]` entry is checked on its own: a
//! mistake in one entry does not hide the mistakes in the next, and `aurora
//! check` can print every problem at once, each with the line it is on.
//!
//! The fields of a plugin entry are defined once, in `config.rs`, and shared
//! by the config file, the `[defaults]` table and manifests.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use semver::VersionReq;
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::config::PluginEntry;
use crate::daemon::settings::DaemonSection;
use crate::spec::PluginSpec;

/// One thing wrong with a file, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, or a description such as `(embedded default)`.
    pub file: String,
    /// 1-based line and column, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl Problem {
    /// A problem with no position.
    pub fn in_file(file: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            file: file.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    /// A problem at byte range `span` of `text`.
    pub(crate) fn at(
        file: &str,
        text: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Problem {
        let (line, column) = match span {
            Some(span) => {
                let (line, column) = line_and_column(text, span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        Problem {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    /// The problem as a sentence without the file name, for errors that name
    /// the file themselves.
    pub fn without_file(&self) -> String {
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                format!("line {line}, column {column}: {}", self.message)
            }
            (Some(line), None) => format!("line {line}: {}", self.message),
            _ => self.message.clone(),
        }
    }
}

impl fmt::Display for Problem {
    /// `file:line:column: message`, the form editors and terminals link.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                write!(f, "{}:{line}:{column}: {}", self.file, self.message)
            }
            (Some(line), None) => write!(f, "{}:{line}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Where a plugin was defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file),
            None => f.write_str(&self.file),
        }
    }
}

/// Another plugin that a plugin needs, with the versions it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub name: String,
    pub versions: VersionReq,
}

/// A plugin as one file defines it, before the whole set is resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginDefinition {
    pub spec: PluginSpec,
    pub requires: Vec<Requirement>,
    /// The protocol versions the plugin speaks; any when `None`.
    pub protocol: Option<VersionReq>,
    pub origin: Origin,
}

/// A parsed config file.
#[derive(Debug, Clone, Default)]
pub struct Document {
    /// The `[daemon]` table as written; resolved into settings later.
    pub(crate) daemon: DaemonSection,
    /// The spec every plugin starts from: `[defaults]` over the built-in
    /// defaults.
    pub template: Option<PluginSpec>,
    pub plugins: Vec<PluginDefinition>,
}

/// Keys a `[defaults]` table may not set: they name one plugin, not all.
const PER_PLUGIN_ONLY: [&str; 6] = ["name", "command", "args", "version", "requires", "protocol"];

/// Parses a config file's `text`. `file` names it in problems and `base`
/// anchors relative paths.
///
/// # Errors
///
/// Every problem found: a syntax error stops parsing at once; otherwise each
/// section and each plugin entry is checked on its own.
pub fn parse(text: &str, file: &str, base: &Path) -> Result<Document, Vec<Problem>> {
    let root = DeTable::parse(text).map_err(|err| vec![toml_problem(file, text, &err)])?;
    let mut problems = Vec::new();
    let mut document = Document::default();

    let root = root.into_inner();
    let mut defaults = None;
    let mut entries = Vec::new();
    for (key, value) in root {
        match key.get_ref().as_ref() {
            "daemon" => match DaemonSection::deserialize(ValueDeserializer::from(value)) {
                Ok(section) => document.daemon = section,
                Err(err) => problems.push(toml_problem(file, text, &err)),
            },
            "defaults" => defaults = Some(value),
            "plugin" => match value.get_ref() {
                DeValue::Array(array) => entries.extend(array.iter().cloned()),
                _ => problems.push(Problem::at(
                    file,
                    text,
                    Some(value.span()),
                    "`plugin` must be an array of tables: write each as [[plugin]]",
                )),
            },
            other => problems.push(Problem::at(
                file,
                text,
                Some(key.span()),
                format!("unknown section `{other}`; expected `daemon`, `defaults` or `plugin`"),
            )),
        }
    }

    let builtin = PluginSpec::new("(defaults)", "(defaults)");
    let template = match defaults {
        Some(value) => parse_defaults(value, file, text, base, &builtin, &mut problems),
        None => None,
    };

    let template_ref = template.as_ref().unwrap_or(&builtin);
    for entry in entries {
        let span = entry.span();
        match parse_entry(entry, file, text, base, template_ref) {
            Ok(definition) => {
                let name = &definition.spec.name;
                if document.plugins.iter().any(|p| &p.spec.name == name) {
                    problems.push(Problem::at(
                        file,
                        text,
                        Some(span),
                        format!("plugin {name:?} is defined twice"),
                    ));
                } else {
                    document.plugins.push(definition);
                }
            }
            Err(problem) => problems.push(problem),
        }
    }
    document.template = template;

    if problems.is_empty() {
        Ok(document)
    } else {
        Err(problems)
    }
}

/// Parses a plugin manifest (`plugin.toml`): one plugin entry at the top
/// level, whose `version` is required. `dir` is the manifest's directory,
/// which anchors relative paths.
///
/// # Errors
///
/// The problem that stopped parsing.
pub fn parse_manifest(
    text: &str,
    file: &str,
    dir: &Path,
    template: &PluginSpec,
) -> Result<PluginDefinition, Problem> {
    let root = DeTable::parse(text).map_err(|err| toml_problem(file, text, &err))?;
    let span = root.span();
    let value = Spanned::new(span, DeValue::Table(root.into_inner()));
    let mut definition = parse_entry(value, file, text, dir, template)?;
    if definition.spec.version.is_none() {
        return Err(Problem::in_file(
            file,
            format!(
                "plugin {:?} has no `version`; a manifest must give one (a semver version \
                 such as \"1.0.0\")",
                definition.spec.name
            ),
        ));
    }
    definition.origin.line = None;
    Ok(definition)
}

fn parse_defaults(
    value: Spanned<DeValue<'_>>,
    file: &str,
    text: &str,
    base: &Path,
    builtin: &PluginSpec,
    problems: &mut Vec<Problem>,
) -> Option<PluginSpec> {
    let span = value.span();
    let DeValue::Table(mut table) = value.into_inner() else {
        problems.push(Problem::at(
            file,
            text,
            Some(span),
            "`defaults` must be a table",
        ));
        return None;
    };
    let mut refused = false;
    for key in PER_PLUGIN_ONLY {
        if let Some((key, _)) = table.remove_entry(key) {
            problems.push(Problem::at(
                file,
                text,
                Some(key.span()),
                format!(
                    "`{}` belongs to one plugin and cannot have a default",
                    key.get_ref()
                ),
            ));
            refused = true;
        }
    }
    if refused {
        return None;
    }

    // The entry type requires a name and a command; give it placeholders
    // that `into_spec` replaces with each plugin's own.
    for key in ["name", "command"] {
        table.insert(
            Spanned::new(span.clone(), Cow::Borrowed(key)),
            Spanned::new(span.clone(), DeValue::String(Cow::Borrowed("(defaults)"))),
        );
    }
    let value = Spanned::new(span.clone(), DeValue::Table(table));
    let entry = match PluginEntry::deserialize(ValueDeserializer::from(value)) {
        Ok(entry) => entry,
        Err(err) => {
            problems.push(toml_problem(file, text, &err));
            return None;
        }
    };
    match entry.into_spec(base, builtin) {
        Ok(template) => Some(template),
        Err(message) => {
            let message = message.replace("plugin \"(defaults)\"", "defaults");
            problems.push(Problem::at(file, text, Some(span), message));
            None
        }
    }
}

fn parse_entry(
    value: Spanned<DeValue<'_>>,
    file: &str,
    text: &str,
    base: &Path,
    template: &PluginSpec,
) -> Result<PluginDefinition, Problem> {
    let span = value.span();
    let at = |message: String| Problem::at(file, text, Some(span.clone()), message);
    let mut entry = PluginEntry::deserialize(ValueDeserializer::from(value))
        .map_err(|err| toml_problem(file, text, &err))?;
    let name = entry.name.clone();
    if name.trim().is_empty() {
        return Err(at("a plugin has an empty name".to_owned()));
    }
    if !is_valid_name(&name) {
        return Err(at(format!(
            "plugin name {name:?} may hold only letters, digits, '-', '_' and '.'"
        )));
    }

    let mut requires = Vec::with_capacity(entry.requires.len());
    for (needed, range) in std::mem::take(&mut entry.requires) {
        let versions = VersionReq::parse(&range).map_err(|err| {
            at(format!(
                "plugin {name:?}: the requirement {needed} = {range:?} is not a semver range: {err}"
            ))
        })?;
        requires.push(Requirement {
            name: needed,
            versions,
        });
    }
    let protocol = match entry.protocol.take() {
        Some(range) => Some(VersionReq::parse(&range).map_err(|err| {
            at(format!(
                "plugin {name:?}: protocol {range:?} is not a semver range: {err}"
            ))
        })?),
        None => None,
    };

    let spec = entry.into_spec(base, template).map_err(at)?;
    let (line, _) = line_and_column(text, span.start);
    Ok(PluginDefinition {
        spec,
        requires,
        protocol,
        origin: Origin {
            file: file.to_owned(),
            line: Some(line),
        },
    })
}

/// Plugin names appear in paths (state directories), log lines and shell
/// commands, so they are kept to a safe alphabet.
fn is_valid_name(name: &str) -> bool {
    !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn toml_problem(file: &str, text: &str, err: &toml::de::Error) -> Problem {
    Problem::at(file, text, err.span(), err.message().trim_end().to_owned())
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Resolves `path` against `base` unless it is absolute.
pub(crate) fn anchored(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse_text(text: &str) -> Result<Document, Vec<Problem>> {
        parse(text, "aurora.toml", Path::new("/etc/aurora"))
    }

    fn messages(problems: &[Problem]) -> String {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        lines.join("\n")
    }

    #[test]
    fn every_broken_entry_is_reported_with_its_line() {
        let text = "\
[[plugin]]
name = \"a\"
command = \"x\"
call_timeout = \"soon\"

[[plugin]]
name = \"b\"
command = \"y\"
colour = \"blue\"

[[plugin]]
name = \"c\"
command = \"z\"
";
        let problems = parse_text(text).unwrap_err();
        assert_eq!(problems.len(), 2, "{}", messages(&problems));
        assert_eq!(problems[0].line, Some(4), "{}", problems[0]);
        assert!(problems[0].message.contains("soon"), "{}", problems[0]);
        assert_eq!(problems[1].line, Some(9), "{}", problems[1]);
        assert!(problems[1].message.contains("colour"), "{}", problems[1]);
        assert!(problems[1].to_string().starts_with("aurora.toml:9:"));
    }

    #[test]
    fn a_syntax_error_is_one_problem_with_a_position() {
        let problems = parse_text("[[plugin]\nname = 1\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, Some(1));
    }

    #[test]
    fn defaults_apply_to_every_plugin_and_entries_override_them() {
        let text = r#"
[defaults]
call_timeout = "3s"
idle_timeout = "1m"
env = { SHARED = "1" }

[defaults.restart]
mode = "always"

[[plugin]]
name = "a"
command = "bin/a"

[[plugin]]
name = "b"
command = "bin/b"
call_timeout = "9s"
env = { OWN = "2" }
"#;
        let document = parse_text(text).unwrap();
        let a = &document.plugins[0].spec;
        let b = &document.plugins[1].spec;
        assert_eq!(a.call_timeout, Duration::from_secs(3));
        assert_eq!(b.call_timeout, Duration::from_secs(9));
        assert_eq!(a.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(a.restart.mode, crate::RestartMode::Always);
        assert_eq!(b.env.len(), 2, "{:?}", b.env);
        assert_eq!(a.command, Path::new("/etc/aurora/bin/a"));
    }

    #[test]
    fn defaults_cannot_name_a_plugin() {
        let problems = parse_text("[defaults]\nname = \"x\"\ncommand = \"y\"\n").unwrap_err();
        assert_eq!(problems.len(), 2, "{}", messages(&problems));
        assert!(problems[0].message.contains("cannot have a default"));
    }

    #[test]
    fn requirements_and_versions_are_parsed() {
        let text = r#"
[[plugin]]
name = "a"
command = "x"
version = "1.2.3"
protocol = "^1"
lazy = true
requires = { b = ">=0.2, <0.4" }
"#;
        let document = parse_text(text).unwrap();
        let a = &document.plugins[0];
        assert_eq!(a.spec.version, Some(semver::Version::new(1, 2, 3)));
        assert!(a.spec.lazy);
        assert_eq!(a.requires[0].name, "b");
        assert!(
            a.requires[0]
                .versions
                .matches(&semver::Version::new(0, 3, 0))
        );
        assert!(
            a.protocol
                .as_ref()
                .unwrap()
                .matches(&semver::Version::new(1, 4, 0))
        );
        assert_eq!(a.origin.line, Some(2));
    }

    #[test]
    fn bad_versions_and_ranges_are_refused() {
        for (field, expected) in [
            ("version = \"one\"", "not a semver version"),
            ("requires = { b = \"about 2\" }", "not a semver range"),
            ("protocol = \"one\"", "not a semver range"),
            ("name2 = 1", "name2"),
        ] {
            let text = format!("[[plugin]]\nname = \"a\"\ncommand = \"x\"\n{field}\n");
            let problems = parse_text(&text).unwrap_err();
            assert!(
                problems[0].message.contains(expected),
                "{}",
                messages(&problems)
            );
        }
    }

    #[test]
    fn unknown_sections_and_unsafe_names_are_refused() {
        let problems = parse_text("[demon]\nsocket = \"x\"\n").unwrap_err();
        assert!(problems[0].message.contains("unknown section `demon`"));
        let problems = parse_text("[[plugin]]\nname = \"../x\"\ncommand = \"y\"\n").unwrap_err();
        assert!(problems[0].message.contains("may hold only"));
    }

    #[test]
    fn a_manifest_is_one_entry_and_needs_a_version() {
        let template = PluginSpec::new("t", "t");
        let dir = Path::new("/srv/plugins/echo");
        let text = "name = \"echo\"\ncommand = \"./echo\"\nversion = \"0.1.0\"\n\
                    [requires]\nbase = \"^1\"\n";
        let definition = parse_manifest(text, "plugin.toml", dir, &template).unwrap();
        assert_eq!(
            definition.spec.command,
            Path::new("/srv/plugins/echo/./echo")
        );
        assert_eq!(definition.requires.len(), 1);

        let err =
            parse_manifest("name = \"echo\"\ncommand = \"x\"\n", "m", dir, &template).unwrap_err();
        assert!(err.message.contains("no `version`"), "{err}");

        let err = parse_manifest("name = \"echo\"\n", "m", dir, &template).unwrap_err();
        assert!(err.message.contains("command"), "{err}");
    }

    #[test]
    fn the_packaged_config_parses() {
        let text = include_str!("../../../packaging/aurora.toml");
        let document = parse_text(text).unwrap();
        assert!(document.plugins.is_empty());
        assert!(document.template.is_some());
    }

    #[test]
    fn lines_and_columns_count_from_one() {
        assert_eq!(line_and_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_and_column("ab", 99), (1, 3));
    }
}
