//! Planning: which implementation runs a call, with which comptime tile, decided before
//! anything is launched.
//!
//! Every kernel has two implementations. The **tensor-core** path
//! ([`crate::tensor_core`]) needs m16n8k16 `mma` on the input type with f32 accumulation,
//! asynchronous copies, 32-lane planes, head dims that are multiples of 16 and enough
//! shared memory for its tiles; the **portable** path ([`crate::portable`]) runs everywhere.
//! A plan function takes the call's [`AttentionShape`] and [`NsaKernelConfig`] and returns
//! a plan (the path and its tile), or, when [`Strategy::TensorCore`] is asked for and
//! cannot run, a [`PlanError`] that says why. The launchers in [`crate::launch`] only
//! launch what a plan says.

mod portable;
mod tensor_core;

use portable::Limits;

use core::fmt;
use std::sync::OnceLock;

use cubecl::prelude::*;
use cubecl::CubeElement;
use serde::{Deserialize, Serialize};

use crate::common::keys::KeySet;
use crate::common::selection::SelectionConfig;
use crate::config::{AttentionShape, NsaKernelConfig};
use crate::portable::grad_key::KeyTileConfig;
use crate::portable::tile::TileConfig;
use crate::tensor_core::layout::MmaTileConfig;

pub use portable::PortableUnavailable;
pub use tensor_core::KeyGradSplit;

/// Environment variable that, when set, makes [`Strategy::Auto`] run the portable kernels
/// (to compare them with the tensor-core ones on the same device). Read once per process.
pub const PORTABLE_KERNELS_VAR: &str = "NSA_PORTABLE_KERNELS";

/// Which implementation of the kernels runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strategy {
    /// The tensor-core kernels where they can run the call, the portable ones elsewhere
    /// (always the portable ones when [`PORTABLE_KERNELS_VAR`] is set).
    #[default]
    Auto,
    /// The tensor-core kernels; planning fails with the reason where they cannot run.
    TensorCore,
    /// The portable kernels.
    Portable,
}

impl Strategy {
    /// `Auto` with [`PORTABLE_KERNELS_VAR`] set is `Portable`.
    fn resolved(self) -> Self {
        static PORTABLE_FROM_ENV: OnceLock<bool> = OnceLock::new();
        let from_env =
            *PORTABLE_FROM_ENV.get_or_init(|| std::env::var_os(PORTABLE_KERNELS_VAR).is_some());
        match self {
            Strategy::Auto if from_env => Strategy::Portable,
            other => other,
        }
    }
}

/// Why the tensor-core kernels cannot run a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorCoreUnavailable {
    /// The device has no m16n8k16 `mma` on the input type with f32 accumulation, or no
    /// asynchronous global-to-shared copies.
    NoMma {
        /// The input type.
        dtype: &'static str,
    },
    /// The device's planes are not 32 lanes wide.
    PlaneSize {
        /// Smallest plane size of the device.
        min: u32,
        /// Largest plane size of the device.
        max: u32,
    },
    /// A head dimension is not a multiple of 16.
    HeadDim {
        /// Query/key head dimension.
        d_k: usize,
        /// Value head dimension.
        d_v: usize,
    },
    /// The key-side backward kernel of the selection branch needs `select_block` to be a
    /// multiple of 16.
    SelectBlock {
        /// `l'`.
        select_block: usize,
    },
    /// One query group needs more units than a cube may hold (a plane per 16 query heads).
    UnitsPerCube {
        /// Units the smallest cube needs.
        needed: usize,
        /// Units a cube may hold on the device.
        max: usize,
    },
    /// The queries sit at an offset into a longer key sequence (a cache's prefill or
    /// decoding step): only the portable kernels take such calls.
    QueriesAtOffset {
        /// Position of the first query.
        query_start: usize,
    },
    /// The smallest tile does not fit the device's shared memory.
    SharedMemory {
        /// Bytes the smallest tile needs.
        needed: usize,
        /// Bytes a cube may use on the device.
        available: usize,
    },
}

impl fmt::Display for TensorCoreUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMma { dtype } => write!(
                f,
                "the device has no m16n8k16 mma on {dtype} with f32 accumulation and asynchronous copies"
            ),
            Self::PlaneSize { min, max } => {
                write!(f, "the device's planes are {min}-{max} lanes wide, not 32")
            }
            Self::HeadDim { d_k, d_v } => {
                write!(f, "head dims d_k = {d_k}, d_v = {d_v} are not multiples of 16")
            }
            Self::SelectBlock { select_block } => write!(
                f,
                "select_block = {select_block} is not a multiple of 16 (key-side backward)"
            ),
            Self::UnitsPerCube { needed, max } => write!(
                f,
                "a cube needs {needed} units (a plane per 16 query heads of a group), the device allows {max}"
            ),
            Self::QueriesAtOffset { query_start } => write!(
                f,
                "the queries start at position {query_start} of the keys, and the tensor-core kernels take causal self-attention only"
            ),
            Self::SharedMemory { needed, available } => write!(
                f,
                "the smallest tile needs {needed} bytes of shared memory, the device has {available}"
            ),
        }
    }
}

/// A plan that cannot be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// [`Strategy::TensorCore`] was asked for, and the tensor-core kernels cannot run the
    /// call.
    TensorCoreUnavailable(TensorCoreUnavailable),
    /// [`Strategy::Portable`] was asked for, or [`Strategy::Auto`] found the tensor-core
    /// kernels unable to run the call (`tensor_core` says why; `None` when the portable
    /// kernels were asked for), and the portable kernels cannot run it either.
    PortableUnavailable {
        /// Why the portable kernels cannot run the call.
        portable: PortableUnavailable,
        /// Why the tensor-core kernels cannot, when they were tried.
        tensor_core: Option<TensorCoreUnavailable>,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TensorCoreUnavailable(why) => {
                write!(
                    f,
                    "NSA kernels: the tensor-core path cannot run this call: {why}"
                )
            }
            Self::PortableUnavailable {
                portable,
                tensor_core,
            } => {
                write!(
                    f,
                    "NSA kernels: no path can run this call: the portable kernels: {portable}"
                )?;
                match tensor_core {
                    Some(why) => write!(f, "; the tensor-core kernels: {why}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl std::error::Error for PlanError {}

/// The implementation a plan chose, with its comptime tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path<T, P> {
    /// The tensor-core kernel and its tile.
    TensorCore(T),
    /// The portable kernel and its tile.
    Portable(P),
}

impl<T, P> Path<T, P> {
    /// Whether the tensor-core kernel runs.
    pub fn is_tensor_core(&self) -> bool {
        matches!(self, Path::TensorCore(_))
    }
}

/// Chooses the path for `strategy`: the tensor-core tile from `tensor_core` unless the
/// portable kernels are asked for, or it has none and the strategy allows the portable
/// path; an error naming each path's reason when none can run.
fn choose<T, P>(
    strategy: Strategy,
    tensor_core: impl FnOnce() -> Result<T, TensorCoreUnavailable>,
    portable: impl FnOnce() -> Result<P, PortableUnavailable>,
) -> Result<Path<T, P>, PlanError> {
    let portable_or = |tensor_core| {
        portable()
            .map(Path::Portable)
            .map_err(|portable| PlanError::PortableUnavailable {
                portable,
                tensor_core,
            })
    };
    match strategy.resolved() {
        Strategy::Portable => portable_or(None),
        Strategy::TensorCore => tensor_core()
            .map(Path::TensorCore)
            .map_err(PlanError::TensorCoreUnavailable),
        Strategy::Auto => match tensor_core() {
            Ok(tile) => Ok(Path::TensorCore(tile)),
            Err(why) => portable_or(Some(why)),
        },
    }
}

/// The attention of one branch over its keys: the sliding window, the compression branch's
/// attention pass, or the selection branch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionPlan {
    /// The call's sizes.
    pub shape: AttentionShape,
    /// Which keys each query attends.
    pub keys: KeySet,
    /// Rows of the branch's keys and values (`query_start + T`, or `N_cmp` for the
    /// compression branch).
    pub key_rows: usize,
    /// Softmax scale.
    pub scale: f32,
    /// The kernel and its tile.
    pub path: Path<MmaTileConfig, TileConfig>,
    /// Parts the keys of each query row are split into, each on its own cube (1: none; more
    /// only on the portable path, when the call has too few query rows to fill the device,
    /// as in a decoding step).
    pub splits: usize,
}

/// The selection branch's forward kernel on tensor cores, which can also finish the gated
/// sum (Eq. 5) in its epilogue; from [`AttentionPlan::gated_sum`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GatedSelectionPlan {
    pub(crate) attention: AttentionPlan,
    pub(crate) tile: MmaTileConfig,
}

/// `[S * B, T, H, d_v]` and `[S * B, H, T]`, f32: the parts' outputs and log-sum-exps of a
/// call whose keys are split into `S = splits` parts; `None` when nothing is split.
fn split_shapes(shape: &AttentionShape, splits: usize) -> Option<([usize; 4], [usize; 3])> {
    let rows = splits * shape.batch;
    (splits > 1).then_some((
        [rows, shape.seq, shape.heads, shape.d_v],
        [rows, shape.heads, shape.seq],
    ))
}

impl AttentionPlan {
    /// The buffers of the parts' outputs and log-sum-exps, f32
    /// (`[S * B, T, H, d_v]`, `[S * B, H, T]`), when the keys are split; `None` otherwise.
    pub fn split_shapes(&self) -> Option<([usize; 4], [usize; 3])> {
        split_shapes(&self.shape, self.splits)
    }

    /// The plan of the selection kernel that also sums the three branches, when the
    /// tensor-core path runs the selection branch; `None` on the portable path (there the
    /// selection and the gated sum are two launches).
    pub fn gated_sum(&self) -> Option<GatedSelectionPlan> {
        match (self.keys, self.path) {
            (KeySet::Selected { .. }, Path::TensorCore(tile)) => Some(GatedSelectionPlan {
                attention: *self,
                tile,
            }),
            _ => None,
        }
    }
}

/// The tensor-core tiles of the compression branch's two passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedTiles {
    /// The attention pass (outputs and log-sum-exp).
    pub attention: MmaTileConfig,
    /// The scoring pass and top-n.
    pub scoring: MmaTileConfig,
}

/// The compression branch's forward: attention over the compressed keys, block scoring and
/// top-n; on tensor cores an attention pass and a scoring pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompressedPlan {
    /// The call's sizes.
    pub shape: AttentionShape,
    /// Compressed keys, `N_cmp`.
    pub key_rows: usize,
    /// Softmax scale.
    pub scale: f32,
    /// Block sizes and counts of the selection.
    pub selection: SelectionConfig,
    /// The kernels and their tiles.
    pub path: Path<CompressedTiles, TileConfig>,
    /// Parts the compressed keys of each query row are split into (see
    /// [`AttentionPlan::splits`]); with more than one the attention runs split and merged,
    /// and the scoring and top-n after it, from the merged log-sum-exp.
    pub splits: usize,
}

impl CompressedPlan {
    /// The attention pass on tensor cores with `tile`, or on the portable tile split into
    /// [`Self::splits`] parts.
    pub(crate) fn attention_pass(&self, path: Path<MmaTileConfig, TileConfig>) -> AttentionPlan {
        AttentionPlan {
            shape: self.shape,
            keys: self.selection.key_set(),
            key_rows: self.key_rows,
            scale: self.scale,
            path,
            splits: self.splits,
        }
    }

    /// As [`AttentionPlan::split_shapes`].
    pub fn split_shapes(&self) -> Option<([usize; 4], [usize; 3])> {
        split_shapes(&self.shape, self.splits)
    }
}

/// The backward pass of one branch: `delta = rowsum(dO * O)`, the query side (`dQ`), for
/// the selection branch the selection inverted into a bitmap, and the key side (`dK`,
/// `dV`, split over query ranges where long key tiles would serialise).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BranchBackwardPlan {
    /// The query side, which walks the keys as the forward kernel does.
    pub query: AttentionPlan,
    /// The key side.
    pub key: Path<(MmaTileConfig, KeyGradSplit), KeyTileConfig>,
}

impl BranchBackwardPlan {
    /// `[B, T, H]`: `delta`, f32.
    pub fn delta_shape(&self) -> [usize; 3] {
        let shape = &self.query.shape;
        [shape.batch, shape.seq, shape.heads]
    }

    /// `[B, H_kv, ceil(T / l'), ceil(T / 32)]`: the selection bitmap, in the selection's
    /// Int type; `None` for the branches that select nothing.
    pub fn bitmap_shape(&self) -> Option<[usize; 4]> {
        let shape = &self.query.shape;
        match self.query.keys {
            KeySet::Selected { block } => Some([
                shape.batch,
                shape.kv_heads,
                shape.seq.div_ceil(block),
                shape.seq.div_ceil(crate::common::bitmap::WORD_BITS),
            ]),
            _ => None,
        }
    }

    /// `[splits * B, split keys, H_kv, d_k + d_v]`: the key side's partial sums, f32;
    /// `None` when nothing is split.
    pub fn partial_shape(&self) -> Option<[usize; 4]> {
        match self.key {
            Path::TensorCore((_, split)) => split.buffer_shape(&self.query.shape),
            Path::Portable(_) => None,
        }
    }
}

/// The sliding-window branch's forward (and its query-side backward walk).
pub fn plan_window<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: AttentionShape,
    config: &NsaKernelConfig,
) -> Result<AttentionPlan, PlanError> {
    let keys = config.window_keys();
    let limits = Limits::of(client);
    let path = choose(
        config.kernel_strategy,
        || tensor_core::forward_tile::<R, F>(client, &shape, tensor_core::WINDOW_ROWS),
        || portable::tile_config(limits, &shape, None, TileConfig::shared_words),
    )?;
    // Each query attends at most `w` keys, in tiles.
    let keys_per_row = config.window.min(shape.key_len());
    let splits = portable::key_splits(limits, &shape, &path, |tile| {
        keys_per_row.div_ceil(tile.tile_keys)
    });
    Ok(AttentionPlan {
        shape,
        keys,
        key_rows: shape.key_len(),
        scale: config.softmax_scale,
        path,
        splits,
    })
}

/// The selection branch's forward.
pub fn plan_selected<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: AttentionShape,
    config: &NsaKernelConfig,
) -> Result<AttentionPlan, PlanError> {
    let limits = Limits::of(client);
    let path = choose(
        config.kernel_strategy,
        || tensor_core::selection_tile::<R, F>(client, &shape),
        || {
            let divides = Some(config.select_block);
            portable::tile_config(limits, &shape, divides, TileConfig::shared_words)
        },
    )?;
    // The parts share out the `n` selected blocks.
    let splits = portable::key_splits(limits, &shape, &path, |_| config.n_selected);
    Ok(AttentionPlan {
        shape,
        keys: config.selected_keys(),
        key_rows: shape.key_len(),
        scale: config.softmax_scale,
        path,
        splits,
    })
}

/// The compression branch's forward over `num_compressed` compressed keys.
pub fn plan_compressed<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: AttentionShape,
    num_compressed: usize,
    config: &NsaKernelConfig,
) -> Result<CompressedPlan, PlanError> {
    let selection = config.selection(shape.key_len());
    let limits = Limits::of(client);
    let path = choose(
        config.kernel_strategy,
        || tensor_core::compressed_tiles::<R, F>(client, &shape, &selection),
        || portable::compressed_tile(limits, &shape, &selection),
    )?;
    let splits = portable::key_splits(limits, &shape, &path, |tile| {
        num_compressed.div_ceil(tile.tile_keys)
    });
    Ok(CompressedPlan {
        shape,
        key_rows: num_compressed,
        scale: config.softmax_scale,
        selection,
        path,
        splits,
    })
}

/// The backward pass of the branch whose attention pattern is `keys`, over `key_rows` key
/// rows.
pub fn plan_branch_backward<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: AttentionShape,
    key_rows: usize,
    keys: KeySet,
    config: &NsaKernelConfig,
) -> Result<BranchBackwardPlan, PlanError> {
    let query = choose(
        config.kernel_strategy,
        || tensor_core::grad_query_tile::<R, F>(client, &shape, keys),
        || portable::grad_query_tile(Limits::of(client), &shape, keys),
    )?;
    let key = choose(
        config.kernel_strategy,
        || {
            let tile = tensor_core::key_tile::<R, F>(client, &shape, keys)?;
            let split =
                tensor_core::key_grad_split(&shape, key_rows, keys, config.n_initial_blocks);
            Ok((tile, split))
        },
        || portable::key_tile_config(Limits::of(client), &shape, keys),
    )?;
    Ok(BranchBackwardPlan {
        query: AttentionPlan {
            shape,
            keys,
            key_rows,
            scale: config.softmax_scale,
            path: query,
            splits: 1,
        },
        key,
    })
}

/// Every plan of one operator call, forward and backward, made before anything is
/// launched: which path each kernel takes, or the device limit that no path fits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CallPlan {
    /// The compression branch's forward; `None` when there are no compressed keys.
    pub compressed: Option<CompressedPlan>,
    /// The selection branch's forward.
    pub selected: AttentionPlan,
    /// The sliding-window branch's forward.
    pub window: AttentionPlan,
    /// The compression branch's backward; `None` when there are no compressed keys.
    pub compressed_backward: Option<BranchBackwardPlan>,
    /// The selection branch's backward.
    pub selected_backward: BranchBackwardPlan,
    /// The sliding-window branch's backward.
    pub window_backward: BranchBackwardPlan,
}

/// Plans every kernel of an operator call on `shape` with `num_compressed` compressed keys
/// (0 when `T_k < l`), forward and backward, in the input type `F`. Queries at an offset
/// (`shape.query_start > 0`) take the portable kernels, and only their forward pass runs
/// (their backward plans are those of the portable kernels, which `Autodiff` never calls
/// for such calls: it differentiates the reference instead).
pub fn plan_call<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: AttentionShape,
    num_compressed: usize,
    config: &NsaKernelConfig,
) -> Result<CallPlan, PlanError> {
    let backward =
        |key_rows, keys| plan_branch_backward::<R, F>(client, shape, key_rows, keys, config);
    let has_compressed = num_compressed > 0;
    Ok(CallPlan {
        compressed: has_compressed
            .then(|| plan_compressed::<R, F>(client, shape, num_compressed, config))
            .transpose()?,
        selected: plan_selected::<R, F>(client, shape, config)?,
        window: plan_window::<R, F>(client, shape, config)?,
        compressed_backward: has_compressed
            .then(|| backward(num_compressed, config.compressed_keys()))
            .transpose()?,
        selected_backward: backward(shape.key_len(), config.selected_keys())?,
        window_backward: backward(shape.key_len(), config.window_keys())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_tensor_cores() -> Result<u32, TensorCoreUnavailable> {
        Err(TensorCoreUnavailable::HeadDim { d_k: 24, d_v: 24 })
    }

    #[test]
    fn auto_takes_tensor_cores_where_they_fit_else_portable() {
        assert_eq!(
            choose(Strategy::Auto, || Ok(1u32), || Ok(2u8)),
            Ok(Path::TensorCore(1))
        );
        assert_eq!(
            choose(Strategy::Auto, no_tensor_cores, || Ok(2u8)),
            Ok(Path::Portable(2))
        );
    }

    #[test]
    fn when_no_path_fits_the_error_names_each_reason() {
        let too_big = PortableUnavailable::UnitsPerCube {
            needed: 512,
            max: 256,
        };
        let none = choose(Strategy::Auto, no_tensor_cores, || -> Result<u8, _> {
            Err(too_big.clone())
        });
        assert_eq!(
            none,
            Err(PlanError::PortableUnavailable {
                portable: too_big.clone(),
                tensor_core: Some(TensorCoreUnavailable::HeadDim { d_k: 24, d_v: 24 }),
            })
        );
        let message = none.unwrap_err().to_string();
        assert!(
            message.contains("512 units") && message.contains("d_k = 24"),
            "{message}"
        );
        let forced = choose(
            Strategy::Portable,
            || Ok(1u32),
            || -> Result<u8, _> { Err(too_big.clone()) },
        );
        assert_eq!(
            forced,
            Err(PlanError::PortableUnavailable {
                portable: too_big,
                tensor_core: None,
            })
        );
    }

    #[test]
    fn a_forced_strategy_runs_its_path_or_says_why_not() {
        let forced = choose(Strategy::TensorCore, no_tensor_cores, || Ok(2u8));
        assert_eq!(
            forced,
            Err(PlanError::TensorCoreUnavailable(
                TensorCoreUnavailable::HeadDim { d_k: 24, d_v: 24 }
            ))
        );
        let message = forced.unwrap_err().to_string();
        assert!(message.contains("d_k = 24"), "{message}");
        let portable = choose(
            Strategy::Portable,
            || -> Result<u32, _> { panic!("not asked") },
            || Ok(2u8),
        );
        assert_eq!(portable, Ok(Path::Portable(2)));
    }

    #[test]
    fn only_long_sequences_split_the_keys_every_query_sees() {
        let shape = |seq| AttentionShape {
            batch: 2,
            seq,
            heads: 64,
            kv_heads: 4,
            d_k: 128,
            d_v: 64,
            query_start: 0,
        };
        let compressed = KeySet::Compressed {
            block: 32,
            stride: 16,
        };
        let short = tensor_core::key_grad_split(&shape(2048), 127, compressed, 1);
        assert_eq!(short.keys, 0);
        assert_eq!(short.buffer_shape(&shape(2048)), None);
        let window =
            tensor_core::key_grad_split(&shape(65536), 65536, KeySet::Window { size: 512 }, 1);
        assert_eq!(window.keys, 0);
        let long = tensor_core::key_grad_split(&shape(65536), 4095, compressed, 1);
        assert_eq!((long.splits, long.positions, long.keys), (16, 4096, 4095));
        assert_eq!(long.buffer_shape(&shape(65536)), Some([32, 4095, 4, 192]));
        let selected = KeySet::Selected { block: 64 };
        let initial = tensor_core::key_grad_split(&shape(65536), 65536, selected, 1);
        assert_eq!(initial.keys, 64);
    }
}
