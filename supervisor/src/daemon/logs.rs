//! The recent log of every plugin, for `aurora logs`.
//!
//! Everything the supervisor logs about a plugin happens inside that
//! plugin's `plugin` span: its stdout and stderr lines (`spawn.rs`), the
//! records it forwards (`connection.rs`) and the lifecycle events of its task
//! (`plugin.rs`). [`PluginLogLayer`] is a `tracing` layer that picks those
//! events out by their span and keeps the last lines of each plugin in a
//! bounded ring, so the daemon needs no second path for plugin output and
//! the rings cost nothing where the layer is not installed.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use aurora_protocol::LogLevel;
use aurora_protocol::control::LogLine;
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// How many new lines a slow `--follow` reader may fall behind before it
/// misses some.
const FOLLOW_BACKLOG: usize = 4096;

/// The span every plugin task runs in (see `PluginHandle::start`).
const PLUGIN_SPAN: &str = "plugin";

/// The last lines of every plugin's log. Cheap to clone; clones share the
/// rings.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Lines kept per plugin.
    capacity: usize,
    rings: Mutex<HashMap<String, VecDeque<LogLine>>>,
    live: broadcast::Sender<(String, LogLine)>,
}

impl LogStore {
    /// A store keeping the last `capacity` lines of each plugin.
    pub fn new(capacity: usize) -> LogStore {
        let (live, _) = broadcast::channel(FOLLOW_BACKLOG);
        LogStore {
            inner: Arc::new(Inner {
                capacity: capacity.max(1),
                rings: Mutex::default(),
                live,
            }),
        }
    }

    /// The layer that fills this store.
    pub fn layer(&self) -> PluginLogLayer {
        PluginLogLayer {
            store: self.clone(),
        }
    }

    fn rings(&self) -> MutexGuard<'_, HashMap<String, VecDeque<LogLine>>> {
        self.inner
            .rings
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Adds a line to `plugin`'s ring, dropping its oldest when full.
    pub fn push(&self, plugin: &str, line: LogLine) {
        {
            let mut rings = self.rings();
            let ring = rings.entry(plugin.to_owned()).or_default();
            if ring.len() == self.inner.capacity {
                ring.pop_front();
            }
            ring.push_back(line.clone());
        }
        // No followers is the usual case.
        let _ = self.inner.live.send((plugin.to_owned(), line));
    }

    /// The last `lines` lines of `plugin`, oldest first, and from the same
    /// moment on, every new line of every plugin. Taking both under one lock
    /// means a follower neither misses nor repeats a line.
    pub fn tail_and_follow(
        &self,
        plugin: &str,
        lines: usize,
    ) -> (Vec<LogLine>, broadcast::Receiver<(String, LogLine)>) {
        let rings = self.rings();
        let live = self.inner.live.subscribe();
        let tail = match rings.get(plugin) {
            Some(ring) => ring
                .iter()
                .skip(ring.len().saturating_sub(lines))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        (tail, live)
    }

    /// The last `lines` lines of `plugin`, oldest first.
    pub fn tail(&self, plugin: &str, lines: usize) -> Vec<LogLine> {
        self.tail_and_follow(plugin, lines).0
    }
}

/// The `tracing` layer behind a [`LogStore`].
pub struct PluginLogLayer {
    store: LogStore,
}

/// The plugin a span belongs to, kept in the span's extensions.
struct PluginName(String);

impl<S> tracing_subscriber::Layer<S> for PluginLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != PLUGIN_SPAN {
            return;
        }
        let mut visitor = NameVisitor(None);
        attrs.record(&mut visitor);
        if let (Some(name), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().insert(PluginName(name));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        let plugin = scope
            .into_iter()
            .find_map(|span| span.extensions().get::<PluginName>().map(|p| p.0.clone()));
        let Some(plugin) = plugin else {
            return;
        };

        let mut fields = LineVisitor::default();
        event.record(&mut fields);
        let source = match (fields.stream.as_deref(), fields.from_plugin) {
            (Some(stream), _) => stream.to_owned(),
            (None, true) => "plugin".to_owned(),
            (None, false) => "aurora".to_owned(),
        };
        let mut text = fields.message;
        if !fields.rest.is_empty() {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(fields.rest.trim_start());
        }
        let line = LogLine {
            unix_ms: unix_ms(),
            level: level_of(event.metadata().level()),
            source,
            text,
        };
        self.store.push(&plugin, line);
    }
}

fn level_of(level: &Level) -> LogLevel {
    match *level {
        Level::ERROR => LogLevel::Error,
        Level::WARN => LogLevel::Warn,
        Level::INFO => LogLevel::Info,
        Level::DEBUG => LogLevel::Debug,
        Level::TRACE => LogLevel::Trace,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct NameVisitor(Option<String>);

impl Visit for NameVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "name" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `name = %spec.name` arrives as a Display wrapped in Debug.
        if field.name() == "name" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// Collects an event's message and fields into one line of text.
#[derive(Default)]
struct LineVisitor {
    message: String,
    /// `stdout` or `stderr` for captured output.
    stream: Option<String>,
    /// Whether the event re-emits a record the plugin forwarded.
    from_plugin: bool,
    /// The other fields as ` key=value`.
    rest: String,
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "stream" => self.stream = Some(value.to_owned()),
            "source" => self.from_plugin = value == "plugin",
            // A forwarded record's own fields, already `key=value`.
            "fields" => {
                if !value.is_empty() {
                    let _ = write!(self.rest, " {value}");
                }
            }
            "plugin_target" => {}
            "message" => self.message = value.to_owned(),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "plugin_target" => {}
            "stream" | "source" | "fields" => self.record_str(field, &format!("{value:?}")),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn events_in_a_plugin_span_land_in_its_ring_and_nowhere_else() {
        let store = LogStore::new(3);
        let subscriber = tracing_subscriber::registry().with(store.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any plugin");
            let span = tracing::info_span!("plugin", name = %"echo");
            let _entered = span.enter();
            tracing::info!(stream = "stderr", "line {}", 1);
            tracing::warn!(
                source = "plugin",
                plugin_target = "echo",
                fields = "a=1",
                "from it"
            );
            tracing::info!(pid = 42, "plugin ready");
            tracing::info!(stream = "stdout", "four");
        });

        let lines = store.tail("echo", 10);
        let texts: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l.source.as_str(), l.text.as_str()))
            .collect();
        // Three kept of four: the ring is bounded.
        assert_eq!(
            texts,
            [
                ("plugin", "from it a=1"),
                ("aurora", "plugin ready pid=42"),
                ("stdout", "four")
            ]
        );
        assert_eq!(lines[0].level, LogLevel::Warn);
        assert_eq!(store.tail("echo", 1).len(), 1);
        assert!(store.tail("other", 10).is_empty());
    }

    #[test]
    fn a_follower_sees_lines_after_its_tail() {
        let store = LogStore::new(10);
        let line = |text: &str| LogLine {
            unix_ms: 0,
            level: LogLevel::Info,
            source: "stdout".into(),
            text: text.into(),
        };
        store.push("a", line("old"));
        let (tail, mut live) = store.tail_and_follow("a", 5);
        store.push("a", line("new"));
        assert_eq!(tail, [line("old")]);
        assert_eq!(live.try_recv().unwrap(), ("a".to_owned(), line("new")));
    }
}
