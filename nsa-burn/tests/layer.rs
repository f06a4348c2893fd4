//! Behaviour of the NSA layer on burn-flex: causality, the selection rules, gradients
//! against finite differences, and every configuration and shape error.
//! (The comparison with an independent naive implementation lives in `naive.rs`.)
//!
//! Files: `layer/causality.rs`, `layer/selection.rs` (the selection rules),
//! `layer/errors.rs` (configuration and shape errors), `layer/inputs.rs` (inputs at the
//! edges: empty, mixed dtypes, overflowing settings, saved records), `layer/gradients.rs`
//! (autodiff), `layer/packed.rs` (packed documents against each document alone),
//! `layer/cache.rs` (cached prefill and decoding against the full forward);
//! the helpers they share are here.

mod common;

#[path = "layer/cache.rs"]
mod cache;
#[path = "layer/causality.rs"]
mod causality;
#[path = "layer/errors.rs"]
mod errors;
#[path = "layer/gradients.rs"]
mod gradients;
#[path = "layer/inputs.rs"]
mod inputs;
#[path = "layer/packed.rs"]
mod packed;
#[path = "layer/selection.rs"]
mod selection;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Int, Tensor};
use nsa_burn::{BranchKv, NsaAttentionConfig, NsaConfig, NsaInput};

type B = Flex;
type AD = Autodiff<Flex>;

fn device() -> <B as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}

fn normal<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device())
}

fn values(tensor: Tensor<B, 3>) -> Vec<f64> {
    tensor.into_data().convert::<f64>().to_vec().unwrap()
}

fn indices(tensor: Tensor<B, 4, Int>) -> (Vec<i64>, [usize; 4]) {
    let dims = tensor.dims();
    (tensor.into_data().convert::<i64>().to_vec().unwrap(), dims)
}

/// Small blocks so a short sequence exercises every branch: l = 8, d = 4, l' = 16,
/// n = 4 (1 initial + 2 local forced), w = 24.
fn small_config() -> NsaConfig {
    NsaConfig::new(24, 4, 2, 8, 6)
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(16)
        .with_n_selected(4)
        .with_window(24)
        .with_query_chunk(16)
}

/// Operator inputs with chosen compressed keys: `boost[i]` is added along the all-ones
/// direction of compressed key `i`, and all queries are all-ones, so `boost` orders the
/// compressed-attention scores.
fn operator_input(
    config: &NsaAttentionConfig,
    seq: usize,
    boost: impl Fn(usize) -> f32,
) -> NsaInput<B> {
    let (heads, kv_heads, dim) = (2, 1, 4);
    let blocks = config.num_compressed_blocks(seq);
    let kv = |len| BranchKv {
        k: normal([1, len, kv_heads, dim]),
        v: normal([1, len, kv_heads, dim]),
    };
    let compressed = (blocks > 0).then(|| {
        let boosts: Vec<f32> = (0..blocks).map(&boost).collect();
        BranchKv {
            k: Tensor::<B, 1>::from_floats(boosts.as_slice(), &device())
                .reshape([1, blocks, 1, 1])
                .expand([1, blocks, kv_heads, dim]),
            v: normal([1, blocks, kv_heads, dim]),
        }
    });
    NsaInput {
        q: Tensor::ones([1, seq, heads, dim], &device()),
        compressed,
        selected: kv(seq),
        window: kv(seq),
        gates: Tensor::ones([1, seq, heads, 3], &device()),
    }
}
