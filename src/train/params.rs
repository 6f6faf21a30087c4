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
        self.slots.iter().map(|s| flat.narrow(0, s.offset, s.len)?.reshape(s.shape.as_slice())?.copy()).collect()
    }

    pub fn tensors(&self, device: &Device) -> Result<Vec<Tensor>> {
        self.slots
            .iter()
            .map(|s| Tensor::from_slice(&self.values[s.offset..s.offset + s.len], s.shape.as_slice(), device))
            .collect()
    }
}
