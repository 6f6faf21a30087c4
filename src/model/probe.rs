//! The linear probe: DP-SGD on the classification head alone, over the frozen model's pooled
//! features, before the LoRA steps (`training.linear-probe-epochs`).
//!
//! Why it is the same mechanism as every other step: at the start of a run every LoRA B is zero,
//! so the model's pooled features are the frozen base model's, a fixed function of each record
//! alone. Computing them once per record and training the head on them is DP-SGD on a model whose
//! trainable tensors are the head's: each step Poisson-samples the records at the run's q, clips
//! each record's head gradient to the run's C, adds N(0, σ²C²) once to the sum and divides by the
//! run's L, exactly as a LoRA step does, with its own noise stream (the step index). The LoRA
//! tensors are neither read for the gradient nor changed, so nothing about them is released by a
//! probe step. The ledger therefore holds probe steps and LoRA steps as identical
//! sampled-Gaussian events, and the run's σ is calibrated for all of them together.
//!
//! Layout trick: each record becomes a one-token example whose "hidden state" (in a
//! `FeatureCache`) is its pooled feature vector, so the DP step's batching, per-example head
//! gradients, clipping and noise run unchanged; mean pooling over one token is the identity.

use super::{DpModel, EvalResult, ExampleScore, Task, HEAD_MODULE};
use crate::data::{make_micro_batches, Batch, Example, FeatureCache, MicroBatchLimits};
use crate::lora::{LoraLinear, Tape};
use candle_core::{DType, Device, Result, Tensor};

/// The head [C, H] · h + b on cached pooled features, trainable like the full model's head
/// (same names, so the trained tensors drop into it).
pub struct LinearProbe {
    pub head_w: Tensor,
    pub head_b: Tensor,
    hidden_size: usize,
}

impl LinearProbe {
    /// A probe starting from the given head (the model's own, zero at the start of a run).
    pub fn new(head_w: Tensor, head_b: Tensor) -> Result<LinearProbe> {
        let (c, h) = head_w.dims2()?;
        if head_b.dims1()? != c {
            candle_core::bail!("linear probe: head bias has {} classes, weight {c}", head_b.dims1()?);
        }
        Ok(LinearProbe { head_w, head_b, hidden_size: h })
    }

    /// Class logits [b, C] of the batch's cached features (no tape).
    pub fn logits(&self, batch: &Batch, tape: Option<&mut Tape>) -> Result<Tensor> {
        let Some((_, x)) = &batch.hidden else {
            candle_core::bail!("linear probe: the batch has no cached pooled features");
        };
        let (b, t, h) = x.dims3()?;
        if t != 1 || h != self.hidden_size {
            candle_core::bail!("linear probe: features must be [b, 1, {}], got [{b}, {t}, {h}]", self.hidden_size);
        }
        let pooled = x.reshape((b, h))?;
        let logits = super::ops::add_const(&crate::lora::linear_nd(&pooled, &self.head_w)?, &self.head_b)?;
        match tape {
            None => Ok(logits),
            Some(tape) => {
                let grad = crate::lora::GradSlot::default();
                let logits = crate::lora::grad_tap(&logits, &grad)?;
                tape.head = Some(crate::lora::HeadRecord { h: pooled, grad });
                Ok(logits)
            }
        }
    }
}

impl DpModel for LinearProbe {
    fn device(&self) -> &Device {
        self.head_w.device()
    }
    fn base_dtype(&self) -> DType {
        DType::F32
    }
    fn adapted_layers(&self) -> Vec<&LoraLinear> {
        Vec::new()
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        vec![
            (format!("base_model.model.{HEAD_MODULE}.weight"), self.head_w.clone()),
            (format!("base_model.model.{HEAD_MODULE}.bias"), self.head_b.clone()),
        ]
    }
    fn set_trainable(&mut self, tensors: &[Tensor]) -> Result<()> {
        crate::lora::check_shapes(&self.trainable(), tensors)?;
        self.head_w = tensors[0].clone();
        self.head_b = tensors[1].clone();
        Ok(())
    }
    fn example_losses(&self, batch: &Batch, tape: Option<&mut Tape>) -> Result<Tensor> {
        super::bert::cross_entropy_per_example(&self.logits(batch, tape)?, &batch.labels)
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn first_adapted_layer(&self) -> usize {
        0
    }
    fn prefix_hidden(&self, _: &Batch, _: usize) -> Result<Tensor> {
        candle_core::bail!("linear probe: it has no layers (its features are cached)")
    }
    fn task(&self) -> Task {
        Task::Classification
    }
    fn score_examples(&self, _: &[Example], _: usize) -> Result<Vec<ExampleScore>> {
        candle_core::bail!("linear probe: held-out scoring runs on the full model, not the probe")
    }
    fn evaluate(&self, _: &[Example], _: usize) -> Result<EvalResult> {
        candle_core::bail!("linear probe: held-out scoring runs on the full model, not the probe")
    }
}

/// The probe's data: one one-token example per record (same labels, same order) and a cache that
/// holds each record's pooled features from `model` as that token's hidden state.
pub fn probe_data(
    model: &dyn DpModel,
    examples: &[Example],
    cache: Option<&FeatureCache>,
    limits: MicroBatchLimits,
) -> Result<(Vec<Example>, FeatureCache)> {
    let h = model.hidden_size();
    let mut hidden = vec![Vec::new(); examples.len()];
    let all: Vec<usize> = (0..examples.len()).collect();
    for mb in make_micro_batches(examples, &all, limits) {
        let batch = Batch::gather(examples, &mb, cache, model.device())?;
        let pooled = model.pooled_features(&batch)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let rows = pooled.to_vec2::<f32>()?;
        for (row, &i) in mb.iter().enumerate() {
            if rows[row].len() != h {
                candle_core::bail!("pooled features have {} values, expected {h}", rows[row].len());
            }
            hidden[i] = rows[row].clone();
        }
    }
    let probe_examples = examples.iter().map(|e| Example::classification(vec![0], e.label)).collect();
    Ok((probe_examples, FeatureCache { start_layer: 0, hidden_size: h, hidden }))
}
