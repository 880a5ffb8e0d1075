//! Landlock rulesets: which files a plugin may read, write and execute, and
//! which TCP ports it may connect to or bind.
//!
//! The ruleset is built in the supervisor, before the fork, because building
//! it opens paths and allocates. The child only hands the finished ruleset's
//! descriptor to `landlock_restrict_self`, which is a single system call.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, Ruleset,
    RulesetAttr, RulesetCreatedAttr, Scope, path_beneath_rules,
};

use crate::spec::{Enforcement, Permissions};

/// The newest Landlock ABI this code knows how to use: file access rights up
/// to ioctl on devices (5), TCP (4) and scoping of signals and abstract
/// sockets (6).
const WANTED: ABI = ABI::V6;

/// Paths every dynamically linked program needs to start and run.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
];

/// Where the dynamic loader and shared libraries live.
const SYSTEM_EXECUTE: &[&str] = &["/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64"];

/// A ruleset ready to be applied, and what the kernel could not enforce.
#[derive(Debug)]
pub(crate) struct LandlockRules {
    /// `None` when the kernel has no Landlock at all.
    pub(crate) ruleset: Option<OwnedFd>,
    /// Parts of the requested sandbox the kernel cannot enforce, in words.
    pub(crate) gaps: Vec<String>,
}

/// Why a ruleset could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the Landlock ruleset: {0}")]
pub(crate) struct LandlockError(String);

/// The Landlock ABI version the running kernel offers, 0 when none.
pub(crate) fn kernel_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag this
    // system call only reports the ABI version; it touches no memory.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(version).unwrap_or(0).max(0)
}

/// What the requested sandbox loses on a kernel with Landlock ABI `abi`.
pub(crate) fn gaps_for(abi: i32) -> Vec<String> {
    let mut gaps = Vec::new();
    if abi < 1 {
        gaps.push("file system access (the kernel has no Landlock)".to_owned());
    } else {
        if abi < 3 {
            gaps.push("truncating files outside the write paths (needs Landlock ABI 3)".to_owned());
        }
        if abi < 5 {
            gaps.push("ioctl on devices (needs Landlock ABI 5)".to_owned());
        }
    }
    if abi < 4 {
        gaps.push("TCP connect and bind rules (needs Landlock ABI 4)".to_owned());
    }
    if abi < 6 {
        gaps.push(
            "signals and abstract sockets outside the sandbox (needs Landlock ABI 6)".to_owned(),
        );
    }
    gaps
}

/// Builds the ruleset for a plugin whose executable is `command`.
///
/// # Errors
///
/// When the kernel cannot enforce all of it and `enforcement` is strict, or
/// when the kernel refuses a rule.
pub(crate) fn build(
    command: &Path,
    permissions: &Permissions,
    enforcement: Enforcement,
) -> Result<LandlockRules, LandlockError> {
    let abi = kernel_abi();
    let gaps = gaps_for(abi);
    if enforcement == Enforcement::Strict && !gaps.is_empty() {
        return Err(LandlockError(format!(
            "enforce = \"strict\" but the kernel cannot enforce: {}",
            gaps.join("; ")
        )));
    }
    if abi < 1 {
        return Ok(LandlockRules {
            ruleset: None,
            gaps,
        });
    }

    let err = |e: landlock::RulesetError| LandlockError(e.to_string());
    let command = command
        .canonicalize()
        .unwrap_or_else(|_| command.to_owned());
    let read: Vec<PathBuf> = SYSTEM_READ
        .iter()
        .map(PathBuf::from)
        .chain(permissions.read.iter().cloned())
        .collect();
    let execute: Vec<PathBuf> = SYSTEM_EXECUTE
        .iter()
        .map(PathBuf::from)
        .chain(permissions.execute.iter().cloned())
        .chain(std::iter::once(command))
        .collect();

    // Writing includes reading and everything else but executing, which
    // stays limited to the execute paths.
    let write_access = AccessFs::from_all(WANTED) & !BitFlags::from(AccessFs::Execute);

    // Best effort at the crate level: rights the kernel lacks are dropped
    // instead of failing, and the gaps computed above say which.
    let ruleset =
        Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(WANTED))
            .map_err(err)?
            .handle_access(AccessNet::from_all(WANTED))
            .map_err(err)?
            .scope(Scope::from_all(WANTED))
            .map_err(err)?
            .create()
            .map_err(err)?
            .add_rules(path_beneath_rules(
                &read,
                AccessFs::ReadFile | AccessFs::ReadDir,
            ))
            .map_err(err)?
            .add_rules(path_beneath_rules(&permissions.write, write_access))
            .map_err(err)?
            .add_rules(path_beneath_rules(
                &execute,
                AccessFs::Execute | AccessFs::ReadFile,
            ))
            .map_err(err)?
            .add_rules(permissions.connect_tcp.iter().map(|&port| {
                Ok::<_, landlock::RulesetError>(NetPort::new(port, AccessNet::ConnectTcp))
            }))
            .map_err(err)?
            .add_rules(permissions.bind_tcp.iter().map(|&port| {
                Ok::<_, landlock::RulesetError>(NetPort::new(port, AccessNet::BindTcp))
            }))
            .map_err(err)?;
    Ok(LandlockRules {
        ruleset: Option::<OwnedFd>::from(ruleset),
        gaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_name_what_older_kernels_miss() {
        assert!(gaps_for(7).is_empty());
        assert!(gaps_for(6).is_empty());
        let v3 = gaps_for(3).join("; ");
        assert!(
            v3.contains("TCP") && v3.contains("ioctl") && v3.contains("signals"),
            "{v3}"
        );
        assert!(gaps_for(0)[0].contains("no Landlock"));
    }

    #[test]
    fn strict_refuses_what_the_kernel_cannot_do() {
        // Only meaningful on a kernel without full support; elsewhere strict
        // must succeed.
        let result = build(
            Path::new("/bin/true"),
            &Permissions::default(),
            Enforcement::Strict,
        );
        match gaps_for(kernel_abi()).is_empty() {
            true => assert!(result.is_ok()),
            false => assert!(result.is_err()),
        }
    }
}
