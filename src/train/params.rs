//! The trainable tensors as one flat f32 vector (the space in which gradients are clipped,
//! noised and optimised), and the map back to named tensors.

use candle_core::{Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct ParamSlot {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

#[derive(Debug, Clone)]
pub struct FlatParams {
    pub slots: Vec<ParamSlot>,
    pub values: Vec<f32>,
}

impl FlatParams {
    pub fn from_named(named: &[(String, Tensor)]) -> Result<Self> {
        let mut slots = Vec::new();
        let mut values = Vec::new();
        for (name, t) in named {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            slots.push(ParamSlot { name: name.clone(), shape: t.dims().to_vec(), offset: values.len(), len: v.len() });
            values.extend(v);
        }
        Ok(FlatParams { slots, values })
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The flat vector as a [P] f32 tensor on `device` (the optimiser updates it in place).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.values, self.values.len(), device)
    }

    /// Cuts a flat [P] tensor into the named tensors' shapes, as copies (so that in-place updates
    /// of the flat tensor never reach tensors the model holds).
    pub fn split(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        if flat.dims() != [self.values.len()] {
            candle_core::bail!("flat parameters: got {:?}, expected [{}]", flat.dims(), self.values.len());
        }
        // `force_contiguous` copies just the slot's values. (`Tensor::copy` would clone the whole
        // [P] storage under each view: one full parameter vector per trainable tensor, held by
        // the model for the whole step — gigabytes with LoRA on every module of a 30-layer model.)
        self.slots
            .iter()
            .map(|s| flat.narrow(0, s.offset, s.len)?.reshape(s.shape.as_slice())?.force_contiguous())
            .collect()
    }

    pub fn tensors(&self, device: &Device) -> Result<Vec<Tensor>> {
        self.slots
            .iter()
            .map(|s| Tensor::from_slice(&self.values[s.offset..s.offset + s.len], s.shape.as_slice(), device))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Storage;

    #[test]
    fn split_gives_each_tensor_its_own_values_and_nothing_more() {
        let named: Vec<(String, Tensor)> = [(vec![2, 3], 0.0f32), (vec![4], 10.0), (vec![3, 1], 20.0)]
            .iter()
            .enumerate()
            .map(|(i, (shape, base))| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|k| base + k as f32).collect();
                (format!("t{i}"), Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
            })
            .collect();
        let layout = FlatParams::from_named(&named).unwrap();
        let flat = layout.to_tensor(&Device::Cpu).unwrap();
        let parts = layout.split(&flat).unwrap();
        for ((_, want), got) in named.iter().zip(&parts) {
            assert_eq!(got.dims(), want.dims());
            let (w, g) = (want.flatten_all().unwrap(), got.flatten_all().unwrap());
            assert_eq!(g.to_vec1::<f32>().unwrap(), w.to_vec1::<f32>().unwrap());
            // The storage under each part holds exactly its own values (not the whole [P]).
            let (storage, l) = got.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else { panic!("cpu") };
            assert_eq!(cpu.as_slice::<f32>().unwrap().len(), got.elem_count());
            assert_eq!(l.start_offset(), 0);
        }
        // An in-place update of the flat tensor (as the optimiser makes) does not reach the parts.
        let before: Vec<f32> = parts[1].to_vec1().unwrap();
        flat.slice_set(&Tensor::full(-1f32, 13, &Device::Cpu).unwrap(), 0, 0).unwrap();
        assert_eq!(parts[1].to_vec1::<f32>().unwrap(), before);
    }
}
