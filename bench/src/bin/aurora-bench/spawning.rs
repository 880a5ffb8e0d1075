//! The spawn figures: one plugin from nothing to its first answer
//! (`spawn_ready`), and a hundred or a thousand started at once until every
//! one has answered (`spawn_100`, `spawn_1000`), with the supervisor's memory
//! while a thousand run (`spawn_1000_rss`).
//!
//! Aurora's side adds plugins to a fresh [`Supervisor`] and calls each one;
//! calls made while a plugin starts wait for it, so the time covers spawn,
//! handshake and first call. The floor's side spawns the floor program from
//! the main thread, welcomes it and makes the same call over the bare socket.
//!
//! Each mass start runs in a new copy of the harness (`--mass-start
//! SIDE:COUNT`, hidden from `--help`), because a process's heap does not shrink
//! back after hundreds of plugins: measured in one process, each side's memory
//! would include what the other side left behind.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use aurora_supervisor::{PluginSpec, Supervisor};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::task::JoinSet;

use crate::Bench;
use crate::calls::{BYTES_METHOD, BytesRequest, ECHO};
use crate::figure::{Figure, Target, millis};
use crate::floor::FloorChild;
use crate::procfs;

/// How long a plugin among hundreds may take to start and answer; far more
/// than it should ever need, so a slow start is measured rather than failed.
const MASS_START_TIMEOUT: Duration = Duration::from_secs(120);

/// The size of the first call's payload.
const FIRST_CALL_BYTES: usize = 16;

/// `spawn_ready`: the median time from spawning one plugin to its first
/// answer.
///
/// # Errors
///
/// When a plugin or the floor fails to start or answer.
pub fn spawn_ready(bench: &Bench) -> anyhow::Result<Vec<Figure>> {
    let request = BytesRequest::new(FIRST_CALL_BYTES)?;
    let mut ours = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..bench.plan.spawn_ready_reps {
        floor.push(millis(floor_spawn_ready(bench, &request)?));
        let echo = bench.binaries.echo.clone();
        let typed = request.typed.clone();
        ours.push(millis(bench.on_worker(ours_spawn_ready(echo, typed))?));
    }
    let target = Target::RatioAtMost(1.5);
    Ok(vec![Figure::from_samples(
        "spawn_ready",
        "ms",
        &ours,
        &floor,
        target,
    )])
}

/// `spawn_100`: the median time for 100 plugins started at once to all
/// answer.
///
/// # Errors
///
/// As [`spawn_ready`].
pub fn spawn_100(bench: &Bench) -> anyhow::Result<Vec<Figure>> {
    let runs = mass_starts(100, bench.plan.spawn_100_reps)?;
    let figure = Figure::from_samples(
        "spawn_100",
        "ms",
        &runs.ours_millis,
        &runs.floor_millis,
        Target::RatioAtMost(1.5),
    );
    Ok(vec![figure.with_plugins(100)])
}

/// `spawn_1000` and `spawn_1000_rss`: the same with a thousand plugins (200
/// in a quick run), and the harness's resident memory, which is the
/// supervisor process's, while they all run.
///
/// # Errors
///
/// As [`spawn_ready`].
pub fn spawn_1000(bench: &Bench) -> anyhow::Result<Vec<Figure>> {
    let count = bench.plan.spawn_many;
    let runs = mass_starts(count, bench.plan.spawn_many_reps)?;
    let time = Figure::from_samples(
        "spawn_1000",
        "ms",
        &runs.ours_millis,
        &runs.floor_millis,
        Target::RatioAtMost(1.5),
    )
    .with_plugins(count);
    let rss = Figure::from_samples(
        "spawn_1000_rss",
        "MiB",
        &runs.ours_rss_mib,
        &runs.floor_rss_mib,
        Target::OursAtMost(30.0),
    )
    .with_plugins(count);
    if count == 1000 {
        return Ok(vec![time, rss]);
    }
    let note = format!("quick run: {count} plugins, not 1000");
    Ok(vec![time.with_note(note.clone()), rss.with_note(note)])
}

/// What repeated mass starts measured, one entry per repetition.
struct MassStarts {
    ours_millis: Vec<f64>,
    floor_millis: Vec<f64>,
    /// The harness's RSS with every plugin running.
    ours_rss_mib: Vec<f64>,
    /// The harness's RSS with every floor process connected.
    floor_rss_mib: Vec<f64>,
}

fn mass_starts(count: usize, reps: usize) -> anyhow::Result<MassStarts> {
    let mut runs = MassStarts {
        ours_millis: Vec::new(),
        floor_millis: Vec::new(),
        ours_rss_mib: Vec::new(),
        floor_rss_mib: Vec::new(),
    };
    for _ in 0..reps {
        let floor = mass_start_in_fresh_process(Side::Floor, count)?;
        runs.floor_millis.push(millis(floor.elapsed()));
        runs.floor_rss_mib.push(floor.rss_kib as f64 / 1024.0);

        let ours = mass_start_in_fresh_process(Side::Ours, count)?;
        runs.ours_millis.push(millis(ours.elapsed()));
        runs.ours_rss_mib.push(ours.rss_kib as f64 / 1024.0);
    }
    Ok(runs)
}

/// Which side of a figure a measurement is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Aurora: a supervisor and SDK plugins.
    Ours,
    /// The harness talking to floor processes directly.
    Floor,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::Floor => "floor",
        }
    }
}

/// What one mass start measured, as the fresh process reports it on its
/// stdout.
#[derive(Debug, Serialize, Deserialize)]
pub struct MassStart {
    pub elapsed_nanos: u64,
    /// The process's RSS once every plugin has answered.
    pub rss_kib: u64,
}

impl MassStart {
    fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_nanos)
    }
}

/// Parses `SIDE:COUNT`, the argument of the hidden `--mass-start` option.
///
/// # Errors
///
/// For anything but `ours` or `floor`, a colon and a count.
pub fn parse_mass_start(text: &str) -> anyhow::Result<(Side, usize)> {
    let (side, count) = text
        .split_once(':')
        .with_context(|| format!("{text:?} is not SIDE:COUNT"))?;
    let side = match side {
        "ours" => Side::Ours,
        "floor" => Side::Floor,
        other => bail!("{other:?} is neither ours nor floor"),
    };
    let count = count
        .parse()
        .with_context(|| format!("{count:?} is not a plugin count"))?;
    Ok((side, count))
}

/// Runs one mass start in this process, which must be fresh, and prints its
/// [`MassStart`] as one line of JSON.
///
/// # Errors
///
/// When a plugin fails to start or answer, or stdout cannot be written.
pub fn run_mass_start(bench: &Bench, side: Side, count: usize) -> anyhow::Result<()> {
    let request = BytesRequest::new(FIRST_CALL_BYTES)?;
    let (elapsed, rss_kib) = match side {
        Side::Floor => floor_mass_start(bench, count, &request)?,
        Side::Ours => {
            let echo = bench.binaries.echo.clone();
            bench.on_worker(ours_mass_start(echo, count, request.typed))?
        }
    };
    let measured = MassStart {
        elapsed_nanos: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
        rss_kib,
    };
    let line = serde_json::to_string(&measured)?;
    writeln!(std::io::stdout(), "{line}").context("cannot report the mass start")?;
    Ok(())
}

/// Runs a mass start in a new copy of the harness, so that its memory figure
/// is that of a process holding only the supervisor (or the floor's sockets)
/// and its plugins, not what earlier measurements left in this one's heap.
fn mass_start_in_fresh_process(side: Side, count: usize) -> anyhow::Result<MassStart> {
    let harness = std::env::current_exe().context("cannot find the harness executable")?;
    let output = Command::new(&harness)
        .arg("--mass-start")
        .arg(format!("{}:{count}", side.name()))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", harness.display()))?;
    ensure!(
        output.status.success(),
        "the {} mass start of {count} plugins failed ({})",
        side.name(),
        output.status
    );
    serde_json::from_slice(&output.stdout).context("cannot read the mass start's report")
}

async fn ours_spawn_ready(echo: PathBuf, request: ByteBuf) -> anyhow::Result<Duration> {
    let supervisor = Supervisor::new();
    let start = Instant::now();
    supervisor.add(PluginSpec::new(ECHO, echo))?;
    let reply: ByteBuf = supervisor.call(ECHO, BYTES_METHOD, &request).await?;
    let elapsed = start.elapsed();

    supervisor.shutdown().await;
    ensure!(reply == request, "the echo plugin changed the payload");
    Ok(elapsed)
}

/// The floor's cost of a new process: spawn, handshake and one call.
pub fn floor_spawn_ready(bench: &Bench, request: &BytesRequest) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut floor = FloorChild::spawn(&bench.binaries.floor)?;
    floor.handshake()?;
    let reply = floor.call(BYTES_METHOD, &request.wire)?;
    let elapsed = start.elapsed();

    ensure!(reply == request.wire, "the floor changed the payload");
    Ok(elapsed)
}

/// Starts `count` echo plugins under one supervisor and calls each once, all
/// at once; returns the time until the last answer and the RSS then, in KiB.
async fn ours_mass_start(
    echo: PathBuf,
    count: usize,
    request: ByteBuf,
) -> anyhow::Result<(Duration, u64)> {
    let supervisor = Supervisor::new();
    let specs: Vec<PluginSpec> = (0..count)
        .map(|index| PluginSpec {
            // Health checks would only add pings to the measurement.
            health_interval: None,
            handshake_timeout: MASS_START_TIMEOUT,
            call_timeout: MASS_START_TIMEOUT,
            ..PluginSpec::new(format!("{ECHO}-{index}"), &echo)
        })
        .collect();
    let names: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();

    let start = Instant::now();
    for spec in specs {
        supervisor.add(spec)?;
    }
    let mut calls = JoinSet::new();
    for name in names {
        let supervisor = supervisor.clone();
        let request = request.clone();
        calls.spawn(async move {
            supervisor
                .call::<ByteBuf, ByteBuf>(&name, BYTES_METHOD, &request)
                .await
        });
    }
    let mut answered = 0;
    let mut first_failure = None;
    while let Some(joined) = calls.join_next().await {
        match joined.context("a calling task panicked")? {
            Ok(_) => answered += 1,
            Err(err) => first_failure = first_failure.or(Some(err)),
        }
    }
    let elapsed = start.elapsed();
    let rss = procfs::own_rss_kib();

    supervisor.shutdown().await;
    if let Some(err) = first_failure {
        return Err(err).context(format!("only {answered} of {count} plugins answered"));
    }
    Ok((elapsed, rss?))
}

/// Starts `count` floor processes and calls each once; returns the time until
/// the last answer and the harness's RSS then, in KiB.
///
/// The main thread spawns, as a supervisor's spawner thread does, while a
/// second thread welcomes each floor and sends its call as soon as it is
/// started; the answers are collected once every call is out.
fn floor_mass_start(
    bench: &Bench,
    count: usize,
    request: &BytesRequest,
) -> anyhow::Result<(Duration, u64)> {
    let (started, to_welcome) = mpsc::channel::<FloorChild>();
    let payload = request.wire.clone();

    let start = Instant::now();
    let welcomer = std::thread::spawn(move || -> anyhow::Result<Vec<FloorChild>> {
        let mut floors = Vec::with_capacity(count);
        for mut floor in to_welcome {
            floor.handshake()?;
            floor.queue_call(BYTES_METHOD, &payload);
            floor.send_queued()?;
            floors.push(floor);
        }
        for floor in &mut floors {
            let reply = floor.receive_reply()?;
            ensure!(reply == payload, "a floor changed the payload");
        }
        Ok(floors)
    });
    for _ in 0..count {
        let floor = FloorChild::spawn(&bench.binaries.floor)?;
        // A closed channel means the welcoming thread failed; its error is
        // collected below.
        if started.send(floor).is_err() {
            break;
        }
    }
    drop(started);
    let floors = welcomer
        .join()
        .map_err(|_| anyhow::anyhow!("the thread welcoming floors panicked"))??;
    let elapsed = start.elapsed();
    let rss = procfs::own_rss_kib()?;

    ensure!(
        floors.len() == count,
        "only {} of {count} floors answered",
        floors.len()
    );
    drop(floors);
    Ok((elapsed, rss))
}
