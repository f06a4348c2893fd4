//! Compressed attention (Eq. 7-8) fused with block scoring (Eq. 9-10) and top-n selection
//! (Eq. 11): per query group, the selection-block scores live in shared memory only. On
//! tensor cores the attention pass is [`crate::range::range_attention_mma_kernel()`] and
//! the scoring pass and top-n are [`compressed_scores_mma_kernel()`].

use cubecl::prelude::*;

use crate::keys::{index_max, index_min, key_range, KeySet};
use crate::mma::{
    load_vector_rows, plane_first_row, rows_barrier, wait_rows, MmaTileConfig, MMA, PLANE,
};
use crate::register_tile::{
    entry_in_range, fast_exp, lane, lane_key_ranges, lane_row_lse, plane_has_rows,
    plane_score_tiles, plane_tile_unmasked, register_load_rows, AccPair, LaneRanges,
};
use crate::tile::{
    attend_range, cube_position, cube_positions, group_rows, head_rows, load_rows, state_finish,
    state_new, tile_scores, TileConfig, NEG_BIG,
};

/// Score that forces a block into the selection.
const FORCED: f32 = 1.0e30;

/// Block sizes and selection counts (comptime).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SelectionConfig {
    /// Compression block `l`.
    pub compress_block: usize,
    /// Compression stride `d`.
    pub compress_stride: usize,
    /// Selection block `l'`.
    pub select_block: usize,
    /// Selected blocks `n`.
    pub n_selected: usize,
    /// Forced leading blocks.
    pub n_initial: usize,
    /// Forced local blocks.
    pub n_local: usize,
    /// Capacity of the shared block-score buffer, at least `ceil(T / l')`.
    pub max_blocks: usize,
}

impl SelectionConfig {
    /// The compressed keys' attention pattern.
    pub fn key_set(&self) -> KeySet {
        KeySet::Compressed {
            block: self.compress_block,
            stride: self.compress_stride,
        }
    }
}

/// `q: [B, T, H, d_k]`, `k_cmp: [B, N_cmp, H_kv, d_k]`, `v_cmp: [B, N_cmp, H_kv, d_v]` ->
/// `o: [B, T, H, d_v]`, `lse: [B, H, T]` (f32), `selected: [B, H_kv, T, n]` (ascending
/// block indices, -1 padded).
///
/// Query `t` sees compression block `i` iff `i*d + l - 1 <= t`. After the attention pass a
/// second pass recomputes each visible block's scores, turns them into probabilities with
/// the row log-sum-exp, sums them over the group (Eq. 10) and adds them to every selection
/// block the compression block overlaps (Eq. 9, overlap reading). Top-n then takes the
/// forced blocks and the highest scores, ties to the lower index.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn compressed_attention_kernel<F: Float, I: Int>(
    q: &Tensor<F>,
    k_cmp: &Tensor<F>,
    v_cmp: &Tensor<F>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    selected: &mut Tensor<I>,
    scale: f32,
    #[comptime] cfg: TileConfig,
    #[comptime] sel: SelectionConfig,
) {
    let mut keys = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.key_stride()));
    let mut values = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.d_v));
    let mut scores = SharedMemory::<f32>::new(comptime!(cfg.group * cfg.tile_keys));
    let mut row_lse = SharedMemory::<f32>::new(cfg.group);
    let mut probs = SharedMemory::<f32>::new(cfg.tile_keys);
    let mut block_scores = SharedMemory::<f32>::new(sel.max_blocks);
    let mut best_score = SharedMemory::<f32>::new(comptime!(cfg.units()));
    let mut best_block = SharedMemory::<u32>::new(comptime!(cfg.units()));
    let (b, head, t, active) = cube_position(q.shape(0), k_cmp.shape(2), q.shape(1));
    if active {
        let unit = UNIT_POS as usize;
        let units = comptime!(cfg.units());
        let q_at = group_rows::<F>(q, b, t, head, cfg.group);
        let k_at = head_rows::<F>(k_cmp, b, head);
        let v_at = head_rows::<F>(v_cmp, b, head);
        let (_, visible) = key_range(t, k_cmp.shape(1), comptime!(sel.key_set()));

        // Attention over the visible compressed keys.
        let mut state = state_new(cfg);
        attend_range::<F>(
            q,
            q_at,
            k_cmp,
            k_at,
            v_cmp,
            v_at,
            0,
            visible,
            scale,
            &mut state,
            &mut keys,
            &mut values,
            &mut scores,
            cfg,
        );
        state_finish::<F>(&state, o, lse, b, t, head, cfg);
        if unit % cfg.parts == 0 {
            row_lse[unit / cfg.parts] = state[0] + state[1].ln();
        }

        // Selection-block scores: candidates are the blocks j with j * l' <= t.
        let candidates = t / sel.select_block + 1;
        let mut j = unit;
        while j < candidates {
            block_scores[j] = 0.0;
            j += units;
        }
        sync_cube();
        let mut row = 0usize;
        while row < visible {
            let valid = index_min(visible - row, cfg.tile_keys);
            // Keys of this tile into shared memory (values are not needed here).
            load_rows::<F, f32>(
                k_cmp,
                k_at,
                row,
                valid,
                &mut keys,
                cfg.tile_keys,
                cfg.d_k,
                cfg.key_stride(),
                cfg.units(),
            );
            sync_cube();
            tile_scores::<F>(
                q,
                q_at,
                &keys,
                valid,
                scale,
                &mut scores,
                cfg.d_k,
                cfg.key_stride(),
                cfg,
            );
            sync_cube();
            // p_cmp summed over the group, per compression block of the tile.
            let mut key = unit;
            while key < cfg.tile_keys {
                let mut p = 0.0f32;
                if key < valid {
                    #[unroll]
                    for g in 0..cfg.group {
                        p += (scores[g * cfg.tile_keys + key] - row_lse[g]).exp();
                    }
                }
                probs[key] = p;
                key += units;
            }
            sync_cube();
            // Each selection block touched by the tile is summed by one unit.
            let (first_block, last_block) = tile_blocks(row, valid, candidates, sel);
            let mut j = first_block + unit;
            while j <= last_block {
                block_scores[j] += tile_block_score(&probs, 0, row, valid, j, sel);
                j += units;
            }
            sync_cube();
            row += cfg.tile_keys;
        }

        let out = b * selected.stride(0) + head * selected.stride(1) + t * selected.stride(2);
        pick_blocks::<I>(
            &mut block_scores,
            0,
            t,
            &mut best_score,
            &mut best_block,
            selected,
            out,
            units,
            sel,
        );
    }
}

/// `sync_plane()` for plane teams (`local`), `sync_cube()` for a cube-wide one.
#[cube]
fn team_sync(#[comptime] local: bool) {
    if comptime!(local) {
        sync_plane();
    } else {
        sync_cube();
    }
}

/// The selection blocks `first..=last` that compressed keys `row..row + valid` overlap,
/// capped at the query's `candidates` (blocks `j` with `j * l' <= t`).
#[cube]
fn tile_blocks(
    row: usize,
    valid: usize,
    candidates: usize,
    #[comptime] sel: SelectionConfig,
) -> (usize, usize) {
    let first = row * sel.compress_stride / sel.select_block;
    let last_start = (row + valid - 1) * sel.compress_stride;
    let last = index_min(
        (last_start + sel.compress_block - 1) / sel.select_block,
        candidates - 1,
    );
    (first, last)
}

/// Eq. 9 (overlap reading) for one selection block `j` and one tile: the sum of the
/// group-summed probabilities `probs[at + r]` of the tile's compressed keys `row + r`
/// (`r < valid`) whose span overlaps block `j`.
#[cube]
fn tile_block_score(
    probs: &SharedMemory<f32>,
    at: usize,
    row: usize,
    valid: usize,
    j: usize,
    #[comptime] sel: SelectionConfig,
) -> f32 {
    // Key i overlaps the block iff i * d < block_start + l' and i * d + l > block_start.
    let block_start = j * sel.select_block;
    let mut lo = row;
    if block_start >= sel.compress_block {
        lo = index_max(
            lo,
            (block_start - sel.compress_block) / sel.compress_stride + 1,
        );
    }
    let hi = index_min(
        row + valid,
        (block_start + sel.select_block - 1) / sel.compress_stride + 1,
    );
    let mut total = 0.0f32;
    for i in lo..hi {
        total += probs[at + i - row];
    }
    total
}

/// Eq. 11 for query `t` over the candidate scores `block_scores[at..]`: forces the first
/// `n_initial` blocks and the `n_local` ending at `t`'s own, takes the `n` highest (ties
/// to the lower index) and writes them ascending, `-1` padded, to `selected[out..]`
/// (`stride(3)` apart). The whole cube calls it; it clobbers the scores.
#[cube]
#[allow(clippy::too_many_arguments)]
fn pick_blocks<I: Int>(
    block_scores: &mut SharedMemory<f32>,
    at: usize,
    t: usize,
    best_score: &mut SharedMemory<f32>,
    best_block: &mut SharedMemory<u32>,
    selected: &mut Tensor<I>,
    out: usize,
    #[comptime] units: usize,
    #[comptime] sel: SelectionConfig,
) {
    let unit = UNIT_POS as usize;
    let candidates = t / sel.select_block + 1;
    let own = t / sel.select_block;
    let mut j = unit;
    while j < candidates {
        if j < sel.n_initial || (j <= own && j + sel.n_local > own) {
            block_scores[at + j] = FORCED;
        }
        j += units;
    }
    sync_cube();

    // One block per round: each unit scans its strided share, unit 0 reduces.
    let mut chosen = Array::<i32>::new(sel.n_selected);
    #[unroll]
    for round in 0..sel.n_selected {
        let mut best = f32::new(NEG_BIG);
        let mut best_j = 0u32;
        let mut j = unit;
        while j < candidates {
            if block_scores[at + j] > best {
                best = block_scores[at + j];
                best_j = j as u32;
            }
            j += units;
        }
        best_score[unit] = best;
        best_block[unit] = best_j;
        sync_cube();
        if unit == 0 {
            let mut win = f32::new(NEG_BIG);
            let mut win_j = 0u32;
            for u in 0..units {
                let score = best_score[u];
                if score > win || (score == win && score > NEG_BIG && best_block[u] < win_j) {
                    win = score;
                    win_j = best_block[u];
                }
            }
            if win > NEG_BIG {
                chosen[round] = win_j as i32;
                block_scores[at + win_j as usize] = NEG_BIG;
            } else {
                chosen[round] = -1;
            }
        }
        sync_cube();
    }

    // Ascending order, empty slots (-1) last.
    if unit == 0 {
        for slot in 0..sel.n_selected {
            let mut pick = slot;
            for other in slot + 1..sel.n_selected {
                let a = chosen[other];
                let c = chosen[pick];
                if a >= 0 && (c < 0 || a < c) {
                    pick = other;
                }
            }
            let value = chosen[pick];
            chosen[pick] = chosen[slot];
            chosen[slot] = value;
            selected[out + slot * selected.stride(3)] = I::cast_from(value);
        }
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
            // Each (position, selection block) the tile touches is summed by one worker,
            // over the position's segments (Eq. 10) and the block's keys (Eq. 9).
            let (first_block, last_block) = tile_blocks(first, valid, seq, sel);
            #[unroll]
            for round in 0..comptime!((owned * max_span).div_ceil(workers)) {
                let idx = worker + round * workers;
                let position = first_owned + idx / max_span;
                let j = first_block + idx % max_span;
                // Nested: `&&` does not short-circuit.
                if idx < comptime!(owned * max_span) && position < positions {
                    if j <= last_block && j * sel.select_block <= t0 + position {
                        let mut total = 0.0f32;
                        #[unroll]
                        for part in 0..segments.per_position {
                            total += tile_block_score(
                                &sums,
                                (position * segments.per_position + part) * cfg.tile_keys,
                                first,
                                valid,
                                j,
                                sel,
                            );
                        }
                        block_scores[position * sel.max_blocks + j] += total;
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
                    p = (scores[2 * tile + half][e] * scale - row_lse[half]).exp();
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

/// The best block among this lane's share `lane, lane + 32, ..` of the `candidates` scores
/// at `block_scores[at..]`, the lower index on ties: `(score, block)`, `(NEG_BIG, 0)` if
/// the share is empty.
#[cube]
fn lane_best(
    block_scores: &SharedMemory<f32>,
    at: usize,
    lane: usize,
    candidates: usize,
) -> (f32, u32) {
    let mut best = f32::new(NEG_BIG);
    let mut best_j = 0u32;
    let mut j = lane;
    while j < candidates {
        let score = block_scores[at + j];
        if score > best {
            best = score;
            best_j = j as u32;
        }
        j += PLANE;
    }
    (best, best_j)
}

/// Whether `(score, block)` beats `(best, best_block)`: a higher score, or the same score
/// at a lower block.
#[cube]
fn beats(score: f32, block: u32, best: f32, best_block: u32) -> bool {
    score > best || (score == best && block < best_block)
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

/// [`pick_blocks()`] by one plane, for the tensor-core kernel (whose planes pick for
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
    let own = t / sel.select_block;
    let mut j = lane;
    while j < candidates {
        if j < sel.n_initial || (j <= own && j + sel.n_local > own) {
            block_scores[at + j] = FORCED;
        }
        j += PLANE;
    }
    let (mut best, mut best_j) = lane_best(block_scores, at, lane, candidates);
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
                let (next, next_j) = lane_best(block_scores, at, lane, candidates);
                best = next;
                best_j = next_j;
            }
        }
        chosen[round] = pick;
    }
    // Slot of each pick: ascending, empty slots (-1) last.
    #[unroll]
    for i in 0..sel.n_selected {
        let value = chosen[i];
        let mut slot = 0usize;
        #[unroll]
        for other in 0..sel.n_selected {
            let other_value = chosen[other];
            if value >= 0 {
                if other_value >= 0 && other_value < value {
                    slot += 1;
                }
            } else if other_value >= 0 || other < i {
                slot += 1;
            }
        }
        if lane == comptime!(i % PLANE) {
            selected[out + slot * selected.stride(3)] = I::cast_from(value);
        }
    }
}
