//! Host side: tile sizes for the device, grid shape, and one launch function per kernel.
//! Tensors come in as CubeCL [`TensorArg`]s in the layouts the kernels document.

use cubecl::features::MmaConfig;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeElement};

use crate::bitmap::{selection_bitmap_kernel, WORD_BITS};
use crate::compress::{
    compressed_attention_kernel, compressed_scores_mma_kernel, ScoreSegments, SelectionConfig,
};
use crate::delta::{delta_kernel, RowLayout};
use crate::gated_sum::{gated_sum_backward_kernel, gated_sum_kernel, GatedRest, GatedRestLaunch};
use crate::grad_key::{
    grad_key_value_kernel, grad_key_value_mma_kernel, sum_key_splits_kernel, KeyTileConfig,
};
use crate::grad_query::{grad_query_kernel, grad_query_mma_kernel};
use crate::keys::KeySet;
use crate::mma::{MmaTileConfig, MMA, PLANE};
use crate::range::range_attention_mma_kernel;
use crate::select::{
    selected_attention_kernel, selected_attention_mma_kernel, selection_input_elems,
};
use crate::tile::TileConfig;
use crate::window::window_attention_kernel;

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
}

impl AttentionShape {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Whether some tensor of the call has more elements than 32-bit offsets reach.
    fn needs_64_bit_offsets(&self, kv_rows: usize) -> bool {
        let d = self.d_k.max(self.d_v);
        let largest =
            (self.batch * self.seq * self.heads * d).max(self.batch * kv_rows * self.kv_heads * d);
        largest > u32::MAX as usize
    }
}

/// Units a cube may hold for one query group, at most.
const MAX_UNITS: usize = 128;

/// The tile for `shape` on this device: `G * parts` units (`parts` the largest power of two
/// keeping the cube within `MAX_UNITS` (128) and `d_v`), and the largest power-of-two number
/// of key rows, at most 32 and dividing `divides` when given, for which the kernel's
/// shared memory (`words(&tile)` f32 words) fits the device.
pub fn tile_config<R: Runtime>(
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

/// Environment variable that, when set, keeps every call on the portable kernels (to
/// compare them with the tensor-core ones on the same device).
pub const PORTABLE_KERNELS_VAR: &str = "NSA_PORTABLE_KERNELS";

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

/// Elements per vector load of the tensor-core kernels (head dims are multiples of 16 and
/// the inputs are contiguous, so every row starts on a vector).
const MMA_VECTOR: usize = 8;

/// Key rows per tile of the tensor-core kernels.
const MMA_TILE_KEYS: usize = 32;

/// Query rows a forward tensor-core cube of the window branch aims at. Three planes, not
/// four: the kernel takes 167-168 registers per unit, and an H100 scheduler holds three
/// warps only at 168 or fewer (two above). With four planes the window forward took 8.2 ms
/// at 64k instead of 6.7 (BENCHMARKS.md).
const WINDOW_ROWS: usize = 48;

/// Query rows a cube of the compression branch's attention pass aims at: four planes, so
/// each key tile serves more rows than with three (64k: 31.9 ms for the branch against
/// 33.2 with three planes, 35.4 with five and 32.6 with six; BENCHMARKS.md).
const COMPRESSED_ROWS: usize = 64;

/// Query rows and key rows per tile of the compression branch's scoring pass: it holds no
/// output accumulators (94 registers), so its cubes are larger and its tiles longer than
/// the attention passes'; 64k: 31.9 ms for the branch against 35.4 with 48 rows of 32-key
/// tiles (BENCHMARKS.md).
const SCORING_ROWS: usize = 128;
const SCORING_TILE_KEYS: usize = 64;

/// Query positions a selection-forward tensor-core cube holds (when `G` is a multiple of
/// 16): neighbouring positions load the blocks they took in the same slot (the forced
/// initial and local ones) once. On the H100 at 64k the selection forward took 26.3 ms with
/// one position, 25.1 with two, 24.7 with four and 35.6 with eight (BENCHMARKS.md).
const SELECT_POSITIONS: usize = 4;

/// Query rows a `dQ` tensor-core cube of the window and compression branches aims at: four
/// planes measured faster than three there (BENCHMARKS.md).
const GRAD_QUERY_ROWS: usize = 64;

/// The tensor-core tile for `shape`, or `None` to use the portable kernels: the device must
/// have m16n8k16 `mma` on `F` with f32 accumulation and 32-lane planes, the head dims
/// must be multiples of 16, and the kernel's shared memory, `bytes(&tile)`, must fit the
/// device. With `cube_rows` `None` a cube holds one query position (the selection branch);
/// with `Some(rows)` as many positions as fill `rows` rows (at least one plane per position),
/// fewer if memory is short. Key tiles hold `tile_keys` rows (a multiple of 16).
pub fn mma_tile_config<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    cube_rows: Option<usize>,
    tile_keys: usize,
    bytes: impl Fn(&MmaTileConfig) -> usize,
) -> Option<MmaTileConfig> {
    if !tensor_cores_fit::<R, F>(client, shape) {
        return None;
    }
    let hardware = &client.properties().hardware;
    let group = shape.group();
    let min_planes = group.div_ceil(MMA);
    // A one-position cube loads its own tiles: on the H100 a second plane sharing the loads
    // was slower (BENCHMARKS.md), since it halves the cubes an SM holds.
    let one_position = cube_rows.is_none();
    let mut planes = cube_rows.map_or(min_planes, |rows| min_planes.max(rows / MMA));
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
        if bytes(&cfg) <= hardware.max_shared_memory_size {
            return Some(cfg);
        }
        if planes == min_planes {
            return None;
        }
        planes -= 1;
    }
}

/// The selection forward's tensor-core tile: [`SELECT_POSITIONS`] positions per cube when
/// the group fills whole planes (`G` a multiple of 16) and their tiles fit, else one.
fn selection_tile_config<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
) -> Option<MmaTileConfig> {
    let elem = core::mem::size_of::<F>();
    let bytes = |c: &MmaTileConfig| elem * selection_input_elems(c);
    let group = shape.group();
    if group % MMA == 0 {
        let rows = SELECT_POSITIONS * group;
        let cfg = mma_tile_config::<R, F>(client, shape, Some(rows), MMA_TILE_KEYS, bytes);
        if let Some(cfg) = cfg.filter(|c| c.positions == SELECT_POSITIONS) {
            return Some(cfg);
        }
    }
    mma_tile_config::<R, F>(client, shape, None, MMA_TILE_KEYS, bytes)
}

/// Whether the tensor-core kernels can run `shape` in `F` on this device: manual m16n8k16
/// `mma` on `F` with f32 accumulation, asynchronous global-to-shared copies, 32-lane planes,
/// head dims that are multiples of 16, and [`PORTABLE_KERNELS_VAR`] unset.
fn tensor_cores_fit<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
) -> bool {
    if std::env::var_os(PORTABLE_KERNELS_VAR).is_some() {
        return false;
    }
    let properties = client.properties();
    let elem = F::as_type_native_unchecked().storage_type();
    let config = |n: usize| MmaConfig {
        a_type: elem,
        b_type: elem,
        cd_type: f32::as_type_native_unchecked().storage_type(),
        m: MMA as u32,
        n: n as u32,
        k: MMA as u32,
    };
    let tensor_cores =
        properties.features.matmul.mma.contains(&config(MMA / 2)) && properties.features.copy_async;
    let hardware = &properties.hardware;
    let planes_fit =
        hardware.plane_size_min == PLANE as u32 && hardware.plane_size_max == PLANE as u32;
    tensor_cores && planes_fit && shape.d_k % MMA == 0 && shape.d_v % MMA == 0
}

/// The key-side tensor-core cube (see [`crate::grad_key::grad_key_value_mma_kernel()`]):
/// 64 key rows (for the selection branch the largest of 64, 32, 16 dividing `l'`; `None`
/// when `l'` is not a multiple of 16) and 32 query rows per step, if its shared memory fits.
pub fn key_mma_tile_config<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    keys: KeySet,
) -> Option<MmaTileConfig> {
    if !tensor_cores_fit::<R, F>(client, shape) {
        return None;
    }
    let key_rows = if keys.is_selected() {
        let block = keys.select_block();
        [64, 32, 16].into_iter().find(|rows| block % rows == 0)?
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
    let bytes = cfg.input_bytes(elem) + elem * own_rows + 4 * (3 * cfg.tile_keys + 2 * cfg.units());
    (bytes <= client.properties().hardware.max_shared_memory_size).then_some(cfg)
}

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

/// Cubes of 256 units for a kernel with one unit per element of `units` elements.
fn elementwise_grid<R: Runtime>(client: &ComputeClient<R>, units: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new_1d(256);
    (
        calculate_cube_count_elemwise(client, units, cube_dim),
        cube_dim,
    )
}

/// One cube per `(batch, KV head, t)`.
fn grid<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    cfg: &TileConfig,
) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new_1d(cfg.units() as u32);
    let cubes = shape.batch * shape.kv_heads * shape.seq;
    let count = calculate_cube_count_elemwise(client, cubes * cfg.units(), cube_dim);
    (count, cube_dim)
}

fn address_type(shape: &AttentionShape, kv_rows: usize) -> AddressType {
    if shape.needs_64_bit_offsets(kv_rows) {
        AddressType::U64
    } else {
        AddressType::U32
    }
}

/// Sliding-window attention. `q: [B, T, H, d_k]`, `k: [B, T, H_kv, d_k]`,
/// `v: [B, T, H_kv, d_v]` -> `o: [B, T, H, d_v]`, `lse: [B, H, T]` f32.
#[allow(clippy::too_many_arguments)]
pub fn launch_window<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    q: TensorArg<R>,
    k: TensorArg<R>,
    v: TensorArg<R>,
    o: TensorArg<R>,
    lse: TensorArg<R>,
    scale: f32,
    window: usize,
) {
    let elem = core::mem::size_of::<F>();
    let rows = Some(WINDOW_ROWS);
    if let Some(cfg) =
        mma_tile_config::<R, F>(client, shape, rows, MMA_TILE_KEYS, |c| c.input_bytes(elem))
    {
        let (count, dim) = mma_grid(client, shape, &cfg);
        // SAFETY: every index the kernel forms stays inside its tensors for these shapes (rows
        // past `valid` and padding rows are never read), as the parity tests check.
        unsafe {
            range_attention_mma_kernel::launch_unchecked::<F, R>(
                client,
                count,
                dim,
                address_type(shape, shape.seq),
                MMA_VECTOR,
                q,
                k,
                v,
                o,
                lse,
                scale,
                cfg,
                KeySet::Window { size: window },
            );
        }
        return;
    }
    let cfg = tile_config(client, shape, None, TileConfig::shared_words);
    let (count, dim) = grid(client, shape, &cfg);
    window_attention_kernel::launch::<F, R>(
        client,
        count,
        dim,
        address_type(shape, shape.seq),
        q,
        k,
        v,
        o,
        lse,
        scale,
        cfg,
        window,
    );
}

/// Selected-block attention. `q`, `k`, `v` as in [`launch_window`],
/// `selected: [B, H_kv, T, n]` Int -> `o: [B, T, H, d_v]`, `lse: [B, H, T]` f32.
#[allow(clippy::too_many_arguments)]
pub fn launch_selected<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    q: TensorArg<R>,
    k: TensorArg<R>,
    v: TensorArg<R>,
    selected: TensorArg<R>,
    o: TensorArg<R>,
    lse: TensorArg<R>,
    scale: f32,
    select_block: usize,
) {
    if let Some(cfg) = selection_tile_config::<R, F>(client, shape) {
        launch_selected_mma::<R, F, I>(
            client,
            shape,
            cfg,
            [q, k, v, selected],
            ComptimeOptionArgs::None,
            [o, lse],
            scale,
            select_block,
        );
        return;
    }
    let cfg = tile_config(client, shape, Some(select_block), TileConfig::shared_words);
    let (count, dim) = grid(client, shape, &cfg);
    selected_attention_kernel::launch::<F, I, R>(
        client,
        count,
        dim,
        address_type(shape, shape.seq),
        q,
        k,
        v,
        selected,
        o,
        lse,
        scale,
        cfg,
        select_block,
    );
}

/// Whether [`launch_selected_gated_sum`] can run `shape` in `F` on this device: the
/// tensor-core selection kernel sums the gates itself; elsewhere the selection branch and
/// the gated sum run one after the other ([`launch_selected`], [`launch_gated_sum`]).
pub fn selection_sums_gates<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
) -> bool {
    selection_tile_config::<R, F>(client, shape).is_some()
}

/// Selected-block attention that finishes the gated sum (Eq. 5): as [`launch_selected`], but
/// `o: [B, T, H, d_v]` receives `g_cmp * o_cmp + g_slc * o_slc + g_win * o_win` from
/// `rest = [o_cmp, o_win, gates]` (`[B, T, H, d_v]` twice, `[B, T, H, 3]`) and the
/// selection output itself is never written. Panics unless [`selection_sums_gates`].
#[allow(clippy::too_many_arguments)]
pub fn launch_selected_gated_sum<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    [q, k, v, selected]: [TensorArg<R>; 4],
    [compressed, window, gates]: [TensorArg<R>; 3],
    o: TensorArg<R>,
    lse: TensorArg<R>,
    scale: f32,
    select_block: usize,
) {
    let cfg = selection_tile_config::<R, F>(client, shape)
        .expect("launch_selected_gated_sum needs the tensor-core selection kernel (see selection_sums_gates)");
    let rest = ComptimeOptionArgs::Some(GatedRestLaunch::new(compressed, window, gates));
    launch_selected_mma::<R, F, I>(
        client,
        shape,
        cfg,
        [q, k, v, selected],
        rest,
        [o, lse],
        scale,
        select_block,
    );
}

/// [`selected_attention_mma_kernel()`] for `[q, k, v, selected]` -> `[o, lse]`.
#[allow(clippy::too_many_arguments)]
fn launch_selected_mma<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    cfg: MmaTileConfig,
    [q, k, v, selected]: [TensorArg<R>; 4],
    rest: ComptimeOptionArgs<GatedRest<F>, R>,
    [o, lse]: [TensorArg<R>; 2],
    scale: f32,
    select_block: usize,
) {
    let (count, dim) = mma_grid(client, shape, &cfg);
    // SAFETY: every index the kernel forms stays inside its tensors for these shapes (rows
    // past `valid` and padding rows are never read), as the parity tests check.
    unsafe {
        selected_attention_mma_kernel::launch_unchecked::<F, I, R>(
            client,
            count,
            dim,
            address_type(shape, shape.seq),
            MMA_VECTOR,
            q,
            k,
            v,
            selected,
            rest,
            o,
            lse,
            scale,
            cfg,
            select_block,
        );
    }
}

/// Compressed attention with fused top-n selection. `q: [B, T, H, d_k]`,
/// `k_cmp: [B, N_cmp, H_kv, d_k]`, `v_cmp: [B, N_cmp, H_kv, d_v]` -> `o: [B, T, H, d_v]`,
/// `lse: [B, H, T]` f32, `selected: [B, H_kv, T, n]` Int. `selection.max_blocks` is
/// filled in here.
#[allow(clippy::too_many_arguments)]
pub fn launch_compressed<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    num_compressed: usize,
    q: TensorArg<R>,
    k_cmp: TensorArg<R>,
    v_cmp: TensorArg<R>,
    o: TensorArg<R>,
    lse: TensorArg<R>,
    selected: TensorArg<R>,
    scale: f32,
    selection: SelectionConfig,
) {
    // Round the block-score buffer up to a power of two so few variants get compiled.
    let max_blocks = shape
        .seq
        .div_ceil(selection.select_block)
        .next_power_of_two();
    let selection = SelectionConfig {
        max_blocks,
        ..selection
    };
    let elem = core::mem::size_of::<F>();
    let bytes = |tile: &MmaTileConfig| {
        tile.input_bytes(elem) + ScoreSegments::shared_bytes(tile, max_blocks)
    };
    let attention =
        mma_tile_config::<R, F>(client, shape, Some(COMPRESSED_ROWS), MMA_TILE_KEYS, |c| {
            c.input_bytes(elem)
        });
    let scoring =
        mma_tile_config::<R, F>(client, shape, Some(SCORING_ROWS), SCORING_TILE_KEYS, bytes);
    if let (Some(attention), Some(scoring)) = (attention, scoring) {
        let (q, q_again) = twice(q);
        let (lse, lse_again) = twice(lse);
        let (k_cmp, k_cmp_again) = twice(k_cmp);
        // SAFETY: every index the kernels form stays inside their tensors for these shapes
        // (rows past `valid` and padding rows are never read), as the parity tests check.
        unsafe {
            // The attention pass writes `o` and `lse`, which the scoring pass reads.
            let (count, dim) = mma_grid(client, shape, &attention);
            range_attention_mma_kernel::launch_unchecked::<F, R>(
                client,
                count,
                dim,
                address_type(shape, num_compressed),
                MMA_VECTOR,
                q,
                k_cmp,
                v_cmp,
                o,
                lse,
                scale,
                attention,
                selection.key_set(),
            );
            let (count, dim) = mma_grid(client, shape, &scoring);
            compressed_scores_mma_kernel::launch_unchecked::<F, I, R>(
                client,
                count,
                dim,
                address_type(shape, num_compressed),
                MMA_VECTOR,
                q_again,
                k_cmp_again,
                lse_again,
                selected,
                scale,
                scoring,
                selection,
            );
        }
        return;
    }
    let cfg = tile_config(client, shape, None, |tile| {
        tile.shared_words() + max_blocks + 2 * tile.units() + tile.group + tile.tile_keys
    });
    let (count, dim) = grid(client, shape, &cfg);
    compressed_attention_kernel::launch::<F, I, R>(
        client,
        count,
        dim,
        address_type(shape, num_compressed),
        q,
        k_cmp,
        v_cmp,
        o,
        lse,
        selected,
        scale,
        cfg,
        selection,
    );
}

/// Tensors of one branch's backward pass, in the layouts of [`launch_grad_query`].
pub struct GradArgs<R: Runtime> {
    /// `[B, T, H, d_k]`.
    pub q: TensorArg<R>,
    /// The branch's keys `[B, L, H_kv, d_k]`.
    pub k: TensorArg<R>,
    /// The branch's values `[B, L, H_kv, d_v]`.
    pub v: TensorArg<R>,
    /// Gradient of the branch output, `[B, T, H, d_v]`.
    pub d_o: TensorArg<R>,
    /// `rowsum(dO * O)`, `[B, T, H]` f32.
    pub delta: TensorArg<R>,
    /// The forward row log-sum-exp, `[B, H, T]` f32.
    pub lse: TensorArg<R>,
    /// `[B, H_kv, T, n]` Int for [`KeySet::Selected`]; any Int tensor otherwise (unread).
    /// Read by the query side.
    pub selected: TensorArg<R>,
    /// The selection bitmap `[B, H_kv, n_blocks, ceil(T / 32)]` Int of
    /// [`launch_selection_bitmap`] for [`KeySet::Selected`]; any Int tensor otherwise
    /// (unread). Read by the key side.
    pub bitmap: TensorArg<R>,
}

/// Shape of the selection bitmap of `shape` with selection blocks of `select_block` rows:
/// `[B, H_kv, ceil(T / l'), ceil(T / 32)]`.
pub fn selection_bitmap_shape(shape: &AttentionShape, select_block: usize) -> [usize; 4] {
    [
        shape.batch,
        shape.kv_heads,
        shape.seq.div_ceil(select_block),
        shape.seq.div_ceil(WORD_BITS),
    ]
}

/// The selection inverted ([`crate::bitmap::selection_bitmap_kernel()`]):
/// `selected: [B, H_kv, T, n]` -> `bitmap` of [`selection_bitmap_shape`], both contiguous
/// Int tensors of the same type.
pub fn launch_selection_bitmap<R: Runtime, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    selected: TensorArg<R>,
    bitmap: TensorArg<R>,
) {
    let units = shape.batch * shape.kv_heads * shape.seq.div_ceil(WORD_BITS);
    let (count, cube_dim) = elementwise_grid(client, units);
    selection_bitmap_kernel::launch::<I, R>(
        client,
        count,
        cube_dim,
        address_type(shape, shape.seq),
        selected,
        bitmap,
    );
}

/// Elements per vector of the row kernels (delta, gated sum): the widest of 4, 2, 1
/// dividing `d_v`.
fn row_vector(d_v: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|width| d_v % width == 0)
        .unwrap_or(1)
}

/// The row layout of `[B, T, H, d_v]` for the row kernels, its vector width, and its grid.
fn row_grid<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
) -> (RowLayout, usize, CubeCount, CubeDim) {
    let vector = row_vector(shape.d_v);
    let layout = RowLayout::new(shape.d_v / vector);
    let rows = shape.batch * shape.seq * shape.heads;
    let cube_dim = CubeDim::new_1d(layout.units() as u32);
    let count = calculate_cube_count_elemwise(client, rows * layout.units_per_row, cube_dim);
    (layout, vector, count, cube_dim)
}

/// `delta = rowsum(dO * O)`: `d_o`, `o: [B, T, H, d_v]` contiguous in `F` ->
/// `delta: [B, T, H]` f32, contiguous.
pub fn launch_delta<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    d_o: TensorArg<R>,
    o: TensorArg<R>,
    delta: TensorArg<R>,
) {
    let (layout, vector, count, cube_dim) = row_grid(client, shape);
    // SAFETY: `layout.units_per_row` units per row of `[B, T, H]`, guarded by the row count;
    // each reads vectors of its own row of `d_o` and `o`.
    unsafe {
        delta_kernel::launch_unchecked::<F, R>(
            client,
            count,
            cube_dim,
            address_type(shape, shape.seq),
            vector,
            d_o,
            o,
            delta,
            layout,
        );
    }
}

/// The gated sum (Eq. 5): `o_cmp`, `o_slc`, `o_win: [B, T, H, d_v]` and
/// `gates: [B, T, H, 3]`, contiguous in `F` -> `o: [B, T, H, d_v]`.
pub fn launch_gated_sum<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    [o_cmp, o_slc, o_win]: [TensorArg<R>; 3],
    gates: TensorArg<R>,
    o: TensorArg<R>,
) {
    let vector = row_vector(shape.d_v);
    let vectors = shape.d_v / vector;
    let (count, cube_dim) =
        elementwise_grid(client, shape.batch * shape.seq * shape.heads * vectors);
    // SAFETY: one unit per vector of `o`, guarded by its length; the inputs have its shape
    // and `gates` three elements per row.
    unsafe {
        gated_sum_kernel::launch_unchecked::<F, R>(
            client,
            count,
            cube_dim,
            address_type(shape, shape.seq),
            vector,
            o_cmp,
            o_slc,
            o_win,
            gates,
            o,
            vectors,
        );
    }
}

/// Backward of [`launch_gated_sum`]: `d_o: [B, T, H, d_v]`, the three branch outputs and
/// the gates -> the branch outputs' gradients `[B, T, H, d_v]` and the gates' `[B, T, H, 3]`,
/// all contiguous in `F`.
pub fn launch_gated_sum_backward<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    d_o: TensorArg<R>,
    [o_cmp, o_slc, o_win]: [TensorArg<R>; 3],
    gates: TensorArg<R>,
    [d_cmp, d_slc, d_win]: [TensorArg<R>; 3],
    d_gates: TensorArg<R>,
) {
    let (layout, vector, count, cube_dim) = row_grid(client, shape);
    // SAFETY: as for `launch_delta`; every tensor has the shape of `d_o` or of `gates`.
    unsafe {
        gated_sum_backward_kernel::launch_unchecked::<F, R>(
            client,
            count,
            cube_dim,
            address_type(shape, shape.seq),
            vector,
            d_o,
            o_cmp,
            o_slc,
            o_win,
            gates,
            d_cmp,
            d_slc,
            d_win,
            d_gates,
            layout,
        );
    }
}

/// Backward, query side: `dq: [B, T, H, d_k]` of the branch whose attention pattern is
/// `keys`, over `key_rows` key rows (`L`).
#[allow(clippy::too_many_arguments)]
pub fn launch_grad_query<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    key_rows: usize,
    keys: KeySet,
    args: GradArgs<R>,
    dq: TensorArg<R>,
    scale: f32,
) {
    let elem = core::mem::size_of::<F>();
    let bytes = |tile: &MmaTileConfig| tile.input_bytes(elem);
    let cube_rows = (!keys.is_selected()).then_some(GRAD_QUERY_ROWS);
    if let Some(cfg) = mma_tile_config::<R, F>(client, shape, cube_rows, MMA_TILE_KEYS, bytes) {
        let (count, dim) = mma_grid(client, shape, &cfg);
        // SAFETY: as for the forward tensor-core kernels.
        unsafe {
            grad_query_mma_kernel::launch_unchecked::<F, I, R>(
                client,
                count,
                dim,
                address_type(shape, key_rows),
                MMA_VECTOR,
                args.q,
                args.k,
                args.v,
                args.d_o,
                args.delta,
                args.lse,
                args.selected,
                dq,
                scale,
                cfg,
                keys,
            );
        }
        return;
    }
    let divides = keys.is_selected().then(|| keys.select_block());
    let cfg = tile_config(client, shape, divides, |tile| {
        tile.tile_keys * (tile.key_stride() + tile.d_v + 1) + 2 * tile.group * tile.tile_keys
    });
    let (count, dim) = grid(client, shape, &cfg);
    grad_query_kernel::launch::<F, I, R>(
        client,
        count,
        dim,
        address_type(shape, key_rows),
        args.q,
        args.k,
        args.v,
        args.d_o,
        args.delta,
        args.lse,
        args.selected,
        dq,
        scale,
        cfg,
        keys,
    );
}

/// Units of the key-side backward cube, at least.
const KEY_GRAD_UNITS: usize = 128;

/// Outputs each unit of the portable key-side cube accumulates per key-row dimension, at
/// most ([`KeyTileConfig::width`]): wider tiles get more units instead. Mesa lavapipe sums
/// this kernel's per-unit arrays of 16 wrongly (the compression and selection branches of
/// a `d_v = 128` case, 2026-11-26) and those of 8 correctly.
const KEY_GRAD_WIDTH: usize = 8;

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
/// fits the device, with the units `key_grad_units` gives.
pub fn key_tile_config<R: Runtime>(
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

/// Query positions per copy of a split key tile, at least.
const MIN_SPLIT_POSITIONS: usize = 2048;

/// Copies a split key tile runs in, at most (bounds the partial-sum buffer).
const MAX_SPLITS: usize = 16;

/// How the tensor-core key-side backward splits the queries of the key rows that every
/// later query may see (see [`crate::grad_key::grad_key_value_mma_kernel()`]): key rows
/// `0..keys` run in `splits` copies of `positions` query positions each, whose sums go
/// through an f32 buffer of [`KeyGradSplit::buffer_shape`].
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
    /// `[splits * B, keys, H_kv, d_k + d_v]`, or `[B, 1, 1, 1]` (never read) when nothing
    /// is split.
    pub fn buffer_shape(&self, shape: &AttentionShape) -> [usize; 4] {
        if self.keys == 0 {
            [shape.batch, 1, 1, 1]
        } else {
            [
                self.splits * shape.batch,
                self.keys,
                shape.kv_heads,
                shape.d_k + shape.d_v,
            ]
        }
    }
}

/// The split for the key-side backward of `shape` over `key_rows` key rows: on the
/// tensor-core path, every compressed key and the first `initial_blocks` selection blocks
/// (which all later queries see or select) are split when `T` exceeds
/// `MIN_SPLIT_POSITIONS`, in at most `MAX_SPLITS` copies; nothing otherwise.
pub fn key_grad_split<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    key_rows: usize,
    keys: KeySet,
    initial_blocks: usize,
) -> KeyGradSplit {
    let none = KeyGradSplit {
        splits: 1,
        positions: shape.seq,
        keys: 0,
    };
    if key_mma_tile_config::<R, F>(client, shape, keys).is_none()
        || shape.seq <= MIN_SPLIT_POSITIONS
    {
        return none;
    }
    let split_keys = match keys {
        KeySet::Compressed { .. } => key_rows,
        KeySet::Selected { block } => (initial_blocks * block).min(key_rows),
        KeySet::Window { .. } => 0,
    };
    if split_keys == 0 {
        return none;
    }
    let positions = MIN_SPLIT_POSITIONS.max(shape.seq.div_ceil(MAX_SPLITS));
    KeyGradSplit {
        splits: shape.seq.div_ceil(positions),
        positions,
        keys: split_keys,
    }
}

/// Backward, key side: `dk: [B, L, H_kv, d_k]` and `dv: [B, L, H_kv, d_v]` of the branch
/// whose attention pattern is `keys`, over `key_rows` key rows (`L`). With a `split` from
/// [`key_grad_split`], `partial` is an f32 buffer of [`KeyGradSplit::buffer_shape`] and the
/// split rows of `dk`/`dv` are left for [`launch_sum_key_splits`].
#[allow(clippy::too_many_arguments)]
pub fn launch_grad_key_value<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    key_rows: usize,
    keys: KeySet,
    args: GradArgs<R>,
    dk: TensorArg<R>,
    dv: TensorArg<R>,
    split: KeyGradSplit,
    partial: TensorArg<R>,
    scale: f32,
) {
    if let Some(cfg) = key_mma_tile_config::<R, F>(client, shape, keys) {
        let cube_dim = CubeDim::new_1d(cfg.units() as u32);
        let cubes = split.splits * shape.batch * shape.kv_heads * key_rows.div_ceil(cfg.rows());
        let count = calculate_cube_count_elemwise(client, cubes * cfg.units(), cube_dim);
        // SAFETY: as for the forward tensor-core kernels.
        unsafe {
            grad_key_value_mma_kernel::launch_unchecked::<F, I, R>(
                client,
                count,
                cube_dim,
                address_type(shape, key_rows),
                MMA_VECTOR,
                args.q,
                args.k,
                args.v,
                args.d_o,
                args.delta,
                args.lse,
                args.bitmap,
                dk,
                dv,
                partial,
                scale,
                split.positions as u32,
                split.keys as u32,
                cfg,
                keys,
            );
        }
        return;
    }
    assert_eq!(split.keys, 0, "the portable key-side kernel does not split");
    let cfg = key_tile_config(client, shape, keys);
    let cube_dim = CubeDim::new_1d(cfg.units as u32);
    let cubes = shape.batch * shape.kv_heads * key_rows.div_ceil(cfg.tile_keys);
    let count = calculate_cube_count_elemwise(client, cubes * cfg.units, cube_dim);
    grad_key_value_kernel::launch::<F, I, R>(
        client,
        count,
        cube_dim,
        address_type(shape, key_rows),
        args.q,
        args.k,
        args.v,
        args.d_o,
        args.delta,
        args.lse,
        args.bitmap,
        dk,
        dv,
        scale,
        cfg,
        keys,
    );
}

/// Adds up the split copies of [`launch_grad_key_value`]: `partial` (f32,
/// [`KeyGradSplit::buffer_shape`]) -> key rows `0..split.keys` of `dk: [B, L, H_kv, d_k]`
/// and `dv: [B, L, H_kv, d_v]`. Nothing to do when nothing was split.
#[allow(clippy::too_many_arguments)]
pub fn launch_sum_key_splits<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    key_rows: usize,
    split: KeyGradSplit,
    partial: TensorArg<R>,
    dk: TensorArg<R>,
    dv: TensorArg<R>,
    scale: f32,
) {
    if split.keys == 0 {
        return;
    }
    let outputs = shape.batch * split.keys * shape.kv_heads * (shape.d_k + shape.d_v);
    let (count, cube_dim) = elementwise_grid(client, outputs);
    sum_key_splits_kernel::launch::<F, R>(
        client,
        count,
        cube_dim,
        address_type(shape, key_rows),
        partial,
        dk,
        dv,
        scale,
        shape.d_k,
        shape.d_v,
    );
}
