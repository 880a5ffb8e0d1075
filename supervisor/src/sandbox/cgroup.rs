//! A cgroup per plugin process, so that its whole process tree can be
//! limited and killed, including descendants that left its process group.
//!
//! Aurora uses whatever the machine offers, each hierarchy independently:
//! the v2 (unified) hierarchy for membership and `cgroup.kill`, plus memory
//! and pids limits when those controllers can be enabled there; and the v1
//! `pids` and `memory` hierarchies for limits on hybrid machines. Every
//! plugin cgroup lives under `aurora-<supervisor pid>` beside the
//! supervisor's own cgroup (named with the supervisor's pid and start time),
//! so one write to that parent's `cgroup.kill` ends every plugin at once (the
//! guardian relies on this), and cgroups left by a supervisor that died are
//! recognisable and cleaned up at start.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spec::Limits;

/// The per-supervisor parent cgroups, one per usable hierarchy.
#[derive(Debug, Default)]
pub(crate) struct Roots {
    /// `aurora-<pid>-<start time>` in the v2 hierarchy.
    pub(crate) unified: Option<PathBuf>,
    /// Whether the v2 parent can set memory and pids limits on its children.
    unified_limits: bool,
    pids: Option<PathBuf>,
    memory: Option<PathBuf>,
    /// Why a hierarchy is unusable, for the sandbox report.
    pub(crate) problems: Vec<String>,
}

impl Roots {
    /// Every per-supervisor parent cgroup that exists.
    pub(crate) fn parents(&self) -> impl Iterator<Item = &Path> {
        [&self.unified, &self.pids, &self.memory]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }
}

/// The roots for this process, found and created on first use.
pub(crate) fn roots() -> &'static Roots {
    static ROOTS: OnceLock<Roots> = OnceLock::new();
    ROOTS.get_or_init(discover)
}

fn discover() -> Roots {
    let mut roots = Roots::default();
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        roots
            .problems
            .push("cannot read /proc/self/mountinfo".to_owned());
        return roots;
    };
    let Ok(membership) = fs::read_to_string("/proc/self/cgroup") else {
        roots
            .problems
            .push("cannot read /proc/self/cgroup".to_owned());
        return roots;
    };
    let pid = std::process::id();
    let parent_name = format!("aurora-{pid}-{}", start_time(pid).unwrap_or(0));

    let mut make = |kind: &str, mount: Option<PathBuf>, own: Option<&str>| -> Option<PathBuf> {
        let (mount, own) = match (mount, own) {
            (Some(mount), Some(own)) => (mount, own),
            _ => {
                roots
                    .problems
                    .push(format!("no {kind} cgroup hierarchy is mounted"));
                return None;
            }
        };
        let base = mount.join(own.trim_start_matches('/'));
        clean_stale(&base);
        let parent = base.join(&parent_name);
        match fs::create_dir(&parent) {
            Ok(()) => Some(parent),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Some(parent),
            Err(err) => {
                roots
                    .problems
                    .push(format!("cannot create {}: {err}", parent.display()));
                None
            }
        }
    };

    let unified = make(
        "v2",
        mount_of(&mountinfo, None),
        own_path(&membership, None),
    );
    let pids = make(
        "pids",
        mount_of(&mountinfo, Some("pids")),
        own_path(&membership, Some("pids")),
    );
    let memory = make(
        "memory",
        mount_of(&mountinfo, Some("memory")),
        own_path(&membership, Some("memory")),
    );
    roots.unified_limits = unified.as_deref().is_some_and(enable_unified_limits);
    roots.unified = unified;
    roots.pids = pids;
    roots.memory = memory;
    roots
}

/// The mount point of the v2 hierarchy (`controller` `None`) or of the v1
/// hierarchy carrying `controller`.
fn mount_of(mountinfo: &str, controller: Option<&str>) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split(' ').nth(4)?;
        let mut after = after.split(' ');
        let fs_type = after.next()?;
        let options = after.nth(1).unwrap_or("");
        let matches = match controller {
            None => fs_type == "cgroup2",
            Some(name) => fs_type == "cgroup" && options.split(',').any(|o| o == name),
        };
        matches.then(|| PathBuf::from(mount_point))
    })
}

/// This process's own cgroup path in the v2 hierarchy (`None`) or in the v1
/// hierarchy carrying `controller`.
fn own_path<'a>(membership: &'a str, controller: Option<&str>) -> Option<&'a str> {
    membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => id == "0" && controllers.is_empty(),
            Some(name) => controllers.split(',').any(|c| c == name),
        };
        matches.then_some(path)
    })
}

/// Turns on the memory and pids controllers for the plugin cgroups, which
/// only works where the supervisor's own cgroup already delegates them.
fn enable_unified_limits(parent: &Path) -> bool {
    let available = fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
    let has = |name| available.split_whitespace().any(|c| c == name);
    has("memory")
        && has("pids")
        && fs::write(parent.join("cgroup.subtree_control"), "+memory +pids").is_ok()
}

/// Removes `aurora-<pid>-<start>` cgroups under `base` whose supervisor is gone,
/// killing anything still inside them.
fn clean_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(|n| n.strip_prefix("aurora-")) else {
            continue;
        };
        let Some((pid, started)) = owner.split_once('-') else {
            continue;
        };
        let (Ok(pid), Ok(started)) = (pid.parse::<u32>(), started.parse::<u64>()) else {
            continue;
        };
        // The pid alone could have been reused since; with the start time it
        // names one process for good.
        let owner_alive = start_time(pid) == Some(started);
        if owner_alive {
            continue;
        }
        let parent = entry.path();
        let children: Vec<PathBuf> = fs::read_dir(&parent)
            .map(|dirs| {
                dirs.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        for child in &children {
            kill_members(child);
            let _ = fs::remove_dir(child);
        }
        match fs::remove_dir(&parent) {
            Ok(()) => tracing::info!(
                cgroup = %parent.display(),
                "removed a cgroup left by a supervisor that died"
            ),
            // Another user's leftovers, or processes still dying: the next
            // start with the right to remove them will.
            Err(err) => tracing::debug!(
                cgroup = %parent.display(),
                %err,
                "cannot remove a cgroup left by a supervisor that died"
            ),
        }
    }
}

/// When process `pid` started, in clock ticks since boot; `None` when no such
/// process exists (a thread id does not count).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; starttime is field 22.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let is_process = status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .is_some_and(|tgid| tgid.trim() == pid.to_string());
    if !is_process {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Kills every process in the cgroup at `dir`.
fn kill_members(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    // v1 has no cgroup.kill: signal each member, a few rounds in case one
    // forked while we read the list.
    for _ in 0..3 {
        let members = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if members.trim().is_empty() {
            return;
        }
        for pid in members.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// One plugin process's cgroups.
#[derive(Debug)]
pub(crate) struct PluginCgroup {
    leaves: Vec<PathBuf>,
    /// Whether `leaves[0]` is in the v2 hierarchy.
    has_unified: bool,
}

impl PluginCgroup {
    /// Creates cgroups for plugin `name` in every usable hierarchy and sets
    /// `limits` on them. Returns `None` when no hierarchy is usable, and
    /// always the limits that no cgroup enforces.
    pub(crate) fn create(name: &str, limits: &Limits) -> (Option<PluginCgroup>, Vec<String>) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let roots = roots();
        let leaf_name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let leaf_name = format!("{leaf_name}-{}", NEXT.fetch_add(1, Ordering::Relaxed));

        let mut leaves = Vec::new();
        let mut make = |parent: &Option<PathBuf>| -> Option<PathBuf> {
            let leaf = parent.as_ref()?.join(&leaf_name);
            fs::create_dir(&leaf).ok()?;
            leaves.push(leaf.clone());
            Some(leaf)
        };
        let unified = make(&roots.unified);
        let pids = make(&roots.pids);
        let memory = make(&roots.memory);

        let mut pids_limited = false;
        let mut memory_limited = false;
        if let Some(max) = limits.processes {
            pids_limited = [
                unified.as_ref().filter(|_| roots.unified_limits),
                pids.as_ref(),
            ]
            .into_iter()
            .flatten()
            .any(|dir| fs::write(dir.join("pids.max"), max.to_string()).is_ok());
        }
        if let Some(max) = limits.memory {
            let v2 = unified
                .as_ref()
                .filter(|_| roots.unified_limits)
                .is_some_and(|dir| fs::write(dir.join("memory.max"), max.to_string()).is_ok());
            let v1 = memory.as_ref().is_some_and(|dir| {
                fs::write(dir.join("memory.limit_in_bytes"), max.to_string()).is_ok()
            });
            memory_limited = v2 || v1;
        }

        let mut gaps = Vec::new();
        if limits.processes.is_some() && !pids_limited {
            gaps.push("a cgroup process limit (only RLIMIT_NPROC, which root ignores)".to_owned());
        }
        if limits.memory.is_some() && !memory_limited {
            gaps.push("a cgroup memory limit (only RLIMIT_AS)".to_owned());
        }
        if unified.is_none() && pids.is_none() && memory.is_none() {
            gaps.push("a cgroup for the process tree (descendants that leave the process group may outlive the plugin)".to_owned());
            return (None, gaps);
        }
        let has_unified = unified.is_some();
        (
            Some(PluginCgroup {
                leaves,
                has_unified,
            }),
            gaps,
        )
    }

    /// Opens the v2 cgroup's directory, for starting the child inside it
    /// (`clone3` with `CLONE_INTO_CGROUP`).
    pub(crate) fn open_unified_dir(&self) -> io::Result<Option<OwnedFd>> {
        if !self.has_unified {
            return Ok(None);
        }
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&self.leaves[0])?;
        Ok(Some(OwnedFd::from(dir)))
    }

    /// Opens each cgroup's `cgroup.procs` for the child to write itself into
    /// before it runs any plugin code: the v2 one (if any) first, then the
    /// v1 ones.
    pub(crate) fn open_procs(&self) -> io::Result<Vec<OwnedFd>> {
        self.leaves
            .iter()
            .map(|leaf| {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(leaf.join("cgroup.procs"))?;
                Ok(OwnedFd::from(file))
            })
            .collect()
    }

    /// Kills every process in the plugin's cgroups.
    pub(crate) fn kill(&self) {
        for leaf in &self.leaves {
            kill_members(leaf);
        }
    }

    /// Whether no process is left in any of the cgroups.
    pub(crate) fn is_empty(&self) -> bool {
        self.leaves.iter().all(|leaf| {
            fs::read_to_string(leaf.join("cgroup.procs")).map_or(true, |m| m.trim().is_empty())
        })
    }

    /// Removes the cgroups; fails quietly for any still holding a process.
    pub(crate) fn remove(&self) {
        for leaf in &self.leaves {
            let _ = fs::remove_dir(leaf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 23 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
38 30 0:34 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids";

    const MEMBERSHIP: &str = "8:pids:/\n4:memory:/jobs/42\n1:cpu:/\n0::/user.slice\n";

    #[test]
    fn start_time_identifies_live_processes_only() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn finds_each_hierarchy_and_our_place_in_it() {
        assert_eq!(
            mount_of(MOUNTINFO, None),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            mount_of(MOUNTINFO, Some("pids")),
            Some("/sys/fs/cgroup/pids".into())
        );
        assert_eq!(
            mount_of(MOUNTINFO, Some("memory")),
            Some("/sys/fs/cgroup/memory".into())
        );
        assert_eq!(mount_of(MOUNTINFO, Some("cpuset")), None);

        assert_eq!(own_path(MEMBERSHIP, None), Some("/user.slice"));
        assert_eq!(own_path(MEMBERSHIP, Some("memory")), Some("/jobs/42"));
        assert_eq!(own_path(MEMBERSHIP, Some("pids")), Some("/"));
    }
}
