//! Memory and CPU of plugin processes, for `aurora status`.
//!
//! `sysinfo` computes CPU use from the difference between two readings, so
//! one `System` lives as long as the daemon and each status request reads
//! only the plugins' pids. A pid read for the first time is read twice, a
//! moment apart, so even the first status shows a meaningful figure.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// The gap between the two readings of a pid seen for the first time.
const FIRST_SAMPLE_GAP: Duration = Duration::from_millis(250);

/// One process's use of the machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// Resident memory, in bytes.
    pub(crate) memory_bytes: u64,
    /// Percent of one core since the previous reading.
    pub(crate) cpu_percent: f32,
    /// CPU time used since the process started, in milliseconds.
    pub(crate) cpu_time_ms: u64,
}

/// Readings of plugin processes, kept between status requests.
pub(crate) struct ProcessStats {
    /// `None` where the system cannot be read (no `/proc`).
    system: Mutex<Option<System>>,
    /// Pids read at least once.
    seen: Mutex<HashSet<u32>>,
}

impl ProcessStats {
    pub(crate) fn new() -> ProcessStats {
        ProcessStats {
            system: Mutex::new(System::new().ok()),
            seen: Mutex::default(),
        }
    }

    /// Reads `pids`; pids that cannot be read are left out.
    pub(crate) async fn sample(&self, pids: &[u32]) -> HashMap<u32, Sample> {
        let fresh: Vec<u32> = {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            pids.iter()
                .copied()
                .filter(|pid| !seen.contains(pid))
                .collect()
        };
        if !fresh.is_empty() {
            self.refresh(&fresh);
            tokio::time::sleep(FIRST_SAMPLE_GAP).await;
        }
        let samples = self.refresh(pids);

        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Forget pids that are gone, so the set does not grow forever.
        seen.retain(|pid| pids.contains(pid));
        seen.extend(pids.iter().copied());
        samples
    }

    fn refresh(&self, pids: &[u32]) -> HashMap<u32, Sample> {
        let mut system = self.system.lock().unwrap_or_else(|p| p.into_inner());
        let Some(system) = system.as_mut() else {
            return HashMap::new();
        };
        let wanted: Vec<Pid> = pids.iter().map(|&pid| Pid::from_u32(pid)).collect();
        let what = ProcessRefreshKind::nothing().with_memory().with_cpu();
        system.refresh_processes_specifics(ProcessesToUpdate::Some(&wanted), true, what);
        pids.iter()
            .filter_map(|&pid| {
                let process = system.process(Pid::from_u32(pid))?;
                let sample = Sample {
                    memory_bytes: process.memory(),
                    cpu_percent: process.cpu_usage(),
                    cpu_time_ms: process.accumulated_cpu_time(),
                };
                Some((pid, sample))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_our_own_process() {
        let stats = ProcessStats::new();
        let me = std::process::id();
        let samples = stats.sample(&[me, u32::MAX - 1]).await;
        let sample = samples.get(&me).expect("our own process can be read");
        assert!(sample.memory_bytes > 0);
        assert!(!samples.contains_key(&(u32::MAX - 1)));
    }
}
