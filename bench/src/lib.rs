//! The parts of the benchmark that both of its programs share.
//!
//! The harness (`aurora-bench`) and the bare child it measures Aurora against
//! (`aurora-bench-floor`) must agree on two things: the bytes of a call and a
//! reply, and the CPU work behind the `spin` method. Both live here so that
//! neither program can drift from the other.
//!
//! Layout:
//! - [`wire`]: the few protocol frames the floor speaks, read and written by
//!   hand over blocking I/O, without building protocol values;
//! - [`work`]: the CPU-bound loop behind `spin`, the same loop the wordcount
//!   example plugin runs.

pub mod wire;
pub mod work;
