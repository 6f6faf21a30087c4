//! Held-out evaluation (accuracy or perplexity). Evaluation data is never used for training.

use super::run::RunError;
use crate::data::{make_micro_batches, Batch, Example, FeatureCache};
use crate::lora::peft::Adapter;
use crate::model::{BertClassifier, DpModel, EvalResult, LlamaLm};
use candle_core::Result;
use rand::SeedableRng;

pub use crate::model::score::{accuracy, correct_per_example, nll_per_example, perplexity};
pub use crate::model::{per_group, GroupMetric, NO_GROUP};

/// Hidden states entering the lowest adapted layer, for every example (see `FeatureCache`).
/// Returns `None` when layer 0 is adapted (nothing to cache).
pub fn feature_cache(
    model: &dyn DpModel,
    examples: &[Example],
    batch_size: impl Into<crate::data::MicroBatchLimits> + Copy,
) -> Result<Option<FeatureCache>> {
    let start = model.first_adapted_layer();
    if start == 0 {
        return Ok(None);
    }
    let h = model.hidden_size();
    let mut hidden = vec![Vec::new(); examples.len()];
    let all: Vec<usize> = (0..examples.len()).collect();
    for mb in make_micro_batches(examples, &all, batch_size) {
        let batch = Batch::gather(examples, &mb, None, model.device())?;
        let x = model.prefix_hidden(&batch, start)?;
        for (row, &i) in mb.iter().enumerate() {
            let len = examples[i].ids.len();
            hidden[i] = x.get(row)?.narrow(0, 0, len)?.flatten_all()?.to_vec1()?;
        }
    }
    Ok(Some(FeatureCache { start_layer: start, hidden_size: h, hidden }))
}

/// What `dptrain eval` runs.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model_dir: std::path::PathBuf,
    /// An adapter folder written by dptrain; `None` evaluates the base model (LM only).
    pub adapter: Option<std::path::PathBuf>,
    pub data: std::path::PathBuf,
    pub max_seq_len: usize,
    pub batch: usize,
    /// Prompts to continue greedily (LM); empty = the first tokens of the first records.
    pub prompts: Vec<String>,
    pub samples: usize,
    pub max_new_tokens: usize,
    /// How the frozen base weights are stored (dtype, quantization).
    pub base: crate::model::quant::BaseFormat,
}

/// A greedy continuation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    pub prompt: String,
    pub continuation: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub model: String,
    pub adapter: Option<String>,
    pub data: String,
    pub data_sha256: String,
    pub records: usize,
    pub metric: EvalResult,
    /// The metric per `group` of the records (empty when they have none).
    pub groups: Vec<GroupMetric>,
    pub samples: Vec<Sample>,
}

/// `dptrain eval`: the held-out metric of base or base + adapter on a file, and (LM) a few
/// greedy continuations.
pub fn eval_command(opts: &EvalOptions, device: &candle_core::Device) -> std::result::Result<EvalReport, RunError> {
    use crate::model::load_tokenizer;
    use crate::model::{Architecture, LlamaConfig};
    let arch = Architecture::detect(&opts.model_dir)?;
    // A run folder or its release/ folder.
    let adapter = opts.adapter.as_deref().map(|d| Adapter::read(&crate::report::rundir::release_of(d))).transpose()?;
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([0; 32]);
    let (data, scores, samples) = match arch {
        Architecture::Bert => {
            let Some(adapter) = &adapter else {
                return Err(RunError::Plan(
                    "a classification model needs --adapter (the trained head); the base encoder has none".into(),
                ));
            };
            let head = format!("base_model.model.{}.weight", crate::model::HEAD_MODULE);
            let num_labels = adapter
                .tensors
                .get(&head)
                .map(|t| t.dim(0))
                .transpose()?
                .ok_or_else(|| RunError::Plan(format!("{}: no `{head}` tensor", adapter.dir.display())))?;
            let labels = adapter_labels(&adapter.dir, num_labels)?;
            let tokenizer = load_tokenizer(&opts.model_dir, Some(opts.max_seq_len))?;
            let data = crate::data::load_classification(&opts.data, &tokenizer, Some(&labels))?;
            if let Some(q) = opts.base.quant.or(opts.base.quant_vocab) {
                return Err(RunError::Plan(format!(
                    "--quantize/--quantize-vocab {}: quantized base weights are implemented for the Llama family only",
                    q.name()
                )));
            }
            let mut model = BertClassifier::load(&opts.model_dir, Some(&adapter.spec), num_labels, &mut rng, device)?
                .with_base_dtype(opts.base.dtype)?;
            adapter.apply(&mut model)?;
            let scores = model.score_examples(&data.examples, opts.batch)?;
            (data, scores, Vec::new())
        }
        Architecture::Llama => {
            let cfg = LlamaConfig::from_file(&opts.model_dir.join("config.json"))?;
            let tokenizer = load_tokenizer(&opts.model_dir, None)?;
            let data = crate::data::load_lm(&opts.data, &tokenizer, opts.max_seq_len, cfg.eos_token())?;
            let spec = adapter.as_ref().map(|a| &a.spec);
            let mut model = LlamaLm::load(&opts.model_dir, spec, &mut rng, device, opts.base)?;
            if let Some(a) = &adapter {
                a.apply(&mut model)?;
            }
            let scores = model.score_examples(&data.examples, opts.batch)?;
            let prompts: Vec<Vec<u32>> = if opts.prompts.is_empty() {
                data.examples.iter().take(opts.samples).map(|e| e.ids[..e.ids.len().min(8)].to_vec()).collect()
            } else {
                opts.prompts
                    .iter()
                    .map(|p| tokenizer.encode(p.as_str(), true).map(|e| e.get_ids().to_vec()))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| RunError::Plan(format!("tokenizing a prompt: {e}")))?
            };
            let decode =
                |ids: &[u32]| tokenizer.decode(ids, false).map_err(|e| RunError::Plan(format!("decoding: {e}")));
            let mut samples = Vec::new();
            for p in prompts.iter().filter(|p| !p.is_empty()) {
                let cont = model.greedy(p, opts.max_new_tokens)?;
                samples.push(Sample { prompt: decode(p)?, continuation: decode(&cont)? });
            }
            (data, scores, samples)
        }
    };
    let metric = EvalResult::aggregate(scores.iter().copied());
    let groups = per_group(&scores, &data.groups);
    Ok(EvalReport {
        model: opts.model_dir.display().to_string(),
        adapter: opts.adapter.as_ref().map(|a| a.display().to_string()),
        data: opts.data.display().to_string(),
        data_sha256: data.content_hash.clone(),
        records: data.len(),
        metric,
        groups,
        samples,
    })
}

/// Label names of a classification adapter, from the privacy_report.json dptrain wrote beside it.
fn adapter_labels(dir: &std::path::Path, num_labels: usize) -> std::result::Result<Vec<String>, RunError> {
    let path = dir.join("privacy_report.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|_| RunError::Plan(format!("{}: missing (it names the adapter's labels)", path.display())))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| RunError::Plan(format!("{}: not JSON: {e}", path.display())))?;
    let labels: Option<Vec<String>> =
        v["dataset"]["labels"].as_array().and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect());
    match labels {
        Some(l) if l.len() == num_labels => Ok(l),
        _ => Err(RunError::Plan(format!(
            "{}: dataset.labels must list the adapter's {num_labels} labels",
            path.display()
        ))),
    }
}
