//! The parts of the `aurora` binary that are not argument parsing: how it
//! logs (`logging.rs`) and how it prints what the daemon answers
//! (`output.rs`).

pub mod logging;
pub mod output;
