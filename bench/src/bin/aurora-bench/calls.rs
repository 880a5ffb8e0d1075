//! The call figures: round trips of 16 bytes and 64 KiB (`rtt_16b`,
//! `rtt_16b_p99`, `rtt_64k`), calls per second with 64 callers
//! (`throughput`), and the overhead of a call doing about a millisecond of
//! CPU work (`work_1ms`).
//!
//! Aurora's side calls an SDK plugin through [`Supervisor::call`] from a
//! task on the runtime's workers, typed requests and all, as an application
//! would. The floor's side writes the same frames to the floor program from
//! the main thread and reads its answers, blocking; the bytes on the wire are
//! the same on both sides.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use aurora_bench::work;
use aurora_protocol::codec;
use aurora_supervisor::{PluginSpec, Supervisor};
use serde_bytes::ByteBuf;
use tokio::task::JoinSet;

use crate::Bench;
use crate::figure::{Figure, Target, micros, percentile};
use crate::floor::FloorChild;

/// The name the echo plugin is added under.
pub const ECHO: &str = "echo";

/// The echo plugin's method that answers with its byte-buffer request; the
/// floor does the same for it.
pub const BYTES_METHOD: &str = "bytes";

/// The name the wordcount plugin is added under.
const WORDCOUNT: &str = "wordcount";

/// The method doing CPU work, in the wordcount plugin and in the floor.
const SPIN_METHOD: &str = "spin";

/// How many callers `throughput` runs at once into one plugin, and how many
/// calls the floor is sent per window.
const CONCURRENT_CALLERS: usize = 64;

/// How much CPU work `work_1ms` asks for.
const WORK_TARGET: Duration = Duration::from_millis(1);

/// Round trips made before any are timed, on each side, to fault in code and
/// buffers.
const WARM_UP_CALLS: usize = 200;

/// How many alternating slices each repetition is cut into, floor then
/// Aurora, so that a burst of load from elsewhere on the machine falls on
/// both sides rather than on whichever happened to be running.
const SLICES_PER_REP: usize = 10;

/// A `bytes` request, typed for the supervisor and encoded for the floor.
#[derive(Debug, Clone)]
pub struct BytesRequest {
    pub typed: ByteBuf,
    /// The bincode encoding of `typed`: the payload both sides put on the
    /// wire.
    pub wire: Vec<u8>,
}

impl BytesRequest {
    /// A request of `len` bytes.
    ///
    /// # Errors
    ///
    /// When the payload cannot be encoded, which for a byte buffer it can.
    pub fn new(len: usize) -> anyhow::Result<BytesRequest> {
        let typed = ByteBuf::from((0..len).map(|i| i as u8).collect::<Vec<u8>>());
        let wire = codec::encode(&typed)?;
        Ok(BytesRequest { typed, wire })
    }
}

/// An SDK plugin under a supervisor and a floor process, both ready, for the
/// figures that only make calls.
struct Pair {
    supervisor: Supervisor,
    plugin: &'static str,
    floor: FloorChild,
}

impl Pair {
    fn start(bench: &Bench, plugin: &'static str, program: PathBuf) -> anyhow::Result<Pair> {
        let mut floor = FloorChild::spawn(&bench.binaries.floor)?;
        floor.handshake()?;

        let supervisor = Supervisor::new();
        let starting = supervisor.clone();
        bench.on_worker(async move {
            starting.add(PluginSpec::new(plugin, program))?;
            starting.wait_ready(plugin, Duration::from_secs(10)).await?;
            Ok(())
        })?;
        Ok(Pair {
            supervisor,
            plugin,
            floor,
        })
    }

    fn stop(self, bench: &Bench) -> anyhow::Result<()> {
        let supervisor = self.supervisor;
        bench.on_worker(async move {
            supervisor.shutdown().await;
            Ok(())
        })
    }
}

/// `rtt_16b` (p50), `rtt_16b_p99` and `rtt_64k` (p50): one caller, one call
/// at a time, each timed from before the request is encoded to after the
/// reply is decoded.
///
/// # Errors
///
/// When a plugin or the floor fails to start or answer.
pub fn round_trips(bench: &Bench) -> anyhow::Result<Vec<Figure>> {
    let mut pair = Pair::start(bench, ECHO, bench.binaries.echo.clone())?;
    let small = BytesRequest::new(16)?;
    let large = BytesRequest::new(64 * 1024)?;
    floor_round_trips(&mut pair.floor, &small, WARM_UP_CALLS)?;
    ours_round_trips(bench, &pair, &small, WARM_UP_CALLS)?;

    let mut small_p50 = (Vec::new(), Vec::new());
    let mut small_p99 = (Vec::new(), Vec::new());
    let mut large_p50 = (Vec::new(), Vec::new());
    for _ in 0..bench.plan.rtt_reps {
        let small_calls = bench.plan.rtt_16b_calls.div_ceil(SLICES_PER_REP);
        let large_calls = bench.plan.rtt_64k_calls.div_ceil(SLICES_PER_REP);
        let (mut small_ours, mut small_floor) = (Vec::new(), Vec::new());
        let (mut large_ours, mut large_floor) = (Vec::new(), Vec::new());
        for _ in 0..SLICES_PER_REP {
            small_floor.extend(floor_round_trips(&mut pair.floor, &small, small_calls)?);
            small_ours.extend(ours_round_trips(bench, &pair, &small, small_calls)?);
            large_floor.extend(floor_round_trips(&mut pair.floor, &large, large_calls)?);
            large_ours.extend(ours_round_trips(bench, &pair, &large, large_calls)?);
        }
        small_p50.0.push(micros(percentile(&mut small_ours, 0.5)));
        small_p50.1.push(micros(percentile(&mut small_floor, 0.5)));
        small_p99.0.push(micros(percentile(&mut small_ours, 0.99)));
        small_p99.1.push(micros(percentile(&mut small_floor, 0.99)));
        large_p50.0.push(micros(percentile(&mut large_ours, 0.5)));
        large_p50.1.push(micros(percentile(&mut large_floor, 0.5)));
    }
    pair.stop(bench)?;

    let ratio = Target::RatioAtMost(1.5);
    Ok(vec![
        Figure::from_samples("rtt_16b", "us", &small_p50.0, &small_p50.1, ratio),
        Figure::from_samples(
            "rtt_16b_p99",
            "us",
            &small_p99.0,
            &small_p99.1,
            Target::None,
        ),
        Figure::from_samples("rtt_64k", "us", &large_p50.0, &large_p50.1, ratio),
    ])
}

fn floor_round_trips(
    floor: &mut FloorChild,
    request: &BytesRequest,
    calls: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let reply_len = floor.call(BYTES_METHOD, &request.wire)?.len();
        times.push(start.elapsed());
        ensure!(
            reply_len == request.wire.len(),
            "the floor changed the payload"
        );
    }
    let reply = floor.call(BYTES_METHOD, &request.wire)?;
    ensure!(reply == request.wire, "the floor changed the payload");
    Ok(times)
}

fn ours_round_trips(
    bench: &Bench,
    pair: &Pair,
    request: &BytesRequest,
    calls: usize,
) -> anyhow::Result<Vec<Duration>> {
    let supervisor = pair.supervisor.clone();
    let plugin = pair.plugin;
    let request = request.typed.clone();
    bench.on_worker(async move {
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            let reply: ByteBuf = supervisor.call(plugin, BYTES_METHOD, &request).await?;
            times.push(start.elapsed());
            ensure!(
                reply.len() == request.len(),
                "the plugin changed the payload"
            );
        }
        let reply: ByteBuf = supervisor.call(plugin, BYTES_METHOD, &request).await?;
        ensure!(reply == request, "the plugin changed the payload");
        Ok(times)
    })
}

/// `throughput`: calls per second into one plugin from 64 concurrent
/// callers, against the floor answering windows of 64 pipelined calls.
///
/// # Errors
///
/// As [`round_trips`].
pub fn throughput(bench: &Bench) -> anyhow::Result<Vec<Figure>> {
    let mut pair = Pair::start(bench, ECHO, bench.binaries.echo.clone())?;
    let request = BytesRequest::new(16)?;
    let warm_up = Duration::from_millis(100);
    floor_throughput(&mut pair.floor, &request, warm_up)?;
    ours_throughput(bench, &pair, &request, warm_up)?;

    let mut ours = Vec::new();
    let mut floor = Vec::new();
    let slice = bench.plan.throughput_time / SLICES_PER_REP as u32;
    for _ in 0..bench.plan.throughput_reps {
        let mut ours_rate = Rate::default();
        let mut floor_rate = Rate::default();
        for _ in 0..SLICES_PER_REP {
            floor_rate.add(floor_throughput(&mut pair.floor, &request, slice)?);
            ours_rate.add(ours_throughput(bench, &pair, &request, slice)?);
        }
        floor.push(floor_rate.per_second());
        ours.push(ours_rate.per_second());
    }
    pair.stop(bench)?;

    let target = Target::OursAtLeast(300_000.0);
    let figure = Figure::from_samples("throughput", "calls/s", &ours, &floor, target);
    Ok(vec![figure])
}

/// Calls answered over a stretch of time.
#[derive(Debug, Default)]
struct Rate {
    answered: u64,
    elapsed: Duration,
}

impl Rate {
    fn add(&mut self, other: Rate) {
        self.answered += other.answered;
        self.elapsed += other.elapsed;
    }

    fn per_second(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64()
    }
}

/// Sends windows of pipelined calls for about `time`.
fn floor_throughput(
    floor: &mut FloorChild,
    request: &BytesRequest,
    time: Duration,
) -> anyhow::Result<Rate> {
    let start = Instant::now();
    let mut answered = 0u64;
    while start.elapsed() < time {
        for _ in 0..CONCURRENT_CALLERS {
            floor.queue_call(BYTES_METHOD, &request.wire);
        }
        floor.send_queued()?;
        for _ in 0..CONCURRENT_CALLERS {
            let reply_len = floor.receive_reply()?.len();
            ensure!(
                reply_len == request.wire.len(),
                "the floor changed the payload"
            );
        }
        answered += CONCURRENT_CALLERS as u64;
    }
    Ok(Rate {
        answered,
        elapsed: start.elapsed(),
    })
}

/// Runs 64 callers, each calling in a loop, for about `time`, counted until
/// the last caller's last call returned.
fn ours_throughput(
    bench: &Bench,
    pair: &Pair,
    request: &BytesRequest,
    time: Duration,
) -> anyhow::Result<Rate> {
    let supervisor = pair.supervisor.clone();
    let plugin = pair.plugin;
    let request = request.typed.clone();
    bench.on_worker(async move {
        let start = Instant::now();
        let deadline = start + time;
        let mut callers = JoinSet::new();
        for _ in 0..CONCURRENT_CALLERS {
            let supervisor = supervisor.clone();
            let request = request.clone();
            callers.spawn(async move {
                let mut answered = 0u64;
                while Instant::now() < deadline {
                    let reply: ByteBuf = supervisor.call(plugin, BYTES_METHOD, &request).await?;
                    ensure!(
                        reply.len() == request.len(),
                        "the plugin changed the payload"
                    );
                    answered += 1;
                }
                Ok(answered)
            });
        }
        let mut answered = 0u64;
        while let Some(joined) = callers.join_next().await {
            answered += joined.context("a calling task panicked")??;
        }
        Ok(Rate {
            answered,
            elapsed: start.elapsed(),
        })
    })
}

/// `work_1ms`: how much longer a call doing about 1 ms of CPU work takes than
/// the same work done in-process, as a percentage, for Aurora and for the
/// floor.
///
/// # Errors
///
/// As [`round_trips`], and when a side's answer differs from the in-process
/// hash.
pub fn work_1ms(bench: &Bench) -> anyhow::Result<Vec<Figure>> {
    let iterations = calibrate_spin();
    let expected = in_process_spin(iterations);
    let mut pair = Pair::start(bench, WORDCOUNT, bench.binaries.wordcount.clone())?;
    let request = codec::encode(&iterations)?;
    floor_spins(&mut pair.floor, &request, expected, 20)?;
    ours_spins(bench, &pair, iterations, expected, 20)?;

    let mut in_process_millis = Vec::new();
    let mut ours = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..bench.plan.work_reps {
        let calls = bench.plan.work_calls.div_ceil(SLICES_PER_REP);
        let (mut local, mut remote_floor, mut remote_ours) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..SLICES_PER_REP {
            local.extend((0..calls).map(|_| {
                let start = Instant::now();
                in_process_spin(iterations);
                start.elapsed()
            }));
            remote_floor.extend(floor_spins(&mut pair.floor, &request, expected, calls)?);
            remote_ours.extend(ours_spins(bench, &pair, iterations, expected, calls)?);
        }

        let local = micros(percentile(&mut local, 0.5));
        let overhead = |times: &mut [Duration]| {
            let remote = micros(percentile(times, 0.5));
            (remote - local) / local * 100.0
        };
        in_process_millis.push(local / 1000.0);
        floor.push(overhead(&mut remote_floor));
        ours.push(overhead(&mut remote_ours));
    }
    pair.stop(bench)?;

    let target = Target::AboveFloorAtMost {
        margin: 1.0,
        unit: "pp",
    };
    let note = format!(
        "spin({iterations}) takes {:.3} ms in-process; figures are % over that",
        crate::figure::median(&in_process_millis)
    );
    let figure = Figure::from_samples("work_1ms", "%", &ours, &floor, target).with_note(note);
    Ok(vec![figure])
}

/// The iteration count at which `spin` takes about [`WORK_TARGET`] here.
fn calibrate_spin() -> u64 {
    const PROBE_ITERATIONS: u64 = 100_000;
    let fastest = (0..5)
        .map(|_| {
            let start = Instant::now();
            in_process_spin(PROBE_ITERATIONS);
            start.elapsed()
        })
        .min()
        .expect("five probes were timed");
    let per_iteration = fastest.as_secs_f64() / PROBE_ITERATIONS as f64;
    (WORK_TARGET.as_secs_f64() / per_iteration).round().max(1.0) as u64
}

/// The in-process baseline: the plugin's loop, called as a plain function
/// with a deadline as far off as a call's.
///
/// The answer goes through `black_box` too: callers that time this discard
/// it, and with whole-program optimisation the compiler would otherwise drop
/// the hashing and time an empty loop.
fn in_process_spin(iterations: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer =
        work::spin(black_box(iterations), deadline).expect("thirty seconds is ample for the work");
    black_box(answer)
}

fn floor_spins(
    floor: &mut FloorChild,
    request: &[u8],
    expected: u64,
    calls: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let reply = floor.call(SPIN_METHOD, request)?;
        times.push(start.elapsed());
        let hash: u64 = codec::decode(reply)?;
        ensure!(
            hash == expected,
            "the floor's spin returned {hash:x}, not {expected:x}"
        );
    }
    Ok(times)
}

fn ours_spins(
    bench: &Bench,
    pair: &Pair,
    iterations: u64,
    expected: u64,
    calls: usize,
) -> anyhow::Result<Vec<Duration>> {
    let supervisor = pair.supervisor.clone();
    let plugin = pair.plugin;
    bench.on_worker(async move {
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            let hash: u64 = supervisor.call(plugin, SPIN_METHOD, &iterations).await?;
            times.push(start.elapsed());
            ensure!(
                hash == expected,
                "the plugin's spin returned {hash:x}, not {expected:x}"
            );
        }
        Ok(times)
    })
}
