//! Separate random streams for sampling, noise and initialisation (ChaCha20 each).
//!
//! Unseeded (the default, and the only mode fit for release), every stream is keyed with fresh
//! OS entropy. Seeded, the streams share a key derived from the seed and differ in their ChaCha
//! stream id, so a run is bit-reproducible; such a run certifies nothing (its guarantee, certificate
//! and `dptrain verify` say so).

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

pub struct RandomStreams {
    pub sampling: ChaCha20Rng,
    pub noise: ChaCha20Rng,
    pub init: ChaCha20Rng,
    /// Draws the key of the data commitments (`CommitmentKey`).
    pub commitment: ChaCha20Rng,
    pub seeded: bool,
}

impl RandomStreams {
    pub fn new(seed: Option<u64>) -> Self {
        match seed {
            Some(s) => {
                let stream = |id: u64| {
                    let mut r = ChaCha20Rng::seed_from_u64(s);
                    r.set_stream(id);
                    r
                };
                RandomStreams {
                    sampling: stream(1),
                    noise: stream(2),
                    init: stream(3),
                    commitment: stream(4),
                    seeded: true,
                }
            }
            None => RandomStreams {
                sampling: ChaCha20Rng::from_os_rng(),
                noise: ChaCha20Rng::from_os_rng(),
                init: ChaCha20Rng::from_os_rng(),
                commitment: ChaCha20Rng::from_os_rng(),
                seeded: false,
            },
        }
    }
}

/// A uniform double in [0, 1) with 53 random bits.
pub fn uniform01(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}
