//! Figures: one measured quantity for Aurora and for the floor, the ratio
//! between them and whether Aurora met its target; the statistics that reduce
//! repetitions to one number; and the two ways figures are printed.
//!
//! Every figure is the median of its repetitions, taken separately for Aurora
//! and for the floor, and the ratio is always Aurora's median divided by the
//! floor's, whatever the unit: above 1 means Aurora takes longer or uses more,
//! except for a rate such as calls per second, where below 1 means Aurora does
//! less.

use std::io::{self, Write};
use std::time::Duration;

use serde::Serialize;

/// What a figure should reach. These are goals to report against, not
/// assertions: a missed target makes `ok` false and nothing else.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// Aurora's value may be at most this many times the floor's.
    RatioAtMost(f64),
    /// Aurora's value may be at most this much, in the figure's unit.
    OursAtMost(f64),
    /// Aurora's value must be at least this much, in the figure's unit.
    OursAtLeast(f64),
    /// Aurora's value may exceed the floor's by at most `margin`, counted in
    /// `unit` (percentage points, for a figure in percent).
    AboveFloorAtMost { margin: f64, unit: &'static str },
    /// Reported for context, with no goal of its own.
    None,
}

impl Target {
    fn describe(self, unit: &str) -> String {
        match self {
            Target::RatioAtMost(max) => format!("ratio <= {max}"),
            Target::OursAtMost(max) => format!("<= {max} {unit}"),
            Target::OursAtLeast(min) => format!(">= {min} {unit}"),
            Target::AboveFloorAtMost { margin, unit } => format!("<= floor + {margin} {unit}"),
            Target::None => "none, for context".to_owned(),
        }
    }

    fn is_met(self, ours: f64, floor: f64) -> bool {
        match self {
            Target::RatioAtMost(max) => ours <= floor * max,
            Target::OursAtMost(max) => ours <= max,
            Target::OursAtLeast(min) => ours >= min,
            Target::AboveFloorAtMost { margin, .. } => ours - floor <= margin,
            Target::None => true,
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    /// Aurora's median.
    pub ours: f64,
    /// The floor's median.
    pub floor: f64,
    /// `ours / floor`; absent when the floor measured zero.
    pub ratio: Option<f64>,
    pub unit: &'static str,
    pub target: String,
    pub ok: bool,
    /// How many repetitions each median was taken over.
    pub reps: usize,
    /// How many plugins ran at once, for the figures where that varies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugins: Option<usize>,
    /// Anything a reader must know to read the numbers right.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Figure {
    /// Reduces each side's repetitions to its median and judges the target.
    pub fn from_samples(
        name: &str,
        unit: &'static str,
        ours: &[f64],
        floor: &[f64],
        target: Target,
    ) -> Figure {
        let ours_median = median(ours);
        let floor_median = median(floor);
        let ratio = (floor_median > 0.0).then(|| ours_median / floor_median);
        Figure {
            name: name.to_owned(),
            ours: ours_median,
            floor: floor_median,
            ratio,
            unit,
            target: target.describe(unit),
            ok: target.is_met(ours_median, floor_median),
            reps: ours.len().min(floor.len()),
            plugins: None,
            note: None,
        }
    }

    pub fn with_plugins(mut self, plugins: usize) -> Figure {
        self.plugins = Some(plugins);
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Figure {
        self.note = Some(note.into());
        self
    }
}

/// The median of `samples`, or NaN for none.
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        return sorted[middle];
    }
    (sorted[middle - 1] + sorted[middle]) / 2.0
}

/// The `quantile` (0 to 1) of `times`, by the nearest rank.
///
/// # Panics
///
/// When `times` is empty; every measurement loop records at least one time.
pub fn percentile(times: &mut [Duration], quantile: f64) -> Duration {
    assert!(!times.is_empty(), "a percentile of no measurements");
    times.sort_unstable();
    let rank = ((times.len() - 1) as f64 * quantile).round() as usize;
    times[rank]
}

pub fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Prints figures as they are measured: an aligned table for people, or one
/// JSON object per line for programs.
pub struct Printer {
    json: bool,
    out: io::Stdout,
}

/// Column widths of the table, in the order of [`Printer::figure`]'s cells.
const WIDTHS: [usize; 8] = [20, 11, 11, 7, 11, 22, 5, 4];

impl Printer {
    pub fn new(json: bool) -> Printer {
        Printer {
            json,
            out: io::stdout(),
        }
    }

    /// Prints the title and the table's header; nothing in JSON mode.
    ///
    /// # Errors
    ///
    /// When stdout cannot be written, including when it was closed.
    pub fn header(&mut self, title: &str) -> io::Result<()> {
        if self.json {
            return Ok(());
        }
        let mut out = self.out.lock();
        writeln!(out, "{title}")?;
        let cells = [
            "name", "ours", "floor", "ratio", "unit", "target", "ok", "reps",
        ]
        .map(str::to_owned);
        writeln!(out, "{}", row(&cells))?;
        let rule = WIDTHS.map(|width| "-".repeat(width));
        writeln!(out, "{}", row(&rule))?;
        out.flush()
    }

    /// Prints one figure.
    ///
    /// # Errors
    ///
    /// As [`Printer::header`].
    pub fn figure(&mut self, figure: &Figure) -> io::Result<()> {
        let mut out = self.out.lock();
        if self.json {
            let line = serde_json::to_string(&rounded(figure)).map_err(io::Error::other)?;
            writeln!(out, "{line}")?;
            return out.flush();
        }

        let ratio = figure
            .ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        let cells = [
            figure.name.clone(),
            format_value(figure.ours),
            format_value(figure.floor),
            ratio,
            figure.unit.to_owned(),
            figure.target.clone(),
            if figure.ok { "yes" } else { "NO" }.to_owned(),
            figure.reps.to_string(),
        ];
        writeln!(out, "{}", row(&cells))?;
        if let Some(note) = &figure.note {
            writeln!(out, "{:width$}  ^ {note}", "", width = WIDTHS[0])?;
        }
        out.flush()
    }
}

/// Lays out one table row: the name left-aligned, numbers right-aligned,
/// words left-aligned.
fn row(cells: &[String; 8]) -> String {
    let is_right_aligned = [false, true, true, true, false, false, false, true];
    let mut line = String::new();
    for ((cell, width), right) in cells.iter().zip(WIDTHS).zip(is_right_aligned) {
        if right {
            line.push_str(&format!("{cell:>width$}  "));
        } else {
            line.push_str(&format!("{cell:<width$}  "));
        }
    }
    line.trim_end().to_owned()
}

/// Three significant digits or so, without scientific notation.
fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        format!("{value:.0}")
    } else if magnitude >= 100.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// The figure with its numbers cut to three decimals, which is more than any
/// of them can claim and keeps the JSON readable.
fn rounded(figure: &Figure) -> Figure {
    let round = |value: f64| (value * 1000.0).round() / 1000.0;
    Figure {
        ours: round(figure.ours),
        floor: round(figure.floor),
        ratio: figure.ratio.map(round),
        ..figure.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut times: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut times, 0.5), Duration::from_micros(51));
        assert_eq!(percentile(&mut times, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&mut times, 0.0), Duration::from_micros(1));
    }

    #[test]
    fn targets_judge_the_medians() {
        let figure = Figure::from_samples(
            "t",
            "ms",
            &[3.0, 2.0, 9.0],
            &[2.0],
            Target::RatioAtMost(1.5),
        );
        assert_eq!(
            (figure.ours, figure.floor, figure.ratio),
            (3.0, 2.0, Some(1.5))
        );
        assert!(figure.ok);
        assert_eq!(figure.reps, 1);

        let target = Target::AboveFloorAtMost {
            margin: 1.0,
            unit: "pp",
        };
        let figure = Figure::from_samples("t", "%", &[2.5], &[1.0], target);
        assert_eq!(figure.target, "<= floor + 1 pp");
        assert!(!figure.ok);
        let figure = Figure::from_samples("t", "%", &[0.0], &[0.0], Target::OursAtMost(0.5));
        assert!(figure.ok);
        assert_eq!(figure.ratio, None);
    }
}
