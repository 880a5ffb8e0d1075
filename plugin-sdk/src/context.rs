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
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("call cancelled")]
pub struct Cancelled;

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
            _ = self.cancelled() => Err(Cancelled),
        }
    }
}
