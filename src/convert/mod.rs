//! `dptrain convert`: a Llama-architecture GGUF file → a Hugging Face Llama folder
//! (`model.safetensors` in f32, `config.json`, `tokenizer.json`).
//!
//! Every tensor is dequantised to f32 with candle, renamed to its HF name ([`tensors::map_name`];
//! an unknown name is an error), checked against the shape the HF layout expects ([out, in]), and
//! the rows of `attn_q` / `attn_k` are un-permuted from llama.cpp's interleaved-RoPE order back to
//! HF's rotate-half order ([`tensors::unpermute_rows`]). The tokenizer is rebuilt from the GGUF
//! vocabulary and merges ([`tokenizer::tokenizer_json`]; byte-level BPE only). Everything is
//! written into a temporary folder next to the output and renamed into place at the end, so a
//! failure leaves no half-written output.
//!
//! With `--keep-quantized` ([`ConvertOptions::keep_quantized`]) the linear weights of the decoder
//! blocks, the token embedding and the output head that the GGUF stores in a GGML block format
//! (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, …) are not dequantized: their blocks are copied, under their HF
//! names, into [`crate::model::quant::STORED_FILE`] (a GGUF file), the Q/K rows un-permuted as
//! whole rows of blocks, and the model trains on exactly those blocks. Everything else (norms,
//! biases, tensors the GGUF holds as f32/f16) goes to model.safetensors in f32 as without it.

pub mod tensors;
pub mod tokenizer;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Device;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("reading {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("writing {path}: {error}")]
    Write { path: PathBuf, error: std::io::Error },
    #[error("not a readable GGUF file: {0}")]
    Gguf(String),
    #[error("unsupported GGUF architecture `{0}`: only `llama` (general.architecture) can be converted")]
    UnsupportedArchitecture(String),
    #[error(
        "unsupported GGUF tokenizer model `{0}`: only `gpt2` (byte-level BPE, tokenizer.ggml.model) can be converted"
    )]
    UnsupportedTokenizer(String),
    #[error("GGUF metadata `{key}`: {message}")]
    Metadata { key: String, message: String },
    #[error("unknown GGUF tensor `{0}`: not part of the Llama layout this converter knows")]
    UnknownTensor(String),
    #[error("GGUF tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error("output folder {0} exists and is not empty; pass --overwrite to replace it")]
    OutputExists(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub out_dir: PathBuf,
    pub tensors: usize,
    pub parameters: usize,
    pub gguf_sha256: String,
    pub tied_embeddings: bool,
    /// Tensors kept as GGML blocks (in the stored file), and their types (sorted, no repeats).
    pub kept_quantized: usize,
    pub kept_formats: Vec<&'static str>,
}

/// How to convert.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvertOptions {
    /// Replace a non-empty output folder.
    pub overwrite: bool,
    /// Keep the decoder blocks' quantized linear weights as their GGML blocks (module docs).
    pub keep_quantized: bool,
}

/// The decoder-block tensor kinds that are linear weights (kept quantized with --keep-quantized).
const LINEAR_KINDS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
/// The vocabulary tensors `--keep-quantized` also keeps in blocks (the token embedding; the
/// untied output head).
const VOCAB_KINDS: [&str; 2] = ["token_embd", "output"];

/// A quantized [rows, cols] weight with its rows un-permuted for `n_head` heads, block bytes
/// moved as they are.
fn unpermute_block_rows(
    name: &str,
    q: &candle_core::quantized::QTensor,
    n_head: usize,
) -> Result<candle_core::quantized::QTensor, ConvertError> {
    let terr = |m: String| ConvertError::Tensor { name: name.into(), message: m };
    let (rows, cols) = q.shape().dims2().map_err(|e| terr(e.to_string()))?;
    let (block, size) = (q.dtype().block_size(), q.dtype().type_size());
    if !cols.is_multiple_of(block) {
        return Err(terr(format!("rows of {cols} weights are not whole blocks of {block}")));
    }
    let data = q.data().map_err(|e| terr(e.to_string()))?;
    let bytes = tensors::unpermute_rows(&data, rows, cols / block * size, n_head)?;
    candle_core::quantized::ggml_file::qtensor_from_ggml(q.dtype(), &bytes, vec![rows, cols], &Device::Cpu)
        .map_err(|e| terr(e.to_string()))
}

/// The Llama hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct LlamaHparams {
    pub dims: tensors::Dims,
    pub n_layer: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub context_length: usize,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
}

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value, ConvertError> {
    c.metadata.get(key).ok_or_else(|| ConvertError::Metadata { key: key.into(), message: "missing".into() })
}

fn as_u64(key: &str, v: &Value) -> Result<u64, ConvertError> {
    let bad =
        || ConvertError::Metadata { key: key.into(), message: format!("expected a non-negative integer, got {v:?}") };
    let i: i128 = match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => x.into(),
        Value::I64(x) => x.into(),
        _ => return Err(bad()),
    };
    u64::try_from(i).map_err(|_| bad())
}

fn meta_usize(c: &Content, key: &str) -> Result<usize, ConvertError> {
    let v = as_u64(key, meta(c, key)?)?;
    usize::try_from(v).map_err(|_| ConvertError::Metadata { key: key.into(), message: format!("{v} too large") })
}

fn meta_opt_u64(c: &Content, key: &str) -> Result<Option<u64>, ConvertError> {
    c.metadata.get(key).map(|v| as_u64(key, v)).transpose()
}

fn meta_opt_f64(c: &Content, key: &str) -> Result<Option<f64>, ConvertError> {
    c.metadata
        .get(key)
        .map(|v| match *v {
            Value::F32(x) => Ok(x as f64),
            Value::F64(x) => Ok(x),
            ref other => {
                Err(ConvertError::Metadata { key: key.into(), message: format!("expected a float, got {other:?}") })
            }
        })
        .transpose()
}

fn meta_str<'a>(c: &'a Content, key: &str) -> Result<&'a str, ConvertError> {
    match meta(c, key)? {
        Value::String(s) => Ok(s),
        other => Err(ConvertError::Metadata { key: key.into(), message: format!("expected a string, got {other:?}") }),
    }
}

fn meta_array<'a>(c: &'a Content, key: &str) -> Result<&'a [Value], ConvertError> {
    match meta(c, key)? {
        Value::Array(a) => Ok(a),
        other => Err(ConvertError::Metadata {
            key: key.into(),
            message: format!("expected an array, got a {:?}", other.value_type()),
        }),
    }
}

fn meta_strings(c: &Content, key: &str) -> Result<Vec<String>, ConvertError> {
    meta_array(c, key)?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => {
                Err(ConvertError::Metadata { key: key.into(), message: format!("expected strings, got {other:?}") })
            }
        })
        .collect()
}

/// `general.architecture`, which must be `llama`.
pub fn check_architecture(c: &Content) -> Result<(), ConvertError> {
    let arch = meta_str(c, "general.architecture")?;
    if arch != "llama" {
        return Err(ConvertError::UnsupportedArchitecture(arch.to_string()));
    }
    Ok(())
}

/// The tokenizer metadata of a GGUF.
pub fn read_vocab(c: &Content) -> Result<tokenizer::GgufVocab, ConvertError> {
    let model = meta_str(c, "tokenizer.ggml.model")?.to_string();
    if model != "gpt2" {
        return Err(ConvertError::UnsupportedTokenizer(model));
    }
    let tokens = meta_strings(c, "tokenizer.ggml.tokens")?;
    let merges = meta_strings(c, "tokenizer.ggml.merges")?;
    let key = "tokenizer.ggml.token_type";
    let token_types = match c.metadata.get(key) {
        None => Vec::new(),
        Some(_) => meta_array(c, key)?
            .iter()
            .map(|v| match *v {
                Value::I32(x) => Ok(x as i64),
                Value::U32(x) => Ok(x as i64),
                Value::I8(x) => Ok(x as i64),
                Value::U8(x) => Ok(x as i64),
                ref other => Err(ConvertError::Metadata {
                    key: key.into(),
                    message: format!("expected integers, got {other:?}"),
                }),
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(tokenizer::GgufVocab { model, tokens, merges, token_types })
}

/// The Llama hyper-parameters (`llama.*` keys). `vocab` is the tokenizer's size.
pub fn read_hparams(c: &Content, vocab: usize) -> Result<LlamaHparams, ConvertError> {
    let hidden = meta_usize(c, "llama.embedding_length")?;
    let n_head = meta_usize(c, "llama.attention.head_count")?;
    let n_head_kv = match meta_opt_u64(c, "llama.attention.head_count_kv")? {
        Some(v) => v as usize,
        None => n_head,
    };
    if n_head == 0 || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
        return Err(ConvertError::Invalid(format!(
            "{n_head} attention heads cannot share {n_head_kv} key/value heads evenly"
        )));
    }
    let head_dim = match meta_opt_u64(c, "llama.attention.key_length")? {
        Some(k) => k as usize,
        None if hidden.is_multiple_of(n_head) => hidden / n_head,
        None => return Err(ConvertError::Invalid(format!("hidden size {hidden} is not a multiple of {n_head} heads"))),
    };
    if let Some(v) = meta_opt_u64(c, "llama.attention.value_length")? {
        if v as usize != head_dim {
            return Err(ConvertError::Invalid(format!(
                "value head size {v} differs from key head size {head_dim}: not an HF Llama"
            )));
        }
    }
    if let Some(r) = meta_opt_u64(c, "llama.rope.dimension_count")? {
        if r as usize != head_dim {
            return Err(ConvertError::Invalid(format!(
                "RoPE on {r} of {head_dim} head dimensions (partial rotary) is not an HF Llama"
            )));
        }
    }
    if let Some(Value::String(s)) = c.metadata.get("llama.rope.scaling.type") {
        if s != "none" {
            return Err(ConvertError::Invalid(format!(
                "RoPE scaling `{s}` (llama.rope.scaling.type) is not supported by this converter"
            )));
        }
    }
    let n_vocab = match meta_opt_u64(c, "llama.vocab_size")? {
        Some(v) if v as usize != vocab => {
            return Err(ConvertError::Invalid(format!(
                "llama.vocab_size = {v} but tokenizer.ggml.tokens has {vocab} tokens"
            )))
        }
        _ => vocab,
    };
    let rms = "llama.attention.layer_norm_rms_epsilon";
    Ok(LlamaHparams {
        dims: tensors::Dims {
            hidden,
            intermediate: meta_usize(c, "llama.feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            vocab: n_vocab,
        },
        n_layer: meta_usize(c, "llama.block_count")?,
        rms_norm_eps: meta_opt_f64(c, rms)?
            .ok_or_else(|| ConvertError::Metadata { key: rms.into(), message: "missing".into() })?,
        rope_theta: meta_opt_f64(c, "llama.rope.freq_base")?.unwrap_or(10000.0),
        context_length: meta_usize(c, "llama.context_length")?,
        bos_token_id: meta_opt_u64(c, "tokenizer.ggml.bos_token_id")?,
        eos_token_id: meta_opt_u64(c, "tokenizer.ggml.eos_token_id")?,
    })
}

/// HF `LlamaConfig` (config.json).
pub fn config_json(h: &LlamaHparams, tied: bool, attention_bias: bool, mlp_bias: bool) -> serde_json::Value {
    let d = &h.dims;
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_hidden_layers": h.n_layer,
        "num_attention_heads": d.n_head,
        "num_key_value_heads": d.n_head_kv,
        "head_dim": d.head_dim,
        "rms_norm_eps": h.rms_norm_eps,
        "rope_theta": h.rope_theta,
        "max_position_embeddings": h.context_length,
        "vocab_size": d.vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": h.bos_token_id,
        "eos_token_id": h.eos_token_id,
        "hidden_act": "silu",
        "rope_scaling": null,
        "attention_bias": attention_bias,
        "mlp_bias": mlp_bias,
        "torch_dtype": "float32",
    })
}

/// Fails unless `out` is absent, an empty folder, or (with `overwrite`) a folder.
fn check_out_dir(out: &Path, overwrite: bool) -> Result<(), ConvertError> {
    match std::fs::metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ConvertError::Read { path: out.into(), error: e }),
        Ok(m) if !m.is_dir() => Err(ConvertError::Invalid(format!("{} exists and is not a folder", out.display()))),
        Ok(_) if overwrite => Ok(()),
        Ok(_) => {
            let mut it = std::fs::read_dir(out).map_err(|e| ConvertError::Read { path: out.into(), error: e })?;
            if it.next().is_some() {
                Err(ConvertError::OutputExists(out.into()))
            } else {
                Ok(())
            }
        }
    }
}

/// Removes a temporary folder unless the conversion committed it.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Build the output in a temporary folder next to `out` with `fill`, then rename it into place
/// (an old `out` is moved aside first and removed only after the rename succeeded).
fn write_atomically(
    out: &Path,
    overwrite: bool,
    fill: impl FnOnce(&Path) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |error| ConvertError::Write { path, error }
    };
    let name = out
        .file_name()
        .ok_or_else(|| ConvertError::Invalid(format!("output path {} has no folder name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(werr(&parent))?;
    let pid = std::process::id();
    let tmp = TempDir { path: parent.join(format!(".{name}.convert-tmp-{pid}")), keep: false };
    if tmp.path.exists() {
        std::fs::remove_dir_all(&tmp.path).map_err(werr(&tmp.path))?;
    }
    std::fs::create_dir(&tmp.path).map_err(werr(&tmp.path))?;
    fill(&tmp.path)?;
    // The folder may have been filled by someone else meanwhile: check again.
    check_out_dir(out, overwrite)?;
    let mut tmp = tmp;
    if out.exists() {
        let old = TempDir { path: parent.join(format!(".{name}.convert-old-{pid}")), keep: false };
        std::fs::rename(out, &old.path).map_err(werr(out))?;
        if let Err(e) = std::fs::rename(&tmp.path, out) {
            let _ = std::fs::rename(&old.path, out);
            return Err(ConvertError::Write { path: out.into(), error: e });
        }
        tmp.keep = true;
        drop(old);
    } else {
        std::fs::rename(&tmp.path, out).map_err(werr(out))?;
        tmp.keep = true;
    }
    Ok(())
}

/// Convert the GGUF file `gguf` into the HF folder `out`.
pub fn convert_gguf(gguf: &Path, out: &Path, opts: ConvertOptions) -> Result<ConvertSummary, ConvertError> {
    check_out_dir(out, opts.overwrite)?;
    let bytes = std::fs::read(gguf).map_err(|e| ConvertError::Read { path: gguf.into(), error: e })?;
    let source = gguf.file_name().map_or_else(|| gguf.display().to_string(), |n| n.to_string_lossy().into_owned());
    convert_gguf_bytes(&bytes, &source, out, opts)
}

struct F32Tensor {
    name: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Write f32 tensors (already in name order) as safetensors, deterministically: the header's
/// keys are sorted (the `safetensors` crate writes its metadata map in hash order), the header is
/// space-padded to a multiple of 8 bytes, and the data follow in header order.
fn write_safetensors(path: &Path, tensors: &[F32Tensor], meta: &BTreeMap<String, String>) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(meta));
    let mut offset = 0usize;
    for t in tensors {
        assert_eq!(t.data.len(), 4 * t.shape.iter().product::<usize>(), "{}: data size", t.name);
        let end = offset + t.data.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = serde_json::to_vec(&header).expect("JSON values serialise");
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for t in tensors {
        f.write_all(&t.data)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Convert GGUF bytes (named `source` in the safetensors metadata) into the HF folder `out`.
pub fn convert_gguf_bytes(
    bytes: &[u8],
    source: &str,
    out: &Path,
    opts: ConvertOptions,
) -> Result<ConvertSummary, ConvertError> {
    let overwrite = opts.overwrite;
    check_out_dir(out, overwrite)?;
    let gguf_sha256: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    let mut reader = Cursor::new(bytes);
    let content = Content::read(&mut reader).map_err(|e| ConvertError::Gguf(e.to_string()))?;
    check_architecture(&content)?;
    let vocab = read_vocab(&content)?;
    let tok_json = tokenizer::tokenizer_json(&vocab)?;
    let h = read_hparams(&content, vocab.tokens.len())?;

    // Map every name first: an unknown tensor or a missing one fails before any dequantising.
    let mut mapped: BTreeMap<String, (String, tensors::Mapped)> = BTreeMap::new();
    for (name, info) in &content.tensor_infos {
        let m = tensors::map_name(name)?;
        if let Some(l) = m.layer {
            if l >= h.n_layer {
                return Err(ConvertError::Tensor {
                    name: name.clone(),
                    message: format!("block {l} but llama.block_count = {}", h.n_layer),
                });
            }
        }
        let want = tensors::expected_shape(&m, &h.dims);
        if info.shape.dims() != want.as_slice() {
            return Err(ConvertError::Tensor {
                name: name.clone(),
                message: format!("shape {:?}, expected {want:?} for {}", info.shape.dims(), m.hf_name),
            });
        }
        mapped.insert(m.hf_name.clone(), (name.clone(), m));
    }
    let mut required: Vec<String> = vec!["token_embd.weight".into(), "output_norm.weight".into()];
    for l in 0..h.n_layer {
        required.extend(tensors::BLOCK_KINDS.iter().map(|k| format!("blk.{l}.{k}.weight")));
    }
    for r in &required {
        if !content.tensor_infos.contains_key(r) {
            return Err(ConvertError::Tensor { name: r.clone(), message: "missing from the GGUF".into() });
        }
    }
    let tied = !content.tensor_infos.contains_key("output.weight");
    let has = |suffix: &str| content.tensor_infos.keys().any(|n| n.ends_with(suffix));
    let attention_bias = [".attn_q.bias", ".attn_k.bias", ".attn_v.bias", ".attn_output.bias"].iter().any(|s| has(s));
    let mlp_bias = [".ffn_gate.bias", ".ffn_up.bias", ".ffn_down.bias"].iter().any(|s| has(s));

    let mut out_tensors = Vec::with_capacity(mapped.len());
    let mut kept: Vec<(String, candle_core::quantized::QTensor)> = Vec::new();
    let mut parameters = 0usize;
    for (hf_name, (name, m)) in &mapped {
        let terr = |e: candle_core::Error| ConvertError::Tensor { name: name.clone(), message: e.to_string() };
        let q = content.tensor(&mut reader, name, &Device::Cpu).map_err(terr)?;
        let kept_kind = match m.layer {
            Some(_) => LINEAR_KINDS.contains(&m.kind),
            None => VOCAB_KINDS.contains(&m.kind),
        };
        let keep = opts.keep_quantized && !m.is_bias && kept_kind && crate::model::quant::is_block_format(q.dtype());
        if keep {
            let q = match m.kind {
                "attn_q" => unpermute_block_rows(name, &q, h.dims.n_head)?,
                "attn_k" => unpermute_block_rows(name, &q, h.dims.n_head_kv)?,
                _ => q,
            };
            // The same finiteness check as the f32 path, on the values the blocks decode to.
            let values: Vec<f32> =
                q.dequantize(&Device::Cpu).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).map_err(terr)?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(ConvertError::Tensor { name: name.clone(), message: format!("non-finite value at {i}") });
            }
            parameters += values.len();
            kept.push((hf_name.clone(), q));
            continue;
        }
        let t = q.dequantize(&Device::Cpu).map_err(terr)?;
        let shape = t.dims().to_vec();
        let mut values: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).map_err(terr)?;
        let (rows, cols) = (shape[0], shape.iter().skip(1).product::<usize>());
        match m.kind {
            "attn_q" => values = tensors::unpermute_rows(&values, rows, cols, h.dims.n_head)?,
            "attn_k" => values = tensors::unpermute_rows(&values, rows, cols, h.dims.n_head_kv)?,
            _ => {}
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(ConvertError::Tensor { name: name.clone(), message: format!("non-finite value at {i}") });
        }
        parameters += values.len();
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        out_tensors.push(F32Tensor { name: hf_name.clone(), shape, data });
    }

    let config = config_json(&h, tied, attention_bias, mlp_bias);
    let mut st_meta = BTreeMap::new();
    st_meta.insert("format".to_string(), "pt".to_string());
    st_meta.insert("source_gguf".to_string(), source.to_string());
    st_meta.insert("source_gguf_sha256".to_string(), gguf_sha256.clone());
    st_meta.insert("converter".to_string(), concat!("dptrain ", env!("CARGO_PKG_VERSION"), " convert").to_string());

    write_atomically(out, overwrite, |dir| {
        let st_path = dir.join("model.safetensors");
        write_safetensors(&st_path, &out_tensors, &st_meta)
            .map_err(|e| ConvertError::Write { path: st_path.clone(), error: e })?;
        if !kept.is_empty() {
            let q_path = dir.join(crate::model::quant::STORED_FILE);
            let s = |x: &str| Value::String(x.into());
            let md = [
                ("dptrain.source_gguf", s(source)),
                ("dptrain.source_gguf_sha256", s(&gguf_sha256)),
                ("dptrain.converter", s(concat!("dptrain ", env!("CARGO_PKG_VERSION"), " convert --keep-quantized"))),
            ];
            let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
            let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
                kept.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let werr = |e: std::io::Error| ConvertError::Write { path: q_path.clone(), error: e };
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&q_path).map_err(werr)?);
            candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs)
                .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
            f.into_inner().map_err(|e| werr(e.into_error()))?.sync_all().map_err(werr)?;
        }
        let write_json = |file: &str, v: &serde_json::Value| {
            let p = dir.join(file);
            let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
            std::fs::write(&p, text + "\n").map_err(|e| ConvertError::Write { path: p, error: e })
        };
        write_json("config.json", &config)?;
        // Parsed by the tokenizers library and saved by it (its own layout: vocab in id order),
        // then loaded back from the file.
        let tok_path = dir.join("tokenizer.json");
        let invalid =
            |e: tokenizers::Error| ConvertError::Invalid(format!("the rebuilt tokenizer.json does not load: {e}"));
        let tok = tokenizers::Tokenizer::from_str(&tok_json.to_string()).map_err(invalid)?;
        tok.save(&tok_path, true)
            .map_err(|e| ConvertError::Write { path: tok_path.clone(), error: std::io::Error::other(e.to_string()) })?;
        tokenizers::Tokenizer::from_file(&tok_path).map_err(invalid)?;
        Ok(())
    })?;
    let mut kept_formats: Vec<&'static str> =
        kept.iter().map(|(_, q)| crate::model::quant::ggml_name(q.dtype())).collect();
    kept_formats.sort_unstable();
    kept_formats.dedup();
    Ok(ConvertSummary {
        out_dir: out.to_path_buf(),
        tensors: out_tensors.len() + kept.len(),
        parameters,
        gguf_sha256,
        tied_embeddings: tied,
        kept_quantized: kept.len(),
        kept_formats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Tensor;
    use rand::SeedableRng;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn scratch(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "dptrain-convert-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A tiny Llama GGUF: 1 block, hidden 8, 2 heads of 4, 1 KV head, FFN 12; F32 tensors whose
    /// values encode (tensor, row, column) so the un-permutation can be checked.
    fn tiny_gguf(arch: &str, tok_model: &str, extra_tensor: Option<&str>) -> Vec<u8> {
        let v = tokenizer::tests::tiny_vocab();
        let nv = v.tokens.len();
        let (hidden, ffn, heads, kv, hd) = (8usize, 12usize, 2usize, 1usize, 4usize);
        let mk = |seed: f32, shape: &[usize]| {
            let n: usize = shape.iter().product();
            let cols = *shape.last().unwrap();
            let vals: Vec<f32> = (0..n).map(|i| seed + (i / cols) as f32 + (i % cols) as f32 / 100.0).collect();
            QTensor::quantize(&Tensor::from_vec(vals, shape, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
        };
        let mut ts: Vec<(String, QTensor)> = vec![
            ("token_embd.weight".into(), mk(0.0, &[nv, hidden])),
            ("output_norm.weight".into(), mk(0.5, &[hidden])),
            ("blk.0.attn_norm.weight".into(), mk(0.25, &[hidden])),
            ("blk.0.ffn_norm.weight".into(), mk(0.75, &[hidden])),
            ("blk.0.attn_q.weight".into(), mk(1000.0, &[heads * hd, hidden])),
            ("blk.0.attn_k.weight".into(), mk(2000.0, &[kv * hd, hidden])),
            ("blk.0.attn_v.weight".into(), mk(3000.0, &[kv * hd, hidden])),
            ("blk.0.attn_output.weight".into(), mk(4000.0, &[hidden, heads * hd])),
            ("blk.0.ffn_gate.weight".into(), mk(5000.0, &[ffn, hidden])),
            ("blk.0.ffn_up.weight".into(), mk(6000.0, &[ffn, hidden])),
            ("blk.0.ffn_down.weight".into(), mk(7000.0, &[hidden, ffn])),
        ];
        if let Some(n) = extra_tensor {
            ts.push((n.into(), mk(9.0, &[hidden])));
        }
        gguf_bytes(arch, tok_model, (hidden, ffn, heads, kv), &ts)
    }

    /// A one-block Llama GGUF of `ts` (GGUF names) with a gpt2 tokenizer and these dims.
    fn gguf_bytes(
        arch: &str,
        tok_model: &str,
        (hidden, ffn, heads, kv): (usize, usize, usize, usize),
        ts: &[(String, QTensor)],
    ) -> Vec<u8> {
        let v = tokenizer::tests::tiny_vocab();
        let s = |x: &str| Value::String(x.into());
        let strings = |xs: &[String]| Value::Array(xs.iter().map(|x| Value::String(x.clone())).collect());
        let md: Vec<(&str, Value)> = vec![
            ("general.architecture", s(arch)),
            ("llama.block_count", Value::U32(1)),
            ("llama.context_length", Value::U32(64)),
            ("llama.embedding_length", Value::U32(hidden as u32)),
            ("llama.feed_forward_length", Value::U32(ffn as u32)),
            ("llama.attention.head_count", Value::U32(heads as u32)),
            ("llama.attention.head_count_kv", Value::U32(kv as u32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(100000.0)),
            ("tokenizer.ggml.model", s(tok_model)),
            ("tokenizer.ggml.tokens", strings(&v.tokens)),
            ("tokenizer.ggml.merges", strings(&v.merges)),
            ("tokenizer.ggml.token_type", Value::Array(v.token_types.iter().map(|&t| Value::I32(t as i32)).collect())),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ];
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut buf = Cursor::new(Vec::new());
        candle_core::quantized::gguf_file::write(&mut buf, &md_refs, &t_refs).unwrap();
        buf.into_inner()
    }

    /// A one-block Llama GGUF (hidden 64, 2 heads of 32, 1 KV head, FFN 96, untied) whose linear
    /// weights are GGML blocks of three types (Q8_0 attention and embedding, Q4_1 gate/up and
    /// output head, Q4_0 down), their q/k rows permuted the way llama.cpp stores them; random values.
    fn quantized_gguf() -> Vec<u8> {
        let nv = tokenizer::tests::tiny_vocab().tokens.len();
        let (hidden, ffn, heads, kv, hd) = (64usize, 96usize, 2usize, 1usize, 32usize);
        let f32t = |seed: u64, shape: &[usize], offset: f32| {
            let t = (crate::test_util::rand(shape, seed) * 0.5).unwrap() + offset as f64;
            QTensor::quantize(&t.unwrap(), GgmlDType::F32).unwrap()
        };
        let lin = |seed: u64, out: usize, inp: usize, ty: GgmlDType, permute_heads: Option<usize>| {
            let mut t = crate::test_util::rand(&[out, inp], seed);
            if let Some(n) = permute_heads {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                t = Tensor::from_vec(tensors::permute_rows(&v, out, inp, n).unwrap(), (out, inp), &Device::Cpu)
                    .unwrap();
            }
            QTensor::quantize(&t, ty).unwrap()
        };
        let ts: Vec<(String, QTensor)> = vec![
            ("token_embd.weight".into(), lin(1, nv, hidden, GgmlDType::Q8_0, None)),
            ("output.weight".into(), lin(12, nv, hidden, GgmlDType::Q4_1, None)),
            ("output_norm.weight".into(), f32t(2, &[hidden], 1.0)),
            ("blk.0.attn_norm.weight".into(), f32t(3, &[hidden], 1.0)),
            ("blk.0.ffn_norm.weight".into(), f32t(4, &[hidden], 1.0)),
            ("blk.0.attn_q.weight".into(), lin(5, heads * hd, hidden, GgmlDType::Q8_0, Some(heads))),
            ("blk.0.attn_k.weight".into(), lin(6, kv * hd, hidden, GgmlDType::Q8_0, Some(kv))),
            ("blk.0.attn_v.weight".into(), lin(7, kv * hd, hidden, GgmlDType::Q8_0, None)),
            ("blk.0.attn_output.weight".into(), lin(8, hidden, heads * hd, GgmlDType::Q8_0, None)),
            ("blk.0.ffn_gate.weight".into(), lin(9, ffn, hidden, GgmlDType::Q4_1, None)),
            ("blk.0.ffn_up.weight".into(), lin(10, ffn, hidden, GgmlDType::Q4_1, None)),
            ("blk.0.ffn_down.weight".into(), lin(11, hidden, ffn, GgmlDType::Q4_0, None)),
        ];
        gguf_bytes("llama", "gpt2", (hidden, ffn, heads, kv), &ts)
    }

    fn read_tensor(dir: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(name).unwrap();
        let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        (t.shape().to_vec(), v)
    }

    #[test]
    fn tiny_gguf_converts_with_hf_names_unpermuted_rows_config_and_tokenizer() {
        let root = scratch("ok");
        let out = root.join("model");
        let s = convert_gguf_bytes(&tiny_gguf("llama", "gpt2", None), "tiny.gguf", &out, ConvertOptions::default())
            .unwrap();
        assert_eq!(s.tensors, 11);
        assert!(s.tied_embeddings);
        // Row r of the GGUF q holds 1000 + r (+ column/100). HF row 1 is GGUF row 2, HF row 2 is GGUF
        // row 1 (head size 4: half 2); head 1 starts at row 4 the same way.
        let (shape, q) = read_tensor(&out, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(shape, [8, 8]);
        let rows: Vec<f32> = (0..8).map(|r| q[r * 8]).collect();
        assert_eq!(rows, [1000.0, 1002.0, 1001.0, 1003.0, 1004.0, 1006.0, 1005.0, 1007.0]);
        assert_eq!(q[8 + 3], 1002.03);
        let (shape, k) = read_tensor(&out, "model.layers.0.self_attn.k_proj.weight");
        assert_eq!(shape, [4, 8]);
        assert_eq!((0..4).map(|r| k[r * 8]).collect::<Vec<_>>(), [2000.0, 2002.0, 2001.0, 2003.0]);
        let (_, v) = read_tensor(&out, "model.layers.0.self_attn.v_proj.weight");
        assert_eq!((0..4).map(|r| v[r * 8]).collect::<Vec<_>>(), [3000.0, 3001.0, 3002.0, 3003.0], "v is not permuted");
        assert_eq!(read_tensor(&out, "model.layers.0.mlp.down_proj.weight").0, [8, 12]);
        assert_eq!(read_tensor(&out, "model.norm.weight").1[0], 0.5);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["num_key_value_heads"], 1);
        assert_eq!(cfg["head_dim"], 4);
        assert_eq!(cfg["tie_word_embeddings"], true);
        assert_eq!(cfg["rope_theta"], 100000.0);
        assert_eq!(cfg["rms_norm_eps"].as_f64().unwrap(), 1e-5f32 as f64);
        assert_eq!(cfg["bos_token_id"], 1);
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        // What the converter writes passes dptrain's strict config reading, with the θ it wrote.
        let strict = crate::model::LlamaConfig::from_json(&cfg.to_string()).unwrap();
        assert_eq!(strict.rope_theta(), Ok(100000.0));
        let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        assert_eq!(tok.encode("the", false).unwrap().get_tokens(), ["t", "he"]);
        // Non-empty output: refused without --overwrite, replaced with it; no temp folders left.
        let e = convert_gguf_bytes(&tiny_gguf("llama", "gpt2", None), "tiny.gguf", &out, ConvertOptions::default())
            .unwrap_err();
        assert!(matches!(e, ConvertError::OutputExists(_)), "{e}");
        std::fs::write(out.join("stale.txt"), "x").unwrap();
        let first = std::fs::read(out.join("model.safetensors")).unwrap();
        convert_gguf_bytes(
            &tiny_gguf("llama", "gpt2", None),
            "tiny.gguf",
            &out,
            ConvertOptions { overwrite: true, ..Default::default() },
        )
        .unwrap();
        assert!(!out.join("stale.txt").exists());
        assert!(first == std::fs::read(out.join("model.safetensors")).unwrap(), "the output is deterministic");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&first).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["source_gguf"], "tiny.gguf");
        assert_eq!(meta["source_gguf_sha256"], s.gguf_sha256);
        let names: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["model"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unsupported_architecture_tokenizer_and_unknown_tensors_are_clear_errors_leaving_nothing() {
        let root = scratch("err");
        let out = root.join("model");
        let e = convert_gguf_bytes(&tiny_gguf("mistral3", "gpt2", None), "x.gguf", &out, ConvertOptions::default())
            .unwrap_err();
        assert!(matches!(e, ConvertError::UnsupportedArchitecture(_)));
        assert!(e.to_string().contains("`mistral3`") && e.to_string().contains("llama"), "{e}");
        let e = convert_gguf_bytes(&tiny_gguf("llama", "llama", None), "x.gguf", &out, ConvertOptions::default())
            .unwrap_err();
        assert!(matches!(e, ConvertError::UnsupportedTokenizer(_)));
        assert!(e.to_string().contains("`llama`") && e.to_string().contains("gpt2"), "{e}");
        let e = convert_gguf_bytes(
            &tiny_gguf("llama", "gpt2", Some("rope_freqs.weight")),
            "x.gguf",
            &out,
            ConvertOptions::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown GGUF tensor `rope_freqs.weight`"), "{e}");
        let e = convert_gguf_bytes(b"not a gguf at all", "x.gguf", &out, ConvertOptions::default()).unwrap_err();
        assert!(matches!(e, ConvertError::Gguf(_)), "{e}");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "nothing written");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn kept_blocks_decode_to_exactly_the_dequantized_conversion_and_give_the_same_model() {
        use crate::model::quant::{self, STORED_FILE};
        use crate::model::DpModel;
        let root = scratch("keep");
        let bytes = quantized_gguf();
        let (plain, kept) = (root.join("plain"), root.join("kept"));
        let s0 = convert_gguf_bytes(&bytes, "q.gguf", &plain, ConvertOptions::default()).unwrap();
        let keep = ConvertOptions { keep_quantized: true, ..Default::default() };
        let s1 = convert_gguf_bytes(&bytes, "q.gguf", &kept, keep).unwrap();
        assert_eq!((s0.kept_quantized, s1.kept_quantized), (0, 9), "7 linear weights, the embedding, the head");
        assert!(!s1.tied_embeddings);
        assert!(quant::stored_vocab(&kept).unwrap() && !quant::stored_vocab(&plain).unwrap());
        assert_eq!(s1.kept_formats, ["q4_0", "q4_1", "q8_0"]);
        assert_eq!((s1.tensors, s1.parameters), (s0.tensors, s0.parameters));
        assert!(!plain.join(STORED_FILE).exists());
        assert_eq!(quant::stored_formats(&kept).unwrap().unwrap(), ["q4_0", "q4_1", "q8_0"]);

        // Each kept weight: the source's type, absent from the safetensors, and its blocks decode
        // to exactly the f32 values the plain conversion wrote (q/k rows un-permuted as blocks).
        let stored = quant::read_stored(&kept, &Device::Cpu).unwrap();
        let st_bytes = std::fs::read(kept.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        let mut names: Vec<&str> = stored.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names.len(), 9);
        assert!(names.contains(&"model.embed_tokens.weight") && names.contains(&"lm_head.weight"), "{names:?}");
        for (name, q) in &stored {
            assert!(st.tensor(name).is_err(), "{name} is also in model.safetensors");
            let want_type = if name.contains("self_attn") || name.contains("embed_tokens") {
                GgmlDType::Q8_0
            } else if name.contains("down_proj") {
                GgmlDType::Q4_0
            } else {
                GgmlDType::Q4_1
            };
            assert_eq!(q.dtype(), want_type, "{name}");
            let got: Vec<f32> = quant::dequantize(q, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let (shape, want) = read_tensor(&plain, name);
            assert_eq!(q.shape().dims(), shape.as_slice(), "{name}");
            let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{name}: {differ} values differ from the dequantized conversion");
        }

        // The two folders are the same model: per-example losses bit for bit (no adapter, so both
        // run the same frozen f32 product on the same values).
        let load = |dir: &Path, base: quant::BaseFormat| {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
            crate::model::LlamaLm::load(dir, None, &mut rng, &Device::Cpu, base)
        };
        let f32_base = quant::BaseFormat::from(candle_core::DType::F32);
        let exs: Vec<crate::data::Example> = [(7usize, 1usize), (5, 2), (9, 1)]
            .iter()
            .enumerate()
            .map(|(k, &(len, start))| crate::data::Example {
                ids: (0..len).map(|i| ((i * 37 + k * 11) % 261) as u32).collect(),
                label: 0,
                target_start: Some(start),
            })
            .collect();
        let refs: Vec<&crate::data::Example> = exs.iter().collect();
        let batch = crate::data::Batch::from_examples(&refs, &Device::Cpu).unwrap();
        let losses = |dir: &Path| -> Vec<f32> {
            load(dir, f32_base).unwrap().example_losses(&batch, None).unwrap().to_vec1().unwrap()
        };
        let (lp, lk) = (losses(&plain), losses(&kept));
        assert!(lp.iter().all(|l| l.is_finite() && *l > 0.0), "{lp:?}");
        assert_eq!(
            lp.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
            lk.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
        );

        // Stored blocks are never re-quantized or computed in another dtype.
        let e = load(
            &kept,
            quant::BaseFormat {
                dtype: candle_core::DType::F32,
                quant: Some(quant::QuantFormat::Q8_0),
                quant_vocab: None,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains(STORED_FILE) && e.contains("leave model.quantize unset"), "{e}");
        let e = load(&kept, candle_core::DType::BF16.into()).err().unwrap().to_string();
        assert!(e.contains("f32"), "{e}");

        // A stored tensor the model does not use, or a dense one, is an error naming it.
        let write_stored = |extra: (&str, QTensor)| {
            let mut ts: Vec<(&str, &QTensor)> = stored.iter().map(|(k, v)| (k.as_str(), v.as_ref())).collect();
            ts.push((extra.0, &extra.1));
            let mut f = std::fs::File::create(kept.join(STORED_FILE)).unwrap();
            candle_core::quantized::gguf_file::write(&mut f, &[], &ts).unwrap();
        };
        let blocks = QTensor::quantize(&crate::test_util::rand(&[4, 64], 9), GgmlDType::Q8_0).unwrap();
        write_stored(("model.layers.0.mlp.extra_proj.weight", blocks));
        let e = load(&kept, f32_base).err().unwrap().to_string();
        assert!(e.contains("model.layers.0.mlp.extra_proj.weight") && e.contains("not linear weights"), "{e}");
        let dense = QTensor::quantize(&crate::test_util::rand(&[4, 64], 9), GgmlDType::F32).unwrap();
        write_stored(("model.layers.0.mlp.extra_proj.weight", dense));
        let e = load(&kept, f32_base).err().unwrap().to_string();
        assert!(e.contains("extra_proj") && e.contains("not a GGML block format"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
