//! Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.
//!
//! Layout: `<output dir>/private/checkpoints/step-<k>/` with `state.json` (step count, sampler and
//! noise states, commitment key, ledger, metrics so far, fingerprints of config / model / data),
//! `state.sha256` (its checksum) and `tensors.safetensors` (parameters, optimiser state). A
//! checkpoint is built in a temporary folder, every file is fsynced, then the folder is renamed
//! into place and the parent fsynced: a crash leaves either the old checkpoints or the new one,
//! never a half-written one (a folder of the same step is first renamed aside, never deleted
//! before its replacement is in place). `state.sha256` covers `state.json`, and `state.json`
//! holds the sha256 of the tensor file, so an edited or corrupted checkpoint is refused, not
//! loaded; resume also checks that the sampler position, optimiser step count, ledger and metrics
//! all account for the same number of steps.
//!
//! A checkpoint holds the noise key and the sampler state: whoever has two of them can replay the
//! steps between them without noise. It is as sensitive as the training data, lives in the run's
//! private part (owner-only), and is deleted after a finished run unless the config keeps it.

use crate::accounting::event::Ledger;
use crate::config::hex_sha256;
use crate::report::StepMetrics;
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use crate::report::rundir::CHECKPOINTS as CHECKPOINT_DIR;
const STATE: &str = "state.json";
const STATE_SUM: &str = "state.sha256";
const TENSORS: &str = "tensors.safetensors";
/// The checkpoint format this dptrain writes and reads (2: private/ layout, state checksum, commitment key).
pub const FORMAT: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path} is unusable: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("no checkpoint in {0} (expected {0}/private/checkpoints/step-*/ or a checkpoint folder)")]
    NotFound(PathBuf),
    #[error("checkpoint {path} does not belong to this run: {differences}")]
    Mismatch { path: PathBuf, differences: String },
}

/// What a checkpoint must agree with to be resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub config_sha256: String,
    /// The config text itself (to name the keys that differ).
    pub config_text: String,
    /// sha256 over the model folder's config.json and weight files.
    pub model_sha256: String,
    pub train_sha256: String,
    pub test_sha256: String,
    pub non_private: bool,
}

impl Fingerprint {
    /// Every difference, named: config keys that changed, the base model, the data, the mode.
    pub fn differences(&self, other: &Fingerprint) -> Vec<String> {
        let mut out = Vec::new();
        if self.config_sha256 != other.config_sha256 {
            out.push(match changed_keys(&self.config_text, &other.config_text) {
                Some(keys) if keys.is_empty() => "the config file differs (formatting or comments only)".to_string(),
                Some(keys) => format!("config keys differ: {}", keys.join(", ")),
                None => "the config file differs (one version does not parse as TOML)".to_string(),
            });
        }
        if self.model_sha256 != other.model_sha256 {
            out.push(format!(
                "the base model differs (sha256 {} vs {})",
                short(&self.model_sha256),
                short(&other.model_sha256)
            ));
        }
        if self.train_sha256 != other.train_sha256 {
            out.push(format!(
                "the training data differs (sha256 {} vs {})",
                short(&self.train_sha256),
                short(&other.train_sha256)
            ));
        }
        if self.test_sha256 != other.test_sha256 {
            out.push(format!(
                "the test data differs (sha256 {} vs {})",
                short(&self.test_sha256),
                short(&other.test_sha256)
            ));
        }
        if self.non_private != other.non_private {
            out.push("one run is --non-private and the other is not".into());
        }
        out
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// Dotted TOML keys whose values differ between two config texts (formatting is ignored).
fn changed_keys(a: &str, b: &str) -> Option<Vec<String>> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let parse = |s: &str| {
        let table = s.parse::<toml::Table>().ok()?;
        let mut out = Vec::new();
        flatten("", &toml::Value::Table(table), &mut out);
        Some(out)
    };
    let (Some(pa), Some(pb)) = (parse(a), parse(b)) else {
        return None;
    };
    let mut keys: Vec<String> = Vec::new();
    for (k, v) in &pa {
        if pb.iter().find(|(kb, _)| kb == k).map(|(_, vb)| vb) != Some(v) {
            keys.push(k.clone());
        }
    }
    for (k, _) in &pb {
        if !pa.iter().any(|(ka, _)| ka == k) {
            keys.push(k.clone());
        }
    }
    keys.sort();
    keys.dedup();
    Some(keys)
}

/// A ChaCha20 stream's exact position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: [u8; 32],
    pub stream: u64,
    /// u128 as a decimal string (JSON numbers are f64).
    pub word_pos: String,
}

impl RngState {
    pub fn of(rng: &ChaCha20Rng) -> RngState {
        RngState { seed: rng.get_seed(), stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
    }

    pub fn restore(&self) -> Result<ChaCha20Rng, String> {
        use rand::SeedableRng;
        let pos: u128 = self.word_pos.parse().map_err(|e| format!("bad word position: {e}"))?;
        let mut rng = ChaCha20Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// Optimiser state (vectors live in the tensor file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OptimizerState {
    /// AdamW: steps taken; moments `adam_m`, `adam_v` (f64) when at least one step was taken.
    AdamW { steps: u64 },
    /// SGD: velocity `sgd_velocity` (f64) when at least one step was taken.
    Sgd,
}

/// Everything of a run's state but the vectors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub engine: String,
    /// Logical steps completed.
    pub step: u64,
    pub planned_steps: u64,
    /// The stop rule's step limit (`None`: the planned steps).
    pub max_steps: Option<u64>,
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub target_epsilon: Option<f64>,
    pub sampler: RngState,
    pub noise_key: [u8; 32],
    /// The data commitments' key (hex), so a resumed run commits to its data under the same key.
    pub commitment_key: String,
    pub seeded: bool,
    pub optimizer: OptimizerState,
    pub ledger: Ledger,
    pub metrics: Vec<StepMetrics>,
    pub examples_seen: usize,
    pub train_seconds: f64,
    pub fingerprint: Fingerprint,
    /// The micro-batch size the run uses (chosen by its memory plan unless the config fixes it),
    /// kept so that a resumed run groups per-example gradients as the uninterrupted run would.
    /// Absent in checkpoints written before the memory plan existed (those runs used the config's
    /// `training.max-physical-batch`, default 32).
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// sha256 of tensors.safetensors.
    pub tensors_sha256: String,
}

/// A checkpoint in memory: state plus the named f32/f64 vectors.
pub struct Checkpoint {
    pub state: State,
    pub params: Vec<f32>,
    /// `adam_m`, `adam_v` or `sgd_velocity`.
    pub optimizer_vectors: HashMap<String, Vec<f64>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.into(), source }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Checkpoint {
    fn tensor_bytes(&self) -> Result<Vec<u8>, String> {
        let mut data: Vec<(String, Vec<u8>, safetensors::Dtype, usize)> = vec![(
            "params".into(),
            self.params.iter().flat_map(|x| x.to_le_bytes()).collect(),
            safetensors::Dtype::F32,
            self.params.len(),
        )];
        let mut names: Vec<&String> = self.optimizer_vectors.keys().collect();
        names.sort();
        for n in names {
            let v = &self.optimizer_vectors[n];
            data.push((n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), safetensors::Dtype::F64, v.len()));
        }
        let views = data
            .iter()
            .map(|(n, b, dt, len)| safetensors::tensor::TensorView::new(*dt, vec![*len], b).map(|v| (n.clone(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        safetensors::serialize(views, None).map_err(|e| e.to_string())
    }

    /// Writes `<root>/step-<k>` atomically (`root`: the run's checkpoint folder) and keeps only
    /// the newest `keep`.
    pub fn write(&mut self, root: &Path, keep: usize) -> Result<PathBuf, CheckpointError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        let name = format!("step-{:08}", self.state.step);
        let fin = root.join(&name);
        let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)).map_err(io(&tmp))?;
        }
        let tensors = self.tensor_bytes().map_err(|message| CheckpointError::Corrupt { path: tmp.clone(), message })?;
        self.state.tensors_sha256 = hex_sha256(&tensors);
        write_file(&tmp.join(TENSORS), &tensors)?;
        let state = serde_json::to_vec_pretty(&self.state).expect("state serialises");
        write_file(&tmp.join(STATE), &state)?;
        write_file(&tmp.join(STATE_SUM), hex_sha256(&state).as_bytes())?;
        sync_dir(&tmp);
        // A checkpoint of the same step (a resumed finished run) is renamed aside first and removed
        // only once the new one is in place: a crash in between leaves a complete checkpoint.
        let aside = root.join(format!(".old-{name}-{}", std::process::id()));
        if fin.exists() {
            let _ = std::fs::remove_dir_all(&aside);
            std::fs::rename(&fin, &aside).map_err(io(&fin))?;
            #[cfg(test)]
            if tests::CRASH_AFTER_ASIDE.with(|c| c.get()) {
                return Err(CheckpointError::Corrupt { path: fin, message: "simulated crash".into() });
            }
        }
        std::fs::rename(&tmp, &fin).map_err(io(&fin))?;
        sync_dir(root);
        let _ = std::fs::remove_dir_all(&aside);
        // Older checkpoints go only after the new one is in place.
        let mut all = list(root)?;
        all.sort();
        while all.len() > keep.max(1) {
            let (_, old) = all.remove(0);
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(fin)
    }

    /// Reads and verifies one checkpoint folder.
    pub fn read(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let corrupt = |message: String| CheckpointError::Corrupt { path: dir.into(), message };
        let state_bytes = std::fs::read(dir.join(STATE)).map_err(|e| corrupt(format!("{STATE}: {e}")))?;
        let sum = std::fs::read_to_string(dir.join(STATE_SUM)).map_err(|e| corrupt(format!("{STATE_SUM}: {e}")))?;
        if sum.trim() != hex_sha256(&state_bytes) {
            return Err(corrupt(format!("{STATE} does not match the checksum in {STATE_SUM} (edited or corrupted)")));
        }
        let state: State = serde_json::from_slice(&state_bytes).map_err(|e| corrupt(format!("{STATE}: {e}")))?;
        if state.format != FORMAT {
            return Err(corrupt(format!("format {} (this dptrain reads {FORMAT})", state.format)));
        }
        let tensors = std::fs::read(dir.join(TENSORS)).map_err(|e| corrupt(format!("{TENSORS}: {e}")))?;
        if hex_sha256(&tensors) != state.tensors_sha256 {
            return Err(corrupt(format!("{TENSORS} does not match the sha256 recorded in {STATE}")));
        }
        let st = candle_core::safetensors::load_buffer(&tensors, &Device::Cpu).map_err(|e| corrupt(e.to_string()))?;
        let vec_f32 = |t: &Tensor| t.to_vec1::<f32>().map_err(|e| corrupt(e.to_string()));
        let params = vec_f32(st.get("params").ok_or_else(|| corrupt("no `params` tensor".into()))?)?;
        let mut optimizer_vectors = HashMap::new();
        for (name, t) in &st {
            if name != "params" {
                optimizer_vectors.insert(name.clone(), t.to_vec1::<f64>().map_err(|e| corrupt(e.to_string()))?);
            }
        }
        Ok(Checkpoint { state, params, optimizer_vectors })
    }
}

/// (step, folder) of every complete checkpoint under `root` (temporary folders are skipped).
fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).map_err(io(root))? {
        let e = e.map_err(io(root))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(k) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            out.push((k, e.path()));
        }
    }
    Ok(out)
}

/// The checkpoint folder `--resume PATH` means: PATH itself if it is one, else the newest under
/// PATH/private/checkpoints (a run folder) or PATH/checkpoints (its private part).
pub fn locate(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join(STATE).exists() {
        return Ok(path.into());
    }
    let root = [path.join(crate::report::rundir::PRIVATE).join(CHECKPOINT_DIR), path.join(CHECKPOINT_DIR)]
        .into_iter()
        .find(|r| r.is_dir())
        .ok_or_else(|| CheckpointError::NotFound(path.into()))?;
    let mut all = list(&root)?;
    all.sort();
    all.pop().map(|(_, p)| p).ok_or_else(|| CheckpointError::NotFound(path.into()))
}

/// Whether the checkpoint folder `root` holds checkpoints (an interrupted or finished run).
pub fn has_checkpoints(root: &Path) -> bool {
    list(root).map(|l| !l.is_empty()).unwrap_or(false)
}

/// The run folder a checkpoint folder belongs to (`<run>/private/checkpoints/step-k`).
pub fn run_dir_of(checkpoint: &Path) -> Option<PathBuf> {
    let private = checkpoint.parent()?.parent()?;
    (private.file_name()? == crate::report::rundir::PRIVATE).then(|| private.parent().map(PathBuf::from))?
}

impl State {
    /// The sampler position and optimiser step count agree with the step count (each step draws
    /// one 64-bit uniform, two 32-bit ChaCha words, per record of the `n`; the optimiser of the
    /// LoRA phase has taken every step after the `probe_steps` of the linear probe, which has its
    /// own and is never checkpointed).
    pub fn consistency_problems(&self, n: usize, probe_steps: u64) -> Vec<String> {
        let mut out = Vec::new();
        let want = 2u128 * n as u128 * self.step as u128;
        if self.sampler.word_pos.parse::<u128>().ok() != Some(want) {
            out.push(format!(
                "the sampler stream is at word {}, but {} steps over {n} records put it at {want}",
                self.sampler.word_pos, self.step
            ));
        }
        if let OptimizerState::AdamW { steps } = self.optimizer {
            if Some(steps) != self.step.checked_sub(probe_steps) {
                out.push(format!(
                    "the optimiser has taken {steps} steps, the checkpoint says {} ({probe_steps} of them the linear probe's)",
                    self.step
                ));
            }
        }
        out
    }
}

/// sha256 over a model folder's config.json and weight files (in name order, then the stored
/// quantized blocks if the folder has them), streamed.
pub fn model_hash(dir: &Path) -> Result<String, CheckpointError> {
    use sha2::{Digest, Sha256};
    let mut files = vec![dir.join("config.json")];
    files.extend(
        crate::model::llama::weight_files(dir)
            .map_err(|e| CheckpointError::Corrupt { path: dir.into(), message: e.to_string() })?,
    );
    files.extend(crate::model::quant::stored_file(dir));
    let mut h = Sha256::new();
    for f in &files {
        let mut file = std::fs::File::open(f).map_err(io(f))?;
        h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        std::io::copy(&mut file, &mut h).map_err(io(f))?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Stop `Checkpoint::write` right after a same-step checkpoint was renamed aside (the
        /// window in which a SIGKILL used to leave a half-deleted `step-N`).
        pub(super) static CRASH_AFTER_ASIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn checkpoint(step: u64) -> Checkpoint {
        use rand::SeedableRng;
        let rng = ChaCha20Rng::seed_from_u64(1);
        Checkpoint {
            state: State {
                format: FORMAT,
                engine: "test".into(),
                step,
                planned_steps: 10,
                max_steps: None,
                noise_multiplier: 1.0,
                sample_rate: 0.1,
                target_epsilon: None,
                sampler: RngState::of(&rng),
                noise_key: [7; 32],
                commitment_key: "00".repeat(32),
                seeded: true,
                optimizer: OptimizerState::Sgd,
                ledger: Ledger::uniform(0.1, 1.0, step),
                metrics: Vec::new(),
                examples_seen: 0,
                train_seconds: 0.0,
                micro_batch: Some(4),
                fingerprint: Fingerprint {
                    config_sha256: String::new(),
                    config_text: String::new(),
                    model_sha256: String::new(),
                    train_sha256: String::new(),
                    test_sha256: String::new(),
                    non_private: false,
                },
                tensors_sha256: String::new(),
            },
            params: vec![step as f32; 5],
            optimizer_vectors: HashMap::new(),
        }
    }

    #[test]
    fn rewriting_a_checkpoint_never_leaves_a_partial_one_and_a_crash_keeps_the_previous() {
        let root = std::env::temp_dir().join(format!("dptrain-ckpt-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        checkpoint(4).write(&root, 3).unwrap();
        checkpoint(6).write(&root, 3).unwrap();
        // A clean rewrite of the same step replaces it whole.
        let mut again = checkpoint(6);
        again.params = vec![60.0; 5];
        again.write(&root, 3).unwrap();
        assert_eq!(Checkpoint::read(&root.join("step-00000006")).unwrap().params, vec![60.0; 5]);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 2, "no leftover folder of the rewrite");
        // A crash right after the old step-6 was set aside: every step-* folder left is complete,
        // and the newest is the intact previous checkpoint.
        CRASH_AFTER_ASIDE.with(|c| c.set(true));
        assert!(checkpoint(6).write(&root, 3).is_err());
        CRASH_AFTER_ASIDE.with(|c| c.set(false));
        let mut steps: Vec<u64> = list(&root).unwrap().into_iter().map(|(k, _)| k).collect();
        steps.sort();
        assert_eq!(steps, [4]);
        for (_, dir) in list(&root).unwrap() {
            Checkpoint::read(&dir).expect("a complete checkpoint");
        }
        assert_eq!(Checkpoint::read(&root.join("step-00000004")).unwrap().state.step, 4);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn changed_config_keys_are_named_and_formatting_changes_are_not() {
        let a = "[training]\nlearning-rate = 0.05\nseed = 7\n\n[lora]\nrank = 2\n";
        let b = "[training]\nlearning-rate = 0.07\nseed = 7\n\n[lora]\nrank = 2\nalpha = 4\n";
        assert_eq!(changed_keys(a, b).unwrap(), ["lora.alpha", "training.learning-rate"]);
        let reformatted = "# comment\n[lora]\nrank=2\n[training]\nseed = 7\nlearning-rate = 5e-2\n";
        assert_eq!(changed_keys(a, reformatted).unwrap(), Vec::<String>::new());
        assert!(changed_keys(a, "[training\n").is_none());
    }
}
