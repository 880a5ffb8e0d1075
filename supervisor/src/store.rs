//! The version store: a copy of every plugin binary the supervisor has run,
//! so that a rollback never depends on the old file still being on disk.
//!
//! Each plugin has a directory of its own, and each version a directory
//! named after the first 16 hex digits of the binary's BLAKE3 hash:
//!
//! ```text
//! <root>/<plugin>/active                     the hash of the version running now
//! <root>/<plugin>/<hash16>/<file name>       the binary, which is what runs
//! <root>/<plugin>/<hash16>/entry.json        version, hash, source, manifest, times
//! ```
//!
//! A binary is admitted (hashed and copied) when a plugin starts for the
//! first time and on every reload; restarts after a crash run the copy of
//! the version already running. Its semver version is known only once a
//! process of it said hello, and is recorded then. Only the `keep` most
//! recently active versions of a plugin are kept; the active one never goes.
//!
//! The copies are written to a temporary name and renamed into place, so a
//! half-copied binary is never run, and they are never written again. The
//! store lives outside every plugin's writable state directory (the daemon
//! puts it in `<state_dir>/.versions`, a name no plugin can take), so a
//! plugin cannot change the versions it will be rolled back to.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How many versions of each plugin a store keeps unless told otherwise.
pub const DEFAULT_KEEP: usize = 5;

/// The name of the file holding the active version's hash.
const ACTIVE_FILE: &str = "active";

/// The name of each version's description.
const ENTRY_FILE: &str = "entry.json";

/// How long after its last change a file's stamp is trusted to tell its
/// content.
const RACY_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

/// How many hex digits of the hash name a version's directory.
const DIRECTORY_DIGITS: usize = 16;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the plugin binary {path}: {source}")]
    ReadBinary { path: PathBuf, source: io::Error },
    #[error("cannot write {path} in the version store: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Where versions are kept, and how many of each plugin.
#[derive(Debug, Clone)]
pub struct VersionStore {
    root: PathBuf,
    keep: usize,
    /// The hash each source file had when last read, with what identified
    /// the file then; an unchanged file is not read again.
    hashed: Arc<Mutex<HashMap<PathBuf, (FileStamp, String)>>>,
}

/// What changes whenever a file's content may have: its device and inode
/// (a rename into place), size, and modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        })
    }
}

/// One stored version of a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVersion {
    /// The semver version its processes reported; `None` until one said
    /// hello.
    pub version: Option<String>,
    /// The BLAKE3 hash of the binary, in hex.
    pub hash: String,
    /// The stored copy, which is what runs.
    pub binary: PathBuf,
    /// Where the binary was copied from.
    pub source: PathBuf,
    /// The text of the manifest that defined the plugin when it was stored,
    /// when it came from one.
    pub manifest: Option<String>,
    /// When it was stored, and when it last became the running version, in
    /// milliseconds since the Unix epoch.
    pub added_unix_ms: u64,
    pub active_unix_ms: u64,
}

impl VersionStore {
    /// A store under `root` keeping `keep` versions of each plugin (at least
    /// one). Nothing is created until a binary is admitted.
    pub fn new(root: impl Into<PathBuf>, keep: usize) -> VersionStore {
        VersionStore {
            root: root.into(),
            keep: keep.max(1),
            hashed: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn plugin_dir(&self, plugin: &str) -> PathBuf {
        self.root.join(plugin)
    }

    /// Hashes the binary at `source` and copies it into the store unless
    /// that version is there already. `manifest` is the file that defined
    /// the plugin, kept for the record.
    ///
    /// Blocking: call it from a blocking thread.
    ///
    /// # Errors
    ///
    /// When the binary cannot be read or the copy cannot be written.
    pub fn admit(
        &self,
        plugin: &str,
        source: &Path,
        manifest: Option<&Path>,
    ) -> Result<StoredVersion, StoreError> {
        let read_error = |err| StoreError::ReadBinary {
            path: source.to_owned(),
            source: err,
        };

        // Most reloads run a binary that was hashed before: known by its
        // stamp, it is not read again.
        let stamp = FileStamp::of(source);
        let remembered = self
            .hashed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(source)
            .filter(|(known, _)| Some(*known) == stamp)
            .map(|(_, hash)| hash.clone());
        let hash = match remembered {
            Some(hash) => hash,
            None => {
                let file = std::fs::File::open(source).map_err(read_error)?;
                let mut hasher = blake3::Hasher::new();
                hasher.update_reader(file).map_err(read_error)?;
                hasher.finalize().to_hex().to_string()
            }
        };
        if let Some(stored) = self.stored(plugin, &hash) {
            self.remember(source, stamp, &hash);
            return Ok(stored);
        }

        // New: store the bytes read now, named by their own hash, in case
        // the file changed since it was hashed.
        let bytes = std::fs::read(source).map_err(read_error)?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        if let Some(stored) = self.stored(plugin, &hash) {
            return Ok(stored);
        }
        let dir = self.plugin_dir(plugin).join(&hash[..DIRECTORY_DIGITS]);
        create_dir(&dir)?;
        let file_name = source
            .file_name()
            .map_or_else(|| plugin.into(), ToOwned::to_owned);
        let binary = dir.join(file_name);
        write_atomically(&binary, &bytes, 0o755)?;
        let now = unix_ms();
        let stored = StoredVersion {
            version: None,
            hash,
            binary,
            source: source.to_owned(),
            manifest: manifest.and_then(|path| std::fs::read_to_string(path).ok()),
            added_unix_ms: now,
            active_unix_ms: now,
        };
        write_entry(&dir, &stored)?;
        if FileStamp::of(source) == stamp {
            self.remember(source, stamp, &stored.hash);
        }
        Ok(stored)
    }

    /// The stored version with `hash`, if its copy is whole and present.
    fn stored(&self, plugin: &str, hash: &str) -> Option<StoredVersion> {
        let dir = self.plugin_dir(plugin).join(&hash[..DIRECTORY_DIGITS]);
        read_entry(&dir).filter(|stored| stored.hash == hash && stored.binary.is_file())
    }

    /// Remembers the hash of `source` for as long as its stamp holds. A
    /// file modified within the last [`RACY_WINDOW`] is not remembered:
    /// timestamps are coarse, so a same-sized rewrite in that window could
    /// keep its stamp (git's "racily clean" problem).
    fn remember(&self, source: &Path, stamp: Option<FileStamp>, hash: &str) {
        let Some(stamp) = stamp else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let settled_before = now.as_secs() as i64 - RACY_WINDOW.as_secs() as i64;
        if stamp.modified.0 >= settled_before || stamp.changed.0 >= settled_before {
            return;
        }
        self.hashed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(source.to_owned(), (stamp, hash.to_owned()));
    }

    /// Records that the version with `hash` now runs and reported `version`,
    /// then forgets the oldest versions beyond what the store keeps.
    ///
    /// Blocking: call it from a blocking thread.
    ///
    /// # Errors
    ///
    /// When the entry or the active marker cannot be written.
    pub fn activate(&self, plugin: &str, hash: &str, version: &str) -> Result<(), StoreError> {
        let plugin_dir = self.plugin_dir(plugin);
        let dir = plugin_dir.join(&hash[..DIRECTORY_DIGITS.min(hash.len())]);
        if let Some(mut stored) = read_entry(&dir) {
            // Later than every other activation, even within a millisecond,
            // so the order of the list is the order of the swaps.
            let latest = self
                .list(plugin)
                .iter()
                .map(|other| other.active_unix_ms)
                .max()
                .unwrap_or(0);
            stored.version = Some(version.to_owned());
            stored.active_unix_ms = unix_ms().max(latest + 1);
            write_entry(&dir, &stored)?;
        }
        write_atomically(&plugin_dir.join(ACTIVE_FILE), hash.as_bytes(), 0o644)?;
        self.prune(plugin, hash);
        Ok(())
    }

    /// The hash of the version that ran last.
    pub fn active(&self, plugin: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.plugin_dir(plugin).join(ACTIVE_FILE)).ok()?;
        Some(text.trim().to_owned())
    }

    /// Every stored version of `plugin`, the most recently active first.
    pub fn list(&self, plugin: &str) -> Vec<StoredVersion> {
        let Ok(entries) = std::fs::read_dir(self.plugin_dir(plugin)) else {
            return Vec::new();
        };
        let mut versions: Vec<StoredVersion> = entries
            .filter_map(|entry| read_entry(&entry.ok()?.path()))
            .filter(|stored| stored.binary.is_file())
            .collect();
        versions.sort_by(|a, b| {
            (b.active_unix_ms, b.added_unix_ms).cmp(&(a.active_unix_ms, a.added_unix_ms))
        });
        versions
    }

    /// Removes the least recently active versions beyond `keep`, never the
    /// one with hash `active`.
    fn prune(&self, plugin: &str, active: &str) {
        let versions = self.list(plugin);
        let doomed = versions
            .iter()
            .filter(|stored| stored.hash != active)
            .skip(self.keep.saturating_sub(1));
        for stored in doomed {
            if let Some(dir) = stored.binary.parent() {
                tracing::info!(
                    plugin,
                    version = stored.version.as_deref().unwrap_or("unknown"),
                    hash = &stored.hash[..12],
                    "forgetting an old stored version"
                );
                // A process still running it keeps its copy until it exits.
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;

    // Readable and searchable by all: a plugin may run as another user and
    // must be able to execute its stored binary.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| StoreError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Writes `bytes` to a temporary file beside `path` and renames it into
/// place, so readers see the old file or the whole new one.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let write_error = |source| StoreError::Write {
        path: path.to_owned(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.partial", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(write_error)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(write_error)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(write_error)
}

fn read_entry(dir: &Path) -> Option<StoredVersion> {
    let text = std::fs::read_to_string(dir.join(ENTRY_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_entry(dir: &Path, stored: &StoredVersion) -> Result<(), StoreError> {
    let text = serde_json::to_vec_pretty(stored).expect("a stored version always serializes");
    write_atomically(&dir.join(ENTRY_FILE), &text, 0o644)
}

fn unix_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aurora-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_same_binary_is_stored_once_and_each_new_one_apart() {
        let dir = scratch("once");
        let store = VersionStore::new(dir.join("store"), 5);
        let source = dir.join("plugin");
        std::fs::write(&source, b"first build").unwrap();

        let first = store.admit("p", &source, None).unwrap();
        let again = store.admit("p", &source, None).unwrap();
        assert_eq!(first, again);
        assert_eq!(std::fs::read(&first.binary).unwrap(), b"first build");
        assert_eq!(first.binary.file_name().unwrap(), "plugin");

        std::fs::write(&source, b"second build").unwrap();
        let second = store.admit("p", &source, None).unwrap();
        assert_ne!(first.hash, second.hash);
        // The first copy is untouched by the new file at the source path.
        assert_eq!(std::fs::read(&first.binary).unwrap(), b"first build");
        assert_eq!(store.list("p").len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn activation_records_the_version_and_keeps_the_newest() {
        let dir = scratch("keep");
        let store = VersionStore::new(dir.join("store"), 2);
        let source = dir.join("plugin");
        let mut hashes = Vec::new();
        for n in 0..4 {
            std::fs::write(&source, format!("build {n}")).unwrap();
            let stored = store.admit("p", &source, None).unwrap();
            store
                .activate("p", &stored.hash, &format!("1.0.{n}"))
                .unwrap();
            hashes.push(stored.hash);
        }

        let listed = store.list("p");
        let versions: Vec<_> = listed.iter().map(|s| s.version.as_deref()).collect();
        assert_eq!(versions, [Some("1.0.3"), Some("1.0.2")]);
        assert_eq!(store.active("p").as_deref(), Some(hashes[3].as_str()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_binary_names_its_path() {
        let store = VersionStore::new(std::env::temp_dir().join("aurora-store-unused"), 5);
        let err = store
            .admit("p", Path::new("/nonexistent/plugin"), None)
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/plugin"), "{err}");
    }
}
