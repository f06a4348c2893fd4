//! The compression branch's compressor `phi` (Eq. 7): one key (value) per block of `l`.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::compressed_blocks;
use crate::{CompressorKind, NsaConfig};

/// The paper's compressor MLP with its intra-block position embedding.
#[derive(Module, Debug)]
pub struct CompressorMlp<B: Backend> {
    /// Intra-block position embedding `[l, d]`, added to each block before flattening.
    pub position: Param<Tensor<B, 2>>,
    /// `l * d -> hidden`.
    pub hidden: Linear<B>,
    /// `hidden -> d`.
    pub output: Linear<B>,
}

/// Compresses keys or values block by block: block `i` covers positions `[i*d, i*d + l)`,
/// for `0 <= i <= floor((T - l) / d)` (none when `T < l`).
#[derive(Module, Debug)]
pub struct Compressor<B: Backend> {
    /// The MLP, or `None` for mean pooling.
    pub mlp: Option<CompressorMlp<B>>,
    /// Block length `l`.
    pub block: usize,
    /// Stride `d`.
    pub stride: usize,
}

impl<B: Backend> Compressor<B> {
    /// A compressor of `dim`-wide heads as `config` describes (`config.compressor`,
    /// `config.compressor_hidden`, block and stride, initializer).
    pub fn new(config: &NsaConfig, dim: usize, device: &B::Device) -> Self {
        let block = config.compress_block;
        let mlp = match config.compressor {
            CompressorKind::MeanPool => None,
            CompressorKind::Mlp => {
                let hidden = config.compressor_hidden.unwrap_or(dim);
                let linear = |input, output| {
                    LinearConfig::new(input, output)
                        .with_initializer(config.initializer.clone())
                        .init(device)
                };
                Some(CompressorMlp {
                    position: config.initializer.init_with(
                        [block, dim],
                        Some(dim),
                        Some(dim),
                        device,
                    ),
                    hidden: linear(block * dim, hidden),
                    output: linear(hidden, dim),
                })
            }
        };
        Self {
            mlp,
            block,
            stride: config.compress_stride,
        }
    }

    /// Number of complete blocks in `seq_len` positions.
    pub fn num_blocks(&self, seq_len: usize) -> usize {
        compressed_blocks(seq_len, self.block, self.stride)
    }

    /// `x: [B, T, H_kv, d]` -> `[B, N_cmp, H_kv, d]` with `N_cmp = num_blocks(T)`, or `None`
    /// when `T < l` (no block has ended; GPU runtimes cannot hold an empty tensor).
    pub fn forward(&self, x: Tensor<B, 4>) -> Option<Tensor<B, 4>> {
        let [batch, seq, heads, dim] = x.dims();
        let blocks = self.num_blocks(seq);
        let device = x.device();
        if blocks == 0 {
            return None;
        }
        // Positions i*d + r of every block, flattened: [N_cmp * l].
        let starts = Tensor::<B, 1, Int>::arange(0..blocks as i64, &device)
            .mul_scalar(self.stride as i64)
            .reshape([blocks, 1])
            .expand([blocks, self.block]);
        let offsets = Tensor::<B, 1, Int>::arange(0..self.block as i64, &device)
            .reshape([1, self.block])
            .expand([blocks, self.block]);
        let rows = (starts + offsets).reshape([blocks * self.block]);
        let grouped = x
            .select(1, rows)
            .reshape([batch, blocks, self.block, heads, dim]);
        match &self.mlp {
            None => Some(grouped.mean_dim(2).reshape([batch, blocks, heads, dim])),
            Some(mlp) => {
                let position = mlp.position.val().reshape([1, 1, 1, self.block, dim]);
                let flat = (grouped.permute([0, 1, 3, 2, 4]) + position).reshape([
                    batch,
                    blocks,
                    heads,
                    self.block * dim,
                ]);
                let hidden = gelu(mlp.hidden.forward(flat));
                Some(mlp.output.forward(hidden))
            }
        }
    }
}
