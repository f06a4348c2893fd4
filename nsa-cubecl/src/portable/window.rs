//! Sliding-window attention: the query at position `p` attends keys
//! `max(0, p - w + 1) ..= p`. Its tensor-core kernel is
//! [`crate::tensor_core::range::range_attention_mma_kernel()`].

use cubecl::prelude::*;

use crate::common::geometry::{cube_position, group_rows, head_rows, query_position};
use crate::common::keys::{key_range, KeySet};
use crate::portable::tile::{attend_range, state_finish, state_new, TileConfig};

/// `q: [B, T, H, d_k]`, `k: [B, L, H_kv, d_k]`, `v: [B, L, H_kv, d_v]` with `L >= T` (the
/// queries are the last `T` of the `L` key positions) -> `o: [B, T, H, d_v]`,
/// `lse: [B, H, T]` (f32). One cube per `(b, KV head, t)`.
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
        let (start, end) = key_range(
            query_position::<F>(q, k, t),
            k.shape(1),
            comptime!(KeySet::Window { size: window }),
        );
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
