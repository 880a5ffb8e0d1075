//! Reloading a plugin when its binary or manifest changes on disk.
//!
//! The watcher follows the directories that hold each plugin's binary and
//! manifest (a deploy usually renames a new file into place, which a watch
//! on the old file itself would miss) and turns changes into the same
//! request `aurora reload PLUGIN` makes, through the daemon's main loop:
//! re-read the manifests, then swap the plugin safely.
//!
//! A change is acted on only once the file has settled: it exists, its size
//! and modification time have not moved for [`SETTLE_TIME`], and, for a
//! binary, it is executable. So a binary still being copied, or one renamed
//! into place before its mode is set, is never started half-done. A file
//! that settles back to what was last acted on (a `touch`, a second event
//! for the same write) changes nothing.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::Watcher as _;
use tokio::sync::{mpsc, oneshot};

use super::{Command, Shared};
use crate::plugin::find_executable;

/// How long a changed file must stay the same before it is acted on.
pub const SETTLE_TIME: Duration = Duration::from_millis(200);

/// How often settling files are looked at.
const LOOK_INTERVAL: Duration = Duration::from_millis(50);

/// How long a file that vanished (mid-rename, say) is waited for.
const VANISHED_PATIENCE: Duration = Duration::from_secs(30);

/// What identifies a file's content cheaply: its size, modification time
/// and inode (a rename into place changes the inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u64,
    pub modified_ns: i128,
    pub inode: u64,
    pub executable: bool,
}

impl Fingerprint {
    /// The fingerprint of the file at `path`, if there is one.
    pub fn of(path: &Path) -> Option<Fingerprint> {
        let metadata = std::fs::metadata(path).ok()?;
        if !metadata.is_file() {
            return None;
        }
        Some(Fingerprint {
            len: metadata.len(),
            modified_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
            inode: metadata.ino(),
            executable: metadata.permissions().mode() & 0o111 != 0,
        })
    }
}

/// A watched file: whose it is, what it must be to count as ready, and
/// what it was when last acted on.
#[derive(Debug, Clone)]
struct Watched {
    plugin: String,
    /// Binaries must be executable before they count as ready.
    is_binary: bool,
    acted_on: Option<Fingerprint>,
}

/// A changed file waiting to settle.
#[derive(Debug, Clone, Copy)]
struct Unsettled {
    first_seen: Instant,
    last: Option<Fingerprint>,
    unchanged_since: Instant,
}

/// The debouncing, apart from the file system: which watched files changed
/// and which of them have settled. Time and file state are passed in, so
/// the rules are tested exactly.
#[derive(Debug, Default)]
pub struct Settling {
    watched: HashMap<PathBuf, Watched>,
    unsettled: HashMap<PathBuf, Unsettled>,
}

impl Settling {
    /// Watches `path` for `plugin`; `current` is what it is now, so that
    /// only a change from it counts.
    pub fn watch(
        &mut self,
        path: PathBuf,
        plugin: &str,
        is_binary: bool,
        current: Option<Fingerprint>,
    ) {
        self.watched.insert(
            path,
            Watched {
                plugin: plugin.to_owned(),
                is_binary,
                acted_on: current,
            },
        );
    }

    /// Whether `path` is watched.
    pub fn is_watched(&self, path: &Path) -> bool {
        self.watched.contains_key(path)
    }

    /// Notes that the file system reported something about `path`.
    pub fn changed(&mut self, path: &Path, now: Instant) {
        if !self.watched.contains_key(path) {
            return;
        }
        self.unsettled.entry(path.to_owned()).or_insert(Unsettled {
            first_seen: now,
            last: None,
            unchanged_since: now,
        });
    }

    /// Whether any change is waiting to settle.
    pub fn is_waiting(&self) -> bool {
        !self.unsettled.is_empty()
    }

    /// Looks at every unsettled file with `look` and returns the plugins
    /// whose files have settled into something new, each once.
    pub fn settled(
        &mut self,
        now: Instant,
        look: impl Fn(&Path) -> Option<Fingerprint>,
    ) -> Vec<String> {
        let mut plugins = Vec::new();
        let paths: Vec<PathBuf> = self.unsettled.keys().cloned().collect();
        for path in paths {
            let Some(watched) = self.watched.get_mut(&path) else {
                self.unsettled.remove(&path);
                continue;
            };
            let unsettled = self
                .unsettled
                .get_mut(&path)
                .expect("the key was just listed");
            let seen = look(&path);
            if seen != unsettled.last {
                unsettled.last = seen;
                unsettled.unchanged_since = now;
                continue;
            }
            let Some(fingerprint) = seen else {
                if now.duration_since(unsettled.first_seen) > VANISHED_PATIENCE {
                    self.unsettled.remove(&path);
                }
                continue;
            };
            let is_ready = now.duration_since(unsettled.unchanged_since) >= SETTLE_TIME
                && (fingerprint.executable || !watched.is_binary);
            if !is_ready {
                continue;
            }
            self.unsettled.remove(&path);
            if watched.acted_on == Some(fingerprint) {
                continue;
            }
            watched.acted_on = Some(fingerprint);
            if !plugins.contains(&watched.plugin) {
                plugins.push(watched.plugin.clone());
            }
        }
        plugins
    }
}

/// Watches the binaries and manifests of the daemon's plugins until the
/// task is aborted, reloading each plugin whose files change.
pub(crate) async fn watch_plugins(shared: Arc<Shared>) {
    let (changes_tx, mut changes) = mpsc::unbounded_channel::<PathBuf>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // The callback runs on notify's own thread.
        if let Ok(event) = event {
            for path in event.paths {
                let _ = changes_tx.send(path);
            }
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(err) => {
            tracing::warn!(%err, "cannot watch plugin files; changes need `aurora reload`");
            return;
        }
    };

    let mut plan_changes = shared.plan_changes.subscribe();
    let mut settling = Settling::default();
    let mut directories = Vec::new();
    follow_plan(&shared, &mut watcher, &mut settling, &mut directories);
    let mut look = tokio::time::interval(LOOK_INTERVAL);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            Some(path) = changes.recv() => settling.changed(&path, Instant::now()),
            _ = look.tick(), if settling.is_waiting() => {
                for plugin in settling.settled(Instant::now(), Fingerprint::of) {
                    tracing::info!(plugin = %plugin, "plugin files changed on disk; reloading it");
                    request_reload(&shared, plugin).await;
                }
            }
            Ok(()) = plan_changes.changed() => {
                follow_plan(&shared, &mut watcher, &mut settling, &mut directories);
            }
        }
    }
}

/// Points the watcher at the files of the plan as it is now, keeping what
/// was last acted on for files still watched.
fn follow_plan(
    shared: &Shared,
    watcher: &mut notify::RecommendedWatcher,
    settling: &mut Settling,
    directories: &mut Vec<PathBuf>,
) {
    let mut next = Settling::default();
    for definition in &shared.plan().plugins {
        let name = &definition.spec.name;
        let binary = find_executable(&definition.spec.command);
        let mut files = vec![(binary, true)];
        if definition.origin.line.is_none() {
            files.push((PathBuf::from(&definition.origin.file), false));
        }
        for (path, is_binary) in files {
            let acted_on = settling
                .watched
                .get(&path)
                .map_or_else(|| Fingerprint::of(&path), |watched| watched.acted_on);
            next.watch(path, name, is_binary, acted_on);
        }
    }
    next.unsettled = std::mem::take(&mut settling.unsettled);
    *settling = next;

    let mut wanted: Vec<PathBuf> = settling
        .watched
        .keys()
        .filter_map(|path| path.parent().map(Path::to_owned))
        .filter(|dir| dir.is_absolute())
        .collect();
    wanted.sort();
    wanted.dedup();
    for dir in directories.iter().filter(|dir| !wanted.contains(dir)) {
        let _ = watcher.unwatch(dir);
    }
    for dir in wanted.iter().filter(|dir| !directories.contains(dir)) {
        if let Err(err) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), %err, "cannot watch a plugin directory");
        }
    }
    *directories = wanted;
}

/// Asks the main loop to reload `plugin`, as `aurora reload PLUGIN` does,
/// and logs the outcome.
async fn request_reload(shared: &Shared, plugin: String) {
    let (reply, outcome) = oneshot::channel();
    let command = Command::Reload {
        plugin: Some(plugin.clone()),
        reply,
    };
    if shared.commands.send(command).await.is_err() {
        return;
    }
    match outcome.await {
        Ok(Ok(_)) => tracing::info!(plugin = %plugin, "reloaded after a change on disk"),
        Ok(Err(err)) => {
            tracing::error!(plugin = %plugin, reason = %err.message, "reload after a change on disk failed")
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(len: u64, modified_ns: i128, executable: bool) -> Fingerprint {
        Fingerprint {
            len,
            modified_ns,
            inode: 7,
            executable,
        }
    }

    #[test]
    fn a_file_is_acted_on_once_it_has_settled_and_is_executable() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let path = PathBuf::from("/opt/p/bin");
        let mut settling = Settling::default();
        settling.watch(path.clone(), "p", true, Some(print(10, 1, true)));

        // Being written: it grows between looks.
        settling.changed(&path, at(0));
        assert!(
            settling
                .settled(at(0), |_| Some(print(20, 2, false)))
                .is_empty()
        );
        assert!(
            settling
                .settled(at(100), |_| Some(print(30, 3, false)))
                .is_empty()
        );
        // Complete but not yet executable: not started half-deployed.
        assert!(
            settling
                .settled(at(400), |_| Some(print(30, 3, false)))
                .is_empty()
        );
        assert!(settling.is_waiting());
        // chmod +x changes nothing a fingerprint of content sees but the
        // mode; once that has held for the settle time it counts.
        assert!(
            settling
                .settled(at(450), |_| Some(print(30, 3, true)))
                .is_empty()
        );
        assert!(
            settling
                .settled(at(500), |_| Some(print(30, 3, true)))
                .is_empty()
        );
        assert_eq!(
            settling.settled(at(650), |_| Some(print(30, 3, true))),
            ["p"]
        );
        assert!(!settling.is_waiting());

        // Another event for the same content does nothing.
        settling.changed(&path, at(700));
        assert!(
            settling
                .settled(at(700), |_| Some(print(30, 3, true)))
                .is_empty()
        );
        assert!(
            settling
                .settled(at(950), |_| Some(print(30, 3, true)))
                .is_empty()
        );
        assert!(!settling.is_waiting());
    }

    #[test]
    fn a_vanished_file_is_waited_for_then_forgotten() {
        let start = Instant::now();
        let path = PathBuf::from("/opt/p/plugin.toml");
        let mut settling = Settling::default();
        settling.watch(path.clone(), "p", false, Some(print(1, 1, false)));
        settling.changed(&path, start);
        assert!(settling.settled(start, |_| None).is_empty());
        assert!(settling.is_waiting());
        let later = start + VANISHED_PATIENCE + Duration::from_secs(1);
        assert!(settling.settled(later, |_| None).is_empty());
        assert!(!settling.is_waiting());
    }

    #[test]
    fn unwatched_paths_and_manifests_that_need_no_mode() {
        let start = Instant::now();
        let mut settling = Settling::default();
        settling.changed(Path::new("/elsewhere"), start);
        assert!(!settling.is_waiting());

        let manifest = PathBuf::from("/opt/p/plugin.toml");
        settling.watch(manifest.clone(), "p", false, None);
        settling.changed(&manifest, start);
        let look = |_: &Path| Some(print(5, 5, false));
        assert!(settling.settled(start, look).is_empty());
        assert_eq!(settling.settled(start + SETTLE_TIME, look), ["p"]);
    }
}
