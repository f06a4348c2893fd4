//! [`NsaBackend`] on `Fusion<B>` (the default `Cuda`, `Wgpu` and `Rocm` types): each branch's
//! forward and backward pass, the gated sum's, and the selection branch fused with the gated
//! sum, is registered as a custom operation that runs `B`'s kernels when the stream executes.

use core::marker::PhantomData;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Element, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use nsa_cubecl::{AttentionShape, CallPlan, PlanError};

use crate::{
    BranchGrads, BranchSaved, GatedRest, GatedSum, NsaAttentionConfig, NsaBackend, NsaBackward,
};

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// Which operation, and which pass of it, a [`NsaOp`] runs, with the attention config of
/// the steps that read one (the gated sum reads none).
#[derive(Debug, Clone, Copy)]
enum Step {
    /// With the position of the first query.
    Compressed(NsaAttentionConfig, usize),
    Selected(NsaAttentionConfig),
    Window(NsaAttentionConfig),
    GatedSum,
    SelectedGatedSum(NsaAttentionConfig),
    CompressedBackward(NsaAttentionConfig),
    SelectedBackward(NsaAttentionConfig),
    WindowBackward(NsaAttentionConfig),
    GatedSumBackward,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Compressed(..) => "nsa_compressed",
            Step::Selected(_) => "nsa_selected",
            Step::Window(_) => "nsa_window",
            Step::GatedSum => "nsa_gated_sum",
            Step::SelectedGatedSum(_) => "nsa_selected_gated_sum",
            Step::CompressedBackward(_) => "nsa_compressed_backward",
            Step::SelectedBackward(_) => "nsa_selected_backward",
            Step::WindowBackward(_) => "nsa_window_backward",
            Step::GatedSumBackward => "nsa_gated_sum_backward",
        }
    }
}

#[derive(Debug)]
struct NsaOp<B> {
    desc: CustomOpIr,
    step: Step,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + NsaBackend> NsaOp<B> {
    fn float(&self, handles: &mut Handles<B>, input: usize) -> FloatTensor<B> {
        handles.get_float_tensor::<B>(&self.desc.inputs[input])
    }

    /// Backward inputs are `q, k, v, output, lse, grad` (then `selected`).
    fn saved(&self, handles: &mut Handles<B>) -> BranchSaved<B> {
        BranchSaved {
            q: self.float(handles, 0),
            k: self.float(handles, 1),
            v: self.float(handles, 2),
            output: self.float(handles, 3),
            lse: self.float(handles, 4),
        }
    }

    /// Gated-sum inputs are the three branch outputs and the gates (then the gradient).
    fn gated_sum(&self, handles: &mut Handles<B>) -> GatedSum<B> {
        GatedSum {
            compressed: self.float(handles, 0),
            selected: self.float(handles, 1),
            window: self.float(handles, 2),
            gates: self.float(handles, 3),
        }
    }

    fn register_floats(
        &self,
        handles: &mut Handles<B>,
        tensors: impl IntoIterator<Item = FloatTensor<B>>,
    ) {
        for (ir, tensor) in self.desc.outputs.iter().zip(tensors) {
            handles.register_float_tensor::<B>(&ir.id, tensor);
        }
    }
}

impl<B: FusionBackend + NsaBackend> Operation<B::FusionRuntime> for NsaOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        match self.step {
            Step::Compressed(config, query_start) => {
                let (o, lse, selected) = B::nsa_compressed(
                    self.float(handles, 0),
                    self.float(handles, 1),
                    self.float(handles, 2),
                    query_start,
                    &config,
                );
                self.register_floats(handles, [o, lse]);
                handles.register_int_tensor::<B>(&self.desc.outputs[2].id, selected);
            }
            Step::Selected(config) => {
                let selected = handles.get_int_tensor::<B>(&self.desc.inputs[3]);
                let (o, lse) = B::nsa_selected(
                    self.float(handles, 0),
                    self.float(handles, 1),
                    self.float(handles, 2),
                    selected,
                    &config,
                );
                self.register_floats(handles, [o, lse]);
            }
            Step::Window(config) => {
                let (o, lse) = B::nsa_window(
                    self.float(handles, 0),
                    self.float(handles, 1),
                    self.float(handles, 2),
                    &config,
                );
                self.register_floats(handles, [o, lse]);
            }
            Step::GatedSum => {
                let output = B::nsa_gated_sum(self.gated_sum(handles));
                self.register_floats(handles, [output]);
            }
            Step::SelectedGatedSum(config) => {
                let selected = handles.get_int_tensor::<B>(&self.desc.inputs[3]);
                let rest = GatedRest {
                    compressed: self.float(handles, 4),
                    window: self.float(handles, 5),
                    gates: self.float(handles, 6),
                };
                let output = B::nsa_selected_gated_sum(
                    self.float(handles, 0),
                    self.float(handles, 1),
                    self.float(handles, 2),
                    selected,
                    rest,
                    &config,
                );
                self.register_floats(handles, [output]);
            }
            Step::GatedSumBackward => {
                let parts = self.gated_sum(handles);
                let grad = self.float(handles, 4);
                let kernels =
                    B::nsa_backward().expect("registered only when B has backward kernels");
                let GatedSum {
                    compressed,
                    selected,
                    window,
                    gates,
                } = (kernels.gated_sum)(parts, grad);
                self.register_floats(handles, [compressed, selected, window, gates]);
            }
            Step::CompressedBackward(config)
            | Step::SelectedBackward(config)
            | Step::WindowBackward(config) => {
                let saved = self.saved(handles);
                let grad = self.float(handles, 5);
                let kernels =
                    B::nsa_backward().expect("registered only when B has backward kernels");
                let BranchGrads { q, k, v } = match self.step {
                    Step::CompressedBackward(_) => (kernels.compressed)(saved, grad, &config),
                    Step::SelectedBackward(_) => {
                        let selected = handles.get_int_tensor::<B>(&self.desc.inputs[6]);
                        (kernels.selected)(saved, selected, grad, &config)
                    }
                    _ => (kernels.window)(saved, grad, &config),
                };
                self.register_floats(handles, [q, k, v]);
            }
        }
    }
}

/// The branch output `[B, T, H, d_v]` of query `q: [B, T, H, d_k]` and values `v: [.., d_v]`,
/// and its log-sum-exp `[B, H, T]` f32.
fn output_irs<R: FusionRuntime>(q: &FusionTensor<R>, v: &FusionTensor<R>) -> [TensorIr; 2] {
    let [batch, seq, heads, _] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    [
        TensorIr::uninit(
            q.client.create_empty_handle(),
            Shape::new([batch, seq, heads, v.shape[3]]),
            q.dtype,
        ),
        TensorIr::uninit(
            q.client.create_empty_handle(),
            Shape::new([batch, heads, seq]),
            DType::F32,
        ),
    ]
}

/// An uninitialised tensor shaped and typed like `x` (for a gradient).
fn like<R: FusionRuntime>(x: &FusionTensor<R>) -> TensorIr {
    TensorIr::uninit(x.client.create_empty_handle(), x.shape.clone(), x.dtype)
}

/// Registers `step` with the given inputs and output descriptions.
fn register<B: FusionBackend + NsaBackend>(
    step: Step,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: &[TensorIr],
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(step.name(), &inputs, outputs);
    let op = NsaOp::<B> {
        desc: desc.clone(),
        step,
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op)
}

/// Registers a backward step: inputs `saved`, `grad` and `extra`; outputs the gradients of
/// `q`, `k` and `v`.
fn register_backward<B: FusionBackend + NsaBackend>(
    step: Step,
    saved: BranchSaved<Fusion<B>>,
    grad: FloatTensor<Fusion<B>>,
    extra: Option<IntTensor<Fusion<B>>>,
) -> BranchGrads<Fusion<B>> {
    let outputs = [like(&saved.q), like(&saved.k), like(&saved.v)];
    let mut inputs = vec![saved.q, saved.k, saved.v, saved.output, saved.lse, grad];
    inputs.extend(extra);
    let [q, k, v] = register::<B>(step, inputs, &outputs).outputs();
    BranchGrads { q, k, v }
}

/// Registers a gated-sum step: inputs the operands (then `grad`, for the backward step);
/// outputs shaped like `outputs`.
fn register_gated_sum<B: FusionBackend + NsaBackend>(
    step: Step,
    parts: GatedSum<Fusion<B>>,
    grad: Option<FloatTensor<Fusion<B>>>,
    outputs: &[TensorIr],
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let mut inputs = vec![parts.compressed, parts.selected, parts.window, parts.gates];
    inputs.extend(grad);
    register::<B>(step, inputs, outputs)
}

impl<B: FusionBackend + NsaBackend> NsaBackend for Fusion<B> {
    fn nsa_supports_dtype(dtype: DType) -> bool {
        B::nsa_supports_dtype(dtype)
    }

    fn nsa_plan(
        device: &Self::Device,
        dtype: DType,
        shape: AttentionShape,
        config: &NsaAttentionConfig,
    ) -> Result<Option<CallPlan>, PlanError> {
        B::nsa_plan(device, dtype, shape, config)
    }

    fn nsa_compressed(
        q: FloatTensor<Self>,
        k_cmp: FloatTensor<Self>,
        v_cmp: FloatTensor<Self>,
        query_start: usize,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>) {
        let [o, lse] = output_irs(&q, &v_cmp);
        let selected = TensorIr::uninit(
            q.client.create_empty_handle(),
            Shape::new([q.shape[0], v_cmp.shape[2], q.shape[1], config.n_selected]),
            B::IntElem::dtype(),
        );
        let [o, lse, selected] = register::<B>(
            Step::Compressed(*config, query_start),
            vec![q, k_cmp, v_cmp],
            &[o, lse, selected],
        )
        .outputs();
        (o, lse, selected)
    }

    fn nsa_selected(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        selected: IntTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let outputs = output_irs(&q, &v);
        let [o, lse] =
            register::<B>(Step::Selected(*config), vec![q, k, v, selected], &outputs).outputs();
        (o, lse)
    }

    fn nsa_window(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let outputs = output_irs(&q, &v);
        let [o, lse] = register::<B>(Step::Window(*config), vec![q, k, v], &outputs).outputs();
        (o, lse)
    }

    fn nsa_selected_gated_sum(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        selected: IntTensor<Self>,
        rest: GatedRest<Self>,
        config: &NsaAttentionConfig,
    ) -> FloatTensor<Self> {
        let output = [like(&rest.window)];
        let inputs = vec![q, k, v, selected, rest.compressed, rest.window, rest.gates];
        let step = Step::SelectedGatedSum(*config);
        let [output] = register::<B>(step, inputs, &output).outputs();
        output
    }

    fn nsa_gated_sum(parts: GatedSum<Self>) -> FloatTensor<Self> {
        let output = [like(&parts.selected)];
        let [output] = register_gated_sum::<B>(Step::GatedSum, parts, None, &output).outputs();
        output
    }

    fn nsa_backward() -> Option<NsaBackward<Self>> {
        B::nsa_backward()?;
        Some(NsaBackward {
            gated_sum: |parts, grad| {
                let outputs = [
                    like(&parts.compressed),
                    like(&parts.selected),
                    like(&parts.window),
                    like(&parts.gates),
                ];
                let [compressed, selected, window, gates] =
                    register_gated_sum::<B>(Step::GatedSumBackward, parts, Some(grad), &outputs)
                        .outputs();
                GatedSum {
                    compressed,
                    selected,
                    window,
                    gates,
                }
            },
            compressed: |saved, grad, config| {
                register_backward::<B>(Step::CompressedBackward(*config), saved, grad, None)
            },
            selected: |saved, selected, grad, config| {
                let step = Step::SelectedBackward(*config);
                register_backward::<B>(step, saved, grad, Some(selected))
            },
            window: |saved, grad, config| {
                register_backward::<B>(Step::WindowBackward(*config), saved, grad, None)
            },
        })
    }
}
