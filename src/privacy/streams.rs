//! Separate random streams for sampling, noise and initialisation (ChaCha20 each).
//!
//! Unseeded (the default, and the only mode fit for release), every stream is keyed with fresh
//! OS entropy. Seeded, the streams share a key derived from the seed and differ in their ChaCha
//! stream id, so a run is bit-reproducible; such a run certifies nothing (its guarantee, certificate
//! and `dptrain verify` say so). Keyed by a secret `StreamsKey` (drawn from OS entropy by the
//! caller and kept in a private part, never in a config), the streams are as unpredictable as
//! unseeded ones and the run certifies as one: `dptrain tune` fixes each trial's key before the
//! trial runs, so a trial restarted after an interruption repeats its sampling and noise instead of
//! drawing new ones (which would let whoever restarts it pick among several noisy outcomes).

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

/// A secret 256-bit key for a run's random streams (its `Debug` form does not show it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StreamsKey(pub [u8; 32]);

impl std::fmt::Debug for StreamsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamsKey(secret)")
    }
}

impl StreamsKey {
    /// A fresh key from OS entropy.
    pub fn fresh() -> Self {
        let mut k = [0u8; 32];
        ChaCha20Rng::from_os_rng().fill_bytes(&mut k);
        StreamsKey(k)
    }

    pub fn to_hex(&self) -> String {
        super::commitment::hex(&self.0)
    }

    /// A key from its 64 hexadecimal digits.
    pub fn from_hex(s: &str) -> Option<StreamsKey> {
        super::commitment::unhex(s)?.try_into().ok().map(StreamsKey)
    }

    /// The key of sub-stream `id` (an independent key: ChaCha20 keyed by this key, stream `id`).
    pub fn derive(&self, id: u64) -> StreamsKey {
        let mut r = ChaCha20Rng::from_seed(self.0);
        r.set_stream(id);
        let mut k = [0u8; 32];
        r.fill_bytes(&mut k);
        StreamsKey(k)
    }
}

impl RandomStreams {
    /// Streams keyed by a secret key: unpredictable without it, reproducible with it.
    pub fn from_key(key: &StreamsKey) -> Self {
        let stream = |id: u64| {
            let mut r = ChaCha20Rng::from_seed(key.0);
            r.set_stream(id);
            r
        };
        RandomStreams { sampling: stream(1), noise: stream(2), init: stream(3), commitment: stream(4), seeded: false }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streams_key_reads_back_from_its_hex_and_keys_independent_streams() {
        let k = StreamsKey::fresh();
        assert_eq!(StreamsKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(StreamsKey::from_hex(&k.to_hex()[..62]), None);
        assert_eq!(StreamsKey::from_hex(&format!("{}zz", &k.to_hex()[..62])), None);
        assert!(!format!("{k:?}").contains(&k.to_hex()[..8]));
        // Derived keys differ from each other and from the key; the same id derives the same key.
        assert_eq!(k.derive(3), k.derive(3));
        assert!(k.derive(1) != k.derive(2) && k.derive(1) != k);
        // The four streams of one key draw different numbers; the same key draws the same ones.
        let mut a = RandomStreams::from_key(&k);
        let mut b = RandomStreams::from_key(&k);
        let firsts: Vec<u64> =
            [&mut a.sampling, &mut a.noise, &mut a.init, &mut a.commitment].iter_mut().map(|r| r.next_u64()).collect();
        assert_eq!(b.noise.next_u64(), firsts[1]);
        assert!((0..4).all(|i| (i + 1..4).all(|j| firsts[i] != firsts[j])), "{firsts:?}");
        assert!(!a.seeded);
    }
}
