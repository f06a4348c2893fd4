//! Tile policy of the tensor-core kernels: whether the device and the call allow them, and
//! the cube and tile sizes each kernel takes (measured on the H100; docs/design-notes.md).

use cubecl::features::MmaConfig;
use cubecl::prelude::*;
use cubecl::CubeElement;

use super::{CompressedTiles, TensorCoreUnavailable};
use crate::common::keys::KeySet;
use crate::common::selection::SelectionConfig;
use crate::config::AttentionShape;
use crate::tensor_core::layout::{MmaTileConfig, MMA, PLANE};
use crate::tensor_core::scores::ScoreSegments;
use crate::tensor_core::select::selection_input_elems;

/// Key rows per tile of the tensor-core kernels.
const MMA_TILE_KEYS: usize = 32;

/// Query rows a forward tensor-core cube of the window branch aims at. Three planes, not
/// four: the kernel takes 167-168 registers per unit, and an H100 scheduler holds three
/// warps only at 168 or fewer (two above). With four planes the window forward took 8.2 ms
/// at 64k instead of 6.7.
pub(super) const WINDOW_ROWS: usize = 48;

/// Query rows a cube of the compression branch's attention pass aims at: four planes, so
/// each key tile serves more rows than with three (64k: 31.9 ms for the branch against
/// 33.2 with three planes, 35.4 with five and 32.6 with six).
const COMPRESSED_ROWS: usize = 64;

/// Query rows and key rows per tile of the compression branch's scoring pass: it holds no
/// output accumulators (94 registers), so its cubes are larger and its tiles longer than
/// the attention passes'; 64k: 31.9 ms for the branch against 35.4 with 48 rows of 32-key
/// tiles.
const SCORING_ROWS: usize = 128;
const SCORING_TILE_KEYS: usize = 64;

/// Query positions a selection-forward tensor-core cube holds (when `G` is a multiple of
/// 16): neighbouring positions load the blocks they took in the same slot (the forced
/// initial and local ones) once. On the H100 at 64k the selection forward took 26.3 ms with
/// one position, 25.1 with two, 24.7 with four and 35.6 with eight.
const SELECT_POSITIONS: usize = 4;

/// Query rows a `dQ` tensor-core cube of the window and compression branches aims at: four
/// planes measured faster than three there.
const GRAD_QUERY_ROWS: usize = 64;

/// Query positions per copy of a split key tile, at least.
const MIN_SPLIT_POSITIONS: usize = 2048;

/// Copies a split key tile runs in, at most (bounds the partial-sum buffer).
const MAX_SPLITS: usize = 16;

/// Whether the device runs the tensor-core kernels on `F` for `shape`: manual m16n8k16
/// `mma` on `F` with f32 accumulation, asynchronous global-to-shared copies, 32-lane
/// planes, head dims that are multiples of 16, queries not at an offset.
fn device_fits<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
) -> Result<(), TensorCoreUnavailable> {
    let properties = client.properties();
    let elem = F::as_type_native_unchecked().storage_type();
    let config = MmaConfig {
        a_type: elem,
        b_type: elem,
        cd_type: f32::as_type_native_unchecked().storage_type(),
        m: MMA as u32,
        n: (MMA / 2) as u32,
        k: MMA as u32,
    };
    if !(properties.features.matmul.mma.contains(&config) && properties.features.copy_async) {
        return Err(TensorCoreUnavailable::NoMma {
            dtype: core::any::type_name::<F>(),
        });
    }
    let hardware = &properties.hardware;
    if hardware.plane_size_min != PLANE as u32 || hardware.plane_size_max != PLANE as u32 {
        return Err(TensorCoreUnavailable::PlaneSize {
            min: hardware.plane_size_min,
            max: hardware.plane_size_max,
        });
    }
    if !shape.d_k.is_multiple_of(MMA) || !shape.d_v.is_multiple_of(MMA) {
        return Err(TensorCoreUnavailable::HeadDim {
            d_k: shape.d_k,
            d_v: shape.d_v,
        });
    }
    if shape.query_start > 0 {
        return Err(TensorCoreUnavailable::QueriesAtOffset {
            query_start: shape.query_start,
        });
    }
    Ok(())
}

/// The tensor-core tile for `shape` whose units and shared memory, `bytes(&tile)`, fit the
/// device. With `cube_rows` `None` a cube holds one query position (the selection branch);
/// with `Some(rows)` as many positions as fill `rows` rows (at least one plane per
/// position), fewer if the device's units per cube or its memory are short. Key tiles hold `tile_keys` rows (a multiple of 16).
fn mma_tile_config<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    cube_rows: Option<usize>,
    tile_keys: usize,
    bytes: impl Fn(&MmaTileConfig) -> usize,
) -> Result<MmaTileConfig, TensorCoreUnavailable> {
    device_fits::<R, F>(client, shape)?;
    let hardware = &client.properties().hardware;
    let available = hardware.max_shared_memory_size;
    let max_planes = hardware.max_units_per_cube as usize / PLANE;
    let group = shape.group();
    let min_planes = group.div_ceil(MMA);
    if min_planes > max_planes {
        return Err(TensorCoreUnavailable::UnitsPerCube {
            needed: min_planes * PLANE,
            max: max_planes * PLANE,
        });
    }
    // A one-position cube loads its own tiles: on the H100 a second plane sharing the loads
    // was slower, since it halves the cubes an SM holds.
    let one_position = cube_rows.is_none();
    let mut planes = cube_rows
        .map_or(min_planes, |rows| min_planes.max(rows / MMA))
        .min(max_planes);
    loop {
        let cfg = MmaTileConfig {
            group,
            d_k: shape.d_k,
            d_v: shape.d_v,
            tile_keys,
            planes,
            positions: if one_position {
                1
            } else {
                planes * MMA / group
            },
        };
        let needed = bytes(&cfg);
        if needed <= available {
            return Ok(cfg);
        }
        if planes == min_planes {
            return Err(TensorCoreUnavailable::SharedMemory { needed, available });
        }
        planes -= 1;
    }
}

/// Input bytes of a tile in `F`.
fn input_bytes<F>(cfg: &MmaTileConfig) -> usize {
    cfg.input_bytes(core::mem::size_of::<F>())
}

/// A forward (or `dQ`) cube of `rows` query rows over 32-key tiles.
pub(super) fn forward_tile<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    rows: usize,
) -> Result<MmaTileConfig, TensorCoreUnavailable> {
    mma_tile_config::<R, F>(client, shape, Some(rows), MMA_TILE_KEYS, input_bytes::<F>)
}

/// The selection forward's tile: [`SELECT_POSITIONS`] positions per cube when the group
/// fills whole planes (`G` a multiple of 16) and their tiles fit, else one.
pub(super) fn selection_tile<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
) -> Result<MmaTileConfig, TensorCoreUnavailable> {
    let bytes = |c: &MmaTileConfig| core::mem::size_of::<F>() * selection_input_elems(c);
    let group = shape.group();
    if group.is_multiple_of(MMA) {
        let rows = SELECT_POSITIONS * group;
        let cfg = mma_tile_config::<R, F>(client, shape, Some(rows), MMA_TILE_KEYS, bytes);
        if let Some(cfg) = cfg.ok().filter(|c| c.positions == SELECT_POSITIONS) {
            return Ok(cfg);
        }
    }
    mma_tile_config::<R, F>(client, shape, None, MMA_TILE_KEYS, bytes)
}

/// The compression branch's attention-pass and scoring-pass tiles.
pub(super) fn compressed_tiles<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    selection: &SelectionConfig,
) -> Result<CompressedTiles, TensorCoreUnavailable> {
    let attention = forward_tile::<R, F>(client, shape, COMPRESSED_ROWS)?;
    let max_blocks = selection.max_blocks;
    let bytes = |tile: &MmaTileConfig| {
        input_bytes::<F>(tile) + ScoreSegments::shared_bytes(tile, max_blocks)
    };
    let scoring =
        mma_tile_config::<R, F>(client, shape, Some(SCORING_ROWS), SCORING_TILE_KEYS, bytes)?;
    Ok(CompressedTiles { attention, scoring })
}

/// The `dQ` tile of the branch with pattern `keys`: as the forward cubes, one position per
/// cube for the selection branch.
pub(super) fn grad_query_tile<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    keys: KeySet,
) -> Result<MmaTileConfig, TensorCoreUnavailable> {
    let cube_rows = (!keys.is_selected()).then_some(GRAD_QUERY_ROWS);
    mma_tile_config::<R, F>(client, shape, cube_rows, MMA_TILE_KEYS, input_bytes::<F>)
}

/// The key-side cube (see [`crate::tensor_core::grad_key`]): 64 key rows (for the
/// selection branch the largest of 64, 32, 16 dividing `l'`) and 32 query rows per step,
/// if its shared memory fits.
pub(super) fn key_tile<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    keys: KeySet,
) -> Result<MmaTileConfig, TensorCoreUnavailable> {
    device_fits::<R, F>(client, shape)?;
    let key_rows = if keys.is_selected() {
        let block = keys.select_block();
        [64, 32, 16]
            .into_iter()
            .find(|rows| block.is_multiple_of(*rows))
            .ok_or(TensorCoreUnavailable::SelectBlock {
                select_block: block,
            })?
    } else {
        64
    };
    let cfg = MmaTileConfig {
        group: shape.group(),
        d_k: shape.d_k,
        d_v: shape.d_v,
        tile_keys: MMA_TILE_KEYS,
        planes: key_rows / MMA,
        positions: 1,
    };
    let elem = core::mem::size_of::<F>();
    let own_rows = key_rows * (cfg.key_stride() + cfg.value_stride());
    let needed =
        cfg.input_bytes(elem) + elem * own_rows + 4 * (3 * cfg.tile_keys + 2 * cfg.units());
    let available = client.properties().hardware.max_shared_memory_size;
    if needed > available {
        return Err(TensorCoreUnavailable::SharedMemory { needed, available });
    }
    Ok(cfg)
}

/// How the tensor-core key-side backward splits the queries of the key rows that every
/// later query may see (see [`crate::tensor_core::grad_key`]): key rows `0..keys` run in
/// `splits` copies of `positions` query positions each, whose sums go through an f32
/// buffer of [`KeyGradSplit::buffer_shape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyGradSplit {
    /// Copies of each split key tile (1: nothing split).
    pub splits: usize,
    /// Query positions per copy.
    pub positions: usize,
    /// Split key rows, `0..keys` (0: nothing split).
    pub keys: usize,
}

impl KeyGradSplit {
    /// `[splits * B, keys, H_kv, d_k + d_v]`, or `None` when nothing is split.
    pub fn buffer_shape(&self, shape: &AttentionShape) -> Option<[usize; 4]> {
        (self.keys > 0).then_some([
            self.splits * shape.batch,
            self.keys,
            shape.kv_heads,
            shape.d_k + shape.d_v,
        ])
    }
}

/// The split for the key-side backward of `shape` over `key_rows` key rows: every
/// compressed key and the first `initial_blocks` selection blocks (which all later queries
/// see or select) are split when `T` exceeds [`MIN_SPLIT_POSITIONS`], in at most
/// [`MAX_SPLITS`] copies; nothing otherwise.
pub(super) fn key_grad_split(
    shape: &AttentionShape,
    key_rows: usize,
    keys: KeySet,
    initial_blocks: usize,
) -> KeyGradSplit {
    let split_keys = match keys {
        KeySet::Compressed { .. } => key_rows,
        KeySet::Selected { block } => (initial_blocks * block).min(key_rows),
        KeySet::Window { .. } => 0,
    };
    if shape.seq <= MIN_SPLIT_POSITIONS || split_keys == 0 {
        return KeyGradSplit {
            splits: 1,
            positions: shape.seq,
            keys: 0,
        };
    }
    let positions = MIN_SPLIT_POSITIONS.max(shape.seq.div_ceil(MAX_SPLITS));
    KeyGradSplit {
        splits: shape.seq.div_ceil(positions),
        positions,
        keys: split_keys,
    }
}
