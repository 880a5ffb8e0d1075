//! The sandbox a plugin runs in, enforced by the kernel.
//!
//! Everything that allocates, opens paths or looks up users happens here, in
//! the supervisor, before the fork ([`Prepared::prepare`]). The child then
//! runs [`Prepared::child_setup`]'s closure between `fork` and `exec`, where
//! only async-signal-safe system calls are allowed, in this order:
//!
//! 1. join the plugin's cgroups (writing `0` to each `cgroup.procs`), but
//!    for the v2 one, which the child is normally started inside;
//! 2. set the rlimits;
//! 3. as root: empty the capability bounding set, then switch to the
//!    configured user and group, or stay root with no capabilities;
//! 4. set `no_new_privs`, so nothing the plugin executes can gain privileges;
//! 5. apply the Landlock ruleset (files, TCP ports, signal and socket scopes);
//! 6. mark every descriptor above the plugin's socket close-on-exec.
//!
//! What the kernel cannot enforce is reported in [`Prepared::gaps`]; with
//! `enforce = "strict"` any gap refuses the start instead.

mod cgroup;
pub(crate) mod guardian;
mod landlock;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};

pub(crate) use cgroup::PluginCgroup;

use crate::spec::{Enforcement, PluginSpec};

/// Why a sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SandboxError {
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("cannot look up user or group: {0}")]
    Lookup(#[source] nix::Error),
    #[error("cannot join the plugin's cgroup: {0}")]
    Cgroup(#[source] io::Error),
    #[error("enforce = \"strict\" but the kernel cannot enforce: {0}")]
    Strict(String),
}

/// One rlimit: resource, soft and hard value.
type Rlimit = (libc::__rlimit_resource_t, libc::rlim_t, libc::rlim_t);

/// Everything the child needs, made ready before the fork.
pub(crate) struct Prepared {
    rlimits: Vec<Rlimit>,
    /// `(uid, gid)` to switch to.
    credentials: Option<(libc::uid_t, libc::gid_t)>,
    /// As root, the highest capability number the kernel knows: every one
    /// up to it is dropped. `None` when the supervisor is not root.
    drop_capabilities: Option<u32>,
    ruleset: Option<OwnedFd>,
    /// The v2 cgroup's directory, to start the child in.
    pub(crate) unified_dir: Option<OwnedFd>,
    /// The v2 cgroup's `cgroup.procs`, for when the child could not be
    /// started inside it.
    unified_procs: Option<OwnedFd>,
    /// The v1 cgroups' `cgroup.procs`.
    cgroup_procs: Vec<OwnedFd>,
    /// The plugin's cgroups, for killing and removal after it exits.
    pub(crate) cgroup: Option<Arc<PluginCgroup>>,
    /// What the kernel cannot enforce, in words.
    pub(crate) gaps: Vec<String>,
}

impl Prepared {
    /// Builds the sandbox for `spec`.
    ///
    /// # Errors
    ///
    /// For an unknown user or group, a ruleset the kernel refuses, a cgroup
    /// that cannot be joined, or any gap under `enforce = "strict"`.
    pub(crate) fn prepare(spec: &PluginSpec) -> Result<Prepared, SandboxError> {
        guardian::ensure_started();
        let permissions = &spec.permissions;
        let limits = &spec.limits;
        let is_root = nix::unistd::geteuid().is_root();

        let rules = landlock::build(&spec.command, permissions, permissions.enforce)?;
        let mut gaps = rules.gaps;

        let credentials = match (&permissions.user, is_root) {
            (Some(user), true) => Some(lookup_credentials(user, permissions.group.as_deref())?),
            (Some(user), false) => {
                gaps.push(format!(
                    "running as user {user:?} (the supervisor is not root)"
                ));
                None
            }
            (None, _) => None,
        };
        let unprivileged_user = credentials.is_some_and(|(uid, _)| uid != 0);

        let (cgroup, cgroup_gaps) = PluginCgroup::create(&spec.name, limits);
        gaps.extend(cgroup_gaps);
        let (unified_dir, cgroup_procs) = match &cgroup {
            Some(cgroup) => (
                cgroup.open_unified_dir().map_err(SandboxError::Cgroup)?,
                cgroup.open_procs().map_err(SandboxError::Cgroup)?,
            ),
            None => (None, Vec::new()),
        };
        let mut cgroup_procs = cgroup_procs
            .into_iter()
            .map(above_channel)
            .collect::<io::Result<Vec<_>>>()
            .map_err(SandboxError::Cgroup)?;
        // open_procs lists the v2 cgroup first.
        let unified_procs = unified_dir.as_ref().map(|_| cgroup_procs.remove(0));
        let ruleset = rules
            .ruleset
            .map(above_channel)
            .transpose()
            .map_err(SandboxError::Cgroup)?;

        let mut rlimits: Vec<Rlimit> = Vec::new();
        if let Some(bytes) = limits.memory {
            rlimits.push((libc::RLIMIT_AS, bytes, bytes));
        }
        if let Some(seconds) = limits.cpu_seconds {
            rlimits.push((libc::RLIMIT_CPU, seconds, seconds.saturating_add(1)));
        }
        if let Some(files) = limits.open_files {
            let files = files.min(current_hard_limit(libc::RLIMIT_NOFILE));
            rlimits.push((libc::RLIMIT_NOFILE, files, files));
        }
        if let Some(bytes) = limits.file_size {
            rlimits.push((libc::RLIMIT_FSIZE, bytes, bytes));
        }
        if !limits.core_dumps {
            rlimits.push((libc::RLIMIT_CORE, 0, 0));
        }
        // RLIMIT_NPROC counts every process of the user, so it only means
        // "this plugin's processes" for a user of the plugin's own.
        if let (Some(processes), true) = (limits.processes, unprivileged_user) {
            rlimits.push((libc::RLIMIT_NPROC, processes, processes));
        }

        if permissions.enforce == Enforcement::Strict && !gaps.is_empty() {
            return Err(SandboxError::Strict(gaps.join("; ")));
        }
        Ok(Prepared {
            rlimits,
            credentials,
            drop_capabilities: is_root.then(last_capability),
            ruleset,
            unified_dir,
            unified_procs,
            cgroup_procs,
            cgroup: cgroup.map(Arc::new),
            gaps,
        })
    }

    /// The closure to run in the child between `fork` and `exec`. Its
    /// argument says whether the child was started inside its v2 cgroup
    /// already; if not, it joins it like the v1 ones.
    ///
    /// The descriptors it refers to belong to `self`, which must outlive the
    /// spawn.
    pub(crate) fn child_setup(&self) -> impl FnMut(bool) -> io::Result<()> + Send + 'static {
        let rlimits = self.rlimits.clone();
        let credentials = self.credentials;
        let drop_capabilities = self.drop_capabilities;
        let ruleset = self.ruleset.as_ref().map(|fd| fd.as_raw_fd());
        let unified_procs = self.unified_procs.as_ref().map(|fd| fd.as_raw_fd());
        let cgroup_procs: Vec<i32> = self.cgroup_procs.iter().map(|fd| fd.as_raw_fd()).collect();

        // SAFETY (whole closure): it runs in the forked child before exec and
        // makes only async-signal-safe system calls, reading memory that was
        // allocated before the fork; it allocates nothing itself, and its
        // errors are raw OS error numbers.
        move |in_unified| unsafe {
            let unified_procs = unified_procs.filter(|_| !in_unified);
            for &fd in unified_procs.iter().chain(&cgroup_procs) {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            for &(resource, soft, hard) in &rlimits {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(last) = drop_capabilities {
                for capability in 0..=last {
                    libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0);
                }
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                );
            }
            // Raw system calls: glibc's wrappers would also change the
            // credentials of every other thread they believe exists, and the
            // child, cloned without glibc's fork, still lists the
            // supervisor's threads; it would wait for them forever. The
            // child has one thread, which is all the kernel changes.
            if let Some((uid, gid)) = credentials
                && (libc::syscall(libc::SYS_setgroups, 1, &gid) != 0
                    || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            if drop_capabilities.is_some() && credentials.is_none_or(|(uid, _)| uid == 0) {
                clear_capabilities()?;
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = ruleset
                && libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0
            {
                return Err(io::Error::last_os_error());
            }
            mark_descriptors_close_on_exec();
            Ok(())
        }
    }
}

/// The environment a plugin starts with: the variables its spec passes
/// through from the supervisor's, then its own.
pub(crate) fn environment(spec: &PluginSpec) -> Vec<(OsString, OsString)> {
    let passed = spec
        .permissions
        .pass_env
        .iter()
        .filter_map(|name| std::env::var_os(name).map(|value| (OsString::from(name), value)));
    let own = spec
        .env
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
    passed.chain(own).collect()
}

/// Moves `fd` above the plugin's socket number: the child places its socket
/// at [`aurora_protocol::CHANNEL_FD`] before the sandbox is applied, which
/// would silently replace a sandbox descriptor that happened to sit there.
pub(crate) fn above_channel(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > aurora_protocol::CHANNEL_FD {
        return Ok(fd);
    }
    let floor = aurora_protocol::CHANNEL_FD + 1;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))
        .map(|raw| {
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing
            // else owns.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
        })
        .map_err(io::Error::from)
}

fn lookup_credentials(
    user: &str,
    group: Option<&str>,
) -> Result<(libc::uid_t, libc::gid_t), SandboxError> {
    let found = nix::unistd::User::from_name(user).map_err(SandboxError::Lookup)?;
    let found = found.ok_or_else(|| SandboxError::UnknownUser(user.to_owned()))?;
    let gid = match group {
        None => found.gid,
        Some(group) => {
            let named = nix::unistd::Group::from_name(group).map_err(SandboxError::Lookup)?;
            named
                .ok_or_else(|| SandboxError::UnknownGroup(group.to_owned()))?
                .gid
        }
    };
    Ok((found.uid.as_raw(), gid.as_raw()))
}

/// The highest capability number the running kernel knows, read once.
/// Without `/proc`, 63 covers every kernel; dropping a capability past the
/// last is a harmless EINVAL.
fn last_capability() -> u32 {
    static LAST: OnceLock<u32> = OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(63)
            .min(63)
    })
}

fn current_hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `limit`.
    match unsafe { libc::getrlimit(resource, &mut limit) } {
        0 => limit.rlim_max,
        _ => u64::MAX,
    }
}

/// Clears the effective, permitted and inheritable capability sets.
///
/// # Safety
///
/// Async-signal-safe: one system call on stack memory.
unsafe fn clear_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads the header and two data structs, which live on
    // this stack frame for the duration of the call.
    match unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Marks every descriptor above the plugin's socket close-on-exec, so the
/// plugin inherits nothing but stdio and its channel.
///
/// # Safety
///
/// Async-signal-safe: system calls only.
unsafe fn mark_descriptors_close_on_exec() {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    let first = aurora_protocol::CHANNEL_FD as u32 + 1;
    // SAFETY: close_range with CLOEXEC only sets flags on this process's
    // descriptors.
    let marked =
        unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if marked != 0 {
        // Kernels before 5.11: mark them one at a time up to a sane bound.
        for fd in first as i32..4096 {
            // SAFETY: as above; unused numbers fail with EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}
