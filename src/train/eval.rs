//! Held-out evaluation (accuracy). Evaluation data is never used for training.

use crate::data::{make_micro_batches, Batch, Example, FeatureCache};
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
        let batch = Batch::gather(examples, &mb, None, model.device())?;
        let pred: Vec<u32> =
            model.logits(&batch.input_ids, &batch.attention_mask, None)?.argmax(D::Minus1)?.to_vec1()?;
        let labels: Vec<u32> = batch.labels.to_vec1()?;
        correct += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
    }
    Ok(correct as f64 / examples.len() as f64)
}

/// Hidden states entering the lowest adapted layer, for every example (see `FeatureCache`).
/// Returns `None` when layer 0 is adapted (nothing to cache).
pub fn feature_cache(model: &BertClassifier, examples: &[Example], batch_size: usize) -> Result<Option<FeatureCache>> {
    let start = model.first_adapted_layer();
    if start == 0 {
        return Ok(None);
    }
    let h = model.config.hidden_size;
    let mut hidden = vec![Vec::new(); examples.len()];
    let all: Vec<usize> = (0..examples.len()).collect();
    for mb in make_micro_batches(examples, &all, batch_size) {
        let batch = Batch::gather(examples, &mb, None, model.device())?;
        let x = model.run_layers(model.embed(&batch.input_ids)?, &batch.attention_mask, 0..start, None)?;
        for (row, &i) in mb.iter().enumerate() {
            let len = examples[i].ids.len();
            hidden[i] = x.get(row)?.narrow(0, 0, len)?.flatten_all()?.to_vec1()?;
        }
    }
    Ok(Some(FeatureCache { start_layer: start, hidden_size: h, hidden }))
}
