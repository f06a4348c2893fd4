//! Selected-block attention (Eq. 12), group-centric: the cube of `(b, KV head, t)` holds the
//! group's `G` query heads and loops over the `n` blocks they selected together.

use cubecl::prelude::*;

use crate::keys::KeySet;
use crate::mma::{rows_barrier, MmaTileConfig};
use crate::register_tile::{
    fast_exp, lane_key_ranges, register_attend_tile, register_load_rows, register_state_finish,
    register_state_new,
};
use crate::tile::{
    attend_tile, cube_position, cube_positions, group_rows, head_rows, selected_tile, state_finish,
    state_new, TileConfig,
};

/// `q: [B, T, H, d_k]`, `k: [B, T, H_kv, d_k]`, `v: [B, T, H_kv, d_v]`,
/// `selected: [B, H_kv, T, n]` (block indices, -1 for an empty slot) ->
/// `o: [B, T, H, d_v]`, `lse: [B, H, T]` (f32). Keys of block `j` are
/// `[j * l', (j + 1) * l')`, causally cut at `t`; `tile_keys` divides `l'`.
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
        let mut state = state_new(cfg);
        // Uniform loops (slots x tiles): the block index comes from memory, so only the
        // number of valid rows depends on it, never whether a barrier is reached.
        for slot in 0..selected.shape(3) {
            let block = i32::cast_from(selected[slots + slot * selected.stride(3)]);
            #[unroll]
            for tile in 0..comptime!(select_block / cfg.tile_keys) {
                let (first, valid) = selected_tile(block, tile, t, select_block, cfg.tile_keys);
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

/// [`selected_attention_kernel()`] on tensor cores: one cube per `(b, KV head, t)`
/// (`cfg.positions == 1`), its `16 * planes` rows the group's heads (padded); each selected
/// block is attended in `ceil(l' / tile_keys)` tiles.
#[cube(launch_unchecked, address_type = "dynamic", fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
pub fn selected_attention_mma_kernel<F: Float, I: Int, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    selected: &Tensor<I>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] select_block: usize,
) {
    let keys = comptime!(KeySet::Selected {
        block: select_block
    });
    let width = N::value();
    let mut inputs = SharedMemory::<Vector<F, N>>::new(comptime!(cfg.input_elems() / width));
    let barrier = rows_barrier();
    let seq = q.shape(1);
    let (b, head, t, active) = cube_positions(q.shape(0), k.shape(2), seq, 1usize);
    if active {
        let queries = register_load_rows::<F, N>(q, b, t, head, &mut inputs, cfg.d_k, cfg);
        let k_at = head_rows::<Vector<F, N>>(k, b, head);
        let v_at = head_rows::<Vector<F, N>>(v, b, head);
        let slots = b * selected.stride(0) + head * selected.stride(1) + t * selected.stride(2);
        let ranges = lane_key_ranges(t, seq, k.shape(1), keys, cfg);
        let mut state = register_state_new(cfg);
        for slot in 0..selected.shape(3) {
            let block = i32::cast_from(selected[slots + slot * selected.stride(3)]);
            #[unroll]
            for part in 0..comptime!(select_block.div_ceil(cfg.tile_keys)) {
                let (first, valid) = selected_tile(block, part, t, select_block, cfg.tile_keys);
                // Uniform over the cube: every row is position t.
                if valid > 0 {
                    register_attend_tile::<F, N>(
                        k,
                        k_at,
                        v,
                        v_at,
                        first,
                        valid,
                        &ranges,
                        scale,
                        &queries,
                        &mut inputs,
                        &barrier,
                        &mut state,
                        cfg,
                    );
                }
            }
        }
        register_state_finish::<F>(&state, o, lse, b, t, head, cfg);
    }
}
