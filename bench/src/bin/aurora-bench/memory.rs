//! The resting-cost figures: the memory of one idle plugin (`idle_pss`), and
//! the supervisor's own memory and CPU with ten idle plugins
//! (`supervisor_idle`, `supervisor_idle_cpu`).
//!
//! The supervisor runs inside the harness, so the supervisor's figures are
//! the harness process's: its floor is the same process, runtime started,
//! measured for as long just before the supervisor is created. That is why
//! this group runs first, before other figures leave memory behind.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aurora_supervisor::{PluginSpec, Supervisor};
use serde_bytes::ByteBuf;

use crate::Bench;
use crate::calls::{BYTES_METHOD, BytesRequest, ECHO};
use crate::figure::{Figure, Target, median};
use crate::floor::FloorChild;
use crate::procfs::{self, Pss};

/// How long a plugin rests after its call before its memory is read, so that
/// whatever it does just after answering is over.
const SETTLE: Duration = Duration::from_millis(200);

/// The length of one CPU and memory sample of an idle process.
const IDLE_SAMPLE: Duration = Duration::from_secs(1);

/// `idle_pss`: the proportional set size of an echo plugin that has answered
/// one call and rests, against the floor in the same state.
///
/// # Errors
///
/// When a plugin or the floor fails to start or answer, or `/proc` cannot be
/// read.
pub fn idle_pss(bench: &Bench) -> anyhow::Result<Vec<Figure>> {
    let request = BytesRequest::new(16)?;
    let (mut ours, mut ours_anonymous) = (Vec::new(), Vec::new());
    let (mut floor, mut floor_anonymous) = (Vec::new(), Vec::new());
    for _ in 0..bench.plan.pss_reps {
        let pss = floor_idle_pss(bench, &request)?;
        floor.push(pss.total_kib as f64);
        floor_anonymous.push(pss.anonymous_kib as f64);

        let echo = bench.binaries.echo.clone();
        let typed = request.typed.clone();
        let pss = bench.on_worker(ours_idle_pss(echo, typed))?;
        ours.push(pss.total_kib as f64);
        ours_anonymous.push(pss.anonymous_kib as f64);
    }
    let note = format!(
        "anonymous part {:.0} KiB vs {:.0} KiB; the rest is program text, shared once \
         several copies run",
        median(&ours_anonymous),
        median(&floor_anonymous)
    );
    let target = Target::OursAtMost(1024.0);
    let figure = Figure::from_samples("idle_pss", "KiB", &ours, &floor, target).with_note(note);
    Ok(vec![figure])
}

fn floor_idle_pss(bench: &Bench, request: &BytesRequest) -> anyhow::Result<Pss> {
    let mut floor = FloorChild::spawn(&bench.binaries.floor)?;
    floor.handshake()?;
    floor.call(BYTES_METHOD, &request.wire)?;
    std::thread::sleep(SETTLE);
    procfs::pss(floor.pid())
}

async fn ours_idle_pss(echo: PathBuf, request: ByteBuf) -> anyhow::Result<Pss> {
    let supervisor = Supervisor::new();
    supervisor.add(PluginSpec::new(ECHO, echo))?;
    let _: ByteBuf = supervisor.call(ECHO, BYTES_METHOD, &request).await?;
    tokio::time::sleep(SETTLE).await;
    let pid = supervisor.status(ECHO).and_then(|status| status.pid);
    let pss = pid
        .context("the echo plugin has no process")
        .and_then(procfs::pss);

    supervisor.shutdown().await;
    pss
}

/// `supervisor_idle` and `supervisor_idle_cpu`: the harness's RSS and CPU
/// use, one-second samples at a time, with a supervisor running ten idle
/// echo plugins, against the same samples of the harness alone.
///
/// # Errors
///
/// When a plugin fails to start, or `/proc` cannot be read.
pub fn supervisor_idle(bench: &Bench) -> anyhow::Result<Vec<Figure>> {
    let samples = bench.plan.idle_samples;
    let mut floor = IdleSamples::default();
    for _ in 0..samples {
        let cpu_before = procfs::own_cpu_time();
        let start = Instant::now();
        std::thread::sleep(IDLE_SAMPLE);
        floor.record(cpu_before, start)?;
    }

    let echo = bench.binaries.echo.clone();
    let plugins = bench.plan.idle_plugins;
    let ours = bench.on_worker(ours_supervisor_idle(echo, plugins, samples))?;

    let rss = Figure::from_samples(
        "supervisor_idle",
        "MiB",
        &ours.rss_mib,
        &floor.rss_mib,
        Target::OursAtMost(8.0),
    );
    let cpu = Figure::from_samples(
        "supervisor_idle_cpu",
        "% of a core",
        &ours.cpu_percent,
        &floor.cpu_percent,
        Target::OursAtMost(0.1),
    );
    Ok(vec![rss.with_plugins(plugins), cpu.with_plugins(plugins)])
}

async fn ours_supervisor_idle(
    echo: PathBuf,
    plugins: usize,
    samples: usize,
) -> anyhow::Result<IdleSamples> {
    let supervisor = Supervisor::new();
    let request = ByteBuf::from(vec![0u8; 16]);
    let names: Vec<String> = (0..plugins)
        .map(|index| format!("{ECHO}-{index}"))
        .collect();
    for name in &names {
        supervisor.add(PluginSpec::new(name, &echo))?;
    }
    // One call each, so that every connection has done some work before it
    // rests, as in a real application.
    for name in &names {
        let _: ByteBuf = supervisor.call(name, BYTES_METHOD, &request).await?;
    }
    tokio::time::sleep(SETTLE).await;

    let mut idle = IdleSamples::default();
    for _ in 0..samples {
        let cpu_before = procfs::own_cpu_time();
        let start = Instant::now();
        tokio::time::sleep(IDLE_SAMPLE).await;
        idle.record(cpu_before, start)?;
    }

    supervisor.shutdown().await;
    Ok(idle)
}

/// One-second readings of the harness at rest.
#[derive(Debug, Default)]
struct IdleSamples {
    rss_mib: Vec<f64>,
    cpu_percent: Vec<f64>,
}

impl IdleSamples {
    /// Records the sample that began at `start` with `cpu_before` used.
    fn record(&mut self, cpu_before: Duration, start: Instant) -> anyhow::Result<()> {
        let cpu = procfs::own_cpu_time().saturating_sub(cpu_before);
        let wall = start.elapsed();
        self.cpu_percent
            .push(cpu.as_secs_f64() / wall.as_secs_f64() * 100.0);
        self.rss_mib.push(procfs::own_rss_kib()? as f64 / 1024.0);
        Ok(())
    }
}
