//! The guardian: a tiny process that kills every plugin when the supervisor
//! dies, even by SIGKILL.
//!
//! `PR_SET_PDEATHSIG` takes care of each plugin's own process, but not of
//! what a plugin started: a grandchild in the plugin's process group, or one
//! that left it with `setsid`. The guardian is forked once, before the first
//! plugin, and blocks reading a pipe whose only writer is the supervisor. The
//! supervisor tells it which process groups are live; when the pipe reaches
//! end-of-file (the supervisor is gone, however it went) the guardian kills
//! those groups and writes `cgroup.kill` of the supervisor's plugin cgroup
//! parent, which takes every plugin process tree with it, then exits.
//!
//! The guardian runs between `fork` and `_exit` without ever calling `exec`,
//! so it may use only async-signal-safe calls: it reads, kills, writes and
//! exits, with fixed-size buffers on its stack.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Mutex, OnceLock};

use crate::sandbox::cgroup;

/// The most process groups the guardian remembers; beyond that, groups rely
/// on their cgroup alone.
const MAX_GROUPS: usize = 8192;

/// The supervisor's end of the pipe to the guardian, if one could be started.
fn channel() -> Option<&'static Mutex<File>> {
    static CHANNEL: OnceLock<Option<Mutex<File>>> = OnceLock::new();
    CHANNEL
        .get_or_init(|| match start() {
            Ok(file) => Some(Mutex::new(file)),
            Err(err) => {
                tracing::warn!(%err, "cannot start the guardian; if aurora is killed outright, \
                    processes its plugins started may survive it");
                None
            }
        })
        .as_ref()
}

/// Starts the guardian if it is not running yet.
pub(crate) fn ensure_started() {
    let _ = channel();
}

/// Tells the guardian that process group `group` is live.
pub(crate) fn track(group: i32) {
    send(group);
}

/// Tells the guardian that process group `group` is gone.
pub(crate) fn untrack(group: i32) {
    send(-group);
}

fn send(value: i32) {
    let Some(channel) = channel() else {
        return;
    };
    let mut file = channel.lock().unwrap_or_else(|poison| poison.into_inner());
    // Four bytes to a pipe are written atomically; a failure means the
    // guardian died, which the next start of aurora will clean up after.
    let _ = file.write_all(&value.to_le_bytes());
}

fn start() -> std::io::Result<File> {
    // The cgroup parent must exist before the guardian holds its kill file.
    let kill_file = cgroup::roots().unified.as_ref().and_then(|parent| {
        File::options()
            .write(true)
            .open(parent.join("cgroup.kill"))
            .ok()
    });
    let kill_fd = kill_file.as_ref().map_or(-1, |f| f.as_raw_fd());
    // Made before the fork: the guardian cannot allocate.
    let parents: Vec<CString> = cgroup::roots()
        .parents()
        .filter_map(|path| CString::new(path.as_os_str().as_bytes()).ok())
        .collect();
    let parent_pointers: Vec<*const libc::c_char> = parents.iter().map(|p| p.as_ptr()).collect();

    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let read_fd = read_end.as_raw_fd();

    // SAFETY: the child runs only `guardian_main`, which makes nothing but
    // async-signal-safe system calls and never returns.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => unsafe { guardian_main(read_fd, kill_fd, &parent_pointers) },
        pid => {
            tracing::debug!(pid, "guardian started");
            drop(read_end);
            drop(kill_file);
            Ok(File::from(write_end))
        }
    }
}

/// The guardian's whole life.
///
/// # Safety
///
/// Must be called only in a freshly forked child, with `read_fd` the read end
/// of the supervisor's pipe, `kill_fd` a `cgroup.kill` file or -1, and
/// `parents` pointers to the NUL-terminated paths of the plugin cgroup
/// parents, allocated before the fork.
unsafe fn guardian_main(read_fd: i32, kill_fd: i32, parents: &[*const libc::c_char]) -> ! {
    // SAFETY (whole block): every call is an async-signal-safe system call
    // on descriptors and memory this process owns.
    unsafe {
        // Out of the supervisor's process group, so that a Ctrl-C meant for
        // the supervisor does not end the guardian before it is needed.
        libc::setpgid(0, 0);
        for signal in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
        ] {
            libc::signal(signal, libc::SIG_IGN);
        }
        close_all_but(read_fd, kill_fd);

        let mut groups = [0i32; MAX_GROUPS];
        let mut count = 0usize;
        let mut word = [0u8; 4];
        'reading: loop {
            let mut filled = 0;
            while filled < word.len() {
                let n = libc::read(
                    read_fd,
                    word[filled..].as_mut_ptr().cast(),
                    word.len() - filled,
                );
                if n > 0 {
                    filled += n as usize;
                } else if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                } else {
                    break 'reading;
                }
            }
            let value = i32::from_le_bytes(word);
            if value > 0 && count < MAX_GROUPS {
                groups[count] = value;
                count += 1;
            } else if let Some(at) = groups[..count].iter().position(|&g| g == -value) {
                count -= 1;
                groups[at] = groups[count];
            }
        }

        for &group in &groups[..count] {
            libc::kill(-group, libc::SIGKILL);
        }
        if kill_fd >= 0 {
            libc::write(kill_fd, b"1".as_ptr().cast(), 1);
        }
        // After a clean exit every plugin cgroup is gone and the parents are
        // empty; after a crash they are not, and the next start cleans up.
        for &parent in parents {
            libc::rmdir(parent);
        }
        libc::_exit(0)
    }
}

/// Closes every descriptor from 3 up except `keep_a` and `keep_b`, so the
/// guardian holds no copy of the pipe's write end or of any plugin socket.
unsafe fn close_all_but(keep_a: i32, keep_b: i32) {
    let (low, high) = if keep_a < keep_b {
        (keep_a, keep_b)
    } else {
        (keep_b, keep_a)
    };
    let mut start = 3u32;
    for keep in [low, high] {
        if keep < 3 {
            continue;
        }
        let keep = keep as u32;
        if keep > start {
            close_range(start, keep - 1);
        }
        start = keep + 1;
    }
    close_range(start, u32::MAX);
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range only closes descriptors of this process.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if closed != 0 {
        // Kernels before 5.9: close one by one up to a sane bound.
        for fd in first..last.min(65_536) {
            // SAFETY: as above.
            unsafe { libc::close(fd as i32) };
        }
    }
}
