//! The NSA attention operator in plain Burn tensor ops: the reference every kernel is tested
//! against. It runs on every backend and `Autodiff<B>` differentiates it.
//!
//! # Memory
//!
//! Queries are processed in chunks of `C = query_chunk` positions; no `[T, T]` score matrix
//! and no `[T, n * l', d]` gather is ever built. Per chunk, with `B` batch, `H` query heads,
//! `H_kv` KV heads, `N_cmp ~ T / d` compressed keys and `d = d_k + d_v`, the transient
//! tensors are about (in elements):
//!
//! - compression branch: `B * H * C * N_cmp` scores plus the `B * H_kv * C * ceil(T / l')`
//!   block scores;
//! - selection branch: `B * H_kv * C * n * l' * d` gathered keys and values plus
//!   `B * H * C * n * l'` scores;
//! - window branch: `B * H * C * (C + w)` scores.
//!
//! Without autodiff these are freed after each chunk, so the forward pass needs the inputs,
//! the output and one chunk's transients: the paper's heads (`H = 64`, `H_kv = 4`,
//! `d_k = 192`, `d_v = 128`) at `T = 16k` with `C = 64` stay near 1 GiB of transients. Under
//! autodiff every chunk's transients are kept for the backward pass, so training memory
//! grows like `T * (H_kv * n * l' * d + H * (N_cmp + n * l' + w))`: use the reference for
//! gradients at moderate `T` only (the backward kernels are the fast path).

mod compress;
mod operator;
mod scoring;
mod select;
mod window;

pub use compress::compressed_attention;
pub use operator::operator;
pub use scoring::{block_scores, top_n_blocks};
pub use select::selected_attention;
pub use window::window_attention;

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

/// `[B, T, H, d]` query heads to `[B, H_kv, T, G, d]`, query head `h` being member
/// `h % G` of KV group `h / G`.
pub(crate) fn group_heads<B: Backend>(x: Tensor<B, 4>, n_kv_heads: usize) -> Tensor<B, 5> {
    let [batch, seq, heads, dim] = x.dims();
    x.reshape([batch, seq, n_kv_heads, heads / n_kv_heads, dim])
        .permute([0, 2, 1, 3, 4])
}

/// Inverse of [`group_heads`]: `[B, H_kv, T, G, d]` to `[B, T, H, d]`.
pub(crate) fn ungroup_heads<B: Backend>(x: Tensor<B, 5>) -> Tensor<B, 4> {
    let [batch, kv_heads, seq, group, dim] = x.dims();
    x.permute([0, 2, 1, 3, 4])
        .reshape([batch, seq, kv_heads * group, dim])
}

/// `[B, T, H_kv, d]` keys or values to `[B, H_kv, T, d]`.
pub(crate) fn heads_first<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    x.swap_dims(1, 2)
}

/// The query ranges `[start, end)` of at most `chunk` positions covering `0..seq_len`.
pub(crate) fn query_chunks(seq_len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..seq_len)
        .step_by(chunk)
        .map(move |start| (start, (start + chunk).min(seq_len)))
}

/// Query positions `t` and key positions `p` on a `[C, L]` grid, for the queries
/// `queries.0..queries.1` and the keys `keys.0..keys.1`: `(t, p)`, both `[C, L]` Int.
pub(crate) fn position_grid<B: Backend>(
    queries: (usize, usize),
    keys: (usize, usize),
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let rows = queries.1 - queries.0;
    let cols = keys.1 - keys.0;
    let t = Tensor::<B, 1, Int>::arange(queries.0 as i64..queries.1 as i64, device)
        .reshape([rows, 1])
        .expand([rows, cols]);
    let p = Tensor::<B, 1, Int>::arange(keys.0 as i64..keys.1 as i64, device)
        .reshape([1, cols])
        .expand([rows, cols]);
    (t, p)
}

/// Log-sum-exp value of a query row that attends no key: the kernels' finite stand-in for
/// minus infinity, one constant for the kernels and the reference.
pub use nsa_cubecl::EMPTY_ROW_LSE;

/// One branch's attention: its output and the log-sum-exp of each query row's scaled
/// scores over the keys the row attends (what the backward kernels need).
#[derive(Debug, Clone)]
pub struct Attended<B: Backend> {
    /// `[B, T, H, d_v]`.
    pub output: Tensor<B, 4>,
    /// `[B, H, T]`, f32; [`EMPTY_ROW_LSE`] for a row that attends no key.
    pub lse: Tensor<B, 3>,
}

/// Softmax over the last dimension where `allowed` is true, exactly 0 elsewhere, and the
/// log-sum-exp of the allowed entries. Every row needs at least one allowed entry (the
/// callers guarantee it).
///
/// `scores: [.., L]`, `allowed: [.., L]` (same shape) -> (`[.., L]`, `[.., 1]`).
pub(crate) fn masked_softmax<B: Backend, const D: usize>(
    scores: Tensor<B, D>,
    allowed: Tensor<B, D, Bool>,
) -> (Tensor<B, D>, Tensor<B, D>) {
    let scores = scores.mask_fill(allowed.bool_not(), f32::NEG_INFINITY);
    let max = scores.clone().detach().max_dim(D - 1);
    let lse = (scores.clone() - max.clone()).exp().sum_dim(D - 1).log() + max;
    (softmax(scores, D - 1), lse.detach())
}

/// Per-row log-sum-exp `[B, H_kv, T, G]` (group member last) to `[B, H, T]` in f32.
pub(crate) fn lse_heads<B: Backend>(lse: Tensor<B, 4>) -> Tensor<B, 3> {
    let [batch, kv_heads, seq, group] = lse.dims();
    lse.swap_dims(2, 3)
        .reshape([batch, kv_heads * group, seq])
        .cast(burn::tensor::DType::F32)
}

/// Dense attention of grouped query rows against one set of keys per KV head, with a mask
/// shared by the batch and the heads. Row `r` of a chunk is query position `r / G`, group
/// member `r % G`.
///
/// `q: [B, H_kv, C * G, d_k]`, `k: [B, H_kv, L, d_k]`, `v: [B, H_kv, L, d_v]`,
/// `allowed: [C, L]` (per query position) -> (`o: [B, H_kv, C * G, d_v]`,
/// `p: [B, H_kv, C * G, L]`, the attention probabilities, `lse: [B, H_kv, C * G, 1]`).
pub(crate) fn grouped_masked_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    allowed: Tensor<B, 2, Bool>,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [batch, kv_heads, rows, _] = q.dims();
    let [chunk, keys] = allowed.dims();
    let group = rows / chunk;
    let allowed = allowed
        .reshape([chunk, 1, keys])
        .expand([chunk, group, keys])
        .reshape([1, 1, rows, keys])
        .expand([batch, kv_heads, rows, keys]);
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let (probs, lse) = masked_softmax(scores, allowed);
    (probs.clone().matmul(v), probs, lse)
}
