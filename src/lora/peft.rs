//! Reading an adapter folder written by dptrain (HF PEFT layout: adapter_config.json and
//! adapter_model.safetensors) back onto a model.

use crate::model::bert::LoraSpec;
use crate::model::DpModel;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter file missing: {0}")]
    Missing(PathBuf),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// An adapter folder's settings and tensors.
pub struct Adapter {
    pub dir: PathBuf,
    pub spec: LoraSpec,
    /// PEFT `task_type` (SEQ_CLS or CAUSAL_LM).
    pub task_type: String,
    /// By PEFT name, on the CPU in f32.
    pub tensors: HashMap<String, Tensor>,
}

impl Adapter {
    pub fn read(dir: &Path) -> Result<Adapter, AdapterError> {
        let cfg_path = dir.join("adapter_config.json");
        let st_path = dir.join("adapter_model.safetensors");
        let text = std::fs::read_to_string(&cfg_path).map_err(|_| AdapterError::Missing(cfg_path.clone()))?;
        let bad = |message: String| AdapterError::Invalid { path: cfg_path.clone(), message };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if v.get("peft_type").and_then(|p| p.as_str()) != Some("LORA") {
            return Err(bad("peft_type is not LORA".into()));
        }
        let rank = v.get("r").and_then(|r| r.as_u64()).ok_or_else(|| bad("missing integer `r`".into()))? as usize;
        let alpha = v.get("lora_alpha").and_then(|a| a.as_f64()).ok_or_else(|| bad("missing `lora_alpha`".into()))?;
        if v.get("use_rslora").and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad("use_rslora = true is not supported (scale alpha/√r)".into()));
        }
        let targets: Vec<String> = match v.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("target_modules must be a list of module names".into()))?,
            _ => return Err(bad("target_modules must be a list of module names".into())),
        };
        let layers = match v.get("layers_to_transform") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|l| l as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("layers_to_transform must be a list of layer indices".into()))?,
            ),
            Some(serde_json::Value::Number(n)) => {
                Some(vec![n.as_u64().ok_or_else(|| bad("bad layer".into()))? as usize])
            }
            Some(_) => return Err(bad("layers_to_transform must be a list of layer indices".into())),
        };
        let task_type = v.get("task_type").and_then(|t| t.as_str()).unwrap_or("").to_string();
        if !st_path.exists() {
            return Err(AdapterError::Missing(st_path));
        }
        let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu)?;
        Ok(Adapter { dir: dir.into(), spec: LoraSpec { rank, alpha, targets, layers }, task_type, tensors })
    }

    /// Sets `model`'s trainable tensors to the adapter's, by name. Every trainable tensor must be
    /// in the file with its shape, and the file must hold nothing else.
    pub fn apply(&self, model: &mut dyn DpModel) -> Result<(), AdapterError> {
        let path = self.dir.join("adapter_model.safetensors");
        let bad = |message: String| AdapterError::Invalid { path: path.clone(), message };
        let expected = model.trainable();
        let mut out = Vec::with_capacity(expected.len());
        for (name, t) in &expected {
            let v = self.tensors.get(name).ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
            if v.dims() != t.dims() {
                return Err(bad(format!("tensor `{name}` has shape {:?}, the model expects {:?}", v.dims(), t.dims())));
            }
            out.push(v.to_dtype(candle_core::DType::F32)?.to_device(model.device())?);
        }
        if let Some(extra) = self.tensors.keys().find(|k| !expected.iter().any(|(n, _)| n == *k)) {
            return Err(bad(format!("tensor `{extra}` matches nothing in this model (wrong base model?)")));
        }
        model.set_trainable(&out)?;
        Ok(())
    }
}
