//! Restart bookkeeping: exponential backoff with jitter and a restart budget.
//!
//! Kept free of I/O and clocks (callers pass `Instant`s in) so the rules can
//! be tested exactly.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::spec::RestartPolicy;

/// Counts restarts and computes the delay before the next one.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: RestartPolicy,
    /// Consecutive quick failures; the exponent of the next delay.
    attempt: u32,
    /// When each restart within the window happened, oldest first.
    recent: VecDeque<Instant>,
}

/// What to do after a plugin stopped on its own.
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    /// Wait this long, then start it again.
    RestartAfter(Duration),
    /// The budget is spent: mark the plugin failed.
    GiveUp { restarts: u32, window: Duration },
}

impl Backoff {
    pub(crate) fn new(policy: RestartPolicy) -> Backoff {
        Backoff {
            policy,
            attempt: 0,
            recent: VecDeque::new(),
        }
    }

    /// Decides about a plugin that ran for `uptime` and stopped at `now`.
    /// `jitter` in `[0, 1)` spreads restarts so that many plugins failing
    /// together do not come back in lockstep.
    pub(crate) fn next(&mut self, now: Instant, uptime: Duration, jitter: f64) -> Decision {
        if uptime >= self.policy.reset_after {
            self.attempt = 0;
        }
        while let Some(&oldest) = self.recent.front() {
            if now.duration_since(oldest) < self.policy.window {
                break;
            }
            self.recent.pop_front();
        }

        let budget_spent = self.recent.len() >= self.policy.max_restarts as usize;
        if budget_spent {
            return Decision::GiveUp {
                restarts: self.recent.len() as u32,
                window: self.policy.window,
            };
        }

        let full = self
            .policy
            .backoff_initial
            .saturating_mul(2u32.saturating_pow(self.attempt))
            .min(self.policy.backoff_max);
        // Half fixed, half random: never less than half the full delay.
        let delay = full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        self.attempt = self.attempt.saturating_add(1);
        self.recent.push_back(now);
        Decision::RestartAfter(delay)
    }

    /// Forgets every failure, as after an operator's explicit restart.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
            reset_after: Duration::from_secs(5),
            ..RestartPolicy::default()
        }
    }

    const QUICK: Duration = Duration::from_millis(10);

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut backoff = Backoff::new(RestartPolicy {
            max_restarts: 10,
            ..policy()
        });
        let start = Instant::now();
        let delays: Vec<_> = (0..4)
            .map(|i| backoff.next(start + Duration::from_millis(i), QUICK, 1.0))
            .collect();
        let ms = |n| Decision::RestartAfter(Duration::from_millis(n));
        assert_eq!(delays, [ms(100), ms(200), ms(350), ms(350)]);
    }

    #[test]
    fn jitter_keeps_at_least_half_the_delay() {
        let mut backoff = Backoff::new(policy());
        let decision = backoff.next(Instant::now(), QUICK, 0.0);
        assert_eq!(decision, Decision::RestartAfter(Duration::from_millis(50)));
    }

    #[test]
    fn gives_up_when_the_window_holds_too_many_restarts() {
        let mut backoff = Backoff::new(policy());
        let start = Instant::now();
        for i in 0..3 {
            let decision = backoff.next(start + Duration::from_secs(i), QUICK, 0.5);
            assert!(matches!(decision, Decision::RestartAfter(_)), "restart {i}");
        }
        let decision = backoff.next(start + Duration::from_secs(3), QUICK, 0.5);
        assert_eq!(
            decision,
            Decision::GiveUp {
                restarts: 3,
                window: Duration::from_secs(10)
            }
        );
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let mut backoff = Backoff::new(policy());
        let start = Instant::now();
        for i in 0..3 {
            backoff.next(start + Duration::from_secs(i), QUICK, 0.5);
        }
        // Eleven seconds later the first two have aged out of the window.
        let decision = backoff.next(start + Duration::from_secs(11), QUICK, 0.5);
        assert!(matches!(decision, Decision::RestartAfter(_)));
    }

    #[test]
    fn a_long_run_resets_the_delay() {
        let mut backoff = Backoff::new(RestartPolicy {
            max_restarts: 10,
            ..policy()
        });
        let start = Instant::now();
        backoff.next(start, QUICK, 1.0);
        backoff.next(start, QUICK, 1.0);
        let decision = backoff.next(start, Duration::from_secs(6), 1.0);
        assert_eq!(decision, Decision::RestartAfter(Duration::from_millis(100)));
    }
}
