//! What the harness reads about processes: resident and proportional memory
//! from `/proc`, CPU time from the kernel's own accounting, and the
//! open-file limit it raises before starting a thousand plugins.

use std::io;
use std::time::Duration;

use anyhow::Context as _;

/// Raises the soft limit on open files to the hard limit and returns it.
///
/// Each plugin costs the supervisor about four descriptors (its socket and
/// the pipes for its stdout and stderr), so a thousand plugins need more than
/// the usual soft limit of 1024.
///
/// # Errors
///
/// When the kernel refuses either call.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// The harness's own resident set size, in KiB (`VmRSS` in
/// `/proc/self/status`).
///
/// # Errors
///
/// When the file cannot be read or lacks the line.
pub fn own_rss_kib() -> anyhow::Result<u64> {
    kib_field("/proc/self/status", "VmRSS:")
}

/// A process's proportional set size: its private pages plus its share of
/// the pages it has in common with other processes.
#[derive(Debug, Clone, Copy)]
pub struct Pss {
    pub total_kib: u64,
    /// The anonymous part (heap, stacks, runtime state): what each further
    /// copy of the same program adds, since its code pages are shared.
    pub anonymous_kib: u64,
}

/// The proportional set size of process `pid`, from
/// `/proc/PID/smaps_rollup`.
///
/// # Errors
///
/// When the file cannot be read or lacks the lines.
pub fn pss(pid: u32) -> anyhow::Result<Pss> {
    let path = format!("/proc/{pid}/smaps_rollup");
    Ok(Pss {
        total_kib: kib_field(&path, "Pss:")?,
        anonymous_kib: kib_field(&path, "Pss_Anon:")?,
    })
}

/// The CPU time the harness has used so far, user and system, across all of
/// its threads.
///
/// This asks `getrusage` rather than reading `/proc/self/stat`, whose clock
/// ticks are 10 ms long: over a one-second sample that would be a resolution
/// of one percent of a core, too coarse for a figure whose target is zero.
pub fn own_cpu_time() -> Duration {
    // SAFETY: rusage is plain old data, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into the struct it is given, and
    // RUSAGE_SELF cannot fail.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let to_duration = |time: libc::timeval| {
        Duration::from_secs(time.tv_sec as u64) + Duration::from_micros(time.tv_usec as u64)
    };
    to_duration(usage.ru_utime) + to_duration(usage.ru_stime)
}

/// Reads a `Name:   1234 kB` line out of a `/proc` file.
fn kib_field(path: &str, name: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let line = text
        .lines()
        .find(|line| line.starts_with(name))
        .with_context(|| format!("{path} has no {name} line"))?;
    let value = line[name.len()..].trim().trim_end_matches("kB").trim();
    value
        .parse()
        .with_context(|| format!("{path}: cannot read {name} {value:?} as a number of KiB"))
}
