//! Finding plugins: every `plugin.toml` under the plugins directory is one.
//!
//! The walk is deterministic (entries sorted by name), skips hidden
//! directories, follows symbolic links to directories (packages are often
//! installed elsewhere and linked in) and remembers where it has been, so a
//! link loop ends the walk instead of recursing forever.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::daemon::document::{PluginDefinition, Problem, parse_manifest};
use crate::daemon::settings::MANIFEST_NAME;
use crate::spec::PluginSpec;

/// How deep below the plugins directory manifests are looked for.
const MAX_DEPTH: usize = 8;

/// What a walk of the plugins directory found.
#[derive(Debug, Default)]
pub struct Discovered {
    pub plugins: Vec<PluginDefinition>,
    pub problems: Vec<Problem>,
    /// The manifest files read, for logs.
    pub manifests: Vec<PathBuf>,
}

/// Reads every manifest under `dir`. Each manifest's plugin starts from
/// `template` (the config's defaults). A missing `dir` is a problem only when
/// `required`.
pub fn discover(dir: &Path, required: bool, template: &PluginSpec) -> Discovered {
    let mut found = Discovered::default();
    if !dir.is_dir() {
        if required {
            found.problems.push(Problem::in_file(
                dir.display().to_string(),
                "the plugins directory does not exist or is not a directory",
            ));
        }
        return found;
    }

    let mut manifests = Vec::new();
    let mut visited = HashSet::new();
    walk(dir, 0, &mut visited, &mut manifests, &mut found.problems);
    for manifest in manifests {
        let file = manifest.display().to_string();
        let text = match std::fs::read_to_string(&manifest) {
            Ok(text) => text,
            Err(err) => {
                found
                    .problems
                    .push(Problem::in_file(file, format!("cannot read: {err}")));
                continue;
            }
        };
        let manifest_dir = manifest.parent().unwrap_or(dir);
        match parse_manifest(&text, &file, manifest_dir, template) {
            Ok(plugin) => found.plugins.push(plugin),
            Err(problem) => found.problems.push(problem),
        }
        found.manifests.push(manifest);
    }
    found
}

fn walk(
    dir: &Path,
    depth: usize,
    visited: &mut HashSet<PathBuf>,
    manifests: &mut Vec<PathBuf>,
    problems: &mut Vec<Problem>,
) {
    let Ok(canonical) = dir.canonicalize() else {
        return;
    };
    if !visited.insert(canonical) {
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            problems.push(Problem::in_file(
                dir.display().to_string(),
                format!("cannot list the directory: {err}"),
            ));
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();

    for path in paths {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        // `metadata` follows links: a linked directory is walked like any.
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        let is_manifest = metadata.is_file() && name == MANIFEST_NAME;
        if is_manifest {
            manifests.push(path);
        } else if metadata.is_dir() && depth < MAX_DEPTH {
            walk(&path, depth + 1, visited, manifests, problems);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("aurora-discovery-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn manifest(dir: &Path, name: &str, body: &str) {
        let plugin_dir = dir.join(name);
        std::fs::create_dir_all(&plugin_dir).unwrap();
        std::fs::write(plugin_dir.join(MANIFEST_NAME), body).unwrap();
    }

    #[test]
    fn finds_manifests_in_order_and_reports_broken_ones() {
        let dir = temp_dir("order");
        manifest(
            &dir,
            "b",
            "name = \"b\"\ncommand = \"./b\"\nversion = \"1.0.0\"\n",
        );
        manifest(
            &dir,
            "a",
            "name = \"a\"\ncommand = \"./a\"\nversion = \"2.0.0\"\n",
        );
        manifest(
            &dir,
            "nested/c",
            "name = \"c\"\ncommand = \"c\"\nversion = \"x\"\n",
        );
        manifest(
            &dir,
            ".hidden",
            "name = \"h\"\ncommand = \"h\"\nversion = \"1.0.0\"\n",
        );
        std::fs::write(dir.join("README"), "not a manifest").unwrap();

        let found = discover(&dir, true, &PluginSpec::new("t", "t"));
        let names: Vec<&str> = found.plugins.iter().map(|p| p.spec.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(found.problems.len(), 1, "{:?}", found.problems);
        assert!(found.problems[0].file.ends_with("nested/c/plugin.toml"));
        assert_eq!(found.plugins[0].spec.command, dir.join("a/./a"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_link_loop_ends_the_walk() {
        let dir = temp_dir("loop");
        manifest(
            &dir,
            "a",
            "name = \"a\"\ncommand = \"a\"\nversion = \"1.0.0\"\n",
        );
        std::os::unix::fs::symlink(&dir, dir.join("a/back")).unwrap();
        let found = discover(&dir, true, &PluginSpec::new("t", "t"));
        assert_eq!(found.plugins.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_matters_only_when_configured() {
        let missing = Path::new("/nonexistent/aurora/plugins");
        let template = PluginSpec::new("t", "t");
        assert!(discover(missing, false, &template).problems.is_empty());
        assert_eq!(discover(missing, true, &template).problems.len(), 1);
    }
}
