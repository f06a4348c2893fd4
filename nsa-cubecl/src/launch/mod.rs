//! Launching what a plan ([`crate::plan`]) says: one launch function per step, tensors as
//! CubeCL [`TensorArg`]s in the layouts the kernels document, grouped in argument structs.

mod backward;
mod forward;
mod rows;

use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

use crate::config::AttentionShape;
use crate::portable::tile::TileConfig;
use crate::tensor_core::layout::MmaTileConfig;

pub use backward::{launch_branch_backward, BranchBackwardArgs, SelectionArgs};
pub use forward::{
    launch_compressed, launch_selected, launch_selected_gated_sum, launch_window, AttentionArgs,
    GatedRestArgs,
};
pub use rows::{launch_gated_sum, launch_gated_sum_backward, GatedSumArgs};

/// Elements per vector load of the tensor-core kernels (head dims are multiples of 16 and
/// the inputs are contiguous, so every row starts on a vector).
const MMA_VECTOR: usize = 8;

/// One cube per `(batch, KV head, cfg.positions query positions)`.
fn mma_grid<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    cfg: &MmaTileConfig,
) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new_1d(cfg.units() as u32);
    let cubes = shape.batch * shape.kv_heads * shape.seq.div_ceil(cfg.positions);
    let count = calculate_cube_count_elemwise(client, cubes * cfg.units(), cube_dim);
    (count, cube_dim)
}

/// One cube per `(batch, KV head, t)`.
fn portable_grid<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    cfg: &TileConfig,
) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new_1d(cfg.units() as u32);
    let cubes = shape.batch * shape.kv_heads * shape.seq;
    let count = calculate_cube_count_elemwise(client, cubes * cfg.units(), cube_dim);
    (count, cube_dim)
}

/// Cubes of 256 units for a kernel with one unit per element of `units` elements.
fn elementwise_grid<R: Runtime>(client: &ComputeClient<R>, units: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new_1d(256);
    (
        calculate_cube_count_elemwise(client, units, cube_dim),
        cube_dim,
    )
}

/// 64-bit offsets where some tensor of the call, with `kv_rows` key rows, has more elements
/// than 32-bit offsets reach.
fn address_type(shape: &AttentionShape, kv_rows: usize) -> AddressType {
    if shape.needs_64_bit_offsets(kv_rows) {
        AddressType::U64
    } else {
        AddressType::U32
    }
}

/// The same tensor as two kernel arguments (for two launches).
fn twice<R: Runtime>(arg: TensorArg<R>) -> (TensorArg<R>, TensorArg<R>) {
    match arg {
        TensorArg::Handle { handle } => (
            TensorArg::Handle {
                handle: handle.clone(),
            },
            TensorArg::Handle { handle },
        ),
        TensorArg::Alias { .. } => panic!("NSA kernels take tensor handles, not aliases"),
    }
}
