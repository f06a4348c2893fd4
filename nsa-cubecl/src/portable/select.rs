//! Selected-block attention (Eq. 12) on the portable tile, group-centric: a cube holds the
//! `G` query heads of a KV head at one position `t` and loops over the `n` blocks they
//! selected together.

use cubecl::prelude::*;

use crate::common::geometry::{cube_position, group_rows, head_rows, query_position};
use crate::common::selection::selected_tile;
use crate::portable::tile::{attend_tile, state_finish, state_new, TileConfig};

/// `q: [B, T, H, d_k]`, `k: [B, T_k, H_kv, d_k]`, `v: [B, T_k, H_kv, d_v]` with `T_k >= T`
/// (the queries are the last `T` of the `T_k` key positions),
/// `selected: [B, H_kv, T, n]` (block indices, -1 for an empty slot) ->
/// `o: [B, T, H, d_v]`, `lse: [B, H, T]` (f32). Keys of block `j` are
/// `[j * l', (j + 1) * l')`, causally cut at the query's position; `tile_keys` divides
/// `l'`.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn selected_attention_kernel<F: Float, I: Int>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    selected: &Tensor<I>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] cfg: TileConfig,
    #[comptime] select_block: usize,
) {
    let mut keys = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.key_stride()));
    let mut values = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.d_v));
    let mut scores = SharedMemory::<f32>::new(comptime!(cfg.group * cfg.tile_keys));
    let (b, head, t, active) = cube_position(q.shape(0), k.shape(2), q.shape(1));
    if active {
        let q_at = group_rows::<F>(q, b, t, head, cfg.group);
        let k_at = head_rows::<F>(k, b, head);
        let v_at = head_rows::<F>(v, b, head);
        let slots = b * selected.stride(0) + head * selected.stride(1) + t * selected.stride(2);
        let position = query_position::<F>(q, k, t);
        let mut state = state_new(cfg);
        // Uniform loops (slots x tiles): the block index comes from memory, so only the
        // number of valid rows depends on it, never whether a barrier is reached.
        for slot in 0..selected.shape(3) {
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
        state_finish::<F>(&state, o, lse, b, t, head, cfg);
    }
}
