//! The wordcount plugin: a plugin that does real, if modest, work.
//!
//! Where the echo plugin measures the supervisor, this one stands in for a
//! plugin someone would actually write: it counts and ranks the words of a
//! text, hashes strings, and burns a chosen amount of CPU. Its handlers are
//! synchronous, so a long call holds up the plugin's only thread the way a
//! careless real plugin would. `count` logs through `tracing`, which the SDK
//! forwards to the supervisor, so log forwarding can be watched end to end.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

use aurora_plugin_sdk::{Context, Error, ErrorKind, Plugin};
use serde::Serialize;

/// How many of the most frequent words `count` reports.
const TOP_WORDS: usize = 10;

/// The FNV-1a 64-bit offset basis.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// The FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// How many `spin` iterations run between looks at the clock; a power of two
/// large enough that reading the clock costs nothing measurable.
const SPIN_ITERATIONS_PER_DEADLINE_CHECK: u64 = 1 << 16;

/// What `count` reports about a text.
#[derive(Debug, Serialize)]
struct TextCounts {
    /// Whitespace-separated words, as `wc -w` counts them.
    words: u64,
    /// Lines, counting a last line without a newline as a line.
    lines: u64,
    /// The length of the text in bytes of UTF-8.
    bytes: u64,
    /// The most frequent words with their counts, most frequent first and
    /// alphabetical among equals.
    top: Vec<(String, u64)>,
}

fn main() -> ExitCode {
    Plugin::new("wordcount", env!("CARGO_PKG_VERSION"))
        .method(
            "count",
            |_ctx: &Context, text: String| -> Result<TextCounts, Error> {
                let counts = count_text(&text);
                tracing::info!(
                    words = counts.words,
                    lines = counts.lines,
                    bytes = counts.bytes,
                    "counted a text"
                );
                Ok(counts)
            },
        )
        .method(
            "hash",
            |_ctx: &Context, text: String| -> Result<String, Error> {
                Ok(format!("{:016x}", fnv1a(FNV_OFFSET_BASIS, text.as_bytes())))
            },
        )
        .method(
            "spin",
            |ctx: &Context, iterations: u64| -> Result<u64, Error> { spin(ctx, iterations) },
        )
        .run()
}

/// Counts the words, lines and bytes of `text` and ranks its words.
///
/// For ranking, each word is lower-cased and stripped of leading and trailing
/// characters that are not letters or digits, so "The" and "the," count as
/// one word; a word of punctuation alone is counted but not ranked.
fn count_text(text: &str) -> TextCounts {
    let mut words = 0_u64;
    let mut frequencies: HashMap<String, u64> = HashMap::new();
    for word in text.split_whitespace() {
        words += 1;

        let trimmed = word.trim_matches(|c: char| !c.is_alphanumeric());
        if trimmed.is_empty() {
            continue;
        }
        *frequencies.entry(trimmed.to_lowercase()).or_default() += 1;
    }

    let mut top: Vec<(String, u64)> = frequencies.into_iter().collect();
    top.sort_unstable_by(|(word_a, count_a), (word_b, count_b)| {
        count_b.cmp(count_a).then_with(|| word_a.cmp(word_b))
    });
    top.truncate(TOP_WORDS);

    TextCounts {
        words,
        lines: text.lines().count() as u64,
        bytes: text.len() as u64,
        top,
    }
}

/// Folds `bytes` into the FNV-1a 64-bit hash state `state`.
///
/// Start from [`FNV_OFFSET_BASIS`] to hash a single buffer.
fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// Burns CPU for `iterations` rounds and returns the final hash.
///
/// Each round hashes the previous round's result, so no round can be skipped
/// or reordered and the answer is the same on every machine: a caller picks
/// an iteration count to get a repeatable amount of work. The time a round
/// takes does vary by machine; a benchmark calibrates against it rather than
/// this plugin guessing. Cancellation cannot be observed while a synchronous
/// handler holds the thread, but the deadline can, and is checked now and
/// then.
///
/// # Errors
///
/// `DeadlineExceeded` when the call's deadline passes before the last round.
fn spin(ctx: &Context, iterations: u64) -> Result<u64, Error> {
    let deadline = ctx.deadline();
    let mut hash = FNV_OFFSET_BASIS;
    for round in 0..iterations {
        let is_check_round = round % SPIN_ITERATIONS_PER_DEADLINE_CHECK == 0;
        if is_check_round && Instant::now() >= deadline {
            let message = format!("deadline passed after {round} of {iterations} iterations");
            return Err(Error::new(ErrorKind::DeadlineExceeded, message));
        }
        hash = fnv1a(hash, &hash.to_le_bytes());
    }
    Ok(hash)
}
