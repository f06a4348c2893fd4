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
    GatedRestArgs, SplitArgs,
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

/// One cube per `(part, batch, KV head, t)`, for the keys split into `splits` parts.
fn portable_grid<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    cfg: &TileConfig,
    splits: usize,
) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new_1d(cfg.units() as u32);
    let cubes = splits * shape.batch * shape.kv_heads * shape.seq;
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

/// 64-bit offsets where some tensor a kernel indexes reaches past 32-bit offsets, decided
/// from the shape and strides of every argument of the launch (split buffers, bitmaps and
/// block indices included).
fn address_type<R: Runtime>(args: &[&TensorArg<R>]) -> AddressType {
    let reaches = args.iter().map(|arg| match arg {
        TensorArg::Handle { handle } => reach(&handle.shape, &handle.strides),
        TensorArg::Alias { shape, strides, .. } => reach(shape, strides),
    });
    if needs_64_bit_offsets(reaches) {
        AddressType::U64
    } else {
        AddressType::U32
    }
}

/// Elements from a tensor's first to one past its last: `1 + sum((shape[i] - 1) *
/// strides[i])`, 0 for an empty tensor.
fn reach(shape: &[usize], strides: &[usize]) -> usize {
    if shape.contains(&0) {
        return 0;
    }
    1 + shape
        .iter()
        .zip(strides)
        .map(|(&dim, &stride)| (dim - 1) * stride)
        .sum::<usize>()
}

/// Whether an offset into a tensor of one of these reaches can pass `u32::MAX`.
fn needs_64_bit_offsets(reaches: impl IntoIterator<Item = usize>) -> bool {
    reaches.into_iter().any(|reach| reach > u32::MAX as usize)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each buffer a backward pass indexes, alone past 32-bit offsets, decides 64-bit
    /// offsets: the queries, a split key side's partial sums, the selection bitmap.
    #[test]
    fn any_large_buffer_takes_64_bit_offsets() {
        let contiguous = |shape: [usize; 4]| {
            let strides = [
                shape[1] * shape[2] * shape[3],
                shape[2] * shape[3],
                shape[3],
                1,
            ];
            reach(&shape, &strides)
        };
        let small = contiguous([1, 4096, 64, 128]);
        assert!(!needs_64_bit_offsets([
            small,
            contiguous([1, 4096, 4, 128])
        ]));
        for (name, large) in [
            ("queries", [2, 140_000, 128, 128]),
            ("partial sums", [64 * 8, 8192, 8, 256]),
            ("bitmap", [8, 64, 1 << 17, 1 << 12]),
        ] {
            assert!(
                needs_64_bit_offsets([small, contiguous(large)]),
                "{name} {large:?} needs 64-bit offsets"
            );
        }
        // One past the last 32-bit offset, and exactly at it.
        assert!(needs_64_bit_offsets([u32::MAX as usize + 1]));
        assert!(!needs_64_bit_offsets([u32::MAX as usize]));
        // A broadcast (stride 0) dimension adds nothing; an empty tensor reaches nothing.
        assert_eq!(reach(&[1 << 20, 1 << 20], &[0, 1]), 1 << 20);
        assert_eq!(reach(&[0, 8], &[8, 1]), 0);
    }
}
