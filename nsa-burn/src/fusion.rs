//! [`NsaBackend`] on `Fusion<B>` (the default `Cuda`, `Wgpu` and `Rocm` types): each branch
//! is registered as a custom operation that runs `B`'s kernels when the stream executes.

use core::marker::PhantomData;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Element, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use crate::{NsaAttentionConfig, NsaBackend};

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// Which branch a [`BranchOp`] runs.
#[derive(Debug, Clone, Copy)]
enum Branch {
    Compressed,
    Selected,
    Window,
}

#[derive(Debug)]
struct BranchOp<B> {
    desc: CustomOpIr,
    branch: Branch,
    config: NsaAttentionConfig,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + NsaBackend> Operation<B::FusionRuntime> for BranchOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let config = &self.config;
        match self.branch {
            Branch::Compressed => {
                let ([q, k, v], [o, selected]) = self.desc.as_fixed();
                let (out, blocks) = B::nsa_compressed(
                    handles.get_float_tensor::<B>(q),
                    handles.get_float_tensor::<B>(k),
                    handles.get_float_tensor::<B>(v),
                    config,
                );
                handles.register_float_tensor::<B>(&o.id, out);
                handles.register_int_tensor::<B>(&selected.id, blocks);
            }
            Branch::Selected => {
                let ([q, k, v, selected], [o]) = self.desc.as_fixed();
                let out = B::nsa_selected(
                    handles.get_float_tensor::<B>(q),
                    handles.get_float_tensor::<B>(k),
                    handles.get_float_tensor::<B>(v),
                    handles.get_int_tensor::<B>(selected),
                    config,
                );
                handles.register_float_tensor::<B>(&o.id, out);
            }
            Branch::Window => {
                let ([q, k, v], [o]) = self.desc.as_fixed();
                let out = B::nsa_window(
                    handles.get_float_tensor::<B>(q),
                    handles.get_float_tensor::<B>(k),
                    handles.get_float_tensor::<B>(v),
                    config,
                );
                handles.register_float_tensor::<B>(&o.id, out);
            }
        }
    }
}

/// The branch output `[B, T, H, d_v]` of query `q: [B, T, H, d_k]` and values `v: [.., d_v]`.
fn output_ir<R: FusionRuntime>(q: &FusionTensor<R>, v: &FusionTensor<R>) -> TensorIr {
    let shape = Shape::new([q.shape[0], q.shape[1], q.shape[2], v.shape[3]]);
    TensorIr::uninit(q.client.create_empty_handle(), shape, q.dtype)
}

/// Registers `branch` with the given inputs and output descriptions.
fn register<B: FusionBackend + NsaBackend>(
    branch: Branch,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: &[TensorIr],
    config: &NsaAttentionConfig,
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let name = match branch {
        Branch::Compressed => "nsa_compressed",
        Branch::Selected => "nsa_selected",
        Branch::Window => "nsa_window",
    };
    let desc = CustomOpIr::new(name, &inputs, outputs);
    let op = BranchOp::<B> {
        desc: desc.clone(),
        branch,
        config: *config,
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op)
}

impl<B: FusionBackend + NsaBackend> NsaBackend for Fusion<B> {
    fn nsa_compressed(
        q: FloatTensor<Self>,
        k_cmp: FloatTensor<Self>,
        v_cmp: FloatTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let o = output_ir(&q, &v_cmp);
        let selected = TensorIr::uninit(
            q.client.create_empty_handle(),
            Shape::new([q.shape[0], v_cmp.shape[2], q.shape[1], config.n_selected]),
            B::IntElem::dtype(),
        );
        let [o, selected] = register::<B>(
            Branch::Compressed,
            vec![q, k_cmp, v_cmp],
            &[o, selected],
            config,
        )
        .outputs();
        (o, selected)
    }

    fn nsa_selected(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        selected: IntTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> FloatTensor<Self> {
        let o = output_ir(&q, &v);
        register::<B>(Branch::Selected, vec![q, k, v, selected], &[o], config).output()
    }

    fn nsa_window(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> FloatTensor<Self> {
        let o = output_ir(&q, &v);
        register::<B>(Branch::Window, vec![q, k, v], &[o], config).output()
    }
}
