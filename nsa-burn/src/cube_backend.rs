//! [`NsaBackend`] on Burn's generic CubeCL backend: plans and launches the `nsa-cubecl`
//! kernels, forward and backward, on contiguous buffers it allocates.

use burn::tensor::{bf16, f16, DType, Shape};
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use nsa_cubecl::{
    launch_branch_backward, launch_compressed, launch_gated_sum, launch_gated_sum_backward,
    launch_selected, launch_selected_gated_sum, launch_window, plan_branch_backward, plan_call,
    plan_compressed, plan_selected, plan_window, AttentionArgs, AttentionShape, BranchBackwardArgs,
    CallPlan, GatedRestArgs, GatedSumArgs, KeySet, NsaKernelConfig, PlanError, SelectionArgs,
    SplitArgs,
};

use crate::backend::{last_rows_start, selected_then_gated_sum};
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

/// The plan, or a panic naming why no kernel can run the call ([`crate::try_nsa_attention`]
/// plans the whole call first and returns that as an error).
fn planned<P>(plan: Result<P, PlanError>) -> P {
    plan.unwrap_or_else(|error| panic!("{error}"))
}

fn dims<R: CubeRuntime>(tensor: &CubeTensor<R>) -> [usize; 4] {
    let shape = tensor.meta.shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// Call sizes from `q: [B, T, H, d_k]`, a value tensor `[B, L, H_kv, d_v]` and the position
/// of the first query.
fn attention_shape<R: CubeRuntime>(
    q: &CubeTensor<R>,
    v: &CubeTensor<R>,
    query_start: usize,
) -> AttentionShape {
    AttentionShape::from_dims(dims(q), dims(v), query_start)
}

/// An uninitialised contiguous tensor of `shape` in `dtype` on `like`'s device.
fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: &[usize], dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape.to_vec()),
        dtype,
    )
}

/// An uninitialised contiguous tensor shaped and typed like `x`.
fn empty_like<R: CubeRuntime>(x: &CubeTensor<R>) -> CubeTensor<R> {
    empty(x, x.meta.shape(), x.dtype)
}

/// One branch's contiguous inputs of a call of `shape` with fresh outputs: `o:
/// [B, T, H, d_v]` in `q`'s dtype and `lse: [B, H, T]` f32, and, when the plan splits the
/// keys, the parts' f32 buffers of `split_shapes`. Returns the launch arguments and
/// `(o, lse)`.
fn attention_args<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    shape: &AttentionShape,
    split_shapes: Option<([usize; 4], [usize; 3])>,
) -> (AttentionArgs<R>, CubeTensor<R>, CubeTensor<R>) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let splits = split_shapes.map(|(o, lse)| SplitArgs {
        o: empty(&q, &o, DType::F32).into_tensor_arg(),
        lse: empty(&q, &lse, DType::F32).into_tensor_arg(),
    });
    let o = empty(
        &q,
        &[shape.batch, shape.seq, shape.heads, shape.d_v],
        q.dtype,
    );
    let lse = empty(&q, &[shape.batch, shape.heads, shape.seq], DType::F32);
    let args = AttentionArgs {
        q: q.into_tensor_arg(),
        k: k.into_tensor_arg(),
        v: v.into_tensor_arg(),
        o: o.clone().into_tensor_arg(),
        lse: lse.clone().into_tensor_arg(),
        splits,
    };
    (args, o, lse)
}

/// The backward pass of one branch, planned and launched by `nsa-cubecl`: this side only
/// allocates the buffers the plan names. `selected` is the selection for
/// the selection branch; the other branches pass none. `keys` picks the branch's
/// attention pattern from the kernel config.
fn branch_backward<R, F, I, BT>(
    saved: BranchSaved<CubeBackend<R, F, I, BT>>,
    selected: Option<CubeTensor<R>>,
    grad: CubeTensor<R>,
    keys: fn(&NsaKernelConfig) -> KeySet,
    config: &NsaAttentionConfig,
) -> BranchGrads<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let (q, k, v) = (
        into_contiguous(saved.q),
        into_contiguous(saved.k),
        into_contiguous(saved.v),
    );
    // Autodiff calls the backward kernels for causal self-attention only.
    let shape = attention_shape(&q, &v, 0);
    let key_rows = dims(&k)[1];
    let kernel_config = config.kernel_config(shape.d_k, shape.seq);
    let keys = keys(&kernel_config);
    let client = q.client.clone();
    let plan = with_float_type!(q.dtype, Fl => planned(plan_branch_backward::<R, Fl>(
        &client, shape, key_rows, keys, &kernel_config,
    )));
    let (dq, dk, dv) = (empty_like(&q), empty_like(&k), empty_like(&v));
    let int_dtype = selected
        .as_ref()
        .map_or(I::dtype(), |selected| selected.dtype);
    let selection = selected.map(into_contiguous).map(|selected| {
        let bitmap_shape = plan
            .bitmap_shape()
            .expect("the selection branch's plan has a bitmap");
        let bitmap = empty(&q, &bitmap_shape, selected.dtype);
        SelectionArgs {
            selected: selected.into_tensor_arg(),
            bitmap: bitmap.into_tensor_arg(),
        }
    });
    let args = BranchBackwardArgs {
        q: q.clone().into_tensor_arg(),
        k: k.into_tensor_arg(),
        v: v.into_tensor_arg(),
        output: into_contiguous(saved.output).into_tensor_arg(),
        lse: saved.lse.into_tensor_arg(),
        d_o: into_contiguous(grad).into_tensor_arg(),
        delta: empty(&q, &plan.delta_shape(), DType::F32).into_tensor_arg(),
        selection,
        partial: plan
            .partial_shape()
            .map(|shape| empty(&q, &shape, DType::F32).into_tensor_arg()),
        dq: dq.clone().into_tensor_arg(),
        dk: dk.clone().into_tensor_arg(),
        dv: dv.clone().into_tensor_arg(),
    };
    with_float_type!(q.dtype, Fl => with_int_type!(int_dtype, In => {
        launch_branch_backward::<R, Fl, In>(&client, &plan, args)
    }));
    BranchGrads {
        q: dq,
        k: dk,
        v: dv,
    }
}

/// The gated sum's operands, contiguous, the gates in the outputs' dtype, and the call
/// sizes from them (`d_k` and `kv_heads` unused).
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
        query_start: 0,
    };
    let gates = cast(into_contiguous(parts.gates), outputs[0].dtype);
    (outputs, gates, shape)
}

/// The launch arguments of the gated sum's operands.
fn gated_sum_args<R: CubeRuntime>(
    outputs: &[CubeTensor<R>; 3],
    gates: &CubeTensor<R>,
) -> GatedSumArgs<R> {
    GatedSumArgs {
        outputs: outputs.clone().map(|t| t.into_tensor_arg()),
        gates: gates.clone().into_tensor_arg(),
    }
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
    with_float_type!(grad.dtype, Fl => launch_gated_sum_backward::<R, Fl>(
        &grad.client,
        &shape,
        grad.clone().into_tensor_arg(),
        gated_sum_args(&outputs, &gates),
        grads.clone().map(|t| t.into_tensor_arg()),
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
    fn nsa_supports_dtype(dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
    }

    fn nsa_plan(
        device: &Self::Device,
        dtype: DType,
        shape: AttentionShape,
        config: &NsaAttentionConfig,
    ) -> Result<Option<CallPlan>, PlanError> {
        let client = R::client(device);
        let kernel_config = config.kernel_config(shape.d_k, shape.key_len());
        let num_compressed = config.num_compressed_blocks(shape.key_len());
        with_float_type!(dtype, Fl => plan_call::<R, Fl>(&client, shape, num_compressed, &kernel_config))
            .map(Some)
    }

    fn nsa_compressed(
        q: CubeTensor<R>,
        k_cmp: CubeTensor<R>,
        v_cmp: CubeTensor<R>,
        query_start: usize,
        config: &NsaAttentionConfig,
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        let num_compressed = dims(&k_cmp)[1];
        let client = q.client.clone();
        let dtype = q.dtype;
        let selected_shape = {
            let [batch, seq, _, _] = dims(&q);
            let [_, _, kv_heads, _] = dims(&v_cmp);
            [batch, kv_heads, seq, config.n_selected]
        };
        let selected = empty(&q, &selected_shape, I::dtype());
        let shape = attention_shape(&q, &v_cmp, query_start);
        let kernel_config = config.kernel_config(shape.d_k, shape.key_len());
        let plan = with_float_type!(dtype, Fl => planned(plan_compressed::<R, Fl>(
            &client, shape, num_compressed, &kernel_config,
        )));
        let (args, o, lse) = attention_args(q, k_cmp, v_cmp, &shape, plan.split_shapes());
        with_float_type!(dtype, Fl => with_int_type!(selected.dtype, In => {
            launch_compressed::<R, Fl, In>(&client, &plan, args, selected.clone().into_tensor_arg())
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
        let client = q.client.clone();
        let dtype = q.dtype;
        let selected = into_contiguous(selected);
        let shape = attention_shape(&q, &v, last_rows_start(&q, &k));
        let kernel_config = config.kernel_config(shape.d_k, shape.key_len());
        let plan = with_float_type!(dtype, Fl => planned(plan_selected::<R, Fl>(
            &client, shape, &kernel_config,
        )));
        let (args, o, lse) = attention_args(q, k, v, &shape, plan.split_shapes());
        with_float_type!(dtype, Fl => with_int_type!(selected.dtype, In => {
            launch_selected::<R, Fl, In>(&client, &plan, args, selected.into_tensor_arg())
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
        let shape = attention_shape(&q, &v, last_rows_start(&q, &k));
        let client = q.client.clone();
        let kernel_config = config.kernel_config(shape.d_k, shape.key_len());
        let plan = with_float_type!(q.dtype, Fl => planned(plan_selected::<R, Fl>(
            &client, shape, &kernel_config,
        )));
        let Some(plan) = plan.gated_sum() else {
            return selected_then_gated_sum::<Self>(q, k, v, selected, rest, config);
        };
        let dtype = q.dtype;
        let selected = into_contiguous(selected);
        let rest = GatedRestArgs {
            compressed: into_contiguous(rest.compressed).into_tensor_arg(),
            window: into_contiguous(rest.window).into_tensor_arg(),
            gates: cast(into_contiguous(rest.gates), dtype).into_tensor_arg(),
        };
        // The tensor-core selection kernel never splits its keys.
        let (args, output, _) = attention_args(q, k, v, &shape, None);
        with_float_type!(dtype, Fl => with_int_type!(selected.dtype, In => {
            launch_selected_gated_sum::<R, Fl, In>(
                &client,
                &plan,
                args,
                selected.into_tensor_arg(),
                rest,
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
        let client = q.client.clone();
        let dtype = q.dtype;
        let shape = attention_shape(&q, &v, last_rows_start(&q, &k));
        let kernel_config = config.kernel_config(shape.d_k, shape.key_len());
        let plan = with_float_type!(dtype, Fl => planned(plan_window::<R, Fl>(
            &client, shape, &kernel_config,
        )));
        let (args, o, lse) = attention_args(q, k, v, &shape, plan.split_shapes());
        with_float_type!(dtype, Fl => launch_window::<R, Fl>(&client, &plan, args));
        (o, lse)
    }

    fn nsa_gated_sum(parts: GatedSum<Self>) -> CubeTensor<R> {
        let (outputs, gates, shape) = gated_sum_operands(parts);
        let output = empty_like(&outputs[0]);
        let client = output.client.clone();
        with_float_type!(output.dtype, Fl => launch_gated_sum::<R, Fl>(
            &client,
            &shape,
            gated_sum_args(&outputs, &gates),
            output.clone().into_tensor_arg(),
        ));
        output
    }

    fn nsa_backward() -> Option<NsaBackward<Self>> {
        Some(NsaBackward {
            gated_sum: gated_sum_backward,
            compressed: |saved, grad, config| {
                branch_backward(saved, None, grad, NsaKernelConfig::compressed_keys, config)
            },
            selected: |saved, selected, grad, config| {
                branch_backward(
                    saved,
                    Some(selected),
                    grad,
                    NsaKernelConfig::selected_keys,
                    config,
                )
            },
            window: |saved, grad, config| {
                branch_backward(saved, None, grad, NsaKernelConfig::window_keys, config)
            },
        })
    }
}
