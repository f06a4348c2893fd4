//! Sliding-window attention: query `t` attends keys `max(0, t - w + 1) ..= t`.

use cubecl::prelude::*;

use crate::keys::{index_min, key_range, KeySet};
use crate::mma::{rows_barrier, MmaTileConfig};
use crate::register_tile::{
    fast_exp, lane_key_ranges, register_attend_range, register_load_rows, register_state_finish,
    register_state_new,
};
use crate::tile::{
    attend_range, cube_position, cube_positions, group_rows, head_rows, state_finish, state_new,
    TileConfig,
};

/// `q: [B, T, H, d_k]`, `k: [B, T, H_kv, d_k]`, `v: [B, T, H_kv, d_v]` ->
/// `o: [B, T, H, d_v]`, `lse: [B, H, T]` (f32). One cube per `(b, KV head, t)`.
#[cube(launch, address_type = "dynamic")]
pub fn window_attention_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] cfg: TileConfig,
    #[comptime] window: usize,
) {
    let mut keys = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.key_stride()));
    let mut values = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.d_v));
    let mut scores = SharedMemory::<f32>::new(comptime!(cfg.group * cfg.tile_keys));
    let (b, head, t, active) = cube_position(q.shape(0), k.shape(2), q.shape(1));
    if active {
        let q_at = group_rows::<F>(q, b, t, head, cfg.group);
        let k_at = head_rows::<F>(k, b, head);
        let v_at = head_rows::<F>(v, b, head);
        let mut state = state_new(cfg);
        let (start, end) = key_range(t, k.shape(1), comptime!(KeySet::Window { size: window }));
        attend_range::<F>(
            q,
            q_at,
            k,
            k_at,
            v,
            v_at,
            start,
            end,
            scale,
            &mut state,
            &mut keys,
            &mut values,
            &mut scores,
            cfg,
        );
        state_finish::<F>(&state, o, lse, b, t, head, cfg);
    }
}

/// [`window_attention_kernel()`] on tensor cores: one cube per `(b, KV head, cfg.positions
/// consecutive query positions)`; it walks the union of its rows' windows and masks each
/// row to its own.
#[cube(launch_unchecked, address_type = "dynamic", fast_math = fast_exp())]
pub fn window_attention_mma_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] window: usize,
) {
    let keys = comptime!(KeySet::Window { size: window });
    let width = N::value();
    let mut inputs = SharedMemory::<Vector<F, N>>::new(comptime!(cfg.input_elems() / width));
    let barrier = rows_barrier();
    let seq = q.shape(1);
    let (b, head, t0, active) = cube_positions(q.shape(0), k.shape(2), seq, cfg.positions);
    if active {
        let queries = register_load_rows::<F, N>(q, b, t0, head, &mut inputs, cfg.d_k, cfg);
        let k_at = head_rows::<Vector<F, N>>(k, b, head);
        let v_at = head_rows::<Vector<F, N>>(v, b, head);
        let ranges = lane_key_ranges(t0, seq, k.shape(1), keys, cfg);
        let last_position = index_min(t0 + cfg.positions, seq) - 1;
        let (first, _) = key_range(t0, k.shape(1), keys);
        let (_, last) = key_range(last_position, k.shape(1), keys);
        let mut state = register_state_new(cfg);
        register_attend_range::<F, N>(
            k,
            k_at,
            v,
            v_at,
            first,
            last,
            &ranges,
            scale,
            &queries,
            &mut inputs,
            &barrier,
            &mut state,
            cfg,
        );
        register_state_finish::<F>(&state, o, lse, b, t0, head, cfg);
    }
}
