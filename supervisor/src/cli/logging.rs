//! How `aurora` logs: human lines on stderr, JSON with `--log-format json`,
//! and, under systemd, human lines without timestamps (journald adds its
//! own) carrying a syslog priority prefix that journald turns into the
//! entry's priority.
//!
//! The daemon also installs the layer that fills the per-plugin log rings
//! behind `aurora logs`; it has its own filter (info and above), so a quiet
//! `--log` setting does not empty the rings.

use std::fmt;
use std::io::IsTerminal;

use aurora_supervisor::daemon::logs::LogStore;
use aurora_supervisor::daemon::settings::LogFormat;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. `filter` is a tracing filter; when it is
/// invalid, `fallback` is used and the problem printed.
pub fn init(format: LogFormat, filter: &str, fallback: &str, store: Option<&LogStore>) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|err| {
        eprintln!("aurora: ignoring log filter {filter:?}: {err}");
        EnvFilter::new(fallback)
    });
    let under_journald = stderr_is_journal();
    let colour = std::io::stderr().is_terminal() && !under_journald;

    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let output = match (format, under_journald) {
        (LogFormat::Json, _) => output.json().with_filter(filter).boxed(),
        (LogFormat::Human, true) => output
            .event_format(Journald(tracing_subscriber::fmt::format().without_time()))
            .with_filter(filter)
            .boxed(),
        (LogFormat::Human, false) => output.with_filter(filter).boxed(),
    };
    let rings = store.map(|store| {
        store
            .layer()
            .with_filter(filter_fn(|metadata| *metadata.level() <= Level::INFO))
    });
    tracing_subscriber::registry()
        .with(output)
        .with(rings)
        .init();
}

/// Whether stderr is connected to the journal: systemd sets
/// `JOURNAL_STREAM` to the device and inode of the stream it connected,
/// which a program compares with its own stderr, since a variable inherited
/// by a child whose stderr was redirected would otherwise mislead it.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    stream.to_str() == Some(&format!("{}:{}", stat.st_dev, stat.st_ino))
}

/// The default format without timestamps, each line prefixed with its
/// syslog priority (`<3>` error to `<7>` debug).
struct Journald(Format<Full, ()>);

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
