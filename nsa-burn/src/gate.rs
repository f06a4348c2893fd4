//! Branch gates (Eq. 5): an MLP on `x_t` and a sigmoid, one gate per head per branch.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::NsaConfig;

/// Gate MLP: `x -> [Linear -> SiLU ->] Linear -> sigmoid`, `3 * H` outputs.
#[derive(Module, Debug)]
pub struct Gate<B: Backend> {
    /// Optional hidden layer (`config.gate_hidden`).
    pub hidden: Option<Linear<B>>,
    /// Output layer to `3 * H` logits.
    pub output: Linear<B>,
    n_heads: usize,
}

impl<B: Backend> Gate<B> {
    /// The gate described by `config`.
    pub fn new(config: &NsaConfig, device: &B::Device) -> Self {
        let linear = |input, output| {
            LinearConfig::new(input, output)
                .with_initializer(config.initializer.clone())
                .init(device)
        };
        let (hidden, width) = match config.gate_hidden {
            Some(width) => (Some(linear(config.d_model, width)), width),
            None => (None, config.d_model),
        };
        Self {
            hidden,
            output: linear(width, 3 * config.n_heads),
            n_heads: config.n_heads,
        }
    }

    /// `x: [B, T, d_model]` -> gates `[B, T, H, 3]` in `[0, 1]`, ordered (compressed,
    /// selected, window).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, seq, _] = x.dims();
        let x = match &self.hidden {
            Some(hidden) => silu(hidden.forward(x)),
            None => x,
        };
        sigmoid(self.output.forward(x)).reshape([batch, seq, self.n_heads, 3])
    }
}
