//! [`NsaBackend`] on `Autodiff<B>`. When `B` has backward kernels ([`NsaBackend::nsa_backward`])
//! each branch is one recorded operation: its forward pass runs `B`'s forward method (the
//! kernels) and keeps the inputs, the output and the row log-sum-exp, and its backward pass
//! calls `B`'s backward kernel. Otherwise the reference runs on `Autodiff<B>` and autodiff
//! differentiates its Burn ops; so it does for queries at an offset into longer keys (a
//! cache's calls), which the backward kernels do not take. The gated sum of the branch
//! outputs (Eq. 5) is recorded the same way. Selected block indices are never differentiated. The gates' projection,
//! the other projections and the compressor stay ordinary Burn ops either way.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::DType;
use nsa_cubecl::{AttentionShape, CallPlan, PlanError};

use crate::backend::{
    last_rows_start, reference_compressed, reference_gated_sum, reference_selected,
    reference_window, BranchBackwardFn, BranchGrads, BranchSaved, GatedSum, GatedSumBackwardFn,
    SelectedBackwardFn,
};
use crate::{NsaAttentionConfig, NsaBackend, NsaBackward};

/// `B`'s backward kernels for a branch call whose queries start at key position
/// `query_start`: `None` when `B` has none or the queries sit at an offset (the kernels take
/// causal self-attention only), and the reference runs instead.
fn backward_kernels<B: NsaBackend>(query_start: usize) -> Option<NsaBackward<B>> {
    B::nsa_backward().filter(|_| query_start == 0)
}

/// What one recorded branch keeps for its backward pass, and the kernel that runs it.
#[derive(Debug, Clone)]
enum BranchState<B: NsaBackend> {
    Branch(BranchSaved<B>, NsaAttentionConfig, BranchBackwardFn<B>),
    Selected(
        BranchSaved<B>,
        IntTensor<B>,
        NsaAttentionConfig,
        SelectedBackwardFn<B>,
    ),
}

/// The backward step of a recorded branch (parents: `q`, `k`, `v`).
#[derive(Debug)]
struct BranchBackward;

impl<B: NsaBackend> Backward<B, 3> for BranchBackward {
    type State = BranchState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let BranchGrads { q, k, v } = match ops.state {
            BranchState::Branch(saved, config, backward) => backward(saved, grad, &config),
            BranchState::Selected(saved, selected, config, backward) => {
                backward(saved, selected, grad, &config)
            }
        };
        let [node_q, node_k, node_v] = ops.parents;
        for (node, grad) in [(node_q, q), (node_k, k), (node_v, v)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// The backward step of the recorded gated sum (parents: the three branch outputs and the
/// gates).
#[derive(Debug)]
struct GatedSumBackward;

impl<B: NsaBackend> Backward<B, 4> for GatedSumBackward {
    type State = (GatedSum<B>, GatedSumBackwardFn<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (parts, backward) = ops.state;
        let GatedSum {
            compressed,
            selected,
            window,
            gates,
        } = backward(parts, grad);
        for (node, grad) in ops
            .parents
            .into_iter()
            .zip([compressed, selected, window, gates])
        {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// A recorded branch's output (tracked), its row log-sum-exp (untracked) and the rest of
/// what its forward method returned.
type Recorded<B, C, X> = (FloatTensor<Autodiff<B, C>>, FloatTensor<Autodiff<B, C>>, X);

/// Records one branch: runs `forward` on the inner tensors (-> output, row log-sum-exp,
/// and whatever else the branch returns) and, when any input is tracked, keeps what
/// `state` builds from the saved tensors. The log-sum-exp comes back untracked.
fn record<B, C, X>(
    [q, k, v]: [FloatTensor<Autodiff<B, C>>; 3],
    forward: impl FnOnce(
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>, X),
    state: impl FnOnce(BranchSaved<B>) -> BranchState<B>,
) -> Recorded<B, C, X>
where
    B: NsaBackend,
    C: CheckpointStrategy,
{
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    match BranchBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (output, lse, extra) = forward(
                q.primitive.clone(),
                k.primitive.clone(),
                v.primitive.clone(),
            );
            let saved = BranchSaved {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                output: output.clone(),
                lse: lse.clone(),
            };
            let state = state(saved);
            (
                prep.finish(state, output),
                Autodiff::<B, C>::from_inner(lse),
                extra,
            )
        }
        OpsKind::UnTracked(prep) => {
            let (output, lse, extra) = forward(q.primitive, k.primitive, v.primitive);
            (
                prep.finish(output),
                Autodiff::<B, C>::from_inner(lse),
                extra,
            )
        }
    }
}

impl<B: NsaBackend, C: CheckpointStrategy> NsaBackend for Autodiff<B, C> {
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
        let Some(kernels) = backward_kernels::<B>(query_start) else {
            return reference_compressed::<Self>(q, k_cmp, v_cmp, query_start, config);
        };
        record::<B, C, _>(
            [q, k_cmp, v_cmp],
            |q, k, v| B::nsa_compressed(q, k, v, query_start, config),
            |saved| BranchState::Branch(saved, *config, kernels.compressed),
        )
    }

    fn nsa_selected(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        selected: IntTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(kernels) = backward_kernels::<B>(last_rows_start(&q, &k)) else {
            return reference_selected::<Self>(q, k, v, selected, config);
        };
        let kept = selected.clone();
        let (output, lse, ()) = record::<B, C, _>(
            [q, k, v],
            |q, k, v| {
                let (output, lse) = B::nsa_selected(q, k, v, selected, config);
                (output, lse, ())
            },
            |saved| BranchState::Selected(saved, kept, *config, kernels.selected),
        );
        (output, lse)
    }

    fn nsa_window(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(kernels) = backward_kernels::<B>(last_rows_start(&q, &k)) else {
            return reference_window::<Self>(q, k, v, config);
        };
        let (output, lse, ()) = record::<B, C, _>(
            [q, k, v],
            |q, k, v| {
                let (output, lse) = B::nsa_window(q, k, v, config);
                (output, lse, ())
            },
            |saved| BranchState::Branch(saved, *config, kernels.window),
        );
        (output, lse)
    }

    fn nsa_gated_sum(parts: GatedSum<Self>) -> FloatTensor<Self> {
        let Some(kernels) = B::nsa_backward() else {
            return reference_gated_sum::<Self>(parts);
        };
        let GatedSum {
            compressed,
            selected,
            window,
            gates,
        } = parts;
        let nodes = [&compressed, &selected, &window, &gates].map(|t| t.node.clone());
        let inner = GatedSum {
            compressed: compressed.primitive,
            selected: selected.primitive,
            window: window.primitive,
            gates: gates.primitive,
        };
        match GatedSumBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::nsa_gated_sum(inner.clone());
                prep.finish((inner, kernels.gated_sum), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::nsa_gated_sum(inner)),
        }
    }
}
