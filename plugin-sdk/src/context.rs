//! What a handler knows about the call it is serving.

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The call a handler is serving: its deadline and its cancellation signal.
///
/// A call is cancelled when the supervisor sends `Cancel` (its caller gave up)
/// or when its deadline passes. Cloning is cheap; every clone sees the same
/// signal.
#[derive(Debug, Clone)]
pub struct Context {
    id: u64,
    deadline: Instant,
    cancel: watch::Receiver<bool>,
}

/// Returned by [`Context::sleep`] when the call is cancelled first.
///
/// With `?` inside a handler it becomes an [`crate::Error`] of kind
/// `Cancelled`, or `DeadlineExceeded` when the deadline is what ended the
/// wait. It deliberately does not implement `std::error::Error`: that would
/// route it through the generic conversion, which reports every error as a
/// plain failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled {
    by_deadline: bool,
}

impl Cancelled {
    pub(crate) fn new(by_deadline: bool) -> Cancelled {
        Cancelled { by_deadline }
    }

    /// Whether the deadline passing, rather than a `Cancel` from the
    /// supervisor, ended the wait.
    pub fn by_deadline(&self) -> bool {
        self.by_deadline
    }
}

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.by_deadline {
            true => f.write_str("the call's deadline passed"),
            false => f.write_str("the call was cancelled"),
        }
    }
}

impl Context {
    pub(crate) fn new(id: u64, deadline: Instant, cancel: watch::Receiver<bool>) -> Context {
        Context {
            id,
            deadline,
            cancel,
        }
    }

    /// The call's id, unique among the calls in flight.
    pub fn call_id(&self) -> u64 {
        self.id
    }

    /// When the caller stops waiting.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left before the deadline, zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Whether the call was cancelled or its deadline has passed.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow() || Instant::now() >= self.deadline
    }

    /// Completes when the call is cancelled or its deadline passes.
    pub async fn cancelled(&self) {
        let mut cancel = self.cancel.clone();
        let deadline = tokio::time::Instant::from_std(self.deadline);
        tokio::select! {
            // An error means the sender is gone, which happens only when the
            // plugin is shutting down: treat that as a cancellation too.
            _ = cancel.wait_for(|cancelled| *cancelled) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }

    /// Sleeps for `duration` unless the call is cancelled first.
    ///
    /// # Errors
    ///
    /// [`Cancelled`] when the call is cancelled or its deadline passes before
    /// `duration` is up.
    pub async fn sleep(&self, duration: Duration) -> Result<(), Cancelled> {
        tokio::select! {
            _ = tokio::time::sleep(duration) => Ok(()),
            _ = self.cancelled() => {
                let by_deadline = !*self.cancel.borrow();
                Err(Cancelled::new(by_deadline))
            }
        }
    }
}
