//! Telling systemd how the daemon is doing: `READY=1`, `STATUS=` lines,
//! `RELOADING=1`, `STOPPING=1` and watchdog pings.
//!
//! systemd passes the notification socket and the watchdog period in the
//! environment. Plugins must not inherit them (a plugin could otherwise
//! report the daemon ready, or keep its watchdog fed while the daemon
//! hangs), so [`Notifier::take_from_env`] reads and removes them once, before
//! any thread exists, and the notifier keeps the address itself. Outside
//! systemd every method does nothing.

use std::ffi::OsString;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use sd_notify::NotifyState;

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// Sends notifications to the service manager, if there is one.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    /// The socket's address: a path, or `@name` for the abstract namespace.
    socket: Option<OsString>,
    /// The watchdog period, when systemd wants pings.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// Reads systemd's variables and removes them from the environment.
    ///
    /// # Safety
    ///
    /// Changes the environment, so no other thread may be running (the same
    /// contract as [`std::env::remove_var`]): call it first thing in `main`.
    pub unsafe fn take_from_env() -> Notifier {
        let socket = std::env::var_os(NOTIFY_SOCKET).filter(|s| !s.is_empty());
        // The watchdog is ours only if no other pid is named.
        let watchdog = sd_notify::watchdog_enabled().filter(|period| !period.is_zero());
        // SAFETY: the caller promises no other thread exists.
        unsafe {
            std::env::remove_var(NOTIFY_SOCKET);
            std::env::remove_var(WATCHDOG_USEC);
            std::env::remove_var(WATCHDOG_PID);
        }
        Notifier { socket, watchdog }
    }

    /// Whether a service manager is listening.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the period systemd allows, as
    /// `sd_watchdog_enabled(3)` recommends.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|period| period / 2)
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// Reload started; `ready` ends it.
    pub fn reloading(&self) {
        // systemd 253 and newer want the monotonic time with RELOADING=1.
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping plugins"),
        ]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(socket) = &self.socket else {
            return;
        };
        let message: String = states.iter().map(|state| format!("{state}\n")).collect();
        if let Err(err) = send_datagram(socket, message.as_bytes()) {
            tracing::warn!(%err, "cannot notify the service manager");
        }
    }
}

fn send_datagram(socket: &OsString, message: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;

    let datagram = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            datagram.send_to_addr(message, &address)?
        }
        None => datagram.send_to(message, socket)?,
    };
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the notification was cut short",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_bound_socket() {
        let dir = std::env::temp_dir().join(format!("aurora-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            socket: Some(path.clone().into_os_string()),
            watchdog: Some(Duration::from_secs(10)),
        };

        notifier.ready("2 plugins ready");
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=2 plugins ready\n");
        notifier.watchdog();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(5)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        let notifier = Notifier::disabled();
        assert!(!notifier.is_enabled());
        notifier.ready("nobody listens");
    }
}
