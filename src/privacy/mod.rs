//! The DP mechanism, one stage per file so each can be checked against the paper line by line:
//! per-example gradients (`per_example`), clipping and summation (`clip`), Gaussian noise from a
//! CSPRNG (`noise`), the random streams they draw from (`streams`), and the keyed commitments that identify a run's
//! data without revealing it (`commitment`).

pub mod clip;
pub mod commitment;
pub mod noise;
pub mod per_example;
pub mod streams;

pub use clip::{clip_and_sum, clip_and_sum_reference, clip_and_sum_reference_kind, clip_factor, ClipKind, ClipStats};
pub use commitment::CommitmentKey;
pub use noise::GaussianNoise;
pub use per_example::{per_example_grad_parts, per_example_grads};
pub use streams::{RandomStreams, StreamsKey};
