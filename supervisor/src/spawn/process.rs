//! Forking and executing a plugin with `clone3`, and waiting for it through
//! a pidfd.
//!
//! `std::process::Command` forks and then, in the child, runs the setup it is
//! given, which includes writing the child into its cgroups. Moving a
//! process into a v2 cgroup is slow: the kernel waits for an RCU grace
//! period, 0.3 to 0.6 ms on the development machine, a quarter of a whole
//! plugin start. `clone3` with `CLONE_INTO_CGROUP` creates the child inside
//! the cgroup instead, and `CLONE_PIDFD` hands back a descriptor that
//! becomes readable when the child exits, which is all the runtime needs to
//! wait for it.
//!
//! The call is made as a raw system call without `CLONE_VM`, so it behaves
//! like `fork`: the child gets a copy of the address space with only the
//! calling thread. Between the clone and `exec` the child makes only
//! async-signal-safe system calls on memory prepared before the clone, and
//! reports a failure as an errno over a close-on-exec pipe, as `std` does.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock, PoisonError};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::sandbox::above_channel;

/// What the kernel's `struct clone_args` holds, in its order.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;

/// How often, and how far apart, `exec` is retried while the program is
/// busy being written: up to a second in all.
const TEXT_BUSY_RETRIES: u32 = 200;
const TEXT_BUSY_PAUSE_NS: libc::c_long = 5_000_000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Everything the child needs, allocated before the clone.
pub(crate) struct Plan<'a> {
    pub(crate) program: &'a CString,
    /// NUL-terminated pointers into `CString`s that outlive the spawn.
    pub(crate) argv: &'a [*const libc::c_char],
    pub(crate) envp: &'a [*const libc::c_char],
    pub(crate) cwd: Option<&'a CString>,
    /// Descriptors for the child's stdin, stdout and stderr, and for its
    /// channel, each above the channel's number so that placing one cannot
    /// replace another.
    pub(crate) stdio: [RawFd; 3],
    pub(crate) channel: RawFd,
    /// The v2 cgroup to start the child in.
    pub(crate) cgroup_dir: Option<RawFd>,
}

/// Starts `plan.program`. `setup` runs in the child after its descriptors
/// and process group are in place and before `exec`; it gets whether the
/// child was started inside `plan.cgroup_dir`.
///
/// # Safety
///
/// `setup` must make only async-signal-safe calls and must not allocate.
/// The pointers in `plan` must be valid and NUL-terminated.
pub(crate) unsafe fn spawn<F>(plan: &Plan<'_>, mut setup: F) -> io::Result<ChildProcess>
where
    F: FnMut(bool) -> io::Result<()>,
{
    let (error_read, error_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let error_write = above_channel(error_write)?;
    let parent = std::process::id() as libc::pid_t;

    let mut pidfd: RawFd = -1;
    let mut in_cgroup = plan.cgroup_dir.is_some();
    let pid = loop {
        let mut args = CloneArgs {
            flags: CLONE_PIDFD,
            pidfd: &raw mut pidfd as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..CloneArgs::default()
        };
        if let (true, Some(dir)) = (in_cgroup, plan.cgroup_dir) {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = dir as u64;
        }
        // SAFETY: `args` is a valid clone_args of the size given; without
        // CLONE_VM the child runs on its own copy of this stack.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &raw const args,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match pid {
            0 => {
                // SAFETY: in the child; `exec_child` never returns and keeps
                // to async-signal-safe calls, as does `setup`.
                unsafe { exec_child(plan, parent, in_cgroup, &mut setup, error_write.as_raw_fd()) }
            }
            pid if pid > 0 => break pid as libc::pid_t,
            _ => {
                let err = io::Error::last_os_error();
                // A kernel or container that refuses CLONE_INTO_CGROUP: start
                // outside and let the child join, as before it existed.
                let refused = matches!(err.raw_os_error(), Some(libc::EINVAL | libc::E2BIG));
                if in_cgroup && refused {
                    in_cgroup = false;
                    continue;
                }
                if err.raw_os_error() == Some(libc::ENOSYS) {
                    return Err(io::Error::other(
                        "starting a plugin needs clone3 (Linux 5.3 or later)",
                    ));
                }
                return Err(err);
            }
        }
    };
    drop(error_write);
    // SAFETY: clone3 with CLONE_PIDFD wrote a new descriptor that nothing
    // else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut child = ChildProcess::new(pid as u32, pidfd)?;

    // The pipe closes without a word when exec succeeds; otherwise the child
    // sent its errno and exited.
    let mut errno = [0u8; 4];
    let mut reader = std::fs::File::from(error_read);
    let mut read = 0;
    while read < errno.len() {
        match reader.read(&mut errno[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    if read == 0 {
        return Ok(child);
    }
    child.reap_blocking();
    if read < errno.len() {
        return Err(io::Error::other(
            "the child failed before exec without saying why",
        ));
    }
    Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
}

/// The child's side: stdio, process group, signal mask and SIGPIPE, death
/// signal, channel, working directory, `setup`, then `exec`. Any failure is
/// written to `error_fd` as an errno before `_exit(127)`.
///
/// # Safety
///
/// Only to be called in a freshly cloned child.
unsafe fn exec_child<F>(
    plan: &Plan<'_>,
    parent: libc::pid_t,
    in_cgroup: bool,
    setup: &mut F,
    error_fd: RawFd,
) -> !
where
    F: FnMut(bool) -> io::Result<()>,
{
    // SAFETY (whole block): async-signal-safe calls on memory prepared
    // before the clone; errors are raw OS error numbers.
    let result = (|| -> io::Result<()> {
        unsafe {
            for (target, &fd) in plan.stdio.iter().enumerate() {
                if libc::dup2(fd, target as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Rust ignores SIGPIPE and runtimes block signals on their threads;
            // the plugin starts with neither.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor may have died before prctl, and then no death
            // signal will ever come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::dup2(plan.channel, aurora_protocol::CHANNEL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(cwd) = plan.cwd
                && libc::chdir(cwd.as_ptr()) != 0
            {
                return Err(io::Error::last_os_error());
            }
            setup(in_cgroup)?;
            // "Text file busy": some process has the program open for
            // writing. Often that is a sibling forked while this supervisor
            // was writing the file (the version store, or a host building
            // its plugins), which holds a copy of the descriptor until its
            // own exec a moment later. Wait that out rather than fail.
            for _ in 0..TEXT_BUSY_RETRIES {
                libc::execve(
                    plan.program.as_ptr(),
                    plan.argv.as_ptr(),
                    plan.envp.as_ptr(),
                );
                if *libc::__errno_location() != libc::ETXTBSY {
                    break;
                }
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: TEXT_BUSY_PAUSE_NS,
                };
                libc::nanosleep(&pause, std::ptr::null_mut());
            }
            Err(io::Error::last_os_error())
        }
    })();
    let errno = result
        .err()
        .and_then(|err| err.raw_os_error())
        .unwrap_or(libc::EINVAL);
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(error_fd, errno.to_ne_bytes().as_ptr().cast(), 4);
        libc::_exit(127)
    }
}

/// A plugin process, waited for through its pidfd. Dropped unreaped, it is
/// killed and reaped in the background.
#[derive(Debug)]
pub(crate) struct ChildProcess {
    pid: u32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
}

impl ChildProcess {
    /// Takes charge of a child just cloned; if the runtime refuses its
    /// pidfd, the child is killed and reaped before the error is returned.
    fn new(pid: u32, pidfd: OwnedFd) -> io::Result<ChildProcess> {
        // SAFETY: the registration owns the pidfd, which stays open until
        // the registration is dropped.
        match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
            Ok(pidfd) => Ok(ChildProcess {
                pid,
                pidfd: Some(pidfd),
                status: None,
            }),
            Err(refused) => {
                let (pidfd, cause) = refused.into_parts();
                let _ = send_signal(pidfd.as_raw_fd(), libc::SIGKILL);
                let _ = reap(pidfd.as_raw_fd(), 0);
                Err(cause)
            }
        }
    }

    pub(crate) fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to exit and reaps it. Cancel-safe: the status
    /// is kept once read.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            let Some(pidfd) = &self.pidfd else {
                return Err(io::Error::other("the process is gone"));
            };
            let mut ready = pidfd.readable().await?;
            match reap(pidfd.as_raw_fd(), libc::WNOHANG)? {
                Some(status) => self.status = Some(status),
                None => ready.clear_ready(),
            }
        }
    }

    /// Sends SIGKILL, unless the process has been reaped already.
    pub(crate) fn start_kill(&mut self) -> io::Result<()> {
        match (&self.pidfd, self.status) {
            (Some(pidfd), None) => send_signal(pidfd.as_raw_fd(), libc::SIGKILL),
            _ => Ok(()),
        }
    }

    /// Reaps the process, waiting for it to exit; for a child that failed
    /// before exec and exits at once.
    fn reap_blocking(&mut self) {
        if let (Some(pidfd), None) = (&self.pidfd, self.status) {
            self.status = reap(pidfd.as_raw_fd(), 0).ok().flatten();
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.start_kill();
        let Some(pidfd) = self.pidfd.take() else {
            return;
        };
        if let Ok(Some(_)) = reap(pidfd.as_raw_fd(), libc::WNOHANG) {
            return;
        }
        // SIGKILL lands soon, or late for a process stuck in the kernel;
        // either way the reaper collects it without blocking this drop.
        reap_in_background(pidfd.into_inner());
    }
}

/// Hands the exited or dying child behind `pidfd` to the reaper thread,
/// which collects orphans of every runtime, including after it has shut
/// down.
fn reap_in_background(pidfd: OwnedFd) {
    static REAPER: OnceLock<Mutex<mpsc::Sender<OwnedFd>>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (orphans, arrivals) = mpsc::channel();
        let started = std::thread::Builder::new()
            .name("aurora-reaper".into())
            .spawn(move || reap_orphans(&arrivals));
        if let Err(err) = started {
            tracing::error!(%err, "cannot start the reaper thread; killed plugins stay zombies");
        }
        Mutex::new(orphans)
    });
    let reaper = reaper.lock().unwrap_or_else(PoisonError::into_inner);
    let _ = reaper.send(pidfd);
}

/// The reaper thread: waits for orphans to exit and collects them.
fn reap_orphans(arrivals: &mpsc::Receiver<OwnedFd>) {
    /// How often the thread looks for new orphans while some are pending.
    const CHECK_MS: libc::c_int = 100;
    let mut pending: Vec<OwnedFd> = Vec::new();
    loop {
        if pending.is_empty() {
            match arrivals.recv() {
                Ok(pidfd) => pending.push(pidfd),
                Err(mpsc::RecvError) => return,
            }
        }
        pending.extend(arrivals.try_iter());
        let mut polled: Vec<libc::pollfd> = pending
            .iter()
            .map(|pidfd| libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll writes only the revents of the array it is given.
        unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, CHECK_MS) };
        let exited: Vec<bool> = polled.iter().map(|p| p.revents != 0).collect();
        let mut index = 0;
        pending.retain(|pidfd| {
            let done = exited[index] && !matches!(reap(pidfd.as_raw_fd(), libc::WNOHANG), Ok(None));
            index += 1;
            !done
        });
    }
}

/// Collects the exit of the process behind `pidfd`; `None` while it runs
/// (with `WNOHANG`).
fn reap(pidfd: RawFd, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    loop {
        // SAFETY: waitid writes one siginfo_t into `info`.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let waited = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd as libc::id_t,
                &mut info,
                libc::WEXITED | flags,
            )
        };
        if waited != 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid filled in a SIGCHLD siginfo, or left it zeroed.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        // Rebuild the wait status that ExitStatus understands.
        let raw = match info.si_code {
            libc::CLD_EXITED => (status & 0xff) << 8,
            libc::CLD_DUMPED => (status & 0x7f) | 0x80,
            _ => status & 0x7f,
        };
        return Ok(Some(ExitStatus::from_raw(raw)));
    }
}

fn send_signal(pidfd: RawFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with no siginfo reads nothing from memory.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    match sent {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    /// Starts `/bin/sh -c script` with every standard descriptor and the
    /// channel on /dev/null, and nothing to set up.
    fn start(program: &str, script: &str) -> io::Result<ChildProcess> {
        let program = CString::new(program).unwrap();
        let args = [
            c"sh".to_owned(),
            c"-c".to_owned(),
            CString::new(script).unwrap(),
        ];
        let mut argv: Vec<_> = args.iter().map(|arg| arg.as_ptr()).collect();
        argv.push(std::ptr::null());
        let envp = [std::ptr::null()];
        let null = std::fs::File::open("/dev/null").unwrap();
        let null = above_channel(OwnedFd::from(null)).unwrap();
        let fd = null.as_raw_fd();
        let plan = Plan {
            program: &program,
            argv: &argv,
            envp: &envp,
            cwd: None,
            stdio: [fd; 3],
            channel: fd,
            cgroup_dir: None,
        };
        // SAFETY: the setup closure does nothing; the plan's pointers live
        // until the call returns.
        unsafe { spawn(&plan, |_| Ok(())) }
    }

    #[tokio::test]
    async fn exit_codes_and_signals_come_back_as_exit_statuses() {
        let mut exits = start("/bin/sh", "exit 3").unwrap();
        assert_eq!(exits.wait().await.unwrap().code(), Some(3));
        // A second wait returns the same status instead of failing.
        assert_eq!(exits.wait().await.unwrap().code(), Some(3));

        let mut sleeps = start("/bin/sh", "exec sleep 60").unwrap();
        sleeps.start_kill().unwrap();
        assert_eq!(sleeps.wait().await.unwrap().signal(), Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn a_program_that_cannot_be_executed_is_an_error_with_its_errno() {
        let err = start("/nonexistent/program", "").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    }

    #[tokio::test]
    async fn a_dropped_child_is_killed() {
        let sleeps = start("/bin/sh", "exec sleep 60").unwrap();
        let pid = sleeps.id() as libc::pid_t;
        drop(sleeps);
        // A zombie still answers signal 0, so this ends only once the kill
        // has landed and the background reaper has collected the child.
        let gone = async {
            // SAFETY: kill with signal 0 only checks for existence.
            while unsafe { libc::kill(pid, 0) } == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), gone)
            .await
            .expect("the dropped child was neither killed nor reaped");
    }
}
