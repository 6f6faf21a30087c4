//! GGUF → Hugging Face tensor names, the shapes the HF Llama layout expects, and the Q/K row
//! un-permutation.
//!
//! llama.cpp's converter permutes the rows of `q_proj` and `k_proj` so that RoPE can rotate
//! adjacent pairs (interleaved), where the HF layout rotates the two halves of each head
//! (rotate-half). For one head of `head_dim` rows (half = head_dim / 2) it stores
//! `gguf[2i + j] = hf[j·half + i]` (i < half, j ∈ {0, 1}), i.e. numpy's
//! `w.reshape(n_head, 2, half, in).swapaxes(1, 2).reshape(out, in)`. HF row 1 is llama.cpp row 2;
//! HF row `half` is llama.cpp row 1.

use super::ConvertError;

/// What a GGUF tensor becomes in the HF folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// HF name, with its `.weight` / `.bias` suffix.
    pub hf_name: String,
    /// Block index for `blk.N.*` tensors.
    pub layer: Option<usize>,
    /// The GGUF base name without `blk.N.` and the suffix (`attn_q`, `token_embd`, …).
    pub kind: &'static str,
    pub is_bias: bool,
}

/// Per-block GGUF tensor kinds that a Llama block must have (weights).
pub const BLOCK_KINDS: [&str; 9] =
    ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"];

fn block_hf(kind: &str) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        "attn_q" => ("attn_q", "self_attn.q_proj"),
        "attn_k" => ("attn_k", "self_attn.k_proj"),
        "attn_v" => ("attn_v", "self_attn.v_proj"),
        "attn_output" => ("attn_output", "self_attn.o_proj"),
        "ffn_gate" => ("ffn_gate", "mlp.gate_proj"),
        "ffn_up" => ("ffn_up", "mlp.up_proj"),
        "ffn_down" => ("ffn_down", "mlp.down_proj"),
        "attn_norm" => ("attn_norm", "input_layernorm"),
        "ffn_norm" => ("ffn_norm", "post_attention_layernorm"),
        _ => return None,
    })
}

/// Map a GGUF Llama tensor name to its HF name. Unknown names are an error (never dropped).
pub fn map_name(gguf_name: &str) -> Result<Mapped, ConvertError> {
    let unknown = || ConvertError::UnknownTensor(gguf_name.to_string());
    let (base, suffix, is_bias) = if let Some(b) = gguf_name.strip_suffix(".weight") {
        (b, "weight", false)
    } else if let Some(b) = gguf_name.strip_suffix(".bias") {
        (b, "bias", true)
    } else {
        return Err(unknown());
    };
    let top = |kind: &'static str, hf: &str| Mapped { hf_name: format!("{hf}.{suffix}"), layer: None, kind, is_bias };
    match base {
        "token_embd" if !is_bias => return Ok(top("token_embd", "model.embed_tokens")),
        "output_norm" if !is_bias => return Ok(top("output_norm", "model.norm")),
        "output" if !is_bias => return Ok(top("output", "lm_head")),
        _ => {}
    }
    let rest = base.strip_prefix("blk.").ok_or_else(unknown)?;
    let (n, kind) = rest.split_once('.').ok_or_else(unknown)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return Err(unknown());
    }
    let layer: usize = n.parse().map_err(|_| unknown())?;
    let (kind, hf) = block_hf(kind).ok_or_else(unknown)?;
    // Biases exist in HF Llama only on the attention projections (attention_bias) and the MLP
    // (mlp_bias); never on the norms.
    if is_bias && matches!(kind, "attn_norm" | "ffn_norm") {
        return Err(unknown());
    }
    Ok(Mapped { hf_name: format!("model.layers.{layer}.{hf}.{suffix}"), layer: Some(layer), kind, is_bias })
}

/// Model dimensions the tensor shapes are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub intermediate: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

/// The HF shape ([out, in] for matrices) of a mapped tensor.
pub fn expected_shape(m: &Mapped, d: &Dims) -> Vec<usize> {
    let q = d.n_head * d.head_dim;
    let kv = d.n_head_kv * d.head_dim;
    let (out, inp) = match m.kind {
        "token_embd" | "output" => (d.vocab, d.hidden),
        "output_norm" | "attn_norm" | "ffn_norm" => return vec![d.hidden],
        "attn_q" => (q, d.hidden),
        "attn_k" | "attn_v" => (kv, d.hidden),
        "attn_output" => (d.hidden, q),
        "ffn_gate" | "ffn_up" => (d.intermediate, d.hidden),
        "ffn_down" => (d.hidden, d.intermediate),
        other => unreachable!("map_name returned unknown kind {other}"),
    };
    if m.is_bias {
        vec![out]
    } else {
        vec![out, inp]
    }
}

fn check_heads(rows: usize, n_head: usize) -> Result<usize, ConvertError> {
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(ConvertError::Invalid(format!("cannot un-permute {rows} rows into {n_head} heads of even size")));
    }
    Ok(rows / n_head)
}

/// The row llama.cpp stores at `gguf_row` comes from HF row `hf_row_of(gguf_row)`.
fn hf_row_of(gguf_row: usize, head_dim: usize) -> usize {
    let (h, r) = (gguf_row / head_dim, gguf_row % head_dim);
    let half = head_dim / 2;
    h * head_dim + (r % 2) * half + r / 2
}

/// llama.cpp's permutation (HF rows → GGUF rows) of a row-major `[rows, cols]` matrix (a bias is
/// `cols = 1`). Used by the tests; the converter applies [`unpermute_rows`].
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>, ConvertError> {
    let head_dim = check_heads(rows, n_head)?;
    assert_eq!(w.len(), rows * cols, "permute_rows: {} values for [{rows}, {cols}]", w.len());
    let mut out = vec![0f32; w.len()];
    for g in 0..rows {
        let h = hf_row_of(g, head_dim);
        out[g * cols..(g + 1) * cols].copy_from_slice(&w[h * cols..(h + 1) * cols]);
    }
    Ok(out)
}

/// The inverse of llama.cpp's permutation (GGUF rows → HF rows): `hf[h·hd + j·half + i] =
/// gguf[h·hd + 2i + j]`. Rows are `cols` elements of any kind: f32 values, or the bytes of a
/// row of GGML blocks (rows of a quantized weight are whole blocks, so moving them moves whole
/// blocks and re-quantizes nothing).
pub fn unpermute_rows<T: Copy + Default>(
    w: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<T>, ConvertError> {
    let head_dim = check_heads(rows, n_head)?;
    assert_eq!(w.len(), rows * cols, "unpermute_rows: {} values for [{rows}, {cols}]", w.len());
    let mut out = vec![T::default(); w.len()];
    for g in 0..rows {
        let h = hf_row_of(g, head_dim);
        out[h * cols..(h + 1) * cols].copy_from_slice(&w[g * cols..(g + 1) * cols]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// numpy's `w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)`, written
    /// out index by index, independently of `hf_row_of`.
    fn numpy_permute(w: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
        let half = head_dim / 2;
        let mut out = vec![0f32; w.len()];
        // After swapaxes the array has shape [n_head, half, 2, cols]; element (h, i, j, c) comes
        // from the source (h, j, i, c).
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    for c in 0..cols {
                        let dst = ((h * half + i) * 2 + j) * cols + c;
                        let src = ((h * 2 + j) * half + i) * cols + c;
                        out[dst] = w[src];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_is_the_exact_inverse_of_llamacpp_permute() {
        let (n_head, head_dim, cols) = (3, 4, 5);
        let rows = n_head * head_dim;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let hf: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.5).collect();
        let gguf = numpy_permute(&hf, n_head, head_dim, cols);
        assert_eq!(permute_rows(&hf, rows, cols, n_head).unwrap(), gguf);
        let back = unpermute_rows(&gguf, rows, cols, n_head).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            hf.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(permute_rows(&unpermute_rows(&hf, rows, cols, n_head).unwrap(), rows, cols, n_head).unwrap(), hf);
        // Row facts of models.json: HF row 1 is llama.cpp row 2, HF row half is llama.cpp row 1.
        assert_eq!(&back[cols..2 * cols], &gguf[2 * cols..3 * cols]);
        assert_eq!(&back[2 * cols..3 * cols], &gguf[cols..2 * cols]);
        // A bias (one column) and K with fewer heads go through the same map.
        let bias: Vec<f32> = (0..rows).map(|i| i as f32).collect();
        assert_eq!(unpermute_rows(&numpy_permute(&bias, n_head, head_dim, 1), rows, 1, n_head).unwrap(), bias);
        assert!(unpermute_rows(&hf, rows, cols, 5).is_err());
        assert!(unpermute_rows(&[0.0; 6], 6, 1, 2).is_err(), "odd head size");
    }

    #[test]
    fn names_map_to_hf_and_unknown_names_are_errors() {
        let m = |s: &str| map_name(s).unwrap().hf_name;
        assert_eq!(m("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(m("blk.0.attn_q.weight"), "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(m("blk.12.attn_k.weight"), "model.layers.12.self_attn.k_proj.weight");
        assert_eq!(m("blk.3.attn_v.weight"), "model.layers.3.self_attn.v_proj.weight");
        assert_eq!(m("blk.3.attn_output.weight"), "model.layers.3.self_attn.o_proj.weight");
        assert_eq!(m("blk.3.ffn_gate.weight"), "model.layers.3.mlp.gate_proj.weight");
        assert_eq!(m("blk.3.ffn_up.weight"), "model.layers.3.mlp.up_proj.weight");
        assert_eq!(m("blk.3.ffn_down.weight"), "model.layers.3.mlp.down_proj.weight");
        assert_eq!(m("blk.3.attn_norm.weight"), "model.layers.3.input_layernorm.weight");
        assert_eq!(m("blk.3.ffn_norm.weight"), "model.layers.3.post_attention_layernorm.weight");
        assert_eq!(m("output_norm.weight"), "model.norm.weight");
        assert_eq!(m("output.weight"), "lm_head.weight");
        assert_eq!(m("blk.1.attn_q.bias"), "model.layers.1.self_attn.q_proj.bias");
        for bad in [
            "rope_freqs.weight",
            "blk.0.attn_rot_embd.weight",
            "blk.x.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.0.attn_q",
            "token_embd.bias",
            "blk.0.attn_norm.bias",
            "blk.0.ffn_gate_exps.weight",
        ] {
            let e = map_name(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("unknown"), "{bad}: {e}");
        }
    }
}
