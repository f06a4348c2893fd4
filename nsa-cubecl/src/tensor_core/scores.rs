//! The compression branch's scoring pass and top-n on tensor cores (Eq. 9-11): after the
//! attention pass ([`crate::tensor_core::range`]) has written each row's log-sum-exp, the
//! scores are recomputed on register fragments, turned into probabilities, summed over the
//! group (Eq. 10) and over the selection blocks each compressed key overlaps (Eq. 9), and
//! each position picks its blocks (Eq. 11).

use cubecl::prelude::*;

use crate::common::geometry::{cube_positions, head_rows, recomputed_probability, NEG_BIG};
use crate::common::keys::{index_min, key_range};
use crate::common::selection::{
    add_key_probabilities, ascending_slot, beats, force_blocks, strided_best, tile_block_keys,
    tile_blocks, SelectionConfig,
};
use crate::tensor_core::fragments::{
    entry_in_range, fast_exp, lane, lane_key_ranges, plane_has_rows, plane_score_tiles,
    plane_tile_unmasked, register_load_rows, AccPair, LaneRanges,
};
use crate::tensor_core::layout::{
    load_vector_rows, plane_first_row, rows_barrier, wait_rows, MmaTileConfig, MMA, PLANE,
};
use crate::tensor_core::softmax::lane_row_lse;

/// `sync_plane()` for plane teams (`local`), `sync_cube()` for a cube-wide one.
#[cube]
fn team_sync(#[comptime] local: bool) {
    if comptime!(local) {
        sync_plane();
    } else {
        sync_cube();
    }
}

/// The scoring pass and top-n of [`compressed_attention_kernel()`] on tensor cores
/// (register fragments, see [`crate::register_tile`]), after the attention pass
/// ([`crate::range::range_attention_mma_kernel()`]) has written the rows' log-sum-exp:
/// `q: [B, T, H, d_k]`, `k_cmp: [B, N_cmp, H_kv, d_k]`, `lse: [B, H, T]` (f32) ->
/// `selected: [B, H_kv, T, n]`. One cube per `(b, KV head, cfg.positions consecutive query
/// positions)`: it recomputes the scores on the tensor cores and turns them into
/// probabilities in registers; each plane sums them over the rows of each of its
/// [`ScoreSegments`] by plane shuffles and writes one f32 tile row per segment to shared
/// memory, from which each `(position, selection block)` the tile touches gets its share
/// (Eq. 9-10) in the position's block scores (`positions * max_blocks` words of shared
/// memory). Top-n then runs once per position, one plane per position. Split from the
/// attention pass, it holds no output accumulators, so it needs far fewer registers.
#[cube(launch_unchecked, address_type = "dynamic", fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
pub fn compressed_scores_mma_kernel<F: Float, I: Int, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k_cmp: &Tensor<Vector<F, N>>,
    lse: &Tensor<f32>,
    selected: &mut Tensor<I>,
    scale: f32,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] sel: SelectionConfig,
) {
    let keys = comptime!(sel.key_set());
    let segments = comptime!(ScoreSegments::new(&cfg));
    let width = N::value();
    let mut inputs = SharedMemory::<Vector<F, N>>::new(comptime!(cfg.input_elems() / width));
    let mut sums = SharedMemory::<f32>::new(comptime!(segments.count * cfg.tile_keys));
    let mut block_scores = SharedMemory::<f32>::new(comptime!(cfg.positions * sel.max_blocks));
    let barrier = rows_barrier();
    let seq = q.shape(1);
    let n_keys = k_cmp.shape(1);
    let (b, head, t0, active) = cube_positions(q.shape(0), k_cmp.shape(2), seq, cfg.positions);
    if active {
        let unit = UNIT_POS as usize;
        let units = comptime!(cfg.units());
        let queries = register_load_rows::<F, N>(q, b, t0, head, &mut inputs, cfg.d_k, cfg);
        let k_at = head_rows::<Vector<F, N>>(k_cmp, b, head);
        let ranges = lane_key_ranges(t0, seq, n_keys, keys, cfg);
        let positions = index_min(t0 + cfg.positions, seq) - t0;
        let (_, visible) = key_range(t0 + positions - 1, n_keys, keys);
        let row_lse = lane_row_lse(lse, b, t0, head, cfg);

        // Selection-block scores of every position: its candidates are the blocks j with
        // j * l' <= t.
        let mut idx = unit;
        while idx < comptime!(cfg.positions * sel.max_blocks) {
            block_scores[idx] = 0.0;
            idx += units;
        }
        sync_cube();
        // When a plane's 16 rows hold whole groups, each plane scores its own positions
        // with plane barriers only; otherwise the cube works as one team.
        let local = comptime!(MMA % cfg.group == 0);
        let workers = comptime!(if local { PLANE } else { cfg.units() });
        let owned = comptime!(if local {
            MMA / cfg.group
        } else {
            cfg.positions
        });
        let max_span = comptime!(tile_block_span(cfg.tile_keys, sel));
        let worker = unit % workers;
        let first_owned = unit / workers * owned;
        let mut first = 0usize;
        while first < visible {
            let valid = index_min(visible - first, cfg.tile_keys);
            load_vector_rows::<F, N>(
                k_cmp,
                k_at,
                first,
                valid,
                &mut inputs,
                unit,
                0usize,
                cfg.tile_keys,
                cfg.d_k,
                units,
            );
            wait_rows(&barrier);
            // Scores -> probabilities with the rows' log-sum-exp, summed per segment.
            if plane_has_rows(cfg) {
                let scores = plane_score_tiles::<F, N>(&inputs, &queries, 0usize, cfg);
                if plane_tile_unmasked(&ranges, first, valid, cfg) {
                    store_segment_sums(
                        &scores, &row_lse, first, valid, &ranges, scale, &mut sums, segments, cfg,
                        false,
                    );
                } else {
                    store_segment_sums(
                        &scores, &row_lse, first, valid, &ranges, scale, &mut sums, segments, cfg,
                        true,
                    );
                }
            }
            team_sync(local);
            // Each (position, selection block) the tile touches is summed by one worker, key
            // by key (Eq. 9), each key over the position's segments (Eq. 10).
            let (first_block, last_block) = tile_blocks(first, valid, seq, sel);
            #[unroll]
            for round in 0..comptime!((owned * max_span).div_ceil(workers)) {
                let idx = worker + round * workers;
                let position = first_owned + idx / max_span;
                let j = first_block + idx % max_span;
                // Nested: `&&` does not short-circuit.
                if idx < comptime!(owned * max_span) && position < positions {
                    if j <= last_block && j * sel.select_block <= t0 + position {
                        let (lo, hi) = tile_block_keys(first, valid, j, sel);
                        let slot = position * sel.max_blocks + j;
                        block_scores[slot] = add_key_probabilities(
                            block_scores[slot],
                            &sums,
                            position * segments.per_position * cfg.tile_keys,
                            lo - first,
                            hi - first,
                            segments.per_position,
                            cfg.tile_keys,
                        );
                    }
                }
            }
            sync_cube();
            first += cfg.tile_keys;
        }

        // Top-n: plane p picks for positions p, p + planes, ..
        let mut position = UNIT_POS as usize / PLANE;
        while position < positions {
            let t = t0 + position;
            let out = b * selected.stride(0) + head * selected.stride(1) + t * selected.stride(2);
            plane_pick_blocks::<I>(
                &mut block_scores,
                position * sel.max_blocks,
                t,
                selected,
                out,
                sel,
            );
            position += cfg.planes;
        }
    }
}

/// How the scoring pass splits the cube's rows for its sums: segments of
/// `rows = gcd(G, 16)` consecutive rows, so none straddles a plane or a query position;
/// each position's group is `per_position` segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScoreSegments {
    /// Rows per segment, a power of two dividing 16.
    pub rows: usize,
    /// Segments per query position, `G / rows`.
    pub per_position: usize,
    /// Segments of the cube.
    pub count: usize,
}

impl ScoreSegments {
    /// The segments of `cfg`'s cube.
    pub fn new(cfg: &MmaTileConfig) -> Self {
        let rows = 1 << cfg.group.trailing_zeros().min(MMA.trailing_zeros());
        ScoreSegments {
            rows,
            per_position: cfg.group / rows,
            count: cfg.rows() / rows,
        }
    }

    /// Bytes of shared memory the scoring pass needs besides its input tiles: the segment
    /// sums of one tile and the positions' block scores (`max_blocks` each).
    pub fn shared_bytes(cfg: &MmaTileConfig, max_blocks: usize) -> usize {
        4 * (Self::new(cfg).count * cfg.tile_keys + cfg.positions * max_blocks)
    }
}

/// The most selection blocks a tile of `tile_keys` compressed keys overlaps.
fn tile_block_span(tile_keys: usize, sel: SelectionConfig) -> usize {
    (sel.select_block - 1 + (tile_keys - 1) * sel.compress_stride + sel.compress_block - 1)
        / sel.select_block
        + 1
}

/// Writes this plane's share of one tile's probabilities `exp(S scale - lse)` (zero
/// outside each row's range when `masked`), summed over the rows of each segment, to
/// `sums[segment * tile_keys + col]`.
///
/// A lane holds rows `g` and `g + 8` (`g = lane / 4`) of columns `8 c + 2 (lane % 4) + e`.
/// When a segment is the plane's 16 rows the lane first adds its two rows; then a
/// reduce-scatter over the lane bits that select a row inside the segment (halving the
/// values each round: `4 + 2 + 1` shuffles for 8 values over 8 lanes) leaves each lane
/// the full sums of some columns, which it writes.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_segment_sums(
    scores: &Array<AccPair>,
    row_lse: &Array<f32>,
    first: usize,
    valid: usize,
    ranges: &LaneRanges,
    scale: f32,
    sums: &mut SharedMemory<f32>,
    #[comptime] segments: ScoreSegments,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] masked: bool,
) {
    let lane = lane();
    // Values per row of this lane, and the row sets kept apart (both rows are one set
    // when a segment spans the plane).
    let per_row = comptime!(cfg.tile_keys / 4);
    let sets = comptime!(if segments.rows == MMA { 1usize } else { 2usize });
    // Lane bits 2.. that select a row inside a segment.
    let rounds = comptime!(segments.rows.min(8).trailing_zeros() as usize);
    let kept = comptime!(per_row >> rounds);
    let mut values = Array::<f32>::new(comptime!(sets * per_row));
    #[unroll]
    for half in 0..2usize {
        #[unroll]
        for tile in 0..comptime!(cfg.tile_keys / 8) {
            #[unroll]
            for e in 0..2usize {
                let mut p = 0.0f32;
                if entry_in_range(ranges, first, valid, tile, half, e, masked) {
                    p = recomputed_probability(scores[2 * tile + half][e] * scale, row_lse[half]);
                }
                let slot = comptime!((half % sets) * per_row + 2 * tile + e);
                if comptime!(sets == 1 && half == 1) {
                    values[slot] += p;
                } else {
                    values[slot] = p;
                }
            }
        }
    }
    #[unroll]
    for set in 0..sets {
        #[unroll]
        for round in 0..rounds {
            let mask = comptime!(1u32 << (2 + rounds - 1 - round));
            let width = comptime!(per_row >> (round + 1));
            let upper = (lane as u32 & mask) != 0;
            #[unroll]
            for i in 0..width {
                let low = values[comptime!(set * per_row + i)];
                let high = values[comptime!(set * per_row + i + width)];
                let send = select(upper, low, high);
                let keep = select(upper, high, low);
                values[comptime!(set * per_row + i)] = keep + plane_shuffle_xor(send, mask);
            }
        }
    }
    // Kept value `i` of a set is the lane's value `w * kept + i` before the rounds, `w`
    // the reduced lane bits (the first round's the highest).
    let g = lane / 4;
    let w = g % comptime!(1usize << rounds);
    let first_segment = plane_first_row() / segments.rows;
    #[unroll]
    for set in 0..sets {
        let segment = first_segment + (set * 8 + g) / segments.rows;
        #[unroll]
        for i in 0..kept {
            let value = w * kept + i;
            let col = value / 2 * 8 + lane % 4 * 2 + value % 2;
            sums[segment * cfg.tile_keys + col] = values[comptime!(set * per_row + i)];
        }
    }
}

/// The plane's best `(score, block)` from each lane's own, by a butterfly: every lane
/// ends with the same winner.
#[cube]
fn plane_best(score: f32, block: u32) -> (f32, u32) {
    let mut best = score;
    let mut best_block = block;
    #[unroll]
    for step in 0..5u32 {
        let mask = comptime!(16u32 >> step);
        let other = plane_shuffle_xor(best, mask);
        let other_block = plane_shuffle_xor(best_block, mask);
        if beats(other, other_block, best, best_block) {
            best = other;
            best_block = other_block;
        }
    }
    (best, best_block)
}

/// The portable kernel's top-n ([`crate::portable::compress`]) by one plane, for the tensor-core kernel (whose planes pick for
/// different positions at once, with no cube barrier): lane `l` owns the blocks
/// `l, l + 32, ..` and keeps its best; each round the plane's best wins
/// ([`plane_best`]) and only its owner rescans. Every lane of the plane must call it.
#[cube]
fn plane_pick_blocks<I: Int>(
    block_scores: &mut SharedMemory<f32>,
    at: usize,
    t: usize,
    selected: &mut Tensor<I>,
    out: usize,
    #[comptime] sel: SelectionConfig,
) {
    let lane = lane();
    let candidates = t / sel.select_block + 1;
    force_blocks(block_scores, at, t, lane, PLANE, sel);
    let (mut best, mut best_j) = strided_best(block_scores, at, lane, candidates, PLANE);
    let mut chosen = Array::<i32>::new(sel.n_selected);
    #[unroll]
    for round in 0..sel.n_selected {
        let (win, win_j) = plane_best(best, best_j);
        let mut pick = i32::new(-1);
        if win > NEG_BIG {
            pick = i32::cast_from(win_j);
            let win_block = usize::cast_from(win_j);
            if win_block % PLANE == lane {
                block_scores[at + win_block] = NEG_BIG;
                let (next, next_j) = strided_best(block_scores, at, lane, candidates, PLANE);
                best = next;
                best_j = next_j;
            }
        }
        chosen[round] = pick;
    }
    #[unroll]
    for i in 0..sel.n_selected {
        let slot = ascending_slot(&chosen, i, sel.n_selected);
        if lane == comptime!(i % PLANE) {
            selected[out + slot * selected.stride(3)] = I::cast_from(chosen[i]);
        }
    }
}
