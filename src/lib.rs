//! dptrain: differentially private LoRA fine-tuning (DP-SGD) on candle.
//!
//! Data flow (one direction): config → `Plan` → data + model → per logical step: Poisson sample →
//! micro-batches → forward with a LoRA tape → backward of the summed loss → per-example
//! gradients → clip → sum → Gaussian noise once → ÷ expected batch size → AdamW → ledger.
//! See docs/ARCHITECTURE.md.

pub mod accounting;
pub mod allocator;
pub mod audit;
pub mod bench;
pub mod config;
pub mod convert;
pub mod data;
pub mod flops;
pub mod kernels;
pub mod lora;
pub mod memory;
pub mod model;
pub mod privacy;
pub mod profile;
pub mod recipe;
pub mod report;
pub mod selftest;
#[cfg(test)]
pub(crate) mod test_util;
pub mod train;
pub mod tune;
