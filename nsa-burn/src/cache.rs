//! The NSA cache: what a layer keeps of each sequence's past so that prefill in chunks and
//! token-by-token decoding give what one forward pass over the whole sequence gives.

use burn::config::Config;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use core::fmt;

use crate::{
    try_nsa_attention, BranchKv, Nsa, NsaBackend, NsaError, NsaForward, NsaInput, NsaOutput,
};

/// Capacity of an [`NsaCache`], fixed when it is created.
#[derive(Config, Debug)]
pub struct NsaCacheConfig {
    /// Sequences the cache serves at once (numbered `0..max_sequences`).
    pub max_sequences: usize,
    /// Pages in the shared pool of the selection branch's keys and values; a page holds one
    /// selection block (`l'` tokens) of one sequence, so a sequence of `T` tokens takes
    /// `ceil(T / l')` pages.
    pub max_pages: usize,
}

/// A cache operation that cannot be done. Nothing in the cache changes when one is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsaCacheError {
    /// The page pool has too few free pages for the new tokens.
    OutOfPages {
        /// Pages the call needs.
        needed: usize,
        /// Pages free in the pool.
        free: usize,
    },
    /// A sequence number at or beyond [`NsaCacheConfig::max_sequences`].
    UnknownSequence {
        /// The sequence number given.
        sequence: usize,
        /// The cache's `max_sequences`.
        max_sequences: usize,
    },
    /// The input is on another device, or the layer's weights in another dtype, than the
    /// cache (which was made on a device, in the dtype of the layer's weights).
    WrongPlacement {
        /// What differs: `device` or `dtype`.
        field: &'static str,
        /// The input's device or the layer's dtype.
        given: String,
        /// The cache's.
        cache: String,
    },
    /// A sequence named twice in one call.
    RepeatedSequence {
        /// The sequence number given twice.
        sequence: usize,
    },
    /// The input's batch dimension differs from the number of sequences named.
    RowsMismatch {
        /// Rows of the input.
        rows: usize,
        /// Sequences named.
        sequences: usize,
    },
    /// The cache was made for a layer with other head counts, head dimensions, block
    /// lengths or window.
    WrongLayer {
        /// What differs, e.g. `n_kv_heads`.
        field: &'static str,
        /// The layer's value.
        layer: usize,
        /// The cache's value.
        cache: usize,
    },
}

impl fmt::Display for NsaCacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfPages { needed, free } => write!(
                f,
                "NSA cache: the new tokens need {needed} pages, but only {free} are free"
            ),
            Self::UnknownSequence {
                sequence,
                max_sequences,
            } => write!(
                f,
                "NSA cache: sequence {sequence} does not exist, the cache holds {max_sequences} (max_sequences)"
            ),
            Self::WrongPlacement {
                field,
                given,
                cache,
            } => write!(
                f,
                "NSA cache: its {field} is {cache}, but the call's is {given}"
            ),
            Self::RepeatedSequence { sequence } => {
                write!(f, "NSA cache: sequence {sequence} is named twice in one call")
            }
            Self::RowsMismatch { rows, sequences } => write!(
                f,
                "NSA cache: the input has {rows} rows but {sequences} sequences are named"
            ),
            Self::WrongLayer {
                field,
                layer,
                cache,
            } => write!(
                f,
                "NSA cache: made for a layer with `{field}` = {cache}, used with one of {layer}"
            ),
        }
    }
}

impl std::error::Error for NsaCacheError {}

/// The dimensions of the layer a cache serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheLayout {
    pub n_kv_heads: usize,
    pub d_k: usize,
    pub d_v: usize,
    /// Selection block length `l'`: the page size.
    pub page: usize,
    /// Compression block length `l`.
    pub block: usize,
    /// Compression stride `d`.
    pub stride: usize,
    /// Window `w`.
    pub window: usize,
}

impl CacheLayout {
    /// The first field in which `other` differs from `self`.
    pub fn check(&self, other: &CacheLayout) -> Result<(), NsaCacheError> {
        let fields = [
            ("n_kv_heads", self.n_kv_heads, other.n_kv_heads),
            ("d_k", self.d_k, other.d_k),
            ("d_v", self.d_v, other.d_v),
            ("select_block", self.page, other.page),
            ("compress_block", self.block, other.block),
            ("compress_stride", self.stride, other.stride),
            ("window", self.window, other.window),
        ];
        match fields.into_iter().find(|(_, layer, cache)| layer != cache) {
            None => Ok(()),
            Some((field, layer, cache)) => Err(NsaCacheError::WrongLayer {
                field,
                layer,
                cache,
            }),
        }
    }
}

/// What the cache keeps of one sequence besides its pages.
#[derive(Debug, Clone)]
struct SequenceState<B: Backend> {
    /// Tokens seen.
    len: usize,
    /// The pool pages holding selection blocks `0, 1, ..` of the sequence.
    pages: Vec<usize>,
    /// Compressed keys and values so far, `[1, N_cmp, H_kv, d]`.
    compressed: Option<BranchKv<B>>,
    /// The compression branch's raw keys and values from position `N_cmp * d` (where the
    /// next compression block starts) to `len`, `[1, len - N_cmp * d, H_kv, d]`.
    pending: Option<BranchKv<B>>,
    /// The window branch's keys and values of the last `min(len, w - 1)` positions.
    window: Option<BranchKv<B>>,
}

impl<B: Backend> Default for SequenceState<B> {
    fn default() -> Self {
        Self {
            len: 0,
            pages: Vec::new(),
            compressed: None,
            pending: None,
            window: None,
        }
    }
}

/// The keys and values one call attends for one sequence: what [`crate::NsaInput`] takes
/// besides the queries and gates.
#[derive(Debug, Clone)]
pub(crate) struct CachedKv<B: Backend> {
    /// `[1, N_cmp(T_k), H_kv, d]`, `None` before the first compression block ends.
    pub compressed: Option<BranchKv<B>>,
    /// `[1, T_k, H_kv, d]`.
    pub selected: BranchKv<B>,
    /// `[1, L_w, H_kv, d]`, the last `L_w = min(T_k, T + w - 1)` positions.
    pub window: BranchKv<B>,
}

/// The new tokens of one sequence, as the layer projects them (`[1, T, H_kv, d]` each).
pub(crate) struct NewTokens<B: Backend> {
    /// The compression branch's raw keys and values.
    pub raw: BranchKv<B>,
    /// The selection branch's keys and values.
    pub selected: BranchKv<B>,
    /// The window branch's keys and values.
    pub window: BranchKv<B>,
}

/// The cache of one [`crate::Nsa`] layer for up to
/// [`NsaCacheConfig::max_sequences`] sequences: create it with [`crate::Nsa::cache`], pass
/// it to [`crate::Nsa::forward_cached`].
///
/// For each sequence and KV head it holds exactly what later tokens read:
/// - the selection branch's keys and values of every past token, in pages of `l'` tokens
///   (one page is one selection block) drawn from one pool shared by all sequences, with a
///   page table per sequence;
/// - the compressed keys and values produced so far, and the compression branch's raw keys
///   and values from where the next compression block starts (fewer than `l` tokens);
/// - the window branch's keys and values of the last `w - 1` tokens.
///
/// Per token and KV head, with `e` bytes per element, that is
/// `(d_k + d_v) * e * (1 + 1/d)` for the pages and the compressed keys, against
/// `(d_k + d_v) * e` for a dense KV cache, plus a fixed `(d_k + d_v) * e * (w + l)` per
/// sequence for the window and the raw tail (with [`crate::KvSharing::Shared`] the window
/// keys are also in the pages). Running out of pages is an error
/// ([`NsaCacheError::OutOfPages`]), never an overwrite.
///
/// The cache is for inference: use it with a backend without autodiff (or
/// `layer.valid()`), since it keeps every tensor it was given.
#[derive(Debug, Clone)]
pub struct NsaCache<B: Backend> {
    pub(crate) layout: CacheLayout,
    /// The page pool: keys `[P, l', H_kv, d_k]`, values `[P, l', H_kv, d_v]`. Always
    /// `Some`: a write takes the tensors out, so that no other handle to them is alive and
    /// the backend can write the new tokens in place instead of copying the pool.
    pool: Option<BranchKv<B>>,
    /// Pages no sequence holds, handed out from the end.
    free: Vec<usize>,
    sequences: Vec<SequenceState<B>>,
}

impl<B: Backend> NsaCache<B> {
    /// An empty cache of `config`'s capacity for a layer of `layout`, in `dtype`.
    pub(crate) fn new(
        config: &NsaCacheConfig,
        layout: CacheLayout,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let pages = config.max_pages.max(1);
        let pool = |dim| {
            Tensor::zeros(
                [pages, layout.page, layout.n_kv_heads, dim],
                (device, dtype),
            )
        };
        Self {
            layout,
            pool: Some(BranchKv {
                k: pool(layout.d_k),
                v: pool(layout.d_v),
            }),
            free: (0..config.max_pages).rev().collect(),
            sequences: vec![SequenceState::default(); config.max_sequences],
        }
    }

    /// Tokens cached for `sequence` (0 for one never used or just released).
    pub fn len(&self, sequence: usize) -> Result<usize, NsaCacheError> {
        self.state(sequence).map(|state| state.len)
    }

    /// Whether `sequence` holds no token.
    pub fn is_empty(&self, sequence: usize) -> Result<bool, NsaCacheError> {
        self.len(sequence).map(|len| len == 0)
    }

    /// Pages no sequence holds.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Forgets `sequence` and returns its pages to the pool, so that the number can serve a
    /// new sequence.
    pub fn release(&mut self, sequence: usize) -> Result<(), NsaCacheError> {
        self.state(sequence)?;
        let state = std::mem::take(&mut self.sequences[sequence]);
        self.free.extend(state.pages.into_iter().rev());
        Ok(())
    }

    fn state(&self, sequence: usize) -> Result<&SequenceState<B>, NsaCacheError> {
        self.sequences
            .get(sequence)
            .ok_or(NsaCacheError::UnknownSequence {
                sequence,
                max_sequences: self.sequences.len(),
            })
    }

    /// Checks that `device` and `dtype` are the cache's.
    pub(crate) fn check_placement(
        &self,
        device: &B::Device,
        dtype: DType,
    ) -> Result<(), NsaCacheError> {
        let pool = self.pool.as_ref().expect("the pool is always there");
        let mismatch = |field, given: String, cache: String| {
            Err(NsaCacheError::WrongPlacement {
                field,
                given,
                cache,
            })
        };
        if pool.k.device() != *device {
            return mismatch(
                "device",
                format!("{device:?}"),
                format!("{:?}", pool.k.device()),
            );
        }
        if pool.k.dtype() != dtype {
            return mismatch(
                "dtype",
                format!("{dtype:?}"),
                format!("{:?}", pool.k.dtype()),
            );
        }
        Ok(())
    }

    /// Checks that `sequences` are distinct and exist and that appending `tokens` to each
    /// fits the pool, before anything changes.
    pub(crate) fn check_append(
        &self,
        sequences: &[usize],
        tokens: usize,
    ) -> Result<(), NsaCacheError> {
        let mut needed = 0;
        for (i, &sequence) in sequences.iter().enumerate() {
            if sequences[..i].contains(&sequence) {
                return Err(NsaCacheError::RepeatedSequence { sequence });
            }
            let state = self.state(sequence)?;
            let pages = (state.len + tokens).div_ceil(self.layout.page);
            needed += pages - state.pages.len();
        }
        if needed > self.free.len() {
            return Err(NsaCacheError::OutOfPages {
                needed,
                free: self.free.len(),
            });
        }
        Ok(())
    }

    /// What [`Self::restore`] needs to undo appends: the free list and the state of
    /// `sequences` (their pages' contents beyond their lengths are never read).
    pub(crate) fn snapshot(&self, sequences: &[usize]) -> Snapshot<B> {
        Snapshot {
            free: self.free.clone(),
            sequences: sequences
                .iter()
                .map(|&sequence| (sequence, self.sequences[sequence].clone()))
                .collect(),
        }
    }

    /// Undoes the appends made since `snapshot` was taken.
    pub(crate) fn restore(&mut self, snapshot: Snapshot<B>) {
        self.free = snapshot.free;
        for (sequence, state) in snapshot.sequences {
            self.sequences[sequence] = state;
        }
    }

    /// Appends `new` tokens to `sequence` (checked by [`Self::check_append`]) and returns
    /// what its queries attend. `compress` is the layer's compressor, which turns
    /// `[1, L, H_kv, d]` raw keys and values into the compression blocks they hold.
    pub(crate) fn append(
        &mut self,
        sequence: usize,
        new: NewTokens<B>,
        compress: impl Fn(BranchKv<B>) -> Option<BranchKv<B>>,
    ) -> CachedKv<B> {
        let tokens = new.selected.k.dims()[1];
        self.write_pages(sequence, new.selected);
        let layout = self.layout;
        let state = &mut self.sequences[sequence];
        state.len += tokens;

        // Compression: the raw tail plus the new tokens, cut after the blocks that end.
        let pending = concat(state.pending.take(), new.raw);
        if let Some(blocks) = compress(pending.clone()) {
            let count = blocks.k.dims()[1];
            state.compressed = Some(concat(state.compressed.take(), blocks));
            let consumed = count * layout.stride;
            let left = pending.k.dims()[1] - consumed;
            state.pending = (left > 0).then(|| narrow(pending, consumed, left));
        } else {
            state.pending = Some(pending);
        }

        // Window: the cached tail plus the new tokens; keep the last w - 1.
        let window = concat(state.window.take(), new.window);
        let len = window.k.dims()[1];
        let keep = len.min(layout.window - 1);
        state.window = (keep > 0).then(|| narrow(window.clone(), len - keep, keep));

        let selected = self.read_pages(sequence);
        CachedKv {
            compressed: self.sequences[sequence].compressed.clone(),
            selected,
            window,
        }
    }

    /// Writes the selection branch's keys and values of the new tokens (`[1, T, H_kv, d]`)
    /// into `sequence`'s pages, taking new pages from the pool as blocks begin.
    fn write_pages(&mut self, sequence: usize, new: BranchKv<B>) {
        let page = self.layout.page;
        let tokens = new.k.dims()[1];
        let mut pool = self.pool.take().expect("the pool is always there");
        let mut position = self.sequences[sequence].len;
        let end = position + tokens;
        while position < end {
            let block = position / page;
            if block == self.sequences[sequence].pages.len() {
                let fresh = self.free.pop().expect("pages checked by check_append");
                self.sequences[sequence].pages.push(fresh);
            }
            let slot = self.sequences[sequence].pages[block];
            let offset = position % page;
            let count = (page - offset).min(end - position);
            let from = position - (end - tokens);
            let write = |pool: Tensor<B, 4>, values: &Tensor<B, 4>| {
                let [_, _, heads, dim] = pool.dims();
                let part = values
                    .clone()
                    .narrow(1, from, count)
                    .reshape([1, count, heads, dim]);
                pool.slice_assign(
                    [slot..slot + 1, offset..offset + count, 0..heads, 0..dim],
                    part,
                )
            };
            pool.k = write(pool.k, &new.k);
            pool.v = write(pool.v, &new.v);
            position += count;
        }
        self.pool = Some(pool);
    }

    /// `sequence`'s selection-branch keys and values in order, `[1, len, H_kv, d]`.
    fn read_pages(&self, sequence: usize) -> BranchKv<B> {
        let state = &self.sequences[sequence];
        let pages: Vec<i64> = state.pages.iter().map(|&page| page as i64).collect();
        let count = pages.len();
        let pool = self.pool.as_ref().expect("the pool is always there");
        let device = pool.k.device();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(pages, [count]), &device);
        let gather = |pool: &Tensor<B, 4>| {
            let [_, page, heads, dim] = pool.dims();
            pool.clone()
                .select(0, index.clone())
                .reshape([1, count * page, heads, dim])
                .narrow(1, 0, state.len)
        };
        BranchKv {
            k: gather(&pool.k),
            v: gather(&pool.v),
        }
    }
}

/// The part of an [`NsaCache`] that appends change (see [`NsaCache::snapshot`]).
pub(crate) struct Snapshot<B: Backend> {
    free: Vec<usize>,
    sequences: Vec<(usize, SequenceState<B>)>,
}

impl<B: NsaBackend> Nsa<B> {
    /// An empty cache of `config`'s capacity for this layer, in the dtype of its weights.
    pub fn cache(&self, config: &NsaCacheConfig, device: &B::Device) -> NsaCache<B> {
        let dtype = self.query.weight.val().dtype();
        NsaCache::new(config, self.cache_layout(), dtype, device)
    }

    fn cache_layout(&self) -> CacheLayout {
        CacheLayout {
            n_kv_heads: self.n_kv_heads,
            d_k: self.d_k,
            d_v: self.d_v,
            page: self.attention.select_block,
            block: self.attention.compress_block,
            stride: self.attention.compress_stride,
            window: self.attention.window,
        }
    }

    /// Causal NSA self-attention over the next tokens of cached sequences: row `i` of `x`
    /// holds the next `T` tokens of sequence `sequences[i]`, at positions continuing from
    /// what `cache` holds of it, and the tokens join the cache. Feeding a sequence in chunks
    /// (prefill), one token at a time (decoding) or in one call gives the outputs and
    /// selected blocks of [`Nsa::forward`] over the whole sequence, up to rounding; the
    /// sequences of one call may have different lengths. (On CUDA the full forward may run
    /// the tensor-core kernels where cached calls run the portable ones, which sum in another
    /// order, so a near-tie between two blocks' scores can select differently there.)
    ///
    /// `x: [S, T, d_model]`, `sequences: [S]` distinct numbers below the cache's
    /// `max_sequences` -> `[S, T, d_model]`.
    ///
    /// Each sequence is one operator call (see [`crate::NsaInput`]): its new queries against
    /// its cached prefix and themselves, gathered from the pages. On the CubeCL backends the
    /// portable kernels run calls after a sequence's first; the first runs whichever kernels
    /// the full forward runs.
    ///
    /// # Panics
    ///
    /// Where [`Nsa::try_forward_cached`] returns an error, with its message.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        cache: &mut NsaCache<B>,
        sequences: &[usize],
    ) -> Tensor<B, 3> {
        self.try_forward_cached(x, cache, sequences)
            .unwrap_or_else(|error| panic!("Nsa::forward_cached: {error}"))
            .output
    }

    /// [`Nsa::forward_cached`] returning a typed error instead of panicking, and the selected
    /// blocks `[S, H_kv, T, n]` (counted from each sequence's start) and the gates. On an
    /// error the cache is as it was before the call.
    pub fn try_forward_cached(
        &self,
        x: Tensor<B, 3>,
        cache: &mut NsaCache<B>,
        sequences: &[usize],
    ) -> Result<NsaForward<B>, NsaError> {
        self.settings.check()?;
        self.check_input(&x)?;
        self.cache_layout().check(&cache.layout)?;
        cache.check_placement(&x.device(), self.query.weight.val().dtype())?;
        let [rows, tokens, _] = x.dims();
        if rows != sequences.len() {
            return Err(NsaCacheError::RowsMismatch {
                rows,
                sequences: sequences.len(),
            }
            .into());
        }
        cache.check_append(sequences, tokens)?;
        let snapshot = cache.snapshot(sequences);
        let projected = self.project(x);
        let row = |t: &Tensor<B, 4>, i: usize| t.clone().narrow(0, i, 1);
        let kv_row = |kv: &BranchKv<B>, i: usize| BranchKv {
            k: row(&kv.k, i),
            v: row(&kv.v, i),
        };
        let mut outputs = Vec::with_capacity(rows);
        for (i, &sequence) in sequences.iter().enumerate() {
            let new = NewTokens {
                raw: kv_row(&projected.raw, i),
                selected: kv_row(&projected.selected, i),
                window: kv_row(&projected.window, i),
            };
            let cached = cache.append(sequence, new, |raw| self.compress(raw));
            let input = NsaInput {
                q: row(&projected.q, i),
                compressed: cached.compressed,
                selected: cached.selected,
                window: cached.window,
                gates: row(&projected.gates, i),
            };
            match try_nsa_attention(input, &self.attention) {
                Ok(output) => outputs.push(output),
                Err(error) => {
                    cache.restore(snapshot);
                    return Err(error);
                }
            }
        }
        let (output, selected_blocks) = outputs
            .into_iter()
            .map(|o| (o.output, o.selected_blocks))
            .unzip();
        let attention = NsaOutput {
            output: Tensor::cat(output, 0),
            selected_blocks: Tensor::cat(selected_blocks, 0),
        };
        Ok(self.finish(attention, projected.gates))
    }
}

/// `first` (if any) followed by `second` along the positions.
fn concat<B: Backend>(first: Option<BranchKv<B>>, second: BranchKv<B>) -> BranchKv<B> {
    match first {
        None => second,
        Some(first) => BranchKv {
            k: Tensor::cat(vec![first.k, second.k], 1),
            v: Tensor::cat(vec![first.v, second.v], 1),
        },
    }
}

/// Positions `start..start + len` of `kv`.
fn narrow<B: Backend>(kv: BranchKv<B>, start: usize, len: usize) -> BranchKv<B> {
    BranchKv {
        k: kv.k.narrow(1, start, len),
        v: kv.v.narrow(1, start, len),
    }
}
