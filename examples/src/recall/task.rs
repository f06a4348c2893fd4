//! The synthetic task: multi-query associative recall in a long context of filler tokens,
//! generated in-process and deterministic from a seed.
//!
//! A sequence of `T` tokens is filler except for `pairs` key-value pairs (a key token
//! followed by its value token) placed at random in a band of the context (its *depth*),
//! and ends with the `pairs` keys again, in a random order: the queries. At each query the
//! model must predict the value that followed that key in the context.
//!
//! ```text
//!  f f k3 v3 f f f f k1 v1 f f f ... f f k2 v2 f f | k1 k3 k2     (input)
//!                                                    v1 v3 v2     (targets)
//! ```
//!
//! Token ids: fillers `0..F`, keys `F..F+K`, values `F+K..F+K+V`. The keys of a sequence
//! are distinct; values may repeat. The context is the `T - pairs` tokens before the
//! queries; depth 0 is its first token, depth 1 its end.

use std::ops::Range;

use burn::config::Config;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::error::{nonzero, RecallError};

/// The vocabulary and the number of pairs of the recall task.
#[derive(Config, Debug)]
pub struct RecallTaskConfig {
    /// Distinct key tokens; at least `pairs`. Default: 64.
    #[config(default = 64)]
    pub keys: usize,
    /// Distinct value tokens. Default: 64.
    #[config(default = 64)]
    pub values: usize,
    /// Distinct filler tokens. Default: 64.
    #[config(default = 64)]
    pub fillers: usize,
    /// Key-value pairs per sequence, each queried once at the end. Default: 8.
    #[config(default = 8)]
    pub pairs: usize,
}

/// A band of the context where pairs sit, as fractions of the context: `from..to` with
/// `0 <= from < to <= 1`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DepthBand {
    /// Start (0: the first token of the sequence).
    pub from: f64,
    /// End, exclusive (1: just before the queries).
    pub to: f64,
}

impl DepthBand {
    /// The whole context.
    pub const ALL: Self = Self { from: 0.0, to: 1.0 };

    /// Bin `index` of `bins` equal bins of the context.
    pub fn bin(index: usize, bins: usize) -> Self {
        Self {
            from: index as f64 / bins as f64,
            to: (index + 1) as f64 / bins as f64,
        }
    }
}

/// Where the pairs of a sequence sit: its length and the depth band.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Sequence length `T`, queries included.
    pub seq_len: usize,
    /// The band of the context the pairs sit in.
    pub depth: DepthBand,
}

/// One sequence of the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecallItem {
    /// The `T` input tokens; the last `pairs` are the queries.
    pub tokens: Vec<i64>,
    /// The value token each query must be answered with, in query order.
    pub answers: Vec<i64>,
}

impl RecallTaskConfig {
    /// Tokens of the vocabulary: fillers, keys and values.
    pub fn vocab(&self) -> usize {
        self.fillers + self.keys + self.values
    }

    /// Checks the sizes: all at least 1, and enough keys for distinct keys per sequence.
    pub fn validate(&self) -> Result<(), RecallError> {
        nonzero("keys", self.keys)?;
        nonzero("values", self.values)?;
        nonzero("fillers", self.fillers)?;
        nonzero("pairs", self.pairs)?;
        if self.keys < self.pairs {
            return Err(RecallError::TooFewKeys {
                keys: self.keys,
                pairs: self.pairs,
            });
        }
        Ok(())
    }

    /// The positions where pairs may start in sequences of this placement, or why none fit.
    pub fn band(&self, placement: Placement) -> Result<Range<usize>, RecallError> {
        let DepthBand { from, to } = placement.depth;
        if !(0.0 <= from && from < to && to <= 1.0) {
            return Err(RecallError::DepthRange { from, to });
        }
        let context = placement.seq_len.saturating_sub(self.pairs) as f64;
        let band = (from * context) as usize..(to * context) as usize;
        if band.len() / 2 < self.pairs {
            return Err(RecallError::BandTooShort {
                seq_len: placement.seq_len,
                from,
                to,
                pairs: self.pairs,
            });
        }
        Ok(band)
    }

    /// One sequence, drawn from `rng`.
    ///
    /// # Panics
    ///
    /// If the pairs do not fit the placement (see [`RecallTaskConfig::band`]).
    pub fn sequence(&self, placement: Placement, rng: &mut SplitMix64) -> RecallItem {
        let band = self
            .band(placement)
            .unwrap_or_else(|error| panic!("{error}"));
        let (key, value) = (self.fillers as i64, (self.fillers + self.keys) as i64);
        let mut tokens: Vec<i64> = (0..placement.seq_len - self.pairs)
            .map(|_| rng.below(self.fillers) as i64)
            .collect();
        let keys = rng.distinct(self.keys, self.pairs);
        let values: Vec<usize> = (0..self.pairs).map(|_| rng.below(self.values)).collect();
        for (slot, pair) in rng
            .distinct(band.len() / 2, self.pairs)
            .into_iter()
            .zip(0..)
        {
            let position = band.start + 2 * slot;
            tokens[position] = key + keys[pair] as i64;
            tokens[position + 1] = value + values[pair] as i64;
        }
        let order = rng.distinct(self.pairs, self.pairs);
        tokens.extend(order.iter().map(|&pair| key + keys[pair] as i64));
        let answers = order
            .iter()
            .map(|&pair| value + values[pair] as i64)
            .collect();
        RecallItem { tokens, answers }
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a small, fast generator whose streams depend
/// only on their seed, so that every sequence of the task can be drawn again.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The generator of item `index` of the data drawn from `seed`.
    pub fn new(seed: u64, index: u64) -> Self {
        Self(derive_seed(seed, index))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (bias below `n / 2^64`).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// `k` distinct values of `0..n` in random order (partial Fisher-Yates shuffle).
    fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut pool: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            pool.swap(i, j);
        }
        pool.truncate(k);
        pool
    }
}

/// A seed for stream `stream` of the data drawn from `seed`.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    mix(seed ^ mix(stream))
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` sequences of one placement, each drawn from the seed and its index when asked for.
#[derive(Debug, Clone)]
pub struct RecallDataset {
    task: RecallTaskConfig,
    placement: Placement,
    seed: u64,
    len: usize,
}

impl RecallDataset {
    /// The dataset, or why the pairs do not fit the placement.
    pub fn new(
        task: &RecallTaskConfig,
        placement: Placement,
        seed: u64,
        len: usize,
    ) -> Result<Self, RecallError> {
        task.band(placement)?;
        Ok(Self {
            task: task.clone(),
            placement,
            seed,
            len,
        })
    }

    /// Where the pairs of its sequences sit.
    pub fn placement(&self) -> Placement {
        self.placement
    }
}

impl Dataset<RecallItem> for RecallDataset {
    fn get(&self, index: usize) -> Option<RecallItem> {
        (index < self.len).then(|| {
            let mut rng = SplitMix64::new(self.seed, index as u64);
            self.task.sequence(self.placement, &mut rng)
        })
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// A batch of sequences of one length.
#[derive(Debug, Clone)]
pub struct RecallBatch<B: Backend> {
    /// Input tokens `[batch, T]`.
    pub tokens: Tensor<B, 2, Int>,
    /// Answer of each query `[batch, pairs]`: the targets at the last `pairs` positions.
    pub answers: Tensor<B, 2, Int>,
}

/// Stacks sequences of one length into a [`RecallBatch`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RecallBatcher;

impl<B: Backend> Batcher<B, RecallItem, RecallBatch<B>> for RecallBatcher {
    fn batch(&self, items: Vec<RecallItem>, device: &B::Device) -> RecallBatch<B> {
        let stack = |rows: Vec<&Vec<i64>>| {
            let shape = [rows.len(), rows[0].len()];
            let flat: Vec<i64> = rows.into_iter().flatten().copied().collect();
            Tensor::from_data(TensorData::new(flat, shape), device)
        };
        RecallBatch {
            tokens: stack(items.iter().map(|item| &item.tokens).collect()),
            answers: stack(items.iter().map(|item| &item.answers).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> RecallTaskConfig {
        RecallTaskConfig::new()
            .with_keys(8)
            .with_values(8)
            .with_fillers(8)
            .with_pairs(4)
    }

    #[test]
    fn each_query_is_answered_by_the_value_after_its_key() {
        let task = task();
        let placement = Placement {
            seq_len: 64,
            depth: DepthBand::ALL,
        };
        let item = task.sequence(placement, &mut SplitMix64::new(7, 0));
        assert_eq!(item.tokens.len(), 64);
        let context = &item.tokens[..60];
        for (query, answer) in item.tokens[60..].iter().zip(&item.answers) {
            let at = context
                .iter()
                .position(|t| t == query)
                .expect("key in context");
            assert_eq!(context[at + 1], *answer);
            assert_eq!(context.iter().filter(|&t| t == query).count(), 1);
        }
        let fillers = context.iter().filter(|&&t| t < 8).count();
        assert_eq!(fillers, 60 - 8);
    }

    #[test]
    fn pairs_sit_in_their_depth_band() {
        let task = task();
        let placement = Placement {
            seq_len: 104,
            depth: DepthBand::bin(1, 4),
        };
        assert_eq!(task.band(placement).unwrap(), 25..50);
        for index in 0..20 {
            let item = task.sequence(placement, &mut SplitMix64::new(1, index));
            let mut outside = item.tokens[..25].iter().chain(&item.tokens[50..100]);
            assert!(outside.all(|&t| t < 8));
        }
    }

    #[test]
    fn sequences_depend_only_on_seed_and_index() {
        let task = task();
        let placement = Placement {
            seq_len: 64,
            depth: DepthBand::ALL,
        };
        let data = RecallDataset::new(&task, placement, 3, 10).unwrap();
        assert_eq!(data.get(4), data.get(4));
        assert_ne!(data.get(4), data.get(5));
        assert_eq!(data.get(10), None);
    }

    #[test]
    fn bad_placements_are_errors() {
        let task = task();
        let band = |seq_len, from, to| {
            task.band(Placement {
                seq_len,
                depth: DepthBand { from, to },
            })
        };
        assert!(matches!(
            band(64, 0.5, 0.5),
            Err(RecallError::DepthRange { .. })
        ));
        assert!(matches!(
            band(64, 0.0, 1.5),
            Err(RecallError::DepthRange { .. })
        ));
        // 4 pairs need 8 tokens: half of a 20-token sequence's 16-token context has them,
        // half of a 16-token one's 12 does not.
        assert_eq!(band(20, 0.0, 0.5).unwrap(), 0..8);
        assert!(matches!(
            band(16, 0.0, 0.5),
            Err(RecallError::BandTooShort { .. })
        ));
        assert!(matches!(
            task.with_keys(2).validate(),
            Err(RecallError::TooFewKeys { keys: 2, pairs: 4 })
        ));
    }
}
