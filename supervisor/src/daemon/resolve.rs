//! Resolving the whole set of plugins before anything starts: names unique,
//! every requirement present in a version it accepts, protocols spoken, no
//! cycles, and an order to start them in.
//!
//! Resolution is all or nothing. Every problem is collected and reported at
//! once, with the names, versions and files involved, and a set with any
//! problem starts nothing, so a daemon never runs half of a broken config.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use semver::Version;

use crate::daemon::document::{PluginDefinition, Problem};

/// A resolved set of plugins.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Every plugin, each after all it requires.
    pub plugins: Vec<PluginDefinition>,
}

impl Plan {
    pub fn get(&self, name: &str) -> Option<&PluginDefinition> {
        self.plugins.iter().find(|p| p.spec.name == name)
    }

    /// The names of the plugins `name` requires.
    pub fn requirements_of(&self, name: &str) -> Vec<String> {
        self.get(name)
            .map(|p| p.requires.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default()
    }

    /// The names of the plugins that require `name`.
    pub fn dependents_of(&self, name: &str) -> Vec<String> {
        self.plugins
            .iter()
            .filter(|p| p.requires.iter().any(|r| r.name == name))
            .map(|p| p.spec.name.clone())
            .collect()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plugins.iter().map(|p| p.spec.name.as_str())
    }
}

/// A plugin's name and version, as problems show it.
struct Named<'a>(&'a PluginDefinition);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spec = &self.0.spec;
        match &spec.version {
            Some(version) => write!(f, "{:?} {version}", spec.name),
            None => write!(f, "{:?}", spec.name),
        }
    }
}

fn problem_at(definition: &PluginDefinition, message: String) -> Problem {
    Problem {
        file: definition.origin.file.clone(),
        line: definition.origin.line,
        column: None,
        message,
    }
}

/// Checks `definitions` as a whole and orders them. `protocol` is the
/// version of the plugin protocol this supervisor speaks.
///
/// # Errors
///
/// Every problem found: duplicate names, missing requirements, versions
/// outside a required range, protocols not spoken, and cycles.
pub fn resolve(
    definitions: Vec<PluginDefinition>,
    protocol: &Version,
) -> Result<Plan, Vec<Problem>> {
    let mut problems = Vec::new();

    // Names first: everything after looks plugins up by name.
    let mut by_name: BTreeMap<String, PluginDefinition> = BTreeMap::new();
    for definition in definitions {
        let name = definition.spec.name.clone();
        if let Some(first) = by_name.get(&name) {
            problems.push(problem_at(
                &definition,
                format!(
                    "plugin {} is defined twice: here and at {} (as {})",
                    Named(&definition),
                    first.origin,
                    Named(first),
                ),
            ));
            continue;
        }
        by_name.insert(name, definition);
    }

    for definition in by_name.values() {
        if let Some(range) = &definition.protocol
            && !range.matches(protocol)
        {
            problems.push(problem_at(
                definition,
                format!(
                    "plugin {} speaks protocol {range}, but this aurora speaks {}.{}",
                    Named(definition),
                    protocol.major,
                    protocol.minor
                ),
            ));
        }
        for requirement in &definition.requires {
            let Some(needed) = by_name.get(&requirement.name) else {
                problems.push(problem_at(
                    definition,
                    format!(
                        "plugin {} requires {:?} {}, but no plugin {:?} is defined",
                        Named(definition),
                        requirement.name,
                        requirement.versions,
                        requirement.name
                    ),
                ));
                continue;
            };
            let accepts_any = requirement.versions == semver::VersionReq::STAR;
            match &needed.spec.version {
                Some(version) if requirement.versions.matches(version) => {}
                None if accepts_any => {}
                Some(version) => problems.push(problem_at(
                    definition,
                    format!(
                        "plugin {} requires {:?} {}, but {:?} is {version} (at {})",
                        Named(definition),
                        requirement.name,
                        requirement.versions,
                        requirement.name,
                        needed.origin
                    ),
                )),
                None => problems.push(problem_at(
                    definition,
                    format!(
                        "plugin {} requires {:?} {}, but {:?} (at {}) declares no version",
                        Named(definition),
                        requirement.name,
                        requirement.versions,
                        requirement.name,
                        needed.origin
                    ),
                )),
            }
        }
    }

    let edges = edges(&by_name);
    for cycle in cycles(&edges) {
        let first = &by_name[&cycle[0]];
        let path: Vec<String> = cycle
            .iter()
            .chain(std::iter::once(&cycle[0]))
            .map(|name| Named(&by_name[name]).to_string())
            .collect();
        problems.push(problem_at(
            first,
            format!("dependency cycle: {}", path.join(" -> ")),
        ));
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    let order = start_order(&edges);
    let plugins = order
        .into_iter()
        .map(|name| {
            by_name
                .remove(&name)
                .expect("the order holds only known names")
        })
        .collect();
    Ok(Plan { plugins })
}

/// Each plugin's requirements that exist, by name.
fn edges(by_name: &BTreeMap<String, PluginDefinition>) -> BTreeMap<String, BTreeSet<String>> {
    by_name
        .iter()
        .map(|(name, definition)| {
            let requires = definition
                .requires
                .iter()
                .map(|r| r.name.clone())
                .filter(|needed| by_name.contains_key(needed))
                .collect();
            (name.clone(), requires)
        })
        .collect()
}

/// Every plugin after what it requires; ties in name order. Assumes no
/// cycles.
fn start_order(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut waiting: HashMap<&str, usize> = edges
        .iter()
        .map(|(name, requires)| (name.as_str(), requires.len()))
        .collect();
    let mut ready: BTreeSet<&str> = waiting
        .iter()
        .filter(|(_, count)| **count == 0)
        .map(|(&name, _)| name)
        .collect();
    let mut order = Vec::with_capacity(edges.len());
    while let Some(name) = ready.pop_first() {
        order.push(name.to_owned());
        for (dependent, requires) in edges {
            if requires.contains(name) {
                let count = waiting
                    .get_mut(dependent.as_str())
                    .expect("every plugin has a count");
                *count -= 1;
                if *count == 0 {
                    ready.insert(dependent);
                }
            }
        }
    }
    order
}

/// The distinct cycles a depth-first walk finds, each as the names along it.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Unseen,
        OnPath,
        Done,
    }
    fn visit<'a>(
        name: &'a str,
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        marks: &mut HashMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
        found: &mut Vec<Vec<String>>,
    ) {
        marks.insert(name, Mark::OnPath);
        path.push(name);
        for next in &edges[name] {
            match marks[next.as_str()] {
                Mark::Unseen => visit(next, edges, marks, path, found),
                Mark::OnPath => {
                    let start = path
                        .iter()
                        .position(|&n| n == next)
                        .expect("a name on the path is in the path");
                    found.push(path[start..].iter().map(|&n| n.to_owned()).collect());
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(name, Mark::Done);
    }

    let mut marks: HashMap<&str, Mark> = edges.keys().map(|n| (n.as_str(), Mark::Unseen)).collect();
    let mut found = Vec::new();
    for name in edges.keys() {
        if marks[name.as_str()] == Mark::Unseen {
            visit(name, edges, &mut marks, &mut Vec::new(), &mut found);
        }
    }
    // The same cycle can be entered at different points; keep one of each.
    let mut seen = BTreeSet::new();
    found.retain(|cycle| {
        let members: BTreeSet<String> = cycle.iter().cloned().collect();
        seen.insert(members)
    });
    found
}

#[cfg(test)]
mod tests {
    use semver::VersionReq;

    use super::*;
    use crate::daemon::document::{Origin, Requirement};
    use crate::spec::PluginSpec;

    const PROTOCOL: Version = Version::new(1, 0, 0);

    fn plugin(name: &str, version: &str, requires: &[(&str, &str)]) -> PluginDefinition {
        let mut spec = PluginSpec::new(name, "x");
        spec.version = (!version.is_empty()).then(|| Version::parse(version).unwrap());
        PluginDefinition {
            spec,
            requires: requires
                .iter()
                .map(|(name, range)| Requirement {
                    name: (*name).to_owned(),
                    versions: VersionReq::parse(range).unwrap(),
                })
                .collect(),
            protocol: None,
            origin: Origin {
                file: format!("{name}/plugin.toml"),
                line: None,
            },
        }
    }

    fn order(plan: &Plan) -> Vec<&str> {
        plan.names().collect()
    }

    fn problems_of(definitions: Vec<PluginDefinition>) -> Vec<String> {
        let problems = resolve(definitions, &PROTOCOL).unwrap_err();
        problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn requirements_come_first_and_ties_go_by_name() {
        let plan = resolve(
            vec![
                plugin("web", "1.0.0", &[("db", "^2"), ("cache", "*")]),
                plugin("db", "2.1.0", &[]),
                plugin("cache", "0.3.0", &[("db", ">=2")]),
                plugin("alone", "1.0.0", &[]),
            ],
            &PROTOCOL,
        )
        .unwrap();
        assert_eq!(order(&plan), ["alone", "db", "cache", "web"]);
        assert_eq!(plan.dependents_of("db"), ["cache", "web"]);
        assert_eq!(plan.requirements_of("web"), ["db", "cache"]);
    }

    #[test]
    fn every_problem_is_reported_with_names_and_versions() {
        let problems = problems_of(vec![
            plugin("web", "1.0.0", &[("db", "^3"), ("queue", "^1")]),
            plugin("db", "2.1.0", &[]),
            plugin("db", "2.2.0", &[]),
        ]);
        assert_eq!(problems.len(), 3, "{problems:#?}");
        let all = problems.join("\n");
        for expected in [
            "plugin \"db\" 2.2.0 is defined twice: here and at db/plugin.toml (as \"db\" 2.1.0)",
            "plugin \"web\" 1.0.0 requires \"db\" ^3, but \"db\" is 2.1.0",
            "plugin \"web\" 1.0.0 requires \"queue\" ^1, but no plugin \"queue\" is defined",
        ] {
            assert!(all.contains(expected), "{expected:?} not in:\n{all}");
        }
    }

    #[test]
    fn cycles_are_reported_once_each_with_their_path() {
        let problems = problems_of(vec![
            plugin("a", "1.0.0", &[("b", "*")]),
            plugin("b", "1.0.0", &[("c", "*")]),
            plugin("c", "1.0.0", &[("a", "*")]),
            plugin("d", "1.0.0", &[("d", "*")]),
            plugin("e", "1.0.0", &[("a", "*")]),
        ]);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].contains(
            "dependency cycle: \"a\" 1.0.0 -> \"b\" 1.0.0 -> \"c\" 1.0.0 -> \"a\" 1.0.0"
        ));
        assert!(problems[1].contains("dependency cycle: \"d\" 1.0.0 -> \"d\" 1.0.0"));
    }

    #[test]
    fn a_plugin_without_a_version_satisfies_only_any_version() {
        let plan = resolve(
            vec![plugin("a", "1.0.0", &[("b", "*")]), plugin("b", "", &[])],
            &PROTOCOL,
        );
        assert!(plan.is_ok());
        let problems = problems_of(vec![
            plugin("a", "1.0.0", &[("b", "^1")]),
            plugin("b", "", &[]),
        ]);
        assert!(problems[0].contains("declares no version"), "{problems:?}");
    }

    #[test]
    fn the_protocol_range_must_include_ours() {
        let mut future = plugin("future", "1.0.0", &[]);
        future.protocol = Some(VersionReq::parse(">=2").unwrap());
        let mut current = plugin("current", "1.0.0", &[]);
        current.protocol = Some(VersionReq::parse("^1").unwrap());
        let problems = problems_of(vec![future, current]);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("speaks protocol >=2, but this aurora speaks 1.0"),
            "{problems:?}"
        );
    }
}
