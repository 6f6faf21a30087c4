//! Scores of held-out records under a model (is each classified correctly; each record's summed
//! next-token NLL), the per-record form every held-out metric aggregates. Evaluation data is never
//! used for training.

use super::{BertClassifier, DpModel, EvalResult, ExampleScore, LlamaLm};
use crate::data::{make_micro_batches, Batch, Example};
use candle_core::{DType, Result, D};

/// Whether each of `examples` is classified correctly (argmax of the logits equals the label).
pub fn correct_per_example(
    model: &BertClassifier,
    examples: &[Example],
    batch_size: usize,
) -> Result<Vec<ExampleScore>> {
    let mut out = vec![ExampleScore::Correct(false); examples.len()];
    let all: Vec<usize> = (0..examples.len()).collect();
    for mb in make_micro_batches(examples, &all, batch_size) {
        let batch = Batch::gather(examples, &mb, None, model.device())?;
        let pred: Vec<u32> =
            model.logits(&batch.input_ids, &batch.attention_mask, None)?.argmax(D::Minus1)?.to_vec1()?;
        let labels: Vec<u32> = batch.labels.to_vec1()?;
        for (row, &i) in mb.iter().enumerate() {
            out[i] = ExampleScore::Correct(pred[row] == labels[row]);
        }
    }
    Ok(out)
}

/// Fraction of `examples` whose predicted class equals the label (NaN for none).
pub fn accuracy(model: &BertClassifier, examples: &[Example], batch_size: usize) -> Result<f64> {
    match EvalResult::aggregate(correct_per_example(model, examples, batch_size)?) {
        EvalResult::Accuracy(a) => Ok(a),
        other => candle_core::bail!("accuracy: unexpected {other:?}"),
    }
}

/// Each record's summed next-token NLL over its own targets (in f64) and its target count.
pub fn nll_per_example(model: &LlamaLm, examples: &[Example], batch_size: usize) -> Result<Vec<ExampleScore>> {
    let mut out = vec![ExampleScore::Nll { sum: 0.0, tokens: 0 }; examples.len()];
    let all: Vec<usize> = (0..examples.len()).collect();
    for mb in make_micro_batches(examples, &all, batch_size) {
        let batch = Batch::gather(examples, &mb, None, model.device())?;
        let lm =
            batch.lm.as_ref().ok_or_else(|| candle_core::Error::Msg("evaluation data has no LM targets".into()))?;
        // Targets are laid out example by example, `counts[row]` of them each.
        let nll: Vec<f64> = model.target_nll(&batch, None)?.to_dtype(DType::F64)?.to_vec1()?;
        let mut at = 0;
        for (row, &i) in mb.iter().enumerate() {
            let n = lm.counts[row];
            out[i] = ExampleScore::Nll { sum: nll[at..at + n].iter().sum(), tokens: n };
            at += n;
        }
        if at != nll.len() {
            candle_core::bail!("{} target losses for {at} targets", nll.len());
        }
    }
    Ok(out)
}

/// Token-level perplexity: exp(Σ NLL / Σ targets) over every target token of `examples`
/// (each record's own targets, as in training; summed in f64).
pub fn perplexity(model: &LlamaLm, examples: &[Example], batch_size: usize) -> Result<EvalResult> {
    Ok(EvalResult::aggregate(nll_per_example(model, examples, batch_size)?))
}
