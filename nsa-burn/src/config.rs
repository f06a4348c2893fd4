//! Configuration of the NSA layer and of the attention operator beneath it, with validation.

use burn::config::Config;
use burn::module::Initializer;
use core::fmt;
use nsa_cubecl::NsaKernelConfig;

use crate::KernelStrategy;

/// How each compression block of `l` keys (or values) becomes one compressed key (value).
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum CompressorKind {
    /// The paper's compressor (§3.3.1): add a learned `[l, d]` intra-block position
    /// embedding, flatten the block to `l * d`, then a two-layer MLP (GELU) down to `d`.
    /// The weights are shared by all KV heads and applied to each head's block separately.
    Mlp,
    /// Mean of the `l` keys (values) of the block. No parameters.
    MeanPool,
}

/// Whether the three branches project their own keys and values or share one projection.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum KvSharing {
    /// Each branch (compressed, selected, window) has its own K and V projections, as in the
    /// paper (§3.3.3). Three times the K/V parameters and activations of `Shared`.
    Independent,
    /// One K and one V projection feed all three branches (what most public kernels do).
    Shared,
}

/// Configuration of the [NSA layer](crate::Nsa), created with [`NsaConfig::init`] or
/// [`NsaConfig::try_init`].
///
/// Defaults are the paper's (§4.1): `l = 32`, `d = 16`, `l' = 64`, `n = 16` (1 initial and 2
/// local blocks included), `w = 512`.
#[derive(Config, Debug)]
pub struct NsaConfig {
    /// Width of the layer's input and output, `d_model`.
    pub d_model: usize,
    /// Number of query heads `H`.
    pub n_heads: usize,
    /// Number of key/value heads `H_kv` (GQA); must divide `n_heads`. Group size `G = H / H_kv`.
    pub n_kv_heads: usize,
    /// Query and key head dimension `d_k`.
    pub d_k: usize,
    /// Value head dimension `d_v` (may differ from `d_k`).
    pub d_v: usize,
    /// Compression block length `l`. Default: 32.
    #[config(default = 32)]
    pub compress_block: usize,
    /// Compression stride `d`; must divide `compress_block` and `select_block`. Default: 16.
    #[config(default = 16)]
    pub compress_stride: usize,
    /// Selection block length `l'`; at least `compress_block`. Default: 64.
    #[config(default = 64)]
    pub select_block: usize,
    /// Number of selected blocks `n` per query, counting the forced ones. Default: 16.
    #[config(default = 16)]
    pub n_selected: usize,
    /// Leading blocks (0, 1, ...) every query selects. Default: 1.
    #[config(default = 1)]
    pub n_initial_blocks: usize,
    /// Local blocks every query selects: the block holding the query and the ones just
    /// before it. Default: 2.
    #[config(default = 2)]
    pub n_local_blocks: usize,
    /// Sliding window `w`: query `t` attends keys `t - w + 1 ..= t`; `w >= T` is full causal
    /// attention. Default: 512.
    #[config(default = 512)]
    pub window: usize,
    /// Compressor of the compression branch. Default: the paper's MLP.
    #[config(default = "CompressorKind::Mlp")]
    pub compressor: CompressorKind,
    /// Hidden width of the compressor MLP; `None` means the head dimension it compresses to
    /// (`d_k` for keys, `d_v` for values). Ignored for mean pooling. Default: `None`.
    #[config(default = "None")]
    pub compressor_hidden: Option<usize>,
    /// Independent K/V projections per branch (the paper's default) or one shared pair.
    #[config(default = "KvSharing::Independent")]
    pub kv_sharing: KvSharing,
    /// Hidden width of the gate MLP (`Linear -> SiLU -> Linear -> sigmoid`); `None` means a
    /// single linear layer before the sigmoid. Default: `None`.
    #[config(default = "None")]
    pub gate_hidden: Option<usize>,
    /// Softmax scale; `None` means `1 / sqrt(d_k)`. Default: `None`.
    #[config(default = "None")]
    pub softmax_scale: Option<f64>,
    /// Queries processed at once by the reference implementation; bounds its memory (see
    /// [`crate::reference`]). Default: 64.
    #[config(default = 64)]
    pub query_chunk: usize,
    /// Which kernels run on Burn's CubeCL backends: tensor-core where they can, else
    /// portable (`Auto`), or one of them forced. Default: `Auto`.
    #[config(default = "KernelStrategy::Auto")]
    pub kernel_strategy: KernelStrategy,
    /// Initializer of the projection, gate and compressor weights.
    #[config(
        default = "Initializer::KaimingUniform{gain: 1.0 / 3.0f64.sqrt(), fan_out_only: false}"
    )]
    pub initializer: Initializer,
}

/// The block-sparsity settings of the NSA attention operator ([`crate::nsa_attention`]):
/// everything the three branches need apart from the tensors.
#[derive(Config, Debug, Copy, PartialEq)]
pub struct NsaAttentionConfig {
    /// Compression block length `l`. Default: 32.
    #[config(default = 32)]
    pub compress_block: usize,
    /// Compression stride `d`. Default: 16.
    #[config(default = 16)]
    pub compress_stride: usize,
    /// Selection block length `l'`. Default: 64.
    #[config(default = 64)]
    pub select_block: usize,
    /// Selected blocks per query `n`, forced ones included. Default: 16.
    #[config(default = 16)]
    pub n_selected: usize,
    /// Forced leading blocks. Default: 1.
    #[config(default = 1)]
    pub n_initial_blocks: usize,
    /// Forced local blocks (the query's block and those before it). Default: 2.
    #[config(default = 2)]
    pub n_local_blocks: usize,
    /// Sliding window `w` (`w >= T`: the whole causal prefix). Default: 512.
    #[config(default = 512)]
    pub window: usize,
    /// Softmax scale; `None` means `1 / sqrt(d_k)`.
    #[config(default = "None")]
    pub softmax_scale: Option<f64>,
    /// Queries the reference processes at once. Default: 64.
    #[config(default = 64)]
    pub query_chunk: usize,
    /// Which kernels run on Burn's CubeCL backends: the tensor-core ones where the device,
    /// dtype and shapes allow, else the portable ones (`Auto`); or one of them forced
    /// (`TensorCore` panics with the reason where it cannot run). Ignored by the reference.
    /// Default: `Auto`.
    #[config(default = "KernelStrategy::Auto")]
    pub kernel_strategy: KernelStrategy,
}

/// An invalid [`NsaConfig`] or [`NsaAttentionConfig`]: names the field and the rule it breaks.
#[derive(Debug, Clone, PartialEq)]
pub enum NsaConfigError {
    /// A size that must be at least 1 is 0.
    Zero {
        /// The field.
        field: &'static str,
    },
    /// `divisor` must divide `dividend`.
    NotDivisible {
        /// Field that must be a multiple.
        dividend: &'static str,
        /// Its value.
        dividend_value: usize,
        /// Field that must divide it.
        divisor: &'static str,
        /// Its value.
        divisor_value: usize,
    },
    /// `compress_block` (l) is larger than `select_block` (l').
    CompressBlockExceedsSelectBlock {
        /// l
        compress_block: usize,
        /// l'
        select_block: usize,
    },
    /// The forced blocks do not fit into `n_selected`.
    ForcedBlocksExceedSelected {
        /// Forced initial blocks.
        n_initial_blocks: usize,
        /// Forced local blocks.
        n_local_blocks: usize,
        /// n
        n_selected: usize,
    },
    /// `softmax_scale` is not a finite positive number once rounded to f32 (the kernels'
    /// precision): NaN, infinite, at most 0, above `f32::MAX` or below the smallest f32.
    InvalidSoftmaxScale {
        /// The value given.
        value: f64,
    },
}

impl fmt::Display for NsaConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zero { field } => write!(f, "`{field}` must be at least 1, got 0"),
            Self::NotDivisible {
                dividend,
                dividend_value,
                divisor,
                divisor_value,
            } => write!(
                f,
                "`{divisor}` ({divisor_value}) must divide `{dividend}` ({dividend_value})"
            ),
            Self::CompressBlockExceedsSelectBlock {
                compress_block,
                select_block,
            } => write!(
                f,
                "`compress_block` ({compress_block}) must not exceed `select_block` ({select_block})"
            ),
            Self::ForcedBlocksExceedSelected {
                n_initial_blocks,
                n_local_blocks,
                n_selected,
            } => write!(
                f,
                "`n_initial_blocks` + `n_local_blocks` ({n_initial_blocks} + {n_local_blocks}) must not exceed `n_selected` ({n_selected})"
            ),
            Self::InvalidSoftmaxScale { value } => {
                write!(
                    f,
                    "`softmax_scale` must be finite and positive as an f32, got {value}"
                )
            }
        }
    }
}

impl std::error::Error for NsaConfigError {}

fn nonzero(field: &'static str, value: usize) -> Result<(), NsaConfigError> {
    if value == 0 {
        Err(NsaConfigError::Zero { field })
    } else {
        Ok(())
    }
}

fn divides(
    divisor: (&'static str, usize),
    dividend: (&'static str, usize),
) -> Result<(), NsaConfigError> {
    if dividend.1 % divisor.1 == 0 {
        Ok(())
    } else {
        Err(NsaConfigError::NotDivisible {
            dividend: dividend.0,
            dividend_value: dividend.1,
            divisor: divisor.0,
            divisor_value: divisor.1,
        })
    }
}

/// Compression blocks of length `block` every `stride` positions that fit in `seq_len`
/// positions: `floor((T - l) / d) + 1`, or 0 when `T < l`.
pub(crate) fn compressed_blocks(seq_len: usize, block: usize, stride: usize) -> usize {
    if seq_len < block {
        0
    } else {
        (seq_len - block) / stride + 1
    }
}

impl NsaAttentionConfig {
    /// Checks every rule of the spec: positive sizes, `d | l`, `d | l'`, `l <= l'`, forced
    /// blocks within `n` (their sum computed without overflow), a scale finite and positive
    /// in f32. A `window` of `T` or more keys is the whole causal prefix; any `usize` is
    /// valid.
    pub fn validate(&self) -> Result<(), NsaConfigError> {
        nonzero("compress_block", self.compress_block)?;
        nonzero("compress_stride", self.compress_stride)?;
        nonzero("select_block", self.select_block)?;
        nonzero("n_selected", self.n_selected)?;
        nonzero("window", self.window)?;
        nonzero("query_chunk", self.query_chunk)?;
        let stride = ("compress_stride", self.compress_stride);
        divides(stride, ("compress_block", self.compress_block))?;
        divides(stride, ("select_block", self.select_block))?;
        if self.compress_block > self.select_block {
            return Err(NsaConfigError::CompressBlockExceedsSelectBlock {
                compress_block: self.compress_block,
                select_block: self.select_block,
            });
        }
        let forced = self.n_initial_blocks.checked_add(self.n_local_blocks);
        if forced.is_none_or(|forced| forced > self.n_selected) {
            return Err(NsaConfigError::ForcedBlocksExceedSelected {
                n_initial_blocks: self.n_initial_blocks,
                n_local_blocks: self.n_local_blocks,
                n_selected: self.n_selected,
            });
        }
        if let Some(value) = self.softmax_scale {
            // The kernels compute in f32: the scale must stay finite and positive there.
            let single = value as f32;
            if !(single.is_finite() && single > 0.0) {
                return Err(NsaConfigError::InvalidSoftmaxScale { value });
            }
        }
        Ok(())
    }

    /// Number of compression blocks for `seq_len` keys: `floor((T - l) / d) + 1`, or 0 when
    /// `T < l`.
    pub fn num_compressed_blocks(&self, seq_len: usize) -> usize {
        compressed_blocks(seq_len, self.compress_block, self.compress_stride)
    }

    /// Number of selection blocks for `seq_len` keys: `ceil(T / l')`.
    pub fn num_selection_blocks(&self, seq_len: usize) -> usize {
        seq_len.div_ceil(self.select_block)
    }

    /// The softmax scale for head dimension `d_k`.
    pub fn scale(&self, d_k: usize) -> f64 {
        self.softmax_scale
            .unwrap_or_else(|| 1.0 / (d_k as f64).sqrt())
    }

    /// The keys the window branch reaches back over for a sequence of `seq_len` keys: `w`,
    /// or `T` when the window covers the whole causal prefix (equal results, and no index
    /// arithmetic on a huge `w`).
    pub fn window_span(&self, seq_len: usize) -> usize {
        self.window.min(seq_len)
    }

    /// What the `nsa-cubecl` kernels read of this configuration, for head dimension `d_k`
    /// and `seq_len` positions. A window of `T` or more keys goes to the kernels as
    /// `usize::MAX` (unbounded), so that every such window compiles to the one causal
    /// kernel and no 32-bit index arithmetic wraps.
    pub fn kernel_config(&self, d_k: usize, seq_len: usize) -> NsaKernelConfig {
        NsaKernelConfig {
            compress_block: self.compress_block,
            compress_stride: self.compress_stride,
            select_block: self.select_block,
            n_selected: self.n_selected,
            n_initial_blocks: self.n_initial_blocks,
            n_local_blocks: self.n_local_blocks,
            window: if self.window >= seq_len {
                usize::MAX
            } else {
                self.window
            },
            softmax_scale: self.scale(d_k) as f32,
            kernel_strategy: self.kernel_strategy,
        }
    }
}

impl NsaConfig {
    /// The attention operator's part of this configuration.
    pub fn attention_config(&self) -> NsaAttentionConfig {
        NsaAttentionConfig {
            compress_block: self.compress_block,
            compress_stride: self.compress_stride,
            select_block: self.select_block,
            n_selected: self.n_selected,
            n_initial_blocks: self.n_initial_blocks,
            n_local_blocks: self.n_local_blocks,
            window: self.window,
            softmax_scale: self.softmax_scale,
            query_chunk: self.query_chunk,
            kernel_strategy: self.kernel_strategy,
        }
    }

    /// Checks every rule: positive sizes, `n_kv_heads | n_heads`, and the attention rules of
    /// [`NsaAttentionConfig::validate`].
    pub fn validate(&self) -> Result<(), NsaConfigError> {
        nonzero("d_model", self.d_model)?;
        nonzero("n_heads", self.n_heads)?;
        nonzero("n_kv_heads", self.n_kv_heads)?;
        nonzero("d_k", self.d_k)?;
        nonzero("d_v", self.d_v)?;
        if let Some(hidden) = self.compressor_hidden {
            nonzero("compressor_hidden", hidden)?;
        }
        if let Some(hidden) = self.gate_hidden {
            nonzero("gate_hidden", hidden)?;
        }
        divides(("n_kv_heads", self.n_kv_heads), ("n_heads", self.n_heads))?;
        self.attention_config().validate()
    }
}
