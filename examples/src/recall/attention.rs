//! The attention of the model's blocks: NSA, or dense causal attention over all keys or over
//! a sliding window, written with Burn's `attention` op.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor};
use clap::ValueEnum;
use nsa_burn::{Nsa, NsaBackend};

/// Which attention the model's blocks use.
#[derive(Config, Debug, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttentionKind {
    /// Native Sparse Attention: compressed, selected and sliding-window branches.
    Nsa,
    /// Dense causal attention over every earlier key.
    Full,
    /// Dense causal attention over the last `window` keys only.
    Sliding,
}

impl AttentionKind {
    /// The name in reports, plots and folders.
    pub fn name(self) -> &'static str {
        match self {
            Self::Nsa => "nsa",
            Self::Full => "full",
            Self::Sliding => "sliding",
        }
    }

    /// Whether it materializes a `T x T` score matrix.
    pub fn is_dense(self) -> bool {
        self != Self::Nsa
    }
}

/// Configuration of [`DenseAttention`].
#[derive(Config, Debug)]
pub struct DenseAttentionConfig {
    /// Width of the input and output, `d_model`.
    pub d_model: usize,
    /// Heads (each with its own keys and values).
    pub heads: usize,
    /// Dimension of each head's queries, keys and values.
    pub head_dim: usize,
    /// Keys each query sees, itself included; `None` for all earlier keys. Default: `None`.
    #[config(default = "None")]
    pub window: Option<usize>,
}

/// Dense causal multi-head attention, optionally limited to a sliding window.
#[derive(Module, Debug)]
pub struct DenseAttention<B: Backend> {
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
    output: Linear<B>,
    heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

impl DenseAttentionConfig {
    /// Initializes the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DenseAttention<B> {
        let inner = self.heads * self.head_dim;
        let linear = |input, output| LinearConfig::new(input, output).init(device);
        DenseAttention {
            query: linear(self.d_model, inner),
            key: linear(self.d_model, inner),
            value: linear(self.d_model, inner),
            output: linear(inner, self.d_model),
            heads: self.heads,
            head_dim: self.head_dim,
            window: self.window,
        }
    }
}

impl<B: Backend> DenseAttention<B> {
    /// `x: [batch, T, d_model]` -> `[batch, T, d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let heads = |t: Tensor<B, 3>| {
            t.reshape([batch, seq, self.heads, self.head_dim])
                .swap_dims(1, 2)
        };
        let mask = self.window.map(|window| {
            outside_window::<B>(seq, window, &x.device()).expand([batch, self.heads, seq, seq])
        });
        let out = attention(
            heads(self.query.forward(x.clone())),
            heads(self.key.forward(x.clone())),
            heads(self.value.forward(x)),
            mask,
            None,
            AttentionModuleOptions {
                is_causal: true,
                ..Default::default()
            },
        );
        self.output.forward(
            out.swap_dims(1, 2)
                .reshape([batch, seq, self.heads * self.head_dim]),
        )
    }
}

/// `[1, 1, T, T]`, true where key `j` is `window` or more positions before query `i`.
fn outside_window<B: Backend>(seq: usize, window: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let position = Tensor::<B, 1, Int>::arange(0..seq as i64, device);
    let distance = position.clone().reshape([seq, 1]) - position.reshape([1, seq]);
    distance
        .greater_equal_elem(window as i64)
        .reshape([1, 1, seq, seq])
}

/// The attention of a block.
// A model holds one per block: the size of the NSA variant does not matter, and the module
// derive needs the layers unboxed.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Attention<B: Backend> {
    /// Native Sparse Attention.
    Nsa(Nsa<B>),
    /// Full or sliding-window dense attention.
    Dense(DenseAttention<B>),
}

impl<B: NsaBackend> Attention<B> {
    /// Causal self-attention: `x: [batch, T, d_model]` -> `[batch, T, d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Nsa(nsa) => nsa.forward(x),
            Self::Dense(dense) => dense.forward(x),
        }
    }

    /// The NSA layer, if this is one (dense attention has no cache).
    pub fn nsa(&self) -> Option<&Nsa<B>> {
        match self {
            Self::Nsa(nsa) => Some(nsa),
            Self::Dense(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    #[test]
    fn window_masks_keys_window_or_more_back() {
        let mask = outside_window::<Flex>(4, 2, &Default::default());
        let expected = [
            [false, false, false, false],
            [false, false, false, false],
            [true, false, false, false],
            [true, true, false, false],
        ];
        assert_eq!(
            mask.reshape([4, 4]).into_data(),
            burn::tensor::TensorData::from(expected)
        );
    }

    #[test]
    fn a_window_as_long_as_the_sequence_is_full_attention() {
        let device = Default::default();
        let full: DenseAttention<Flex> = DenseAttentionConfig::new(16, 2, 8).init(&device);
        let x = Tensor::<Flex, 3>::random([2, 6, 16], Distribution::Normal(0.0, 1.0), &device);
        // The first forward initializes the (lazy) weights the windowed copies share.
        let expected = full.forward(x.clone());
        let window = |window| DenseAttention {
            window: Some(window),
            ..full.clone()
        };
        window(6)
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&expected.clone().into_data(), Tolerance::default());
        // With w = 2 the first two positions still see all their keys, the third does not.
        let narrow = window(2).forward(x);
        let first_two = |t: Tensor<Flex, 3>| t.slice([0..2, 0..2, 0..16]).into_data();
        first_two(narrow.clone())
            .assert_approx_eq::<f32>(&first_two(expected.clone()), Tolerance::default());
        let third = |t: Tensor<Flex, 3>| t.slice([0..2, 2..3, 0..16]);
        assert!((third(narrow) - third(expected)).abs().max().into_scalar() > 1e-4);
    }
}
