//! `aurora-bench`: measures Aurora against a bare-socket floor, in one run.
//!
//! Each figure is measured twice on the same machine, close together in time:
//! once through Aurora (a [`Supervisor`](aurora_supervisor::Supervisor) and
//! an SDK plugin) and once through the floor (the harness itself talking
//! over a socketpair to `aurora-bench-floor`, a child with no SDK and no
//! runtime). Shared machines are noisy, so absolute numbers say little across
//! runs; the ratio between the two sides of one run is the figure that means
//! something. Targets are goals: a missed one is reported, not fatal.
//!
//! Layout:
//! - `figure.rs`: figures, medians and percentiles, and the printed report;
//! - `floor.rs`: starting the floor and driving it with blocking I/O;
//! - `spawning.rs`: `spawn_ready`, `spawn_100`, `spawn_1000`;
//! - `calls.rs`: `rtt_16b`, `rtt_64k`, `throughput`, `work_1ms`;
//! - `memory.rs`: `idle_pss`, `supervisor_idle`;
//! - `reload.rs`: `reload_failed_calls`, `reload_swap`, `reload_complete`;
//! - `procfs.rs`: memory and CPU readings, and the open-file limit;
//! - `binaries.rs`: finding the plugins and the floor next to the harness.
//!
//! Exit codes: 0 when every selected figure was measured (whether or not it
//! met its target), 1 when the harness could not measure one, 2 for a bad
//! command line.

mod binaries;
mod calls;
mod figure;
mod floor;
mod memory;
mod procfs;
mod reload;
mod spawning;

use std::future::Future;
use std::io;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;

use crate::binaries::Binaries;
use crate::figure::{Figure, Printer};

/// Measure Aurora against a bare-socket floor and print each figure.
#[derive(Debug, Parser)]
#[command(name = "aurora-bench")]
struct Args {
    /// Fewer repetitions, shorter samples and 200 plugins instead of 1000, to
    /// finish in about a minute.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure only these figures (comma-separated figure or group names,
    /// such as `rtt_16b,throughput`).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    only: Vec<String>,
    /// Internal: run one mass start (`ours:1000` or `floor:1000`) in this
    /// fresh process and print its figures as JSON.
    #[arg(long, hide = true, value_name = "SIDE:COUNT")]
    mass_start: Option<String>,
}

/// How many repetitions each figure gets and how long its samples last.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    /// One-second samples of the idle supervisor, and as many of the harness
    /// alone.
    pub idle_samples: usize,
    /// Idle plugins under the supervisor for `supervisor_idle`.
    pub idle_plugins: usize,
    pub pss_reps: usize,
    pub spawn_ready_reps: usize,
    pub spawn_100_reps: usize,
    /// How many plugins `spawn_1000` starts: 1000, or 200 in a quick run.
    pub spawn_many: usize,
    pub spawn_many_reps: usize,
    pub rtt_reps: usize,
    pub rtt_16b_calls: usize,
    pub rtt_64k_calls: usize,
    pub throughput_reps: usize,
    pub throughput_time: Duration,
    pub work_reps: usize,
    pub work_calls: usize,
    /// Reloads of one plugin under load for the reload figures.
    pub reloads: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            return Plan {
                quick,
                idle_samples: 2,
                idle_plugins: 10,
                pss_reps: 3,
                spawn_ready_reps: 15,
                spawn_100_reps: 3,
                spawn_many: 200,
                spawn_many_reps: 1,
                rtt_reps: 3,
                rtt_16b_calls: 2000,
                rtt_64k_calls: 300,
                throughput_reps: 3,
                throughput_time: Duration::from_millis(500),
                work_reps: 3,
                work_calls: 100,
                reloads: 10,
            };
        }
        Plan {
            quick,
            idle_samples: 5,
            idle_plugins: 10,
            pss_reps: 5,
            spawn_ready_reps: 31,
            spawn_100_reps: 7,
            spawn_many: 1000,
            spawn_many_reps: 3,
            rtt_reps: 7,
            rtt_16b_calls: 5000,
            rtt_64k_calls: 1000,
            throughput_reps: 7,
            throughput_time: Duration::from_secs(1),
            work_reps: 7,
            work_calls: 300,
            reloads: 50,
        }
    }
}

/// What every measurement needs: the runtime the supervisor runs on, where
/// the programs are, and the plan.
pub struct Bench {
    pub runtime: tokio::runtime::Runtime,
    pub binaries: Binaries,
    pub plan: Plan,
}

impl Bench {
    /// Runs `future` as a task on one of the runtime's worker threads, where
    /// an application's own code would call the supervisor from, and waits
    /// for it on the calling thread.
    ///
    /// # Errors
    ///
    /// The future's own error, or the task's panic as an error.
    pub fn on_worker<T, F>(&self, future: F) -> anyhow::Result<T>
    where
        F: Future<Output = anyhow::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let task = self.runtime.spawn(future);
        self.runtime
            .block_on(task)
            .context("a benchmark task panicked")?
    }
}

/// Figures measured together, because they share their setup.
struct Group {
    /// The figures the group reports, in order.
    figures: &'static [&'static str],
    measure: fn(&Bench) -> anyhow::Result<Vec<Figure>>,
}

/// Every figure, in the order measured. `supervisor_idle` goes first so that
/// its memory figure is not inflated by what earlier figures allocated, and
/// the spawn figures go before the call figures for the same reason.
const GROUPS: &[Group] = &[
    Group {
        figures: &["supervisor_idle", "supervisor_idle_cpu"],
        measure: memory::supervisor_idle,
    },
    Group {
        figures: &["idle_pss"],
        measure: memory::idle_pss,
    },
    Group {
        figures: &["spawn_ready"],
        measure: spawning::spawn_ready,
    },
    Group {
        figures: &["spawn_100"],
        measure: spawning::spawn_100,
    },
    Group {
        figures: &["spawn_1000", "spawn_1000_rss"],
        measure: spawning::spawn_1000,
    },
    Group {
        figures: &["rtt_16b", "rtt_16b_p99", "rtt_64k"],
        measure: calls::round_trips,
    },
    Group {
        figures: &["throughput"],
        measure: calls::throughput,
    },
    Group {
        figures: &["work_1ms"],
        measure: calls::work_1ms,
    },
    Group {
        figures: &["reload_failed_calls", "reload_swap", "reload_complete"],
        measure: reload::reload_under_load,
    },
];

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aurora-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let selected = select_groups(&args.only)?;
    procfs::raise_open_file_limit().context("cannot raise the open-file limit")?;
    let binaries = Binaries::locate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let bench = Bench {
        runtime,
        binaries,
        plan: Plan::new(args.quick),
    };
    if let Some(mass_start) = &args.mass_start {
        let (side, count) = spawning::parse_mass_start(mass_start)?;
        return spawning::run_mass_start(&bench, side, count);
    }

    let mut printer = Printer::new(args.json);
    let title = if args.quick {
        "Aurora against the bare-socket floor (quick run: fewer repetitions, \
         spawn_1000 starts 200 plugins)"
    } else {
        "Aurora against the bare-socket floor"
    };
    if let Err(err) = printer.header(title) {
        return closed_stdout_is_clean(err);
    }

    for group in selected {
        eprintln!("aurora-bench: measuring {}", group.figures.join(", "));
        for figure in (group.measure)(&bench)? {
            if let Err(err) = printer.figure(&figure) {
                return closed_stdout_is_clean(err);
            }
        }
    }
    Ok(())
}

/// The groups `only` names, or every group when it names none.
fn select_groups(only: &[String]) -> anyhow::Result<Vec<&'static Group>> {
    let all_names = || -> Vec<&str> { GROUPS.iter().flat_map(|g| g.figures).copied().collect() };
    if let Some(unknown) = only
        .iter()
        .find(|name| !all_names().contains(&name.as_str()))
    {
        bail!(
            "no figure named {unknown:?}; the figures are {}",
            all_names().join(", ")
        );
    }
    let is_selected = |group: &Group| {
        only.is_empty() || group.figures.iter().any(|f| only.iter().any(|o| o == f))
    };
    Ok(GROUPS.iter().filter(|group| is_selected(group)).collect())
}

/// A reader that stopped reading is not a failure of the harness.
fn closed_stdout_is_clean(err: io::Error) -> anyhow::Result<()> {
    if err.kind() == io::ErrorKind::BrokenPipe {
        return Ok(());
    }
    Err(err).context("cannot write the report")
}
