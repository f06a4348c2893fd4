//! Selected-block attention (Eq. 12) on tensor cores, group-centric: a cube holds the `G`
//! query heads of a KV head at one position, or at four neighbouring positions when `G` is
//! a multiple of 16, and walks the `n` blocks they selected. It can finish the gated sum of
//! the three branches (Eq. 5) in its epilogue ([`GatedRest`]).

use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use crate::common::geometry::{cube_positions, head_rows};
use crate::common::keys::{index_min, KeySet};
use crate::common::selection::selected_tile;
use crate::tensor_core::fragments::{
    fast_exp, lane, lane_key_ranges, lane_rows, register_load_rows, AccPair,
};
use crate::tensor_core::layout::{
    load_key_value_rows, load_vector_rows, plane_first_row, row_position, rows_barrier, wait_rows,
    MmaTileConfig, PLANE,
};
use crate::tensor_core::softmax::{
    register_attend_loaded, register_state_finish, register_state_lse, register_state_new, row_at,
};

/// Key tiles in the tensor-core selection kernel's input buffer: one the cube's positions
/// share, and one of each position's own when a cube holds several.
fn selection_tiles(cfg: &MmaTileConfig) -> usize {
    if cfg.positions > 1 {
        cfg.positions + 1
    } else {
        1
    }
}

/// Elements of the tensor-core selection kernel's input buffer: the cube's query rows, then
/// its key tiles ([`MmaTileConfig::tile_elems`] apart) in the same space.
pub fn selection_input_elems(cfg: &MmaTileConfig) -> usize {
    cfg.input_elems()
        .max(selection_tiles(cfg) * cfg.tile_elems())
}

/// [`selected_attention_kernel()`] on tensor cores. A cube holds `cfg.positions` consecutive
/// positions of one KV head, each on its own planes (`G` a multiple of 16 when
/// `cfg.positions > 1`; one plane per 16 of the group's heads, padded). The positions walk
/// their selection slots in order, each selected block in `ceil(l' / tile_keys)` tiles. A
/// block that every position took in the same slot (the forced initial and local blocks
/// of neighbouring positions) is loaded once into the shared tile, by the whole cube; any
/// other goes into the position's own tile, loaded and waited for by that position's
/// planes alone, so positions only wait for each other at shared blocks. The selected
/// indices may be anything (compared per slot, never assumed).
///
/// With `rest` the kernel writes the gated sum of the three branches (Eq. 5) to
/// `o: [B, T, H, d_v]` instead of its own output (see [`GatedRest`]); `lse` stays its own.
#[cube(launch_unchecked, address_type = "dynamic", fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
pub fn selected_attention_mma_kernel<F: Float, I: Int, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    selected: &Tensor<I>,
    rest: ComptimeOption<GatedRest<F>>,
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
    let tile_elems = comptime!(cfg.tile_elems());
    let position_units = comptime!(cfg.units() / cfg.positions);
    let mut inputs =
        SharedMemory::<Vector<F, N>>::new(comptime!(selection_input_elems(&cfg) / width));
    let barrier = rows_barrier();
    // One barrier per position, for the loads of its own tiles.
    let mut position_barriers = Sequence::<Shared<Barrier>>::new();
    if comptime!(cfg.positions > 1) {
        #[unroll]
        for p in 0..cfg.positions {
            position_barriers.push(Barrier::shared(
                position_units as u32,
                UNIT_POS as usize == p * position_units,
            ));
        }
    }
    let seq = q.shape(1);
    let (b, head, t0, active) = cube_positions(q.shape(0), k.shape(2), seq, cfg.positions);
    if active {
        let queries = register_load_rows::<F, N>(q, b, t0, head, &mut inputs, cfg.d_k, cfg);
        let k_at = head_rows::<Vector<F, N>>(k, b, head);
        let v_at = head_rows::<Vector<F, N>>(v, b, head);
        let last = index_min(t0 + cfg.positions, seq) - 1;
        // This plane's position, and whether it is one (not past the cube or the sequence).
        let own = plane_first_row() / cfg.group;
        let t = t0 + own;
        let real = own < cfg.positions && t < seq;
        let slots = b * selected.stride(0) + head * selected.stride(1);
        let ranges = lane_key_ranges(t0, seq, k.shape(1), keys, cfg);
        let mut state = register_state_new(cfg);
        for slot in 0..selected.shape(3) {
            let slot_at = slots + slot * selected.stride(3);
            let lead = i32::cast_from(selected[slot_at + t0 * selected.stride(2)]);
            let own_block =
                i32::cast_from(selected[slot_at + index_min(t, last) * selected.stride(2)]);
            let mut shared = true;
            if comptime!(cfg.positions > 1) {
                #[unroll]
                for p in 1..cfg.positions {
                    if t0 + p < seq {
                        let block =
                            i32::cast_from(selected[slot_at + (t0 + p) * selected.stride(2)]);
                        shared = shared && block == lead;
                    }
                }
            }
            #[unroll]
            for part in 0..comptime!(select_block.div_ceil(cfg.tile_keys)) {
                let (own_first, own_valid) =
                    selected_tile(own_block, part, t, select_block, cfg.tile_keys);
                let attends = real && own_valid > 0;
                if shared {
                    // Uniform over the cube; the last position reaches furthest into the block.
                    let (first, valid) =
                        selected_tile(lead, part, last, select_block, cfg.tile_keys);
                    if valid > 0 {
                        load_key_value_rows::<F, N>(
                            k,
                            k_at,
                            v,
                            v_at,
                            first,
                            valid,
                            &mut inputs,
                            &barrier,
                            cfg.tile_keys,
                            cfg.values_at(),
                            cfg,
                        );
                        if attends {
                            register_attend_loaded::<F, N>(
                                &inputs, 0usize, first, valid, &ranges, scale, &queries,
                                &mut state, cfg,
                            );
                        }
                        sync_cube();
                    }
                } else if comptime!(cfg.positions > 1) {
                    // Uniform over the position's planes.
                    if attends {
                        let unit = UNIT_POS as usize % position_units;
                        #[unroll]
                        for p in 0..cfg.positions {
                            if own == p {
                                let tile_at = comptime!((p + 1) * tile_elems);
                                load_vector_rows::<F, N>(
                                    k,
                                    k_at,
                                    own_first,
                                    own_valid,
                                    &mut inputs,
                                    unit,
                                    tile_at,
                                    cfg.tile_keys,
                                    cfg.d_k,
                                    position_units,
                                );
                                load_vector_rows::<F, N>(
                                    v,
                                    v_at,
                                    own_first,
                                    own_valid,
                                    &mut inputs,
                                    unit,
                                    comptime!(tile_at + cfg.values_at()),
                                    cfg.tile_keys,
                                    cfg.d_v,
                                    position_units,
                                );
                                wait_rows(position_barriers.index(p));
                            }
                        }
                        register_attend_loaded::<F, N>(
                            &inputs,
                            (own + 1) * comptime!(tile_elems / width),
                            own_first,
                            own_valid,
                            &ranges,
                            scale,
                            &queries,
                            &mut state,
                            cfg,
                        );
                        // The position's own tile is free for its next load once all of
                        // the position's planes have read it.
                        if comptime!(position_units == PLANE) {
                            sync_plane();
                        } else {
                            #[unroll]
                            for p in 0..cfg.positions {
                                if own == p {
                                    position_barriers.index(p).arrive_and_wait();
                                }
                            }
                        }
                    }
                }
            }
        }
        #[comptime]
        match rest {
            ComptimeOption::Some(rest) => {
                let factor = register_state_lse(&state, lse, b, t0, head, cfg);
                store_gated_lane_rows::<F>(&state.out, &factor, &rest, o, b, t0, head, cfg);
            }
            ComptimeOption::None => {
                register_state_finish::<F>(&state, o, lse, b, t0, head, cfg);
            }
        }
    }
}

/// The compression and window branches' outputs `compressed`, `window: [B, T, H, d_v]` and
/// the gates `[B, T, H, 3]`: what the selection kernel sums its own output with.
#[derive(CubeLaunch, CubeType)]
pub struct GatedRest<F: Float> {
    pub compressed: Tensor<F>,
    pub window: Tensor<F>,
    pub gates: Tensor<F>,
}

/// Writes this lane's two rows of the gated sum to `o: [B, T, H, d_v]`, the selection
/// branch's rows being `acc` times `factor` (the tensor-core layout of
/// [`crate::register_tile`]; padding rows skipped); summed in f32.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_gated_lane_rows<F: Float>(
    acc: &Array<AccPair>,
    factor: &Array<f32>,
    rest: &GatedRest<F>,
    o: &mut Tensor<F>,
    b: usize,
    t0: usize,
    kv_head: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let (low, _) = lane_rows();
    let col = lane() % 4 * 2;
    let gates = &rest.gates;
    #[unroll]
    for half in 0..2usize {
        let row = low + half * 8;
        let (position, real) = row_position(row, t0, o.shape(1), cfg);
        if real {
            let head = kv_head * cfg.group + row % cfg.group;
            let gate_at = row_at(gates, b, position, head);
            let g_cmp = f32::cast_from(gates[gate_at]);
            let g_slc = f32::cast_from(gates[gate_at + gates.stride(3)]) * factor[half];
            let g_win = f32::cast_from(gates[gate_at + 2 * gates.stride(3)]);
            let out = row_at(o, b, position, head);
            let cmp = row_at(&rest.compressed, b, position, head);
            let win = row_at(&rest.window, b, position, head);
            #[unroll]
            for tile in 0..comptime!(cfg.d_v / 8) {
                let pair = acc[2 * tile + half];
                #[unroll]
                for e in 0..2usize {
                    let c = tile * 8 + col + e;
                    let sum = g_cmp
                        * f32::cast_from(rest.compressed[cmp + c * rest.compressed.stride(3)])
                        + g_slc * pair[e]
                        + g_win * f32::cast_from(rest.window[win + c * rest.window.stride(3)]);
                    o[out + c * o.stride(3)] = F::cast_from(sum);
                }
            }
        }
    }
}
