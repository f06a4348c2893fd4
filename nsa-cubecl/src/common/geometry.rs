//! Where a cube works and where its rows live: the grid order of cubes over
//! `(batch, KV head, query positions)`, the row addressing of `[B, T, H, d]` and
//! `[B, L, H_kv, d]` tensors, and the finite stand-in for minus infinity.

use cubecl::prelude::*;

use crate::common::keys::index_min;

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

/// Where a cube of a forward pass split over its keys works: part `split` of the keys of
/// the query rows at `(b, KV head, t)`, written to batch row `out_b = split * B + b` of the
/// parts' outputs.
#[derive(CubeType, Clone, Copy)]
pub struct SplitPosition {
    /// Batch row of the inputs.
    pub b: usize,
    /// Which part of the keys, `0..splits`.
    pub split: usize,
    /// Parts the keys are split into.
    pub splits: usize,
    /// Batch row of the output, `split * B + b`.
    pub out_b: usize,
    /// KV head.
    pub head: usize,
    /// Query row.
    pub t: usize,
    /// Whether the cube is inside the grid (not padding).
    pub inside: bool,
}

/// [`cube_position()`] over `out_batch = splits * batch` output rows: the cube's part of the
/// keys and its rows.
#[cube]
pub fn cube_split_position(
    batch: usize,
    out_batch: usize,
    kv_heads: usize,
    seq: usize,
) -> SplitPosition {
    let (out_b, head, t, inside) = cube_position(out_batch, kv_heads, seq);
    SplitPosition {
        b: out_b % batch,
        split: out_b / batch,
        splits: out_batch / batch,
        out_b,
        head,
        t,
        inside,
    }
}

/// Part `split` of `splits` of the rows `start..end`: parts of one length, rounded up to a
/// multiple of `align`, in order (the last ones shorter or empty).
#[cube]
pub fn split_rows(
    start: usize,
    end: usize,
    split: usize,
    splits: usize,
    #[comptime] align: usize,
) -> (usize, usize) {
    let per = ((end - start + splits - 1) / splits + align - 1) / align * align;
    let first = index_min(start + split * per, end);
    (first, index_min(first + per, end))
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
