//! Selected-block attention (Eq. 12) on the portable tile, group-centric: a cube holds the
//! `G` query heads of a KV head at one position `t` and loops over the `n` blocks they
//! selected together.

use cubecl::prelude::*;

use crate::common::geometry::{cube_split_position, group_rows, head_rows, split_rows};
use crate::common::selection::selected_tile;
use crate::portable::tile::{attend_tile, state_finish, state_new, TileConfig};

/// `q: [B, T, H, d_k]` at positions `query_start .. query_start + T` of the keys
/// `k: [B, T_k, H_kv, d_k]`, `v: [B, T_k, H_kv, d_v]`, `selected: [B, H_kv, T, n]` (block
/// indices, -1 for an empty slot) -> `o: [S * B, T, H, d_v]`, `lse: [S * B, H, T]` (f32):
/// with `S = 1` the output, with `S > 1` the slots split into `S` parts, part `s` of batch
/// row `b` at row `s * B + b` (in f32; [`crate::rows::query_splits`] merges them). Keys of
/// block `j` are `[j * l', (j + 1) * l')`, causally cut at the query's position;
/// `tile_keys` divides `l'`.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn selected_attention_kernel<F: Float, O: Float, I: Int>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    selected: &Tensor<I>,
    o: &mut Tensor<O>,
    lse: &mut Tensor<f32>,
    scale: f32,
    query_start: u32,
    #[comptime] cfg: TileConfig,
    #[comptime] select_block: usize,
) {
    let mut keys = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.key_stride()));
    let mut values = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.d_v));
    let mut scores = SharedMemory::<f32>::new(comptime!(cfg.group * cfg.tile_keys));
    let at = cube_split_position(q.shape(0), o.shape(0), k.shape(2), q.shape(1));
    if at.inside {
        let (b, head, t) = (at.b, at.head, at.t);
        let q_at = group_rows::<F>(q, b, t, head, cfg.group);
        let k_at = head_rows::<F>(k, b, head);
        let v_at = head_rows::<F>(v, b, head);
        let slots = b * selected.stride(0) + head * selected.stride(1) + t * selected.stride(2);
        let position = t + usize::cast_from(query_start);
        let (first_slot, end_slot) =
            split_rows(0usize, selected.shape(3), at.split, at.splits, 1usize);
        let mut state = state_new(cfg);
        // Uniform loops (slots x tiles): the block index comes from memory, so only the
        // number of valid rows depends on it, never whether a barrier is reached.
        for slot in first_slot..end_slot {
            let block = i32::cast_from(selected[slots + slot * selected.stride(3)]);
            #[unroll]
            for tile in 0..comptime!(select_block / cfg.tile_keys) {
                let (first, valid) =
                    selected_tile(block, tile, position, select_block, cfg.tile_keys);
                attend_tile::<F>(
                    q,
                    q_at,
                    k,
                    k_at,
                    v,
                    v_at,
                    first,
                    valid,
                    scale,
                    &mut state,
                    &mut keys,
                    &mut values,
                    &mut scores,
                    cfg,
                );
            }
        }
        state_finish::<O>(&state, o, lse, at.out_b, t, head, cfg);
    }
}
