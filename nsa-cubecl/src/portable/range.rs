//! Attention over a contiguous range of key rows per query on the portable tile: the
//! sliding window (keys `max(0, p - w + 1) ..= p` of the query at position `p`) and the
//! compression branch's attention (compressed keys `i` with `i*d + l - 1 <= p`) when a
//! decoding step splits it over cubes. Its tensor-core kernel is
//! [`crate::tensor_core::range::range_attention_mma_kernel()`].

use cubecl::prelude::*;

use crate::common::geometry::{cube_split_position, group_rows, head_rows, split_rows};
use crate::common::keys::{key_range, KeySet};
use crate::portable::tile::{attend_range, state_finish, state_new, TileConfig};

/// `q: [B, T, H, d_k]` at positions `query_start .. query_start + T` of the keys,
/// `k: [B, L, H_kv, d_k]`, `v: [B, L, H_kv, d_v]` -> `o: [S * B, T, H, d_v]`,
/// `lse: [S * B, H, T]` (f32), with `keys` the attention pattern. `S = 1`: the output;
/// `S > 1`: the keys of each row split into `S` parts, part `s` of batch row `b` at row
/// `s * B + b` (in f32; [`crate::rows::query_splits`] merges them). One cube per
/// `(part, b, KV head, t)`.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn range_attention_kernel<F: Float, O: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    o: &mut Tensor<O>,
    lse: &mut Tensor<f32>,
    scale: f32,
    query_start: u32,
    #[comptime] cfg: TileConfig,
    #[comptime] keys: KeySet,
) {
    let mut key_tile = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.key_stride()));
    let mut values = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.d_v));
    let mut scores = SharedMemory::<f32>::new(comptime!(cfg.group * cfg.tile_keys));
    let at = cube_split_position(q.shape(0), o.shape(0), k.shape(2), q.shape(1));
    if at.inside {
        let q_at = group_rows::<F>(q, at.b, at.t, at.head, cfg.group);
        let k_at = head_rows::<F>(k, at.b, at.head);
        let v_at = head_rows::<F>(v, at.b, at.head);
        let position = at.t + usize::cast_from(query_start);
        let (start, end) = key_range(position, k.shape(1), keys);
        let (first, last) = split_rows(start, end, at.split, at.splits, cfg.tile_keys);
        let mut state = state_new(cfg);
        attend_range::<F>(
            q,
            q_at,
            k,
            k_at,
            v,
            v_at,
            first,
            last,
            scale,
            &mut state,
            &mut key_tile,
            &mut values,
            &mut scores,
            cfg,
        );
        state_finish::<O>(&state, o, lse, at.out_b, at.t, at.head, cfg);
    }
}
