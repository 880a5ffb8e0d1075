//! Forwards the plugin's `tracing` events to the supervisor as log records.
//!
//! This is a deliberately small `Subscriber`: plugins pay for what they use,
//! and a full `tracing-subscriber` stack would cost more memory and start-up
//! time than the rest of the SDK together. Spans are accepted but not
//! recorded; events keep their level, target, message and fields.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};

use aurora_protocol::{LogLevel, LogRecord, PluginMessage};
use tokio::sync::mpsc::UnboundedSender;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::serve::Outgoing;

pub(crate) struct Forwarder {
    outgoing: UnboundedSender<Outgoing>,
    max_level: Level,
    next_span: AtomicU64,
}

impl Forwarder {
    pub(crate) fn new(outgoing: UnboundedSender<Outgoing>, max_level: Level) -> Forwarder {
        Forwarder {
            outgoing,
            max_level,
            next_span: AtomicU64::new(1),
        }
    }
}

/// Reads the level named by `value` (`error` … `trace`), `info` if unset or
/// unknown.
pub(crate) fn parse_level(value: Option<&str>) -> Level {
    value
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(Level::INFO)
}

impl Subscriber for Forwarder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max_level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.max_level))
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let mut visitor = FieldVisitor::default();
        event.record(&mut visitor);
        let record = LogRecord {
            level: wire_level(*metadata.level()),
            target: metadata.target().to_owned(),
            message: visitor.message,
            fields: visitor.fields,
        };
        // A send fails only once the plugin is exiting; the record is moot.
        let _ = self
            .outgoing
            .send(Outgoing::Message(PluginMessage::Log(record)));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

fn wire_level(level: Level) -> LogLevel {
    match level {
        Level::ERROR => LogLevel::Error,
        Level::WARN => LogLevel::Warn,
        Level::INFO => LogLevel::Info,
        Level::DEBUG => LogLevel::Debug,
        Level::TRACE => LogLevel::Trace,
    }
}

#[derive(Default)]
struct FieldVisitor {
    message: String,
    fields: Vec<(String, String)>,
}

impl Visit for FieldVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.fields
                .push((field.name().to_owned(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.fields
                .push((field.name().to_owned(), format!("{value:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_records_with_fields() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let forwarder = Forwarder::new(tx, Level::DEBUG);
        tracing::subscriber::with_default(forwarder, || {
            tracing::warn!(target: "wordcount", words = 3, name = "a b", "counted {}", 3);
            tracing::trace!("too verbose to forward");
        });

        let Some(Outgoing::Message(PluginMessage::Log(record))) = rx.try_recv().ok() else {
            panic!("expected one log record");
        };
        assert_eq!(record.level, LogLevel::Warn);
        assert_eq!(record.target, "wordcount");
        assert_eq!(record.message, "counted 3");
        assert_eq!(
            record.fields,
            [
                ("words".to_owned(), "3".to_owned()),
                ("name".to_owned(), "a b".to_owned())
            ]
        );
        assert!(
            rx.try_recv().is_err(),
            "a trace event passed a debug filter"
        );
    }

    #[test]
    fn level_parsing_defaults_to_info() {
        assert_eq!(parse_level(Some("debug")), Level::DEBUG);
        assert_eq!(parse_level(Some("nonsense")), Level::INFO);
        assert_eq!(parse_level(None), Level::INFO);
    }
}
