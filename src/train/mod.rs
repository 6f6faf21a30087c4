//! Training: the DP-SGD step, the optimiser, evaluation and the run loop.

pub mod checkpoint;
pub mod eval;
pub mod interrupt;
pub mod optimizer;
pub mod params;
pub mod run;
pub mod step;

pub use run::{run, RunError, RunOptions, RunOutcome};
