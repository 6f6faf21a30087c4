//! Reading an adapter folder written by dptrain (HF PEFT layout: adapter_config.json and
//! adapter_model.safetensors) back onto a model.

use crate::lora::LoraSpec;
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

/// Module names a layer exposes to LoRA, longest first (so "attention.output.dense" wins over
/// "output.dense").
fn known_modules() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = crate::config::BERT_LORA_MODULES
        .iter()
        .chain(crate::model::llama::LLAMA_LORA_MODULES.iter())
        .copied()
        .chain(crate::model::bert::DISTILBERT_LORA_MODULES.iter().map(|(m, _)| *m))
        .chain(crate::model::llama::PHI3_LORA_MODULES.iter().copied())
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.len()));
    v
}

/// Short module names and layer indices.
type TargetsAndLayers = (Vec<String>, Vec<usize>);

/// Full PEFT module names (`encoder.layer.4.attention.output.dense`, `model.layers.0.mlp.up_proj`)
/// as (short module names, layer indices); `None` when the names are short ones (`query`). The
/// set must be exactly the product of the two (dptrain adapts every target in every chosen layer).
fn full_module_names(names: &[String]) -> Result<Option<TargetsAndLayers>, String> {
    let parse = |name: &str| -> Option<(String, usize)> {
        let parts: Vec<&str> = name.split('.').collect();
        let i = parts.iter().position(|p| *p == "layer" || *p == "layers")?;
        let layer = parts.get(i + 1)?.parse::<usize>().ok()?;
        let rest = parts.get(i + 2..)?.join(".");
        let m = known_modules().into_iter().find(|m| rest == *m || rest.ends_with(&format!(".{m}")))?;
        Some((m.to_string(), layer))
    };
    let parsed: Vec<Option<(String, usize)>> = names.iter().map(|n| parse(n)).collect();
    if parsed.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut targets: Vec<String> = Vec::new();
    let mut layers: Vec<usize> = Vec::new();
    for (n, p) in names.iter().zip(&parsed) {
        let (m, l) = p
            .clone()
            .ok_or_else(|| format!("target module `{n}` is neither a full layer module name nor a short one"))?;
        if !targets.contains(&m) {
            targets.push(m);
        }
        if !layers.contains(&l) {
            layers.push(l);
        }
    }
    layers.sort_unstable();
    if targets.len() * layers.len() != names.len() {
        return Err(format!(
            "target_modules names {} modules, not every one of {:?} in every one of layers {layers:?}",
            names.len(),
            targets
        ));
    }
    Ok(Some((targets, layers)))
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
        let names: Vec<String> = match v.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("target_modules must be a list of module names".into()))?,
            _ => return Err(bad("target_modules must be a list of module names".into())),
        };
        let configured_layers = match v.get("layers_to_transform") {
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
        let (targets, layers) = match full_module_names(&names).map_err(bad)? {
            // dptrain writes the full names of exactly the adapted modules.
            Some((targets, layers)) => (targets, Some(layers)),
            None => (names, configured_layers),
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

#[cfg(test)]
mod tests {
    use super::full_module_names;

    #[test]
    fn full_module_names_give_the_trained_targets_and_layers() {
        let names: Vec<String> = [
            "encoder.layer.4.attention.output.dense",
            "encoder.layer.4.output.dense",
            "encoder.layer.5.attention.output.dense",
            "encoder.layer.5.output.dense",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (t, l) = full_module_names(&names).unwrap().unwrap();
        assert_eq!(t, ["attention.output.dense", "output.dense"]);
        assert_eq!(l, [4, 5]);
        let llama: Vec<String> =
            ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            full_module_names(&llama).unwrap().unwrap(),
            (vec!["q_proj".to_string(), "down_proj".to_string()], vec![0])
        );
        assert_eq!(full_module_names(&["query".to_string()]).unwrap(), None);
        assert!(full_module_names(&names[..3]).is_err(), "not a full product");
    }
}
