//! The portable online-softmax tile shared by the portable kernels of every branch.
//!
//! One cube serves one `(batch, KV head, query position)`: the `G` query heads of the group,
//! each split over `parts` units along `d_v` (`units = G * parts`). Keys and values stream
//! through shared memory in tiles of `tile_keys` rows; every unit keeps, in f32 registers,
//! the running max, the running sum and its share of the output row ("state", see
//! [`state_new()`]). A tile's valid keys are always a prefix of it (`valid` rows).

use cubecl::prelude::*;

use crate::common::geometry::{group_rows, lse_at, Rows, NEG_BIG};
use crate::common::keys::index_min;

/// Comptime shape of the tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileConfig {
    /// Query heads per KV head, `G`.
    pub group: usize,
    /// Query/key head dimension.
    pub d_k: usize,
    /// Value head dimension.
    pub d_v: usize,
    /// Key rows per tile.
    pub tile_keys: usize,
    /// Units per query head (each owns every `parts`-th output dimension).
    pub parts: usize,
}

impl TileConfig {
    /// Units per cube, `group * parts`.
    pub fn units(&self) -> usize {
        self.group * self.parts
    }

    /// Output dimensions each unit accumulates, `ceil(d_v / parts)`.
    pub fn width(&self) -> usize {
        self.d_v.div_ceil(self.parts)
    }

    /// Query dimensions each unit accumulates in the backward pass, `ceil(d_k / parts)`.
    pub fn query_width(&self) -> usize {
        self.d_k.div_ceil(self.parts)
    }

    /// Row stride of the keys in shared memory: one word of padding, so the units that
    /// score consecutive keys read different banks.
    pub fn key_stride(&self) -> usize {
        self.d_k + 1
    }

    /// f32 words of shared memory the tile needs: keys, values and scores.
    pub fn shared_words(&self) -> usize {
        self.tile_keys * (self.key_stride() + self.d_v) + self.group * self.tile_keys
    }
}

/// Fresh state: `[max, sum, acc_0 .. acc_width)`.
#[cube]
pub fn state_new(#[comptime] cfg: TileConfig) -> Array<f32> {
    let mut state = Array::<f32>::new(comptime!(cfg.width() + 2));
    state[0] = NEG_BIG;
    #[unroll]
    for i in 0..comptime!(cfg.width() + 1) {
        state[i + 1] = 0.0;
    }
    state
}

/// Copies `valid` rows starting at `first_row` of `src` (one KV head) into the `rows` rows
/// of `dst` as rows of `dim` values of `E`, `stride` apart; zero past `valid`. The cube's
/// `units` units share the copy.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_rows<F: Float, E: Float>(
    src: &Tensor<F>,
    at: Rows,
    first_row: usize,
    valid: usize,
    dst: &mut SharedMemory<E>,
    #[comptime] rows: usize,
    #[comptime] dim: usize,
    #[comptime] stride: usize,
    #[comptime] units: usize,
) {
    let mut idx = UNIT_POS as usize;
    while idx < comptime!(rows * dim) {
        let row = idx / dim;
        let col = idx % dim;
        let mut value = E::from_int(0);
        if row < valid {
            value = E::cast_from(
                src[at.base + (first_row + row) * at.row_stride + col * at.dim_stride],
            );
        }
        dst[row * stride + col] = value;
        idx += units;
    }
}

/// Copies `valid` key rows and value rows from `first_row` into the tile's shared memory
/// (keys [`TileConfig::key_stride`] words apart, values `value_stride` apart).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_key_values<F: Float>(
    k: &Tensor<F>,
    k_at: Rows,
    v: &Tensor<F>,
    v_at: Rows,
    first_row: usize,
    valid: usize,
    keys: &mut SharedMemory<f32>,
    values: &mut SharedMemory<f32>,
    #[comptime] value_stride: usize,
    #[comptime] cfg: TileConfig,
) {
    load_rows::<F, f32>(
        k,
        k_at,
        first_row,
        valid,
        keys,
        cfg.tile_keys,
        cfg.d_k,
        cfg.key_stride(),
        cfg.units(),
    );
    load_rows::<F, f32>(
        v,
        v_at,
        first_row,
        valid,
        values,
        cfg.tile_keys,
        cfg.d_v,
        value_stride,
        cfg.units(),
    );
}

/// Scaled dot products `[G, tile_keys]` of the group's rows of `q` (`dim` values each)
/// with the rows in shared memory (`stride` words apart); [`NEG_BIG`] past `valid`. Unit
/// `(head, part)` computes rows `part, part + parts, ..` of its head, reading each element
/// of its query row once for all of them. The forward kernels score queries against keys;
/// the backward kernels also take output gradients against values.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn tile_scores<F: Float>(
    q: &Tensor<F>,
    q_at: Rows,
    keys: &SharedMemory<f32>,
    valid: usize,
    scale: f32,
    scores: &mut SharedMemory<f32>,
    #[comptime] dim: usize,
    #[comptime] stride: usize,
    #[comptime] cfg: TileConfig,
) {
    let head = UNIT_POS as usize / cfg.parts;
    let part = UNIT_POS as usize % cfg.parts;
    let per_unit = comptime!(cfg.tile_keys.div_ceil(cfg.parts));
    let query = q_at.base + head * q_at.head_stride;
    let mut dots = Array::<f32>::new(per_unit);
    #[unroll]
    for i in 0..per_unit {
        dots[i] = 0.0;
    }
    for c in 0..dim {
        let q_c = f32::cast_from(q[query + c * q_at.dim_stride]);
        #[unroll]
        for i in 0..per_unit {
            let key = part + i * cfg.parts;
            if key < cfg.tile_keys {
                dots[i] += q_c * keys[key * stride + c];
            }
        }
    }
    #[unroll]
    for i in 0..per_unit {
        let key = part + i * cfg.parts;
        if key < cfg.tile_keys {
            let mut score = f32::new(NEG_BIG);
            if key < valid {
                score = dots[i] * scale;
            }
            scores[head * cfg.tile_keys + key] = score;
        }
    }
}

/// Folds one tile of scores and values into this unit's state (online softmax).
#[cube]
fn tile_update(
    state: &mut Array<f32>,
    scores: &SharedMemory<f32>,
    values: &SharedMemory<f32>,
    valid: usize,
    #[comptime] cfg: TileConfig,
) {
    let head = UNIT_POS as usize / cfg.parts;
    let part = UNIT_POS as usize % cfg.parts;
    let row = head * cfg.tile_keys;
    let mut tile_max = f32::new(NEG_BIG);
    for key in 0..valid {
        tile_max = max(tile_max, scores[row + key]);
    }
    let old_max = state[0];
    let new_max = max(old_max, tile_max);
    let correction = (old_max - new_max).exp();
    let mut sum = state[1] * correction;
    #[unroll]
    for i in 0..cfg.width() {
        state[i + 2] *= correction;
    }
    for key in 0..valid {
        let p = (scores[row + key] - new_max).exp();
        sum += p;
        #[unroll]
        for i in 0..cfg.width() {
            let col = part + i * cfg.parts;
            if col < cfg.d_v {
                state[i + 2] += p * values[key * cfg.d_v + col];
            }
        }
    }
    state[0] = new_max;
    state[1] = sum;
}

/// Attends one tile: loads `valid` key/value rows from `first_row`, scores them against
/// the group's queries and folds them into the state. Every unit of the cube must call it
/// (it synchronizes the cube); `valid` may differ from the tile size, even be 0.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn attend_tile<F: Float>(
    q: &Tensor<F>,
    q_at: Rows,
    k: &Tensor<F>,
    k_at: Rows,
    v: &Tensor<F>,
    v_at: Rows,
    first_row: usize,
    valid: usize,
    scale: f32,
    state: &mut Array<f32>,
    keys: &mut SharedMemory<f32>,
    values: &mut SharedMemory<f32>,
    scores: &mut SharedMemory<f32>,
    #[comptime] cfg: TileConfig,
) {
    load_key_values::<F>(
        k, k_at, v, v_at, first_row, valid, keys, values, cfg.d_v, cfg,
    );
    sync_cube();
    tile_scores::<F>(
        q,
        q_at,
        keys,
        valid,
        scale,
        scores,
        cfg.d_k,
        cfg.key_stride(),
        cfg,
    );
    sync_cube();
    tile_update(state, scores, values, valid, cfg);
    sync_cube();
}

/// Attends the key rows `start..end` (a range every unit of the cube agrees on), tile by
/// tile, through [`attend_tile()`].
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn attend_range<F: Float>(
    q: &Tensor<F>,
    q_at: Rows,
    k: &Tensor<F>,
    k_at: Rows,
    v: &Tensor<F>,
    v_at: Rows,
    start: usize,
    end: usize,
    scale: f32,
    state: &mut Array<f32>,
    keys: &mut SharedMemory<f32>,
    values: &mut SharedMemory<f32>,
    scores: &mut SharedMemory<f32>,
    #[comptime] cfg: TileConfig,
) {
    let mut row = start;
    while row < end {
        let valid = index_min(end - row, cfg.tile_keys);
        attend_tile::<F>(
            q, q_at, k, k_at, v, v_at, row, valid, scale, state, keys, values, scores, cfg,
        );
        row += cfg.tile_keys;
    }
}

/// Writes this unit's share of the group's output rows at `(b, t)` of `o: [B, T, H, d_v]`,
/// `acc / sum` (0 for an empty row), and from the unit owning part 0 the row's
/// log-sum-exp to `lse: [B, H, T]` (`NEG_BIG` for an empty row).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn state_finish<F: Float>(
    state: &Array<f32>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    b: usize,
    t: usize,
    kv_head: usize,
    #[comptime] cfg: TileConfig,
) {
    let o_at = group_rows::<F>(o, b, t, kv_head, cfg.group);
    let lse_index = lse_at(lse, b, kv_head * cfg.group, t);
    let lse_head_stride = lse.stride(1);
    let head = UNIT_POS as usize / cfg.parts;
    let part = UNIT_POS as usize % cfg.parts;
    let sum = state[1];
    let mut inverse = 0.0f32;
    if sum > 0.0 {
        inverse = 1.0 / sum;
    }
    #[unroll]
    for i in 0..cfg.width() {
        let col = part + i * cfg.parts;
        if col < cfg.d_v {
            o[o_at.base + head * o_at.head_stride + col * o_at.dim_stride] =
                F::cast_from(state[i + 2] * inverse);
        }
    }
    if part == 0 {
        let mut value = f32::new(NEG_BIG);
        if sum > 0.0 {
            value = state[0] + sum.ln();
        }
        lse[lse_index + head * lse_head_stride] = value;
    }
}
