//! [`NsaBackend`] on Burn's generic CubeCL backend: launches the `nsa-cubecl` kernels.

use burn::tensor::{bf16, f16, DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use nsa_cubecl::{
    launch_compressed, launch_selected, launch_window, AttentionShape, SelectionConfig,
};

use crate::{NsaAttentionConfig, NsaBackend};

/// Calls `$launch::<R, F, ..>` with `F` the Rust type of the float dtype `$dtype`
/// (and `I` that of the int dtype, for the kernels that take one).
macro_rules! with_float_type {
    ($dtype:expr, $f:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $f = f32;
                $body
            }
            DType::F16 => {
                type $f = f16;
                $body
            }
            DType::BF16 => {
                type $f = bf16;
                $body
            }
            other => panic!("NSA kernels take f32, f16 or bf16 tensors, got {other:?}"),
        }
    };
}

macro_rules! with_int_type {
    ($dtype:expr, $i:ident => $body:expr) => {
        match $dtype {
            DType::I32 => {
                type $i = i32;
                $body
            }
            DType::I64 => {
                type $i = i64;
                $body
            }
            other => panic!("NSA kernels take i32 or i64 block indices, got {other:?}"),
        }
    };
}

fn dims<R: CubeRuntime>(tensor: &CubeTensor<R>) -> [usize; 4] {
    let shape = tensor.meta.shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// Call sizes from `q: [B, T, H, d_k]` and a value tensor `[B, L, H_kv, d_v]`.
fn attention_shape<R: CubeRuntime>(q: &CubeTensor<R>, v: &CubeTensor<R>) -> AttentionShape {
    let [batch, seq, heads, d_k] = dims(q);
    let [_, _, kv_heads, d_v] = dims(v);
    AttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        d_k,
        d_v,
    }
}

/// Output `[B, T, H, d_v]` in `q`'s dtype and log-sum-exp `[B, H, T]` in f32.
fn outputs<R: CubeRuntime>(
    q: &CubeTensor<R>,
    shape: &AttentionShape,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let o = empty_device_contiguous_dtype(
        q.client.clone(),
        q.device.clone(),
        Shape::new([shape.batch, shape.seq, shape.heads, shape.d_v]),
        q.dtype,
    );
    let lse = empty_device_contiguous_dtype(
        q.client.clone(),
        q.device.clone(),
        Shape::new([shape.batch, shape.heads, shape.seq]),
        DType::F32,
    );
    (o, lse)
}

fn scale(config: &NsaAttentionConfig, shape: &AttentionShape) -> f32 {
    config.scale(shape.d_k) as f32
}

impl<R, F, I, BT> NsaBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn nsa_compressed(
        q: CubeTensor<R>,
        k_cmp: CubeTensor<R>,
        v_cmp: CubeTensor<R>,
        config: &NsaAttentionConfig,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let shape = attention_shape(&q, &v_cmp);
        let num_compressed = dims(&k_cmp)[1];
        let (o, lse) = outputs(&q, &shape);
        let selected = empty_device_contiguous_dtype(
            q.client.clone(),
            q.device.clone(),
            Shape::new([shape.batch, shape.kv_heads, shape.seq, config.n_selected]),
            I::dtype(),
        );
        let selection = SelectionConfig {
            compress_block: config.compress_block,
            compress_stride: config.compress_stride,
            select_block: config.select_block,
            n_selected: config.n_selected,
            n_initial: config.n_initial_blocks,
            n_local: config.n_local_blocks,
            max_blocks: 0,
        };
        let client = q.client.clone();
        with_float_type!(q.dtype, Fl => with_int_type!(selected.dtype, In => {
            launch_compressed::<R, Fl, In>(
                &client,
                &shape,
                num_compressed,
                q.into_tensor_arg(),
                k_cmp.into_tensor_arg(),
                v_cmp.into_tensor_arg(),
                o.clone().into_tensor_arg(),
                lse.into_tensor_arg(),
                selected.clone().into_tensor_arg(),
                scale(config, &shape),
                selection,
            )
        }));
        (o, selected)
    }

    fn nsa_selected(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        selected: CubeTensor<R>,
        config: &NsaAttentionConfig,
    ) -> CubeTensor<R> {
        let shape = attention_shape(&q, &v);
        let (o, lse) = outputs(&q, &shape);
        let client = q.client.clone();
        let selected = into_contiguous(selected);
        with_float_type!(q.dtype, Fl => with_int_type!(selected.dtype, In => {
            launch_selected::<R, Fl, In>(
                &client,
                &shape,
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                selected.into_tensor_arg(),
                o.clone().into_tensor_arg(),
                lse.into_tensor_arg(),
                scale(config, &shape),
                config.select_block,
            )
        }));
        o
    }

    fn nsa_window(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        config: &NsaAttentionConfig,
    ) -> CubeTensor<R> {
        let shape = attention_shape(&q, &v);
        let (o, lse) = outputs(&q, &shape);
        let client = q.client.clone();
        with_float_type!(q.dtype, Fl => {
            launch_window::<R, Fl>(
                &client,
                &shape,
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                o.clone().into_tensor_arg(),
                lse.into_tensor_arg(),
                scale(config, &shape),
                config.window,
            )
        });
        o
    }
}
