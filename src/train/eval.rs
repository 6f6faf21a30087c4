//! Held-out evaluation (accuracy). Evaluation data is never used for training.

use crate::data::{make_micro_batches, Batch, Example};
use crate::model::BertClassifier;
use candle_core::{Result, D};

/// Fraction of `examples` whose predicted class equals the label.
pub fn accuracy(model: &BertClassifier, examples: &[Example], batch_size: usize) -> Result<f64> {
    if examples.is_empty() {
        return Ok(f64::NAN);
    }
    let all: Vec<usize> = (0..examples.len()).collect();
    let mut correct = 0usize;
    for mb in make_micro_batches(examples, &all, batch_size) {
        let batch = Batch::from_examples(&mb, model.device())?;
        let pred: Vec<u32> =
            model.logits(&batch.input_ids, &batch.attention_mask, None)?.argmax(D::Minus1)?.to_vec1()?;
        let labels: Vec<u32> = batch.labels.to_vec1()?;
        correct += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
    }
    Ok(correct as f64 / examples.len() as f64)
}
