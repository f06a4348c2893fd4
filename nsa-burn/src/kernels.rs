//! [`NsaBackend`] on Burn's generic CubeCL backend: launches the `nsa-cubecl` kernels,
//! forward and backward.

use burn::tensor::{bf16, f16, DType, Shape};
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use nsa_cubecl::{
    key_grad_split, launch_compressed, launch_delta, launch_gated_sum, launch_gated_sum_backward,
    launch_grad_key_value, launch_grad_query, launch_selected, launch_selected_gated_sum,
    launch_selection_bitmap, launch_sum_key_splits, launch_window, selection_bitmap_shape,
    selection_sums_gates, AttentionShape, GradArgs, KeySet, SelectionConfig,
};

use crate::backend::selected_then_gated_sum;
use crate::{
    BranchGrads, BranchSaved, GatedRest, GatedSum, NsaAttentionConfig, NsaBackend, NsaBackward,
};

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

/// The kernels' inputs in contiguous row-major layout (the tensor-core kernels read whole
/// rows as vectors); a no-op for tensors that already are.
fn contiguous<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    (into_contiguous(q), into_contiguous(k), into_contiguous(v))
}

/// An uninitialised contiguous tensor shaped and typed like `x`.
fn empty_like<R: CubeRuntime>(x: &CubeTensor<R>) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        x.meta.shape().clone(),
        x.dtype,
    )
}

/// The backward pass of one branch: `delta = rowsum(dO * O)` (its own kernel), then the
/// query-side and key-side kernels. `selected` is the selection for
/// [`KeySet::Selected`]; the other branches pass none (the kernels then get a one-element
/// placeholder they never read).
fn branch_backward<R, F, I, BT>(
    saved: BranchSaved<CubeBackend<R, F, I, BT>>,
    selected: Option<CubeTensor<R>>,
    grad: CubeTensor<R>,
    keys: KeySet,
    config: &NsaAttentionConfig,
) -> BranchGrads<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let grad = into_contiguous(grad);
    let output = into_contiguous(saved.output);
    let (q, k, v) = contiguous(saved.q, saved.k, saved.v);
    let shape = attention_shape(&q, &v);
    // [B, T, H] f32
    let delta = empty_device_contiguous_dtype(
        q.client.clone(),
        q.device.clone(),
        Shape::new([shape.batch, shape.seq, shape.heads]),
        DType::F32,
    );
    with_float_type!(q.dtype, Fl => launch_delta::<R, Fl>(
        &q.client,
        &shape,
        grad.clone().into_tensor_arg(),
        output.into_tensor_arg(),
        delta.clone().into_tensor_arg(),
    ));
    let key_rows = dims(&k)[1];
    let placeholder = || {
        empty_device_contiguous_dtype(
            q.client.clone(),
            q.device.clone(),
            Shape::new([1, 1, 1, 1]),
            I::dtype(),
        )
    };
    let (selected, bitmap) = match selected {
        Some(selected) => {
            let selected = into_contiguous(selected);
            // [B, H_kv, n_blocks, ceil(T / 32)]: the selection inverted, for the key side.
            let bitmap = empty_device_contiguous_dtype(
                q.client.clone(),
                q.device.clone(),
                Shape::new(selection_bitmap_shape(&shape, config.select_block)),
                selected.dtype,
            );
            with_int_type!(selected.dtype, In => launch_selection_bitmap::<R, In>(
                &q.client,
                &shape,
                selected.clone().into_tensor_arg(),
                bitmap.clone().into_tensor_arg(),
            ));
            (selected, bitmap)
        }
        None => (placeholder(), placeholder()),
    };
    let args = || GradArgs {
        q: q.clone().into_tensor_arg(),
        k: k.clone().into_tensor_arg(),
        v: v.clone().into_tensor_arg(),
        d_o: grad.clone().into_tensor_arg(),
        delta: delta.clone().into_tensor_arg(),
        lse: saved.lse.clone().into_tensor_arg(),
        selected: selected.clone().into_tensor_arg(),
        bitmap: bitmap.clone().into_tensor_arg(),
    };
    let (dq, dk, dv) = (empty_like(&q), empty_like(&k), empty_like(&v));
    let client = q.client.clone();
    let scale = scale(config, &shape);
    with_float_type!(q.dtype, Fl => with_int_type!(selected.dtype, In => {
        let split = key_grad_split::<R, Fl>(
            &client,
            &shape,
            key_rows,
            keys,
            config.n_initial_blocks,
        );
        // [splits * B, split keys, H_kv, d_k + d_v] f32
        let partial = empty_device_contiguous_dtype(
            client.clone(),
            q.device.clone(),
            Shape::new(split.buffer_shape(&shape)),
            DType::F32,
        );
        launch_grad_query::<R, Fl, In>(
            &client,
            &shape,
            key_rows,
            keys,
            args(),
            dq.clone().into_tensor_arg(),
            scale,
        );
        launch_grad_key_value::<R, Fl, In>(
            &client,
            &shape,
            key_rows,
            keys,
            args(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            split,
            partial.clone().into_tensor_arg(),
            scale,
        );
        launch_sum_key_splits::<R, Fl>(
            &client,
            &shape,
            key_rows,
            split,
            partial.into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            scale,
        );
    }));
    BranchGrads {
        q: dq,
        k: dk,
        v: dv,
    }
}

/// The gated sum's operands, contiguous, the gates in the outputs' dtype, and the call
/// sizes from them (`d_k` unused).
fn gated_sum_operands<R: CubeRuntime>(
    parts: GatedSum<CubeBackend<R, impl FloatElement, impl IntElement, impl BoolElement>>,
) -> ([CubeTensor<R>; 3], CubeTensor<R>, AttentionShape) {
    let outputs = [parts.compressed, parts.selected, parts.window].map(into_contiguous);
    let [batch, seq, heads, d_v] = dims(&outputs[0]);
    let shape = AttentionShape {
        batch,
        seq,
        heads,
        kv_heads: heads,
        d_k: d_v,
        d_v,
    };
    let gates = cast(into_contiguous(parts.gates), outputs[0].dtype);
    (outputs, gates, shape)
}

/// Backward of the gated sum: one kernel for the gradients of the branch outputs and the
/// gates.
fn gated_sum_backward<R, F, I, BT>(
    parts: GatedSum<CubeBackend<R, F, I, BT>>,
    grad: CubeTensor<R>,
) -> GatedSum<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let gates_dtype = parts.gates.dtype;
    let (outputs, gates, shape) = gated_sum_operands(parts);
    let grad = into_contiguous(grad);
    let grads = outputs.each_ref().map(empty_like);
    let d_gates = empty_like(&gates);
    let args = |tensors: &[CubeTensor<R>; 3]| tensors.clone().map(|t| t.into_tensor_arg());
    with_float_type!(grad.dtype, Fl => launch_gated_sum_backward::<R, Fl>(
        &grad.client,
        &shape,
        grad.clone().into_tensor_arg(),
        args(&outputs),
        gates.into_tensor_arg(),
        args(&grads),
        d_gates.clone().into_tensor_arg(),
    ));
    let [compressed, selected, window] = grads;
    GatedSum {
        compressed,
        selected,
        window,
        gates: cast(d_gates, gates_dtype),
    }
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
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        let (q, k_cmp, v_cmp) = contiguous(q, k_cmp, v_cmp);
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
                lse.clone().into_tensor_arg(),
                selected.clone().into_tensor_arg(),
                scale(config, &shape),
                selection,
            )
        }));
        (o, lse, selected)
    }

    fn nsa_selected(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        selected: CubeTensor<R>,
        config: &NsaAttentionConfig,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (q, k, v) = contiguous(q, k, v);
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
                lse.clone().into_tensor_arg(),
                scale(config, &shape),
                config.select_block,
            )
        }));
        (o, lse)
    }

    fn nsa_selected_gated_sum(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        selected: CubeTensor<R>,
        rest: GatedRest<Self>,
        config: &NsaAttentionConfig,
    ) -> CubeTensor<R> {
        let shape = attention_shape(&q, &v);
        let client = q.client.clone();
        let fused = with_float_type!(q.dtype, Fl => selection_sums_gates::<R, Fl>(&client, &shape));
        if !fused {
            return selected_then_gated_sum::<Self>(q, k, v, selected, rest, config);
        }
        let (q, k, v) = contiguous(q, k, v);
        let (output, lse) = outputs(&q, &shape);
        let selected = into_contiguous(selected);
        let compressed = into_contiguous(rest.compressed);
        let window = into_contiguous(rest.window);
        let gates = cast(into_contiguous(rest.gates), q.dtype);
        with_float_type!(q.dtype, Fl => with_int_type!(selected.dtype, In => {
            launch_selected_gated_sum::<R, Fl, In>(
                &client,
                &shape,
                [q, k, v, selected].map(|t| t.into_tensor_arg()),
                [compressed, window, gates].map(|t| t.into_tensor_arg()),
                output.clone().into_tensor_arg(),
                lse.into_tensor_arg(),
                scale(config, &shape),
                config.select_block,
            )
        }));
        output
    }

    fn nsa_window(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        config: &NsaAttentionConfig,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (q, k, v) = contiguous(q, k, v);
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
                lse.clone().into_tensor_arg(),
                scale(config, &shape),
                config.window,
            )
        });
        (o, lse)
    }

    fn nsa_gated_sum(parts: GatedSum<Self>) -> CubeTensor<R> {
        let (outputs, gates, shape) = gated_sum_operands(parts);
        let output = empty_like(&outputs[0]);
        let client = output.client.clone();
        with_float_type!(output.dtype, Fl => launch_gated_sum::<R, Fl>(
            &client,
            &shape,
            outputs.map(|t| t.into_tensor_arg()),
            gates.into_tensor_arg(),
            output.clone().into_tensor_arg(),
        ));
        output
    }

    fn nsa_backward() -> Option<NsaBackward<Self>> {
        Some(NsaBackward {
            gated_sum: gated_sum_backward,
            compressed: |saved, grad, config| {
                let keys = KeySet::Compressed {
                    block: config.compress_block,
                    stride: config.compress_stride,
                };
                branch_backward(saved, None, grad, keys, config)
            },
            selected: |saved, selected, grad, config| {
                let keys = KeySet::Selected {
                    block: config.select_block,
                };
                branch_backward(saved, Some(selected), grad, keys, config)
            },
            window: |saved, grad, config| {
                let keys = KeySet::Window {
                    size: config.window,
                };
                branch_backward(saved, None, grad, keys, config)
            },
        })
    }
}
