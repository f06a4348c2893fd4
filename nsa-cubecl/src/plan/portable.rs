//! Tile policy of the portable kernels: units per cube and the key rows per tile whose
//! shared memory fits the device, or the limit that nothing fits.

use core::fmt;

use cubecl::prelude::*;

use super::Path;
use crate::common::keys::KeySet;
use crate::common::selection::SelectionConfig;
use crate::config::AttentionShape;
use crate::portable::grad_key::KeyTileConfig;
use crate::portable::tile::TileConfig;

/// Units a cube may hold for one query group, at most.
const MAX_UNITS: usize = 128;

/// Cubes that keep a device busy when it does not say how many multiprocessors it has.
const DEFAULT_BUSY_CUBES: usize = 64;

/// Parts a query row's keys are split into, at most: bounds the parts' buffers and the
/// merge's loop.
const MAX_KEY_SPLITS: usize = 32;

/// Units of the key-side backward cube, at least.
const KEY_GRAD_UNITS: usize = 128;

/// Outputs each unit of the key-side cube accumulates per key-row dimension, at most
/// ([`KeyTileConfig::width`]): wider tiles get more units instead. Mesa lavapipe sums
/// this kernel's per-unit arrays of 16 wrongly (the compression and selection branches of
/// a `d_v = 128` case) and those of 8 correctly.
const KEY_GRAD_WIDTH: usize = 8;

/// The device limits a portable tile must fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Limits {
    /// Bytes of shared memory a cube may use.
    pub shared_bytes: usize,
    /// Units a cube may hold.
    pub max_units: usize,
    /// Cubes that keep the device busy: two per streaming multiprocessor where the device
    /// says how many it has, [`DEFAULT_BUSY_CUBES`] otherwise.
    pub busy_cubes: usize,
}

impl Limits {
    pub fn of<R: Runtime>(client: &ComputeClient<R>) -> Self {
        let hardware = &client.properties().hardware;
        Self {
            shared_bytes: hardware.max_shared_memory_size,
            max_units: hardware.max_units_per_cube as usize,
            busy_cubes: hardware
                .num_streaming_multiprocessors
                .map_or(DEFAULT_BUSY_CUBES, |sms| 2 * sms as usize),
        }
    }

    /// An error unless `units` fit one cube.
    fn check_units(&self, units: usize) -> Result<(), PortableUnavailable> {
        if units <= self.max_units {
            Ok(())
        } else {
            Err(PortableUnavailable::UnitsPerCube {
                needed: units,
                max: self.max_units,
            })
        }
    }

    /// An error unless `words` f32 words of shared memory fit one cube.
    fn check_shared(&self, words: usize) -> Result<(), PortableUnavailable> {
        if words * 4 <= self.shared_bytes {
            Ok(())
        } else {
            Err(PortableUnavailable::SharedMemory {
                needed: words * 4,
                available: self.shared_bytes,
            })
        }
    }
}

/// Why the portable kernels cannot run a call on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortableUnavailable {
    /// A cube needs more units than the device allows (the portable kernels give each query
    /// head of a group, `G` of them, at least one unit of one cube).
    UnitsPerCube {
        /// Units the smallest cube needs.
        needed: usize,
        /// Units a cube may hold on the device.
        max: usize,
    },
    /// The smallest tile needs more shared memory than a cube may use (the compression
    /// branch's block scores grow with `T / l'`).
    SharedMemory {
        /// Bytes the smallest tile needs.
        needed: usize,
        /// Bytes a cube may use on the device.
        available: usize,
    },
}

impl fmt::Display for PortableUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnitsPerCube { needed, max } => write!(
                f,
                "a cube needs {needed} units (one per query head of a group at least), the device allows {max}"
            ),
            Self::SharedMemory { needed, available } => write!(
                f,
                "the smallest tile needs {needed} bytes of shared memory, the device has {available}"
            ),
        }
    }
}

/// The tile for `shape` within `limits`: `G * parts` units (`parts` the largest power of
/// two keeping the cube within [`MAX_UNITS`] and `d_v`), and the largest power-of-two number
/// of key rows, at most 32 and dividing `divides` when given, for which the kernel's
/// shared memory (`words(&tile)` f32 words) fits; an error when even one key row does not
/// fit, or the group alone needs more units than a cube holds.
pub(super) fn tile_config(
    limits: Limits,
    shape: &AttentionShape,
    divides: Option<usize>,
    words: impl Fn(&TileConfig) -> usize,
) -> Result<TileConfig, PortableUnavailable> {
    let group = shape.group();
    limits.check_units(group)?;
    let mut parts = 1;
    while group * parts * 2 <= MAX_UNITS && parts * 2 <= shape.d_v {
        parts *= 2;
    }
    let mut tile_keys = 32;
    loop {
        let cfg = TileConfig {
            group,
            d_k: shape.d_k,
            d_v: shape.d_v,
            tile_keys,
            parts,
        };
        let fits = limits.check_shared(words(&cfg));
        if tile_keys == 1 {
            return fits.map(|()| cfg);
        }
        if fits.is_ok() && divides.is_none_or(|d| d % tile_keys == 0) {
            return Ok(cfg);
        }
        tile_keys /= 2;
    }
}

/// Parts to split each query row's keys into on the portable `path`: 1 when the call's
/// `B * H_kv * T` cubes already keep the device busy or the tensor-core path runs, else
/// enough parts for [`Limits::busy_cubes`] cubes, at most [`MAX_KEY_SPLITS`] and at most
/// `parts(tile)`, the parts a row's keys can be cut into (whole key tiles, or selected
/// blocks).
pub(super) fn key_splits<T>(
    limits: Limits,
    shape: &AttentionShape,
    path: &Path<T, TileConfig>,
    parts: impl FnOnce(&TileConfig) -> usize,
) -> usize {
    let Path::Portable(tile) = path else {
        return 1;
    };
    let cubes = shape.batch * shape.kv_heads * shape.seq;
    if cubes >= limits.busy_cubes {
        return 1;
    }
    limits
        .busy_cubes
        .div_ceil(cubes)
        .min(MAX_KEY_SPLITS)
        .min(parts(tile))
        .max(1)
}

/// The compression branch's tile: the attention tile plus the block scores (`max_blocks`),
/// the units' best candidates, the rows' log-sum-exp and the tile's group sums.
pub(super) fn compressed_tile(
    limits: Limits,
    shape: &AttentionShape,
    selection: &SelectionConfig,
) -> Result<TileConfig, PortableUnavailable> {
    let max_blocks = selection.max_blocks;
    tile_config(limits, shape, None, |tile| {
        tile.shared_words() + max_blocks + 2 * tile.units() + tile.group + tile.tile_keys
    })
}

/// The `dQ` tile of the branch with pattern `keys` (key tiles dividing `l'` for the
/// selection branch).
pub(super) fn grad_query_tile(
    limits: Limits,
    shape: &AttentionShape,
    keys: KeySet,
) -> Result<TileConfig, PortableUnavailable> {
    let divides = keys.is_selected().then(|| keys.select_block());
    tile_config(limits, shape, divides, |tile| {
        tile.tile_keys * (tile.key_stride() + tile.d_v + 1) + 2 * tile.group * tile.tile_keys
    })
}

/// Units of the key-side backward cube for `tile_keys` key rows: [`KEY_GRAD_UNITS`] (or
/// the device's most, when fewer), doubled while a unit would hold more than
/// [`KEY_GRAD_WIDTH`] outputs of the wider head dim and the device allows the larger cube.
fn key_grad_units(tile_keys: usize, shape: &AttentionShape, max_units: usize) -> usize {
    let outputs = tile_keys * shape.d_k.max(shape.d_v);
    let mut units = KEY_GRAD_UNITS.min(max_units);
    while outputs > KEY_GRAD_WIDTH * units && 2 * units <= max_units {
        units *= 2;
    }
    units
}

/// The key-side backward cube for `shape`: the most key rows (at most 32, dividing `l'`
/// for the selection branch) and query rows per step (at most 32) whose shared memory
/// fits `limits`, with the units [`key_grad_units`] gives; an error when one key row and
/// one query row do not fit.
pub(super) fn key_tile_config(
    limits: Limits,
    shape: &AttentionShape,
    keys: KeySet,
) -> Result<KeyTileConfig, PortableUnavailable> {
    let mut tile_keys = 32;
    while keys.is_selected() && !keys.select_block().is_multiple_of(tile_keys) {
        tile_keys /= 2;
    }
    let mut rows = 32;
    loop {
        let cfg = KeyTileConfig {
            group: shape.group(),
            d_k: shape.d_k,
            d_v: shape.d_v,
            tile_keys,
            rows,
            units: key_grad_units(tile_keys, shape, limits.max_units),
        };
        let fits = limits.check_shared(cfg.shared_words());
        if fits.is_ok() {
            return Ok(cfg);
        }
        if tile_keys == 1 && rows == 1 {
            return fits.map(|()| cfg);
        }
        if rows >= tile_keys && rows > 1 {
            rows /= 2;
        } else {
            tile_keys /= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WGPU_LIKE: Limits = Limits {
        shared_bytes: 32 * 1024,
        max_units: 256,
        busy_cubes: 64,
    };

    fn shape(heads: usize, seq: usize) -> AttentionShape {
        AttentionShape {
            batch: 1,
            seq,
            heads,
            kv_heads: 1,
            d_k: 64,
            d_v: 64,
            query_start: 0,
        }
    }

    #[test]
    fn a_group_larger_than_a_cube_is_an_error() {
        let words = TileConfig::shared_words;
        assert!(tile_config(WGPU_LIKE, &shape(256, 64), None, words).is_ok());
        assert_eq!(
            tile_config(WGPU_LIKE, &shape(512, 64), None, words),
            Err(PortableUnavailable::UnitsPerCube {
                needed: 512,
                max: 256
            })
        );
    }

    #[test]
    fn only_calls_with_few_query_rows_split_their_keys() {
        let one_row = shape(4, 1);
        let tile = tile_config(WGPU_LIKE, &one_row, None, TileConfig::shared_words).unwrap();
        let portable = Path::<(), _>::Portable(tile);
        // One query row wants 64 parts, at most 32, and at most the parts there are.
        assert_eq!(key_splits(WGPU_LIKE, &one_row, &portable, |_| 100), 32);
        assert_eq!(key_splits(WGPU_LIKE, &one_row, &portable, |_| 3), 3);
        assert_eq!(key_splits(WGPU_LIKE, &shape(4, 5), &portable, |_| 100), 13);
        // 64 rows fill the device; the tensor-core path never splits.
        assert_eq!(key_splits(WGPU_LIKE, &shape(4, 64), &portable, |_| 100), 1);
        let tensor_core = Path::<(), TileConfig>::TensorCore(());
        assert_eq!(key_splits(WGPU_LIKE, &one_row, &tensor_core, |_| 100), 1);
    }

    #[test]
    fn shared_memory_shrinks_the_tile_then_is_an_error() {
        // 4096 extra words (16 KiB) leave room for fewer key rows; 8192 (32 KiB) for none.
        let tile = |extra: usize| {
            tile_config(WGPU_LIKE, &shape(4, 64), None, |t| t.shared_words() + extra)
        };
        let full = tile(0).unwrap().tile_keys;
        let squeezed = tile(4096).unwrap().tile_keys;
        assert!(squeezed < full, "{squeezed} < {full}");
        assert!(matches!(
            tile(8192),
            Err(PortableUnavailable::SharedMemory {
                available: 32768,
                ..
            })
        ));
    }

    #[test]
    fn key_side_cube_never_exceeds_the_device() {
        let small = Limits {
            shared_bytes: 48 * 1024,
            max_units: 64,
            busy_cubes: 64,
        };
        let cfg = key_tile_config(small, &shape(4, 64), KeySet::Window { size: 64 }).unwrap();
        assert!(cfg.units <= 64);
        let tiny = Limits {
            shared_bytes: 64,
            max_units: 64,
            busy_cubes: 64,
        };
        assert!(matches!(
            key_tile_config(tiny, &shape(4, 64), KeySet::Window { size: 64 }),
            Err(PortableUnavailable::SharedMemory { .. })
        ));
    }
}
