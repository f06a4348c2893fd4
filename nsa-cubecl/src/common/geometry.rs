//! Where a cube works and where its rows live: the grid order of cubes over
//! `(batch, KV head, query positions)`, the row addressing of `[B, T, H, d]` and
//! `[B, L, H_kv, d]` tensors, and the finite stand-in for minus infinity.

use cubecl::prelude::*;

/// Stands for minus infinity: WGSL cannot spell `-inf`, so scores of masked keys and the
/// max of an empty row use this finite sentinel (only ever in f32).
pub const NEG_BIG: f32 = -1.0e30;

/// The log-sum-exp written for a row that attends no key (the kernels and the reference
/// agree on it).
pub const EMPTY_ROW_LSE: f32 = NEG_BIG;

/// Where a cube's rows live: `base` is the offset of row 0, head 0, dim 0 of its
/// `(batch, KV head)`; rows, heads and dims are `row_stride`, `head_stride` and
/// `dim_stride` apart.
#[derive(CubeType, Clone, Copy)]
pub struct Rows {
    pub base: usize,
    pub row_stride: usize,
    pub head_stride: usize,
    pub dim_stride: usize,
}

/// The cube's `(batch, KV head, query position)`, with `t` fastest so neighbouring cubes
/// share keys, and whether the cube is inside the grid (not padding).
#[cube]
pub fn cube_position(batch: usize, kv_heads: usize, seq: usize) -> (usize, usize, usize, bool) {
    cube_positions(batch, kv_heads, seq, 1usize)
}

/// [`cube_position()`] for cubes of `positions` consecutive query positions: the first one.
/// The latest positions come first: in the causal branches they attend the most keys, so
/// the longest cubes start first instead of trailing at the end of the grid.
#[cube]
pub fn cube_positions(
    batch: usize,
    kv_heads: usize,
    seq: usize,
    #[comptime] positions: usize,
) -> (usize, usize, usize, bool) {
    let blocks = (seq + positions - 1) / positions;
    let (b, head, block, inside) = cube_tiles_at(CUBE_POS, batch, kv_heads, blocks);
    (b, head, (blocks - 1 - block) * positions, inside)
}

/// Cube number `cube` of a grid of `batch * kv_heads * tiles` cubes (tiles fastest, in
/// order) as `(batch, KV head, tile)`, and whether it is inside that grid.
#[cube]
pub fn cube_tiles_at(
    cube: usize,
    batch: usize,
    kv_heads: usize,
    tiles: usize,
) -> (usize, usize, usize, bool) {
    let tile = cube % tiles;
    let head = (cube / tiles) % kv_heads;
    let b = cube / (tiles * kv_heads);
    (b, head, tile, cube < batch * kv_heads * tiles)
}

/// The key position of query row `t` when the `T` queries of `q: [B, T, ..]` are the last
/// `T` of the `L` key positions of `k: [B, L, ..]` (`t` itself for self-attention,
/// `L = T`).
#[cube]
pub fn query_position<F: Float>(q: &Tensor<F>, k: &Tensor<F>, t: usize) -> usize {
    t + k.shape(1) - q.shape(1)
}

/// The group's query (or output) rows at `(b, t)` of a `[B, T, H, d]` tensor: heads
/// `kv_head * G ..` of that position.
#[cube]
pub fn group_rows<F: Float>(
    x: &Tensor<F>,
    b: usize,
    t: usize,
    kv_head: usize,
    #[comptime] group: usize,
) -> Rows {
    Rows {
        base: b * x.stride(0) + t * x.stride(1) + kv_head * group * x.stride(2),
        row_stride: 0,
        head_stride: x.stride(2),
        dim_stride: x.stride(3),
    }
}

/// The rows of one KV head of a `[B, L, H_kv, d]` key or value tensor.
#[cube]
pub fn head_rows<T: CubePrimitive>(x: &Tensor<T>, b: usize, kv_head: usize) -> Rows {
    Rows {
        base: b * x.stride(0) + kv_head * x.stride(2),
        row_stride: x.stride(1),
        head_stride: 0,
        dim_stride: x.stride(3),
    }
}

/// Offset of row `(b, head, t)` in the rows' log-sum-exp `lse: [B, H, T]`.
#[cube]
pub fn lse_at(lse: &Tensor<f32>, b: usize, head: usize, t: usize) -> usize {
    b * lse.stride(0) + head * lse.stride(1) + t * lse.stride(2)
}

/// Offset of row `(b, t, head)` in `delta: [B, T, H]`.
#[cube]
pub fn delta_at(delta: &Tensor<f32>, b: usize, t: usize, head: usize) -> usize {
    b * delta.stride(0) + t * delta.stride(1) + head * delta.stride(2)
}

/// A probability recomputed from its scaled score and its row's log-sum-exp,
/// `exp(s * scale - lse)`: how the selection scoring and every backward kernel get the
/// forward pass's probabilities back.
#[cube]
pub fn recomputed_probability(scaled_score: f32, lse: f32) -> f32 {
    (scaled_score - lse).exp()
}
