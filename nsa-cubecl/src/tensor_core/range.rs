//! Attention over a contiguous range of keys per query on tensor cores: the sliding-window
//! branch, and the attention pass of the compression branch (whose scoring pass is
//! [`crate::tensor_core::scores::compressed_scores_mma_kernel()`]).

use cubecl::prelude::*;

use crate::common::geometry::{cube_positions, head_rows};
use crate::common::keys::{index_min, key_range, KeySet};
use crate::tensor_core::fragments::{fast_exp, lane_key_ranges, register_load_rows};
use crate::tensor_core::layout::{rows_barrier, MmaTileConfig};
use crate::tensor_core::softmax::{
    register_attend_range, register_state_finish, register_state_new,
};

/// `q: [B, T, H, d_k]`, `k: [B, L, H_kv, d_k]`, `v: [B, L, H_kv, d_v]` ->
/// `o: [B, T, H, d_v]`, `lse: [B, H, T]` (f32), each query attending the keys `keys` gives
/// it (a window, or the compression blocks it has seen). One cube per `(b, KV head,
/// cfg.positions consecutive query positions)`; it walks the union of its rows' ranges and
/// masks each row to its own.
#[cube(launch_unchecked, address_type = "dynamic", fast_math = fast_exp())]
pub fn range_attention_mma_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] keys: KeySet,
) {
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
