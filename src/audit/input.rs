//! Canary records for the black-box audit (`dptrain audit --mode black-box`): random strings of
//! the tokenizer's own words (so no record resembles them and every word is one known token),
//! with random labels (classification) or as secret text (language models), each inserted into
//! the training data with probability ½.

use crate::config::Plan;
use crate::model::{Architecture, DpModel};
use crate::train::RunError;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::Path;

/// Words per canary text.
const WORDS: usize = 8;

/// The fewest vocabulary words canaries are drawn from.
const MIN_VOCABULARY: usize = 20;

/// Micro-batch size for scoring the canaries.
const SCORE_BATCH: usize = 16;

#[derive(Debug, Clone)]
enum Record {
    /// Classification: text and label index.
    Labelled(String, usize),
    /// Language modelling, plain text.
    Text(String),
    /// Language modelling, prompt/completion (the training file's format).
    PromptCompletion(String, String),
}

pub(super) struct InputCanaries {
    records: Vec<Record>,
    inserted: Vec<bool>,
    labels: Vec<String>,
}

fn random_words(rng: &mut impl Rng, vocabulary: &[String], words: usize) -> String {
    (0..words).map(|_| vocabulary[rng.random_range(0..vocabulary.len())].as_str()).collect::<Vec<_>>().join(" ")
}

/// The whole words of the model's tokenizer (letters and digits, at least two, with a BPE
/// word-start mark removed; no pieces, no special tokens), sorted.
fn vocabulary_words(model_dir: &Path) -> Result<Vec<String>, String> {
    let tok = crate::model::load_tokenizer(model_dir, None).map_err(|e| e.to_string())?;
    let mut words: Vec<String> = tok
        .get_vocab(false)
        .keys()
        .map(|t| t.trim_start_matches(['Ġ', '▁']).to_string())
        .filter(|w| w.len() >= 2 && w.chars().all(|c| c.is_ascii_alphanumeric()))
        .collect();
    words.sort();
    words.dedup();
    if words.len() < MIN_VOCABULARY {
        return Err(format!(
            "black-box canaries: the tokenizer of {} has {} whole words, fewer than {MIN_VOCABULARY}",
            model_dir.display(),
            words.len()
        ));
    }
    Ok(words)
}

/// Whether a language-model training file is in the prompt/completion format (its first record
/// has a `prompt`).
fn prompt_completion(train: &Path) -> Result<bool, String> {
    let text = std::fs::read_to_string(train).map_err(|e| format!("cannot read {}: {e}", train.display()))?;
    let first = text.lines().find(|l| !l.trim().is_empty()).ok_or_else(|| format!("{} is empty", train.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(first).map_err(|e| format!("{}: first record is not JSON: {e}", train.display()))?;
    Ok(v.get("prompt").is_some())
}

impl InputCanaries {
    /// `m` canaries for a model of `arch` (`labels`: the run's label set, classification), each
    /// drawn and inserted with probability ½ from the operating system's CSPRNG (from `seed`
    /// when the config is seeded: an experiment, as the audited run's report says).
    pub fn new(
        m: usize,
        arch: Architecture,
        model_dir: &Path,
        labels: &[String],
        train: &Path,
        seed: Option<u64>,
    ) -> Result<InputCanaries, String> {
        let mut rng = match seed {
            Some(s) => {
                let mut r = rand_chacha::ChaCha20Rng::seed_from_u64(s);
                r.set_stream(6);
                r
            }
            None => rand_chacha::ChaCha20Rng::from_os_rng(),
        };
        let v = vocabulary_words(model_dir)?;
        let pc = arch == Architecture::Llama && prompt_completion(train)?;
        if arch == Architecture::Bert && labels.len() < 2 {
            return Err("black-box canaries need at least two labels".into());
        }
        let records = (0..m)
            .map(|_| match arch {
                Architecture::Bert => {
                    Record::Labelled(random_words(&mut rng, &v, WORDS), rng.random_range(0..labels.len()))
                }
                Architecture::Llama if pc => {
                    Record::PromptCompletion(random_words(&mut rng, &v, WORDS / 2), random_words(&mut rng, &v, WORDS))
                }
                Architecture::Llama => Record::Text(random_words(&mut rng, &v, WORDS)),
            })
            .collect();
        let inserted = (0..m).map(|_| rng.random_bool(0.5)).collect();
        Ok(InputCanaries { records, inserted, labels: labels.to_vec() })
    }

    pub fn inserted(&self) -> &[bool] {
        &self.inserted
    }

    pub fn describe(&self) -> String {
        let kind = match self.records.first() {
            Some(Record::Labelled(..)) => "uniformly random labels",
            Some(Record::PromptCompletion(..)) => "half as prompt, the rest as secret completion",
            _ => "as secret text",
        };
        format!(
            "{} canaries ({WORDS} words drawn uniformly from the tokenizer's whole words, {kind})",
            self.records.len()
        )
    }

    fn json(&self, r: &Record) -> serde_json::Value {
        match r {
            Record::Labelled(t, l) => serde_json::json!({"text": t, "label": self.labels[*l]}),
            Record::Text(t) => serde_json::json!({"text": t}),
            Record::PromptCompletion(p, c) => serde_json::json!({"prompt": p, "completion": c}),
        }
    }

    fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
        std::fs::File::create(path)
            .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The training file `train` with the inserted canaries appended, written to `to`.
    pub fn write_training_file(&self, train: &Path, to: &Path) -> Result<(), String> {
        let mut bytes = std::fs::read(train).map_err(|e| format!("cannot read {}: {e}", train.display()))?;
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        for (r, _) in self.records.iter().zip(&self.inserted).filter(|(_, &i)| i) {
            bytes.extend(self.json(r).to_string().bytes());
            bytes.push(b'\n');
        }
        Self::write(to, &bytes)
    }

    /// Every canary in the training format (one per line, in canary order).
    fn records_file(&self) -> String {
        self.records.iter().map(|r| self.json(r).to_string() + "\n").collect()
    }

    /// The canaries, whether each was inserted and its score (the audit's private record).
    pub fn write_list(&self, to: &Path, scores: &[f64]) -> Result<(), String> {
        let text: String = self
            .records
            .iter()
            .zip(&self.inserted)
            .zip(scores)
            .enumerate()
            .map(|(k, ((r, i), s))| {
                serde_json::json!({"canary": k, "inserted": i, "score": s, "record": self.json(r)}).to_string() + "\n"
            })
            .collect();
        Self::write(to, text.as_bytes())
    }

    /// Each canary's score under the trained `model` (higher: more likely trained on).
    /// Classification: ln p(y_k | x_k) − ln mean_j p(y_k | x_j), the canary's label against how
    /// likely the model finds that label on canaries in general (which removes the label's
    /// prior). Language models: the base model's loss minus the trained model's.
    pub fn scores(&self, plan: &Plan, model: &dyn DpModel, labels: &[String]) -> Result<Vec<f64>, RunError> {
        let file = std::env::temp_dir().join(format!("dptrain-audit-canaries-{}.jsonl", std::process::id()));
        Self::write(&file, self.records_file().as_bytes()).map_err(RunError::Plan)?;
        let mut p = plan.clone();
        p.train_path = file.clone();
        p.test_path = file.clone();
        let arch = Architecture::detect(&plan.model_dir)?;
        if arch == Architecture::Bert {
            p.labels = Some(labels.to_vec());
        }
        let loaded = crate::train::run::load_data(&p, arch);
        let _ = std::fs::remove_file(&file);
        let (data, _) = loaded?;
        let examples = &data.examples;
        match arch {
            Architecture::Bert => {
                // loss[k][j]: −ln p(label k | canary j).
                let mut loss = Vec::with_capacity(labels.len());
                for k in 0..labels.len() {
                    let relabelled: Vec<_> =
                        examples.iter().map(|e| crate::data::Example { label: k, ..e.clone() }).collect();
                    loss.push(super::command::example_losses(model, &relabelled, SCORE_BATCH)?);
                }
                let m = examples.len() as f64;
                let log_mean: Vec<f64> = loss
                    .iter()
                    .map(|l| {
                        let lo = l.iter().cloned().fold(f64::INFINITY, f64::min);
                        (l.iter().map(|x| (lo - x).exp()).sum::<f64>() / m).ln() - lo
                    })
                    .collect();
                Ok(examples.iter().enumerate().map(|(j, e)| -loss[e.label][j] - log_mean[e.label]).collect())
            }
            Architecture::Llama => {
                let trained = super::command::example_losses(model, examples, SCORE_BATCH)?;
                let mut rng = rand_chacha::ChaCha20Rng::from_seed([0; 32]);
                let base =
                    crate::model::LlamaLm::load(&plan.model_dir, None, &mut rng, model.device(), plan.base_format())?;
                let base = super::command::example_losses(&base, examples, SCORE_BATCH)?;
                Ok(base.iter().zip(&trained).map(|(b, t)| b - t).collect())
            }
        }
    }
}
