//! Frozen base weights kept quantized (GGML Q8_0 or Q4_K blocks, candle's `QTensor`).
//!
//! `model.quantize = "q8_0" | "q4_k"` stores every frozen linear weight of a Llama-family model's
//! decoder layers in GGML blocks: Q8_0 is 8.5 bits a weight (34 bytes per 32), Q4_K 4.5 bits (144
//! bytes per 256), against 32 for f32 and 16 for bf16. Each weight is quantized as it is read from
//! the memory-mapped safetensors, so the whole model never sits in memory unquantized. Norms, the
//! embedding and the LM head stay dense (f32), unless `model.quantize-vocab` quantizes those two
//! as well: the lookup then dequantizes the rows it reads ([`gather_rows`]), the vocabulary NLL
//! one slice of head rows at a time ([`dequantize_rows`], `model::vocab`).
//!
//! The products: a quantized layer's forward dequantizes its weight to f32 (one layer at a time,
//! a transient [out, in] buffer freed right after the product) and runs the same frozen f32 GEMM
//! as a dense layer (`lora::QuantFrozenLinear`); the backward dequantizes again for
//! dL/dx = G · deq(W). So a quantized model computes *exactly* the dequantized model (the same
//! f32 products on the same values), which is what the tests check: per-example losses and
//! per-example gradients of a quantized model equal those of a dense model holding deq(W)
//! (tests/quantized.rs). The quantization itself changes the model (by about 0.5% of each weight
//! for Q8_0, a few percent for Q4_K): the adapter is trained for the quantized base and is to be
//! deployed on it (the report names the quantization). candle's own quantized matmul is not used
//! for the products: on the CPU it also quantizes the activations (to Q8 blocks), which would make
//! the forward differ from the dequantized model and its backward not the forward's gradient.
//!
//! A folder written by `dptrain convert --keep-quantized` holds the blocks of a GGUF file as
//! they were: its decoder linear weights, and its token embedding and LM head when the GGUF has
//! them in blocks, sit in [`STORED_FILE`] (a GGUF file under HF names, Q/K rows already in HF
//! order), everything else in model.safetensors in f32. Such a folder is
//! loaded with those blocks as the frozen weights, whatever their GGML type, never re-quantized
//! ([`read_stored`]); `model.quantize` must then be unset.
//!
//! The privacy argument is unchanged: the frozen base is a public constant whatever its storage,
//! and per-example gradients, clipping and noise are computed as for any base.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Shape, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file of a model folder that holds frozen linear weights as GGML blocks
/// (`dptrain convert --keep-quantized`).
pub const STORED_FILE: &str = "model.quantized.gguf";

/// The folder's stored-blocks file, if it has one.
pub fn stored_file(dir: &Path) -> Option<PathBuf> {
    let f = dir.join(STORED_FILE);
    f.exists().then_some(f)
}

/// The lower-case name of a GGML type (`q4_1`, `q6_k`, `f16`).
pub fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// Whether `t` is a block format (not a plain float type).
pub fn is_block_format(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

fn stored_err(file: &Path, message: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {message}", file.display()))
}

fn read_stored_header(file: &Path) -> Result<(std::fs::File, gguf_file::Content)> {
    let mut f = std::fs::File::open(file).map_err(|e| stored_err(file, e))?;
    let content =
        gguf_file::Content::read(&mut f).map_err(|e| stored_err(file, format!("not a readable GGUF file: {e}")))?;
    if let Some((name, info)) = content.tensor_infos.iter().find(|(_, i)| !is_block_format(i.ggml_dtype)) {
        return Err(stored_err(
            file,
            format!(
                "tensor `{name}` is {}, not a GGML block format: dense weights belong in model.safetensors",
                ggml_name(info.ggml_dtype)
            ),
        ));
    }
    Ok((f, content))
}

/// The GGML types of a folder's stored blocks, sorted and without repeats (`["q4_1", "q6_k"]`),
/// or None when the folder has no [`STORED_FILE`]. Reads the file's header only.
pub fn stored_formats(dir: &Path) -> Result<Option<Vec<&'static str>>> {
    let Some(file) = stored_file(dir) else { return Ok(None) };
    let (_, content) = read_stored_header(&file)?;
    let mut names: Vec<&'static str> = content.tensor_infos.values().map(|i| ggml_name(i.ggml_dtype)).collect();
    names.sort_unstable();
    names.dedup();
    Ok(Some(names))
}

/// HF names of the vocabulary tensors a stored-blocks file may hold besides decoder linears.
pub const STORED_VOCAB: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// Whether a folder's [`STORED_FILE`] holds the token embedding or the LM head as blocks (false
/// without such a file). Reads the file's header only.
pub fn stored_vocab(dir: &Path) -> Result<bool> {
    let Some(file) = stored_file(dir) else { return Ok(false) };
    let (_, content) = read_stored_header(&file)?;
    Ok(STORED_VOCAB.iter().any(|n| content.tensor_infos.contains_key(*n)))
}

/// Every tensor of a folder's [`STORED_FILE`] (HF name → blocks on `device`), or an empty map
/// when it has none. A dense tensor in the file is an error.
pub fn read_stored(dir: &Path, device: &Device) -> Result<BTreeMap<String, Arc<QTensor>>> {
    let mut out = BTreeMap::new();
    let Some(file) = stored_file(dir) else { return Ok(out) };
    let (mut f, content) = read_stored_header(&file)?;
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut f, name, device).map_err(|e| stored_err(&file, format!("tensor `{name}`: {e}")))?;
        out.insert(name.clone(), Arc::new(q));
    }
    Ok(out)
}

/// A supported quantization of the frozen linear weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 32 weights per block: 32 signed bytes and one f16 scale (8.5 bits a weight).
    Q8_0,
    /// 256 weights per super-block of 8 sub-blocks with 6-bit scales and minimums (4.5 bits).
    Q4K,
}

impl QuantFormat {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "q8_0" => Ok(QuantFormat::Q8_0),
            "q4_k" => Ok(QuantFormat::Q4K),
            _ => Err(format!("unsupported quantization `{s}` (expected q8_0 or q4_k)")),
        }
    }

    /// The name as configured (`q8_0`, `q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4K => "q4_k",
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantFormat::Q8_0 => GgmlDType::Q8_0,
            QuantFormat::Q4K => GgmlDType::Q4K,
        }
    }

    /// Weights per block: every row length (a weight's input size) must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }
}

/// How the frozen base weights are stored: a dense dtype, or GGML blocks for the linear weights
/// of the decoder layers (`quant`) and for the token embedding and LM head (`quant_vocab`), with
/// everything else in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseFormat {
    pub dtype: DType,
    pub quant: Option<QuantFormat>,
    pub quant_vocab: Option<QuantFormat>,
}

impl BaseFormat {
    /// Whether anything is quantized at load (its products then run in f32).
    pub fn is_quantized(&self) -> bool {
        self.quant.is_some() || self.quant_vocab.is_some()
    }
}

impl From<DType> for BaseFormat {
    fn from(dtype: DType) -> Self {
        BaseFormat { dtype, quant: None, quant_vocab: None }
    }
}

/// Quantize one frozen weight [out, in] (any dtype, on any device) to `format` on `device`.
/// `name` names the weight in the error when its rows do not split into whole blocks.
///
/// The weight is read a few rows at a time (at most `QUANT_CHUNK_VALUES` values converted to f32
/// on the CPU at once, per thread) and the chunks are quantized in parallel into one block buffer:
/// so a bf16 8B embedding (525M weights) never exists in f32 (2.1 GB), and a weight on a GPU is
/// brought to the CPU one chunk at a time. Every block is quantized from its own values only, so
/// this is bit for bit candle's `QTensor::quantize` of the whole weight (the slow twin; test).
pub fn quantize_weight(w: &Tensor, format: QuantFormat, name: &str, device: &Device) -> Result<Arc<QTensor>> {
    let (out, inp) = w.dims2()?;
    let block = format.block_size();
    if inp % block != 0 {
        candle_core::bail!(
            "model.quantize = \"{}\": {name} has rows of {inp} weights, not a multiple of the format's block of \
             {block} ({out} × {inp}); use {} or leave model.quantize unset",
            format.name(),
            if format == QuantFormat::Q4K && inp % QuantFormat::Q8_0.block_size() == 0 {
                "q8_0"
            } else {
                "a dense dtype"
            }
        );
    }
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8_0};
    let storage = match format {
        QuantFormat::Q8_0 => blocks_storage::<BlockQ8_0>(w, device, QUANT_CHUNK_VALUES)?,
        QuantFormat::Q4K => blocks_storage::<BlockQ4K>(w, device, QUANT_CHUNK_VALUES)?,
    };
    Ok(Arc::new(QTensor::new(storage, (out, inp))?))
}

/// Safetensors tensors as stored: the dtype asked for is ignored (see `as_stored_source`).
struct AsStored(candle_core::safetensors::MmapedSafetensors);

impl candle_nn::var_builder::SimpleBackend for AsStored {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, _: DType, _: &Device) -> Result<Tensor> {
        let t = self.0.load(name, &Device::Cpu)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        self.0.load(name, &Device::Cpu)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

/// A CPU weight source over safetensors `files` that gives each tensor in its stored dtype (a
/// bf16 weight stays bf16 until `quantize_weight` converts it a chunk at a time).
///
/// # Safety
/// The files are memory-mapped: they must not be modified while the source lives (as for
/// `VarBuilder::from_mmaped_safetensors`).
pub unsafe fn as_stored_source(files: &[PathBuf]) -> Result<candle_nn::VarBuilder<'static>> {
    let mm = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files)? };
    Ok(candle_nn::VarBuilder::from_backend(Box::new(AsStored(mm)), DType::F32, Device::Cpu))
}

/// Values converted to f32 at once per thread while quantizing (16 MiB of f32).
pub const QUANT_CHUNK_VALUES: usize = 1 << 22;

/// `w` [out, in] (rows whole blocks of T) quantized to T's blocks, chunks of whole rows (about
/// `chunk_values` values, at least one row) in parallel, as storage on `device`.
fn blocks_storage<T: candle_core::quantized::GgmlType + 'static>(
    w: &Tensor,
    device: &Device,
    chunk_values: usize,
) -> Result<candle_core::quantized::QStorage> {
    use candle_core::quantized::QStorage;
    use rayon::prelude::*;
    let (out, inp) = w.dims2()?;
    let per_row = inp / T::BLCK_SIZE;
    let rows = (chunk_values / inp).max(1);
    let mut blocks = vec![T::zeros(); out * per_row];
    blocks.par_chunks_mut(rows * per_row).enumerate().try_for_each(|(i, dst)| -> Result<()> {
        let n = dst.len() / per_row;
        let xs = w.narrow(0, i * rows, n)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        T::from_float(&xs.flatten_all()?.to_vec1::<f32>()?, dst);
        Ok(())
    })?;
    match device {
        Device::Cpu => Ok(QStorage::Cpu(Box::new(blocks))),
        dev => {
            // SAFETY: T is plain data (GGML blocks of integers and halves); the slice covers
            // exactly the vector's initialised elements.
            let bytes = unsafe {
                std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks.as_slice()))
            };
            QStorage::from_data(std::borrow::Cow::Borrowed(bytes), dev, T::DTYPE)
        }
    }
}

/// deq(W) in f32 on `device`: on the CPU with the blocks split across rayon's threads (candle's
/// `QTensor::dequantize`, the slow twin, runs on one thread: on 2 cores it made a Llama-3.2-1B
/// step 37–40% slower than the f32 base, threaded 21%: BENCHMARKS.md); elsewhere candle's own (a GPU kernel).
pub fn dequantize(q: &QTensor, device: &Device) -> Result<Tensor> {
    if !device.is_cpu() || !q.device().is_cpu() || !threaded_type(q.dtype()) {
        return q.dequantize(device);
    }
    let mut out = vec![0f32; q.shape().elem_count()];
    blocks_to_float(q, 0, &mut out)?;
    Tensor::from_vec(out, q.shape(), device)
}

/// Rows `r0 .. r0 + rows` of deq(W) for a CPU `QTensor` W [R, C] (C a whole number of blocks, as
/// every quantized weight here is) into `out` ([rows · C], row-major): the same values as those
/// rows of [`dequantize`], without dequantizing the rest (the vocabulary NLL's head slices).
pub fn dequantize_rows(q: &QTensor, r0: usize, rows: usize, out: &mut [f32]) -> Result<()> {
    let (r, c) = q.shape().dims2()?;
    if r0 + rows > r || out.len() != rows * c || !c.is_multiple_of(q.dtype().block_size()) {
        candle_core::bail!(
            "dequantize rows {r0}..{} of a [{r}, {c}] {:?} weight into {} values",
            r0 + rows,
            q.dtype(),
            out.len()
        );
    }
    if !q.device().is_cpu() {
        candle_core::bail!("dequantize rows: the weight is not on the CPU");
    }
    blocks_to_float(q, r0 * c / q.dtype().block_size(), out)
}

/// deq(W)[ids] [ids.len(), C] on `device` (an embedding lookup in a quantized table [R, C]): each
/// row dequantized alone on the CPU; elsewhere the whole table dequantized, then indexed.
pub fn gather_rows(q: &QTensor, ids: &[u32], device: &Device) -> Result<Tensor> {
    let (r, c) = q.shape().dims2()?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= r) {
        candle_core::bail!("embedding lookup: token {bad} outside the vocabulary of {r}");
    }
    if !q.device().is_cpu() {
        let ids = Tensor::new(ids, device)?;
        return dequantize(q, device)?.index_select(&ids, 0);
    }
    use rayon::prelude::*;
    let mut out = vec![0f32; ids.len() * c];
    out.par_chunks_mut(c).zip(ids.par_iter()).try_for_each(|(row, &i)| dequantize_rows(q, i as usize, 1, row))?;
    Tensor::from_vec(out, (ids.len(), c), device)
}

/// Whether [`blocks_to_float`] handles `t` (every type a quantized weight here can have).
fn threaded_type(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(t, Q8_0 | Q4K | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q2K | Q3K | Q5K | Q6K)
}

/// Blocks `b0 ..` of a CPU `QTensor` (as many as `out` holds values) dequantized into `out`.
fn blocks_to_float(q: &QTensor, b0: usize, out: &mut [f32]) -> Result<()> {
    use candle_core::quantized::k_quants::{
        BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0,
    };
    let t = q.dtype();
    let (bs, size) = (t.block_size(), t.type_size());
    let data = q.data()?;
    let n = out.len() / bs;
    if !out.len().is_multiple_of(bs) || (b0 + n) * size > data.len() {
        candle_core::bail!("dequantize: blocks {b0}..{} of {:?} are not in its {} bytes", b0 + n, t, data.len());
    }
    let bytes = &data[b0 * size..(b0 + n) * size];
    match t {
        GgmlDType::Q8_0 => par_to_float::<BlockQ8_0>(bytes, out),
        GgmlDType::Q4K => par_to_float::<BlockQ4K>(bytes, out),
        // The types of stored GGUF blocks (`dptrain convert --keep-quantized`).
        GgmlDType::Q4_0 => par_to_float::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => par_to_float::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => par_to_float::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => par_to_float::<BlockQ5_1>(bytes, out),
        GgmlDType::Q2K => par_to_float::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => par_to_float::<BlockQ3K>(bytes, out),
        GgmlDType::Q5K => par_to_float::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => par_to_float::<BlockQ6K>(bytes, out),
        _ => candle_core::bail!("dequantize: {t:?} blocks are not handled here"),
    }
}

/// `T::to_float` over `bytes` (blocks of type T from a CPU QTensor's storage) into `out`, 1,024
/// blocks a task.
fn par_to_float<T: candle_core::quantized::GgmlType>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    use rayon::prelude::*;
    let size = std::mem::size_of::<T>();
    let blocks = out.len() / T::BLCK_SIZE;
    if !out.len().is_multiple_of(T::BLCK_SIZE)
        || bytes.len() != blocks * size
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        candle_core::bail!("dequantize: {} bytes do not hold {} blocks of {:?}", bytes.len(), blocks, T::DTYPE);
    }
    // SAFETY: the bytes are `blocks` whole blocks of a `Vec<T>` (the storage of a CPU QTensor of
    // T's dtype, borrowed for this call, cut at block boundaries), length and alignment checked
    // above; T is plain data.
    let blocks: &[T] = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, blocks) };
    const CHUNK: usize = 1024;
    out.par_chunks_mut(CHUNK * T::BLCK_SIZE).zip(blocks.par_chunks(CHUNK)).for_each(|(o, b)| T::to_float(b, o));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;

    #[test]
    fn quantized_weights_take_their_formats_bytes_and_dequantize_close_to_the_original() {
        let w = rand(&[8, 512], 3);
        let dense = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = dense.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (format, bytes_per_block, tol) in [(QuantFormat::Q8_0, 34usize, 0.01f32), (QuantFormat::Q4K, 144, 0.1)] {
            let q = quantize_weight(&w, format, "w", &Device::Cpu).unwrap();
            assert_eq!(q.storage_size_in_bytes(), 8 * 512 / format.block_size() * bytes_per_block, "{format:?}");
            let back = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = back.iter().zip(&dense).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err > 0.0, "{format:?}: dequantized exactly: nothing was quantized");
            assert!(err < tol * scale, "{format:?}: max error {err} vs max |w| {scale}");
        }
    }

    #[test]
    fn threaded_dequantization_equals_candles_bit_for_bit() {
        // 2,100 × 512 weights: several 1,024-block chunks and a partial one for both formats.
        let w = rand(&[2100, 512], 5);
        use GgmlDType::*;
        for format in [Q8_0, Q4K, Q4_0, Q4_1, Q5_0, Q5_1, Q2K, Q3K, Q5K, Q6K] {
            let q = QTensor::quantize(&w, format).unwrap();
            let fast = dequantize(&q, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let slow = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(fast.len(), slow.len());
            let differ = fast.iter().zip(&slow).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{format:?}: {differ} values differ");
        }
    }

    #[test]
    fn dequantized_rows_and_gathered_rows_are_those_rows_of_the_whole_dequantization_bit_for_bit() {
        // 37 rows of 512: a row is 16 Q8_0 blocks or 2 Q4_K super-blocks, so a row range starts
        // mid-storage; ranges at the start, the middle, the end and of one row.
        let w = rand(&[37, 512], 8);
        use GgmlDType::*;
        for format in [Q8_0, Q4K, Q4_1, Q6K] {
            let q = QTensor::quantize(&w, format).unwrap();
            let whole = q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            for (r0, rows) in [(0, 37), (0, 5), (13, 9), (36, 1), (30, 7)] {
                let mut out = vec![f32::NAN; rows * 512];
                dequantize_rows(&q, r0, rows, &mut out).unwrap();
                let want: Vec<f32> = whole[r0..r0 + rows].concat();
                let differ = out.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differ, 0, "{format:?} rows {r0}..{}: {differ} values differ", r0 + rows);
            }
            let ids = [36u32, 0, 7, 7, 21];
            let got = gather_rows(&q, &ids, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            for (row, &i) in got.iter().zip(&ids) {
                assert!(
                    row.iter().zip(&whole[i as usize]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{format:?} id {i}"
                );
            }
            let mut out = vec![0f32; 2 * 512];
            assert!(dequantize_rows(&q, 36, 2, &mut out).is_err(), "{format:?}: rows past the end accepted");
            let e = gather_rows(&q, &[37], &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains("37") && e.contains("vocabulary"), "{e}");
        }
    }

    #[test]
    fn chunked_threaded_quantization_is_candles_whole_quantization_bit_for_bit() {
        use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8_0};
        // 23 rows of 768 (3 Q4_K super-blocks, 24 Q8_0 blocks a row), f32 and bf16 sources; chunks
        // of 1, 2 and 5 rows (the last one short) and one chunk for the whole weight.
        let w32 = rand(&[23, 768], 11);
        for w in [w32.clone(), w32.to_dtype(DType::BF16).unwrap()] {
            for format in [QuantFormat::Q8_0, QuantFormat::Q4K] {
                let want = QTensor::quantize(&w.to_dtype(DType::F32).unwrap(), format.ggml()).unwrap();
                let want = want.data().unwrap().to_vec();
                for chunk in [768, 2 * 768, 5 * 768 + 100, 1 << 20] {
                    let storage = match format {
                        QuantFormat::Q8_0 => blocks_storage::<BlockQ8_0>(&w, &Device::Cpu, chunk),
                        QuantFormat::Q4K => blocks_storage::<BlockQ4K>(&w, &Device::Cpu, chunk),
                    };
                    let q = QTensor::new(storage.unwrap(), (23, 768)).unwrap();
                    let got = q.data().unwrap();
                    assert_eq!(got.len(), want.len(), "{format:?} chunk {chunk}");
                    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                    assert_eq!(differ, 0, "{format:?} {:?} chunk {chunk}: {differ} bytes differ", w.dtype());
                }
                let q = quantize_weight(&w, format, "w", &Device::Cpu).unwrap();
                assert_eq!(q.data().unwrap().as_ref(), want.as_slice(), "{format:?}");
            }
        }
    }

    #[test]
    fn a_weight_whose_rows_are_not_whole_blocks_is_refused_naming_it() {
        let w = rand(&[4, 96], 4);
        let e = quantize_weight(&w, QuantFormat::Q4K, "model.layers.0.mlp.down_proj", &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.layers.0.mlp.down_proj") && e.contains("96") && e.contains("256"), "{e}");
        assert!(e.contains("use q8_0"), "{e}");
        assert!(quantize_weight(&w, QuantFormat::Q8_0, "w", &Device::Cpu).is_ok());
        assert!(QuantFormat::parse("q4_0").unwrap_err().contains("q8_0 or q4_k"));
    }
}
