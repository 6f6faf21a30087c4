//! The ChaCha20 block function exactly as `kernels/dp.cu` computes it (djb layout: 64-bit block
//! counter in words 12–13, 64-bit stream id in words 14–15). The CPU noise path reads the same
//! keystream from `rand_chacha`; the test below pins that both agree word for word, so the GPU
//! kernel (a line-by-line copy of this function) is checked against rand_chacha by the GPU tests.

const CONSTANTS: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

fn quarter_round(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    x[a] = x[a].wrapping_add(x[b]);
    x[d] = (x[d] ^ x[a]).rotate_left(16);
    x[c] = x[c].wrapping_add(x[d]);
    x[b] = (x[b] ^ x[c]).rotate_left(12);
    x[a] = x[a].wrapping_add(x[b]);
    x[d] = (x[d] ^ x[a]).rotate_left(8);
    x[c] = x[c].wrapping_add(x[d]);
    x[b] = (x[b] ^ x[c]).rotate_left(7);
}

/// Keystream block `counter` of stream `stream` under `key` (32 bytes, little-endian words).
pub fn chacha20_block(key: &[u8; 32], counter: u64, stream: u64) -> [u32; 16] {
    let mut s = [0u32; 16];
    s[..4].copy_from_slice(&CONSTANTS);
    for i in 0..8 {
        s[4 + i] = u32::from_le_bytes(key[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    }
    s[12] = counter as u32;
    s[13] = (counter >> 32) as u32;
    s[14] = stream as u32;
    s[15] = (stream >> 32) as u32;
    let mut x = s;
    for _ in 0..10 {
        quarter_round(&mut x, 0, 4, 8, 12);
        quarter_round(&mut x, 1, 5, 9, 13);
        quarter_round(&mut x, 2, 6, 10, 14);
        quarter_round(&mut x, 3, 7, 11, 15);
        quarter_round(&mut x, 0, 5, 10, 15);
        quarter_round(&mut x, 1, 6, 11, 12);
        quarter_round(&mut x, 2, 7, 8, 13);
        quarter_round(&mut x, 3, 4, 9, 14);
    }
    for i in 0..16 {
        x[i] = x[i].wrapping_add(s[i]);
    }
    x
}

/// The key as the four little-endian u64 words the CUDA kernels take as arguments.
pub fn key_words(key: &[u8; 32]) -> [u64; 4] {
    let mut w = [0u64; 4];
    for (i, x) in w.iter_mut().enumerate() {
        *x = u64::from_le_bytes(key[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    /// RFC 8439 (formerly 7539) §2.3.2 test vector, the whole published block. The RFC's state is
    /// 32-bit block count (word 12) + 96-bit nonce (words 13–15); the djb layout here (and
    /// rand_chacha's) is a 64-bit counter (words 12–13, low word first) + 64-bit stream (words
    /// 14–15). Key 00:01:…:1f; nonce 00:00:00:09 00:00:00:4a 00:00:00:00 read as little-endian
    /// words is 0x0900_0000, 0x4a00_0000, 0; with block count 1 that is counter =
    /// 0x0900_0000_0000_0001, stream = 0x4a00_0000.
    #[test]
    fn block_function_matches_rfc8439_test_vector() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let out = chacha20_block(&key, 0x0900_0000_0000_0001, 0x4a00_0000);
        let published: [u32; 16] = [
            0xe4e7f110, 0x15593bd1, 0x1fdd0f50, 0xc47120a3, 0xc7f4d1c7, 0x0368c033, 0x9aaa2204, 0x4e6cd4c3, 0x466482d2,
            0x09aa9f07, 0x05d7c214, 0xa2028bd9, 0xd19c12b5, 0xb94e16de, 0xe883d0cb, 0x4e3c50a2,
        ];
        assert_eq!(out, published);
    }

    #[test]
    fn block_function_matches_rand_chacha_keystream() {
        let key: [u8; 32] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        for stream in [0u64, 1, 7, u64::MAX - 3] {
            let mut rng = ChaCha20Rng::from_seed(key);
            rng.set_stream(stream);
            rng.set_word_pos(0);
            for counter in 0..9u64 {
                let want: Vec<u32> = (0..16).map(|_| rng.next_u32()).collect();
                assert_eq!(chacha20_block(&key, counter, stream).to_vec(), want, "stream {stream} block {counter}");
            }
        }
    }

    #[test]
    fn key_words_are_little_endian_pairs_of_key_words() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let w = key_words(&key);
        assert_eq!(w[0] as u32, u32::from_le_bytes([0, 1, 2, 3]));
        assert_eq!((w[0] >> 32) as u32, u32::from_le_bytes([4, 5, 6, 7]));
        assert_eq!((w[3] >> 32) as u32, u32::from_le_bytes([28, 29, 30, 31]));
    }
}
