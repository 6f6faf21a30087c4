//! Keyed commitments to a run's input files: data identity without leaking the data.
//!
//! A plain sha256 of the training file is a deterministic function of the private data: whoever
//! knows every record but one can test candidates for the last one against it, so publishing it
//! beside the adapter breaks the (ε, δ) guarantee. The release therefore carries
//! HMAC-SHA256(key, file bytes) with a fresh 256-bit key that is stored only in the run's private
//! part: without the key the commitment is a pseudo-random string (it reveals nothing about the
//! file), and with it the data owner (or an auditor the owner trusts) can check that a given file
//! is the one the run trained on (`dptrain verify` with the private part).

use hmac::{Hmac, Mac};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use std::io::Read;
use std::path::Path;

/// The secret key of a run's commitments (kept in `private/run.json` and the checkpoints).
#[derive(Clone, PartialEq, Eq)]
pub struct CommitmentKey([u8; 32]);

impl std::fmt::Debug for CommitmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitmentKey(<secret>)")
    }
}

impl CommitmentKey {
    /// A fresh key from the operating system's entropy.
    pub fn fresh() -> CommitmentKey {
        let mut k = [0u8; 32];
        ChaCha20Rng::from_os_rng().fill_bytes(&mut k);
        CommitmentKey(k)
    }

    /// A key drawn from `rng` (a seeded run's own stream: such a run certifies nothing, and its
    /// outputs must then be reproducible byte for byte).
    pub fn from_rng(rng: &mut impl RngCore) -> CommitmentKey {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        CommitmentKey(k)
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Result<CommitmentKey, String> {
        let bytes = unhex(s).ok_or_else(|| "a commitment key is 64 hexadecimal digits".to_string())?;
        let k: [u8; 32] = bytes.try_into().map_err(|_| "a commitment key is 64 hexadecimal digits".to_string())?;
        Ok(CommitmentKey(k))
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }

    /// HMAC-SHA256 of `bytes`, as 64 hexadecimal digits.
    pub fn commit(&self, bytes: &[u8]) -> String {
        let mut m = self.mac();
        m.update(bytes);
        hex(&m.finalize().into_bytes())
    }

    /// HMAC-SHA256 of a file's bytes, streamed.
    pub fn commit_file(&self, path: &Path) -> std::io::Result<String> {
        let mut m = self.mac();
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            m.update(&buf[..n]);
        }
        Ok(hex(&m.finalize().into_bytes()))
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 (key "Jefe"), extended to our fixed-size key by the HMAC definition:
    /// a key shorter than the block is zero-padded, so "Jefe" + 28 zero bytes is the same key.
    #[test]
    fn commitment_is_hmac_sha256_of_the_rfc_4231_vector() {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(b"Jefe");
        let key = CommitmentKey(k);
        assert_eq!(
            key.commit(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(CommitmentKey::from_hex(&key.to_hex()).unwrap(), key);
        assert!(CommitmentKey::from_hex("zz").is_err());
    }

    #[test]
    fn commitments_differ_by_key_and_equal_the_file_commitment() {
        let (a, b) = (CommitmentKey::fresh(), CommitmentKey::fresh());
        assert_ne!(a.commit(b"records"), b.commit(b"records"));
        assert_ne!(a.commit(b"records"), crate::config::hex_sha256(b"records"));
        let path = std::env::temp_dir().join(format!("dptrain-commit-{}", std::process::id()));
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &big).unwrap();
        assert_eq!(a.commit_file(&path).unwrap(), a.commit(&big));
        let _ = std::fs::remove_file(&path);
    }
}
