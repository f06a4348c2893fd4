//! What crosses from the layer to the kernels: the call's sizes ([`AttentionShape`]) and the
//! NSA settings ([`NsaKernelConfig`], named as the layer's attention config names them).

use crate::common::keys::KeySet;
use crate::common::selection::SelectionConfig;
use crate::plan::Strategy;

/// Sizes of one NSA attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch `B`.
    pub batch: usize,
    /// Sequence length `T`.
    pub seq: usize,
    /// Query heads `H`.
    pub heads: usize,
    /// KV heads `H_kv`.
    pub kv_heads: usize,
    /// Query/key head dimension.
    pub d_k: usize,
    /// Value head dimension.
    pub d_v: usize,
    /// Position of the first query in the key sequence: the queries are positions
    /// `query_start .. query_start + T` of `query_start + T` keys (0 for causal
    /// self-attention; more when a cache serves queries after a prefix). Only the portable
    /// forward kernels take queries at an offset.
    pub query_start: usize,
}

impl AttentionShape {
    /// The sizes of a call from the queries' shape `[B, T, H, d_k]`, a value tensor's
    /// `[B, L, H_kv, d_v]` and the position of the first query.
    pub fn from_dims(q: [usize; 4], v: [usize; 4], query_start: usize) -> Self {
        let [batch, seq, heads, d_k] = q;
        let [_, _, kv_heads, d_v] = v;
        Self {
            batch,
            seq,
            heads,
            kv_heads,
            d_k,
            d_v,
            query_start,
        }
    }

    /// Positions of the key sequence, `query_start + T`.
    pub fn key_len(&self) -> usize {
        self.query_start + self.seq
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// The NSA settings the kernels read, with the field names of the layer's attention config
/// (`nsa_burn::NsaAttentionConfig`), the softmax scale resolved, and the kernel strategy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NsaKernelConfig {
    /// Compression block length `l`.
    pub compress_block: usize,
    /// Compression stride `d`.
    pub compress_stride: usize,
    /// Selection block length `l'`.
    pub select_block: usize,
    /// Selected blocks per query `n`, forced ones included.
    pub n_selected: usize,
    /// Forced leading blocks.
    pub n_initial_blocks: usize,
    /// Forced local blocks (the query's block and those before it).
    pub n_local_blocks: usize,
    /// Sliding window `w`.
    pub window: usize,
    /// Softmax scale (the layer's default is `1 / sqrt(d_k)`).
    pub softmax_scale: f32,
    /// Which kernels run.
    pub kernel_strategy: Strategy,
}

impl NsaKernelConfig {
    /// The attention pattern of the compression branch.
    pub fn compressed_keys(&self) -> KeySet {
        KeySet::Compressed {
            block: self.compress_block,
            stride: self.compress_stride,
        }
    }

    /// The attention pattern of the selection branch.
    pub fn selected_keys(&self) -> KeySet {
        KeySet::Selected {
            block: self.select_block,
        }
    }

    /// The attention pattern of the sliding-window branch.
    pub fn window_keys(&self) -> KeySet {
        KeySet::Window { size: self.window }
    }

    /// The comptime selection settings for a key sequence of `key_len` positions: the
    /// block-score buffer holds `ceil(T_k / l')` blocks, rounded up to a power of two so that few kernel
    /// variants get compiled.
    pub(crate) fn selection(&self, key_len: usize) -> SelectionConfig {
        SelectionConfig {
            compress_block: self.compress_block,
            compress_stride: self.compress_stride,
            select_block: self.select_block,
            n_selected: self.n_selected,
            n_initial_blocks: self.n_initial_blocks,
            n_local_blocks: self.n_local_blocks,
            max_blocks: key_len.div_ceil(self.select_block).next_power_of_two(),
        }
    }
}
