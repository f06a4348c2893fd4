//! Which keys a query attends, per branch: what the backward kernels need to walk the
//! attention pattern from the query side (dQ) and from the key side (dK, dV).

use cubecl::prelude::*;

/// The attention pattern of one branch (comptime). Key rows are positions for the
/// selection and window branches and compression-block indices for the compression branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeySet {
    /// Compressed key `i` (covering positions `i * stride .. i * stride + block`) is seen by
    /// the queries `t >= i * stride + block - 1`.
    Compressed { block: usize, stride: usize },
    /// Key `p` of selection block `p / block` is seen by the queries `t >= p` whose group
    /// selected that block.
    Selected { block: usize },
    /// Key `p` is seen by the queries `p <= t < p + size`.
    Window { size: usize },
}

impl KeySet {
    /// Whether the pattern depends on the selected block indices.
    pub fn is_selected(&self) -> bool {
        matches!(self, KeySet::Selected { .. })
    }

    /// The first query position that sees key row `key` is `key * scale + offset`.
    fn first_query(&self) -> (usize, usize) {
        match *self {
            KeySet::Compressed { block, stride } => (stride, block - 1),
            KeySet::Selected { .. } | KeySet::Window { .. } => (1, 0),
        }
    }

    /// Query positions after a key's first query that still see it (`usize::MAX`: all).
    fn reach(&self) -> usize {
        match *self {
            KeySet::Window { size } => size,
            KeySet::Compressed { .. } | KeySet::Selected { .. } => usize::MAX,
        }
    }

    /// Selection block size (1 for the other branches, where it is not used).
    pub fn select_block(&self) -> usize {
        match *self {
            KeySet::Selected { block } => block,
            KeySet::Compressed { .. } | KeySet::Window { .. } => 1,
        }
    }
}

/// The first query position that sees key row `key`.
#[cube]
pub fn first_query(key: usize, #[comptime] keys: KeySet) -> usize {
    let (scale, offset) = comptime!(keys.first_query());
    key * scale + offset
}

/// The smaller of two indices. Index arithmetic uses these rather than `min`/`max`: with
/// 64-bit offsets `usize` is a 64-bit integer in the kernel, for which CUDA's `min`/`max`
/// overloads are ambiguous (the kernel fails to compile).
#[cube]
pub fn index_min(a: usize, b: usize) -> usize {
    select(a < b, a, b)
}

/// The larger of two indices (see [`index_min()`]).
#[cube]
pub fn index_max(a: usize, b: usize) -> usize {
    select(a > b, a, b)
}

/// Whether query `t` sees key row `key`, block selection aside (the selection branch checks
/// the selected indices separately).
#[cube]
pub fn query_sees(t: usize, key: usize, #[comptime] keys: KeySet) -> bool {
    let first = first_query(key, keys);
    let reach = comptime!(keys.reach());
    let mut sees = first <= t;
    if comptime!(reach != usize::MAX) {
        sees = sees && t < first + reach;
    }
    sees
}

/// One past the last query position (below `seq`) that sees any of the key rows
/// `first_key ..= last_key`.
#[cube]
pub fn query_end(last_key: usize, seq: usize, #[comptime] keys: KeySet) -> usize {
    let reach = comptime!(keys.reach());
    let mut end = seq;
    if comptime!(reach != usize::MAX) {
        end = index_min(seq, first_query(last_key, keys) + reach);
    }
    end
}

/// The key rows `start..end` query `t` attends in the compression and window branches
/// (`n_keys` rows exist); for the selection branch, the causal range `0..=t` that its
/// selected blocks cut from.
#[cube]
pub fn key_range(t: usize, n_keys: usize, #[comptime] keys: KeySet) -> (usize, usize) {
    let (scale, offset) = comptime!(keys.first_query());
    let reach = comptime!(keys.reach());
    let mut start = 0usize;
    let mut end = 0usize;
    // Keys whose first query is at or before t: key * scale + offset <= t.
    if t >= offset {
        end = index_min((t - offset) / scale + 1, n_keys);
    }
    if comptime!(reach != usize::MAX) {
        // Keys still in reach: t < key * scale + offset + reach.
        if t + 1 > offset + reach {
            start = (t + 1 - offset - reach + scale - 1) / scale;
        }
    }
    (start, end)
}
