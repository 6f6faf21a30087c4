//! Claim: the vectorised per-example gradients of every trainable tensor equal the gradients of
//! one-example-at-a-time backward passes (the slow, obviously-correct twin), on a tiny random
//! BERT with LoRA on every linear layer type and a padded batch of variable-length examples.

mod common;

use candle_core::{Device, Tensor, Var};
use dptrain::data::{Batch, Example};
use dptrain::lora::Tape;
use dptrain::model::bert::cross_entropy_per_example;
use dptrain::privacy::per_example_grads;

const ALL_MODULES: [&str; 6] =
    ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"];

fn examples() -> Vec<Example> {
    // Variable lengths (3..=11), so the batch is padded; ids avoid 0 (the padding id) on purpose
    // except one example that contains id 0 as a real token.
    let lens = [5usize, 3, 11, 8, 6];
    let mut s = 17u32;
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let ids = (0..len)
                .map(|_| {
                    s = s.wrapping_mul(1103515245).wrapping_add(12345);
                    (s >> 16) % 50
                })
                .collect();
            Example::classification(ids, i % 3)
        })
        .collect()
}

/// Gradient of example `e`'s loss alone, with the trainable tensors as `Var`s.
fn one_at_a_time(model: &mut dptrain::model::BertClassifier, e: &Example) -> Vec<Vec<f32>> {
    let originals: Vec<Tensor> = model.trainable().into_iter().map(|(_, t)| t).collect();
    let vars: Vec<Var> = originals.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    model.set_trainable(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>()).unwrap();
    let batch = Batch::from_examples(&[e], &Device::Cpu).unwrap();
    let logits = model.logits(&batch.input_ids, &batch.attention_mask, None).unwrap();
    let loss = cross_entropy_per_example(&logits, &batch.labels).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let out = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .expect("every trainable tensor gets a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    model.set_trainable(&originals).unwrap();
    out
}

fn check(targets: &[&str], seed: u64) {
    let mut model = common::tiny_bert(seed, targets, 3);
    let exs = examples();
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::from_examples(&refs, &Device::Cpu).unwrap();
    let mut tape = Tape::default();
    let logits = model.logits(&batch.input_ids, &batch.attention_mask, Some(&mut tape)).unwrap();
    cross_entropy_per_example(&logits, &batch.labels).unwrap().sum_all().unwrap().backward().unwrap();
    let fast: Vec<Vec<f32>> = per_example_grads(&model, &tape).unwrap().to_vec2().unwrap();
    let names: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
    for (i, e) in exs.iter().enumerate() {
        let slow = one_at_a_time(&mut model, e);
        let mut offset = 0;
        for (k, s) in slow.iter().enumerate() {
            let f = &fast[i][offset..offset + s.len()];
            offset += s.len();
            let scale = s.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "example {i}, {}: zero reference gradient makes the test vacuous", names[k]);
            let err = f.iter().zip(s).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // Both sides are f32 products whose summation order differs (the batch is padded to
            // its longest example, the single example is not, so GEMM blockings differ): 7.5e-6
            // of the largest element with the gemm crate's AVX2 kernel, 1.4e-5 with its AVX-512
            // one. A formula or mixing error is of the order of the gradient itself.
            assert!(err <= 5e-5 * scale, "example {i}, {}: max error {err} vs scale {scale}", names[k]);
        }
        assert_eq!(offset, fast[i].len());
    }
}

#[test]
fn per_example_grads_match_one_at_a_time_backward_on_every_layer_type() {
    check(&ALL_MODULES, 1);
}

#[test]
fn per_example_grads_match_one_at_a_time_backward_with_default_targets() {
    check(&["query", "value"], 2);
}

#[test]
fn padding_does_not_change_an_examples_output() {
    let model = common::tiny_bert(3, &ALL_MODULES, 2);
    let exs = examples();
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::from_examples(&refs, &Device::Cpu).unwrap();
    let padded: Vec<Vec<f32>> = model.logits(&batch.input_ids, &batch.attention_mask, None).unwrap().to_vec2().unwrap();
    for (i, e) in exs.iter().enumerate() {
        let single = Batch::from_examples(&[e], &Device::Cpu).unwrap();
        let alone: Vec<Vec<f32>> =
            model.logits(&single.input_ids, &single.attention_mask, None).unwrap().to_vec2().unwrap();
        for (a, b) in padded[i].iter().zip(&alone[0]) {
            assert!((a - b).abs() < 1e-5, "example {i}: {a} vs {b}");
        }
    }
}
