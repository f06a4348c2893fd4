//! How the key-side backward kernels (portable and tensor-core) walk the queries of a key
//! tile: the positions that see it, compacted into a list, and the row statistics (`lse`,
//! `delta`) of each step's rows.

use cubecl::prelude::*;

use crate::common::bitmap::bitmap_selects;
use crate::common::geometry::{delta_at, lse_at};
use crate::common::keys::KeySet;
use crate::tensor_core::layout::PLANE;

/// The positions `chunk .. min(chunk + units, end)` that see the key tile starting at
/// `first_key` of `(b, kv_head)`, in order, into `positions`; returns how many. Each unit
/// checks one position (for the selection branch: whether its group selected the tile's
/// block, in `bitmap`); an inclusive prefix sum of the flags gives each taken position its rank: per
/// plane with plane ops plus the earlier planes' totals when `plane_ops` (32-lane planes),
/// Hillis-Steele over the cube otherwise. Every unit must call it (it synchronizes the
/// cube).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn compact_positions<I: Int>(
    chunk: usize,
    end: usize,
    bitmap: &Tensor<I>,
    b: usize,
    kv_head: usize,
    first_key: usize,
    takes: &mut SharedMemory<u32>,
    positions: &mut SharedMemory<u32>,
    #[comptime] units: usize,
    #[comptime] keys: KeySet,
    #[comptime] plane_ops: bool,
) -> usize {
    let unit = UNIT_POS as usize;
    let block = first_key / comptime!(keys.select_block());
    let column = b * bitmap.stride(0) + kv_head * bitmap.stride(1);
    let t = chunk + unit;
    let mut take = 0u32;
    if t < end {
        take = 1;
        // Nested: `&&` does not short-circuit in kernels, and the other branches pass a
        // placeholder `bitmap`.
        if comptime!(keys.is_selected()) {
            if !bitmap_selects::<I>(bitmap, column, t, block) {
                take = 0;
            }
        }
    }
    let (rank, count) = if comptime!(plane_ops) {
        // takes[p]: how many positions plane p takes.
        let plane = unit / PLANE;
        let in_plane = plane_inclusive_sum(take);
        if unit % PLANE == PLANE - 1 {
            takes[plane] = in_plane;
        }
        sync_cube();
        let mut rank = in_plane;
        let mut count = 0u32;
        #[unroll]
        for p in 0..comptime!(units / PLANE) {
            let total = takes[p];
            if p < plane {
                rank += total;
            }
            count += total;
        }
        (rank, count)
    } else {
        takes[unit] = take;
        sync_cube();
        let mut offset = 1usize;
        while offset < units {
            let mut before = 0u32;
            if unit >= offset {
                before = takes[unit - offset];
            }
            sync_cube();
            takes[unit] += before;
            sync_cube();
            offset *= 2;
        }
        (takes[unit], takes[units - 1])
    };
    if take == 1 {
        positions[rank as usize - 1] = t as u32;
    }
    sync_cube();
    count as usize
}

/// The statistics of the step's rows `first_row .. first_row + step_rows` of the position
/// list (row `r` is position `positions[r / G]`, head `r % G`): position + 1 (0 past
/// `rows`), `lse` and `delta`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_row_stats(
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    positions: &SharedMemory<u32>,
    first_row: usize,
    rows: usize,
    b: usize,
    kv_head: usize,
    row_position: &mut SharedMemory<u32>,
    row_lse: &mut SharedMemory<f32>,
    row_delta: &mut SharedMemory<f32>,
    #[comptime] step_rows: usize,
    #[comptime] group: usize,
    #[comptime] units: usize,
) {
    // Unrolled: a loop iteration per step counts towards llvmpipe's cap (see
    // `crate::portable::grad_key`).
    #[unroll]
    for i in 0..comptime!(step_rows.div_ceil(units)) {
        let r = UNIT_POS as usize + i * units;
        if r < step_rows {
            let row = first_row + r;
            let mut position = 0u32;
            let mut value_lse = 0.0f32;
            let mut value_delta = 0.0f32;
            if row < rows {
                let t = positions[row / group] as usize;
                let h = kv_head * group + row % group;
                position = (t + 1) as u32;
                value_lse = lse[lse_at(lse, b, h, t)];
                value_delta = delta[delta_at(delta, b, t, h)];
            }
            row_position[r] = position;
            row_lse[r] = value_lse;
            row_delta[r] = value_delta;
        }
    }
}
