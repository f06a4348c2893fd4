//! The selection rules shared by the portable and tensor-core kernels: the block sizes and
//! counts ([`SelectionConfig`]), which selection blocks a compressed key overlaps and its
//! share of their scores (Eq. 9, overlap reading), the forced initial and local blocks and
//! the tie rule of the top-n (Eq. 11), and the order selected blocks are written in.

use cubecl::prelude::*;

use crate::common::keys::{index_max, index_min, KeySet};

use crate::common::geometry::NEG_BIG;

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
    pub n_initial_blocks: usize,
    /// Forced local blocks (the query's own block and those before it).
    pub n_local_blocks: usize,
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

/// The selection blocks `first..=last` that compressed keys `row..row + valid` overlap,
/// capped at the query's `candidates` (blocks `j` with `j * l' <= t`).
#[cube]
pub fn tile_blocks(
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

/// Eq. 9 (overlap reading) for one selection block `j` and one tile: the tile's compressed
/// keys `lo..hi` (within `row..row + valid`) whose span overlaps block `j`.
#[cube]
pub fn tile_block_keys(
    row: usize,
    valid: usize,
    j: usize,
    #[comptime] sel: SelectionConfig,
) -> (usize, usize) {
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
    (lo, hi)
}

/// `start` plus the group-summed probabilities of the tile's keys `lo..hi` (counted from
/// the tile's first key), added left to right one key at a time: the order every
/// implementation sums a block's score in (the reference's `block_scores`), so that
/// blocks whose keys have equal probabilities tie exactly everywhere. Key `i`'s
/// probability is the sum of its `parts` partial group sums
/// `sums[at + part * part_stride + i]`, in part order.
#[cube]
pub fn add_key_probabilities(
    start: f32,
    sums: &SharedMemory<f32>,
    at: usize,
    lo: usize,
    hi: usize,
    #[comptime] parts: usize,
    #[comptime] part_stride: usize,
) -> f32 {
    let mut total = start;
    for i in lo..hi {
        let mut p = 0.0f32;
        #[unroll]
        for part in 0..parts {
            p += sums[at + part * part_stride + i];
        }
        total += p;
    }
    total
}

/// Eq. 11's forced blocks: for query `t`, sets the score of the first `n_initial_blocks`
/// blocks and of the `n_local_blocks` ending at `t`'s own to a value above every real
/// score, so top-n takes them first. The candidates are the blocks `j` with `j * l' <= t`,
/// scores at `block_scores[at + j]`; this worker takes `first, first + workers, ..`.
#[cube]
pub fn force_blocks(
    block_scores: &mut SharedMemory<f32>,
    at: usize,
    t: usize,
    first: usize,
    #[comptime] workers: usize,
    #[comptime] sel: SelectionConfig,
) {
    let candidates = t / sel.select_block + 1;
    let own = t / sel.select_block;
    let mut j = first;
    while j < candidates {
        if j < sel.n_initial_blocks || (j <= own && j + sel.n_local_blocks > own) {
            block_scores[at + j] = FORCED;
        }
        j += workers;
    }
}

/// The best of the scores `block_scores[at + j]` for `j = first, first + workers, ..` below
/// `candidates`, as `(score, block)`: the lowest block among equal scores (the tie rule
/// of [`beats()`]), `(NEG_BIG, 0)` when there is none.
#[cube]
pub fn strided_best(
    block_scores: &SharedMemory<f32>,
    at: usize,
    first: usize,
    candidates: usize,
    #[comptime] workers: usize,
) -> (f32, u32) {
    let mut best = f32::new(NEG_BIG);
    let mut best_j = 0u32;
    let mut j = first;
    while j < candidates {
        let score = block_scores[at + j];
        if score > best {
            best = score;
            best_j = j as u32;
        }
        j += workers;
    }
    (best, best_j)
}

/// The top-n order of blocks (Eq. 11): `(score, block)` beats `(best, best_block)` with a
/// higher score, or with the same score at a lower block. Every kernel and the reference
/// break ties this way.
#[cube]
pub fn beats(score: f32, block: u32, best: f32, best_block: u32) -> bool {
    score > best || (score == best && block < best_block)
}

/// The output slot of pick `i` among the `n` picks in `chosen` (block indices in the order
/// picked, `-1` for none): selections are written in ascending block order with the empty
/// slots last.
#[cube]
pub fn ascending_slot(chosen: &Array<i32>, i: usize, #[comptime] n: usize) -> usize {
    let value = chosen[i];
    let mut slot = 0usize;
    #[unroll]
    for other in 0..n {
        let other_value = chosen[other];
        if value >= 0 {
            if other_value >= 0 && other_value < value {
                slot += 1;
            }
        } else if other_value >= 0 || other < i {
            slot += 1;
        }
    }
    slot
}

/// Part `part` (of `ceil(block / tile_keys)`) of the selection block `index` (-1: an empty
/// slot) as a tile for query `t`: its first key row and how many of its rows `t` attends
/// (0 for an empty slot or a part after `t`).
#[cube]
pub fn selected_tile(
    index: i32,
    part: usize,
    t: usize,
    #[comptime] block: usize,
    #[comptime] tile_keys: usize,
) -> (usize, usize) {
    let mut first = 0usize;
    let mut valid = 0usize;
    if index >= 0 {
        first = usize::cast_from(index) * block + part * tile_keys;
        if first <= t {
            valid = index_min(
                t + 1 - first,
                index_min(tile_keys, block - part * tile_keys),
            );
        }
    }
    (first, valid)
}
