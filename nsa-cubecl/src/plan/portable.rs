//! Tile policy of the portable kernels: units per cube and the key rows per tile whose
//! shared memory fits the device.

use cubecl::prelude::*;

use crate::common::keys::KeySet;
use crate::common::selection::SelectionConfig;
use crate::config::AttentionShape;
use crate::portable::grad_key::KeyTileConfig;
use crate::portable::tile::TileConfig;

/// Units a cube may hold for one query group, at most.
const MAX_UNITS: usize = 128;

/// Units of the key-side backward cube, at least.
const KEY_GRAD_UNITS: usize = 128;

/// Outputs each unit of the key-side cube accumulates per key-row dimension, at most
/// ([`KeyTileConfig::width`]): wider tiles get more units instead. Mesa lavapipe sums
/// this kernel's per-unit arrays of 16 wrongly (the compression and selection branches of
/// a `d_v = 128` case) and those of 8 correctly.
const KEY_GRAD_WIDTH: usize = 8;

/// The tile for `shape` on this device: `G * parts` units (`parts` the largest power of two
/// keeping the cube within [`MAX_UNITS`] and `d_v`), and the largest power-of-two number
/// of key rows, at most 32 and dividing `divides` when given, for which the kernel's
/// shared memory (`words(&tile)` f32 words) fits the device.
pub(super) fn tile_config<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    divides: Option<usize>,
    words: impl Fn(&TileConfig) -> usize,
) -> TileConfig {
    let group = shape.group();
    let mut parts = 1;
    while group * parts * 2 <= MAX_UNITS && parts * 2 <= shape.d_v {
        parts *= 2;
    }
    let shared_bytes = client.properties().hardware.max_shared_memory_size;
    let mut tile_keys = 32;
    loop {
        let cfg = TileConfig {
            group,
            d_k: shape.d_k,
            d_v: shape.d_v,
            tile_keys,
            parts,
        };
        let fits = words(&cfg) * 4 <= shared_bytes;
        if tile_keys == 1 || (fits && divides.is_none_or(|d| d % tile_keys == 0)) {
            return cfg;
        }
        tile_keys /= 2;
    }
}

/// The compression branch's tile: the attention tile plus the block scores (`max_blocks`),
/// the units' best candidates, the rows' log-sum-exp and the tile's group sums.
pub(super) fn compressed_tile<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    selection: &SelectionConfig,
) -> TileConfig {
    let max_blocks = selection.max_blocks;
    tile_config(client, shape, None, |tile| {
        tile.shared_words() + max_blocks + 2 * tile.units() + tile.group + tile.tile_keys
    })
}

/// The `dQ` tile of the branch with pattern `keys` (key tiles dividing `l'` for the
/// selection branch).
pub(super) fn grad_query_tile<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    keys: KeySet,
) -> TileConfig {
    let divides = keys.is_selected().then(|| keys.select_block());
    tile_config(client, shape, divides, |tile| {
        tile.tile_keys * (tile.key_stride() + tile.d_v + 1) + 2 * tile.group * tile.tile_keys
    })
}

/// Units of the key-side backward cube for `tile_keys` key rows: [`KEY_GRAD_UNITS`], doubled
/// while a unit would hold more than [`KEY_GRAD_WIDTH`] outputs of the wider head dim and
/// the device allows the larger cube.
fn key_grad_units(tile_keys: usize, shape: &AttentionShape, max_units: usize) -> usize {
    let outputs = tile_keys * shape.d_k.max(shape.d_v);
    let mut units = KEY_GRAD_UNITS;
    while outputs > KEY_GRAD_WIDTH * units && 2 * units <= max_units {
        units *= 2;
    }
    units
}

/// The key-side backward cube for `shape`: the most key rows (at most 32, dividing `l'`
/// for the selection branch) and query rows per step (at most 32) whose shared memory
/// fits the device, with the units [`key_grad_units`] gives.
pub(super) fn key_tile_config<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    keys: KeySet,
) -> KeyTileConfig {
    let hardware = &client.properties().hardware;
    let shared_bytes = hardware.max_shared_memory_size;
    let max_units = hardware.max_units_per_cube as usize;
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
            units: key_grad_units(tile_keys, shape, max_units),
        };
        if cfg.shared_words() * 4 <= shared_bytes || (tile_keys == 1 && rows == 1) {
            return cfg;
        }
        if rows >= tile_keys && rows > 1 {
            rows /= 2;
        } else {
            tile_keys /= 2;
        }
    }
}
