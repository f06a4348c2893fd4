//! Packed documents against each document alone: the output, the selected blocks and the
//! gradient of every operator input of [`nsa_attention_packed`] on a backend, against
//! [`nsa_attention`] run once per document on the reference (`Autodiff<Flex>`, f32).

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use nsa_burn::{
    nsa_attention, nsa_attention_packed, BranchKv, Documents, NsaAttentionConfig, NsaBackend,
    NsaInput,
};

use super::relative_error;

/// Documents packed into rows, and the head layout.
#[derive(Debug, Clone)]
pub struct PackedCase {
    /// Rows of `seq` positions.
    pub rows: usize,
    pub seq: usize,
    /// Document lengths, row after row; each row's lengths sum to `seq`.
    pub lengths: Vec<usize>,
    pub heads: usize,
    pub kv_heads: usize,
    pub d_k: usize,
    pub d_v: usize,
    pub config: NsaAttentionConfig,
}

impl PackedCase {
    /// The boundaries of [`PackedCase::lengths`].
    pub fn documents(&self) -> Documents {
        Documents::try_from_lengths(&self.lengths, self.rows, self.seq)
            .expect("valid test documents")
    }
}

/// The six operator inputs `[q, k, v, k_cmp, v_cmp, gates]` of a whole packed case, as
/// f32 data rounded to `dtype`: positions flattened to one row, the compressed keys of every
/// document one after another.
fn packed_inputs(case: &PackedCase, dtype: DType) -> [TensorData; 6] {
    let total = case.rows * case.seq;
    let blocks = case.documents().num_compressed_blocks(&case.config);
    let random = |shape: [usize; 4]| {
        Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
            .cast(dtype)
            .cast(DType::F32)
            .into_data()
    };
    [
        random([1, total, case.heads, case.d_k]),
        random([1, total, case.kv_heads, case.d_k]),
        random([1, total, case.kv_heads, case.d_v]),
        random([1, blocks, case.kv_heads, case.d_k]),
        random([1, blocks, case.kv_heads, case.d_v]),
        Tensor::<Flex, 4>::random(
            [1, total, case.heads, 3],
            Distribution::Uniform(0.0, 1.0),
            &Default::default(),
        )
        .into_data(),
    ]
}

/// The operator's input from six leaves (the same keys for the selected and window
/// branches), `[q, ...]` reshaped to `rows` rows; `None` compressed keys when empty.
fn input<B: NsaBackend>(leaves: &[Option<Tensor<B, 4>>; 6], rows: usize) -> NsaInput<B> {
    let [q, k, v, k_cmp, v_cmp, gates] = leaves.clone();
    let row = |t: Option<Tensor<B, 4>>| {
        let t = t.expect("a position-wise input");
        let [_, total, n, d] = t.dims();
        t.reshape([rows, total / rows, n, d])
    };
    let (k, v) = (row(k), row(v));
    NsaInput {
        q: row(q),
        compressed: k_cmp.zip(v_cmp).map(|(k, v)| BranchKv { k, v }),
        selected: BranchKv {
            k: k.clone(),
            v: v.clone(),
        },
        window: BranchKv { k, v },
        gates: row(gates),
    }
}

/// Leaves requiring gradients, on `B` in `dtype` (`None` for empty data).
fn leaves<B: AutodiffBackend>(
    data: &[TensorData; 6],
    dtype: DType,
    device: &B::Device,
) -> [Option<Tensor<B, 4>>; 6] {
    [0, 1, 2, 3, 4, 5].map(|i| {
        (data[i].num_elements() > 0).then(|| {
            let inner =
                Tensor::<B::InnerBackend, 4>::from_data(data[i].clone(), device).cast(dtype);
            Tensor::<B, 4>::from_inner(inner).require_grad()
        })
    })
}

/// Output `[1, total, H, d_v]`, selected blocks `[1, H_kv, total, n]` and the gradients of
/// the six inputs (f32 data; empty where the input is empty).
struct Results {
    output: TensorData,
    blocks: TensorData,
    grads: [TensorData; 6],
}

fn results<B: AutodiffBackend>(
    leaves: [Option<Tensor<B, 4>>; 6],
    output: Tensor<B, 4>,
    blocks: TensorData,
    weights: &TensorData,
) -> Results {
    let device = output.device();
    let weights = Tensor::<B, 4>::from_data(weights.clone(), &device).cast(output.dtype());
    let grads = (output.clone() * weights).sum().backward();
    let grads = leaves.map(|leaf| match leaf {
        Some(leaf) => leaf
            .grad(&grads)
            .expect("every input gets a gradient")
            .cast(DType::F32)
            .into_data(),
        None => TensorData::new(Vec::<f32>::new(), [0]),
    });
    Results {
        output: output.cast(DType::F32).into_data(),
        blocks,
        grads,
    }
}

/// `data[.., range, ..]` along dimension 1, as data.
fn part(data: &TensorData, range: std::ops::Range<usize>) -> TensorData {
    Tensor::<Flex, 4>::from_data(data.clone(), &Default::default())
        .slice_dim(1, range)
        .into_data()
}

/// The concatenation of `parts` along `dim`, as f32 data (block indices included: they
/// are small integers, exact in f32).
fn cat(parts: Vec<TensorData>, dim: usize) -> TensorData {
    let parts = parts
        .into_iter()
        .filter(|p| p.num_elements() > 0)
        .map(|p| Tensor::<Flex, 4>::from_data(p.convert::<f32>(), &Default::default()))
        .collect::<Vec<_>>();
    if parts.is_empty() {
        return TensorData::new(Vec::<f32>::new(), [0]);
    }
    Tensor::cat(parts, dim).into_data()
}

/// Each document alone on the reference, the results concatenated in packing order.
fn alone(case: &PackedCase, inputs: &[TensorData; 6], weights: &TensorData) -> Results {
    type R = Autodiff<Flex>;
    let documents = case.documents();
    let mut each = Vec::new();
    for (range, compressed) in documents
        .ranges()
        .zip(documents.compressed_ranges(&case.config))
    {
        let slices: [TensorData; 6] = [0, 1, 2, 3, 4, 5].map(|i| {
            let range = if i == 3 || i == 4 {
                compressed.clone()
            } else {
                range.clone()
            };
            if range.is_empty() {
                TensorData::new(Vec::<f32>::new(), [0])
            } else {
                part(&inputs[i], range)
            }
        });
        let leaves = leaves::<R>(&slices, DType::F32, &Default::default());
        let out = nsa_attention(input(&leaves, 1), &case.config);
        let blocks = out.selected_blocks.into_data().convert::<i64>();
        each.push(results(leaves, out.output, blocks, &part(weights, range)));
    }
    let take =
        |pick: &dyn Fn(&Results) -> TensorData, dim| cat(each.iter().map(pick).collect(), dim);
    Results {
        output: take(&|r| r.output.clone(), 1),
        blocks: take(&|r| r.blocks.clone(), 2),
        grads: [0, 1, 2, 3, 4, 5].map(|i| take(&|r| r.grads[i].clone(), 1)),
    }
}

/// Runs `case` packed on `B` in `dtype` and each document alone on the reference; panics
/// when the selected blocks differ or an error passes the dtype's tolerance, and returns
/// the worst relative error.
pub fn check_packed<B: AutodiffBackend + NsaBackend>(
    case: &PackedCase,
    dtype: DType,
    device: &B::Device,
) -> f64 {
    let inputs = packed_inputs(case, dtype);
    let total = case.rows * case.seq;
    let weights = Tensor::<Flex, 4>::random(
        [1, total, case.heads, case.d_v],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    )
    .cast(dtype)
    .cast(DType::F32)
    .into_data();
    let packed_leaves = leaves::<B>(&inputs, dtype, device);
    let out = nsa_attention_packed(
        input(&packed_leaves, case.rows),
        &case.documents(),
        &case.config,
    );
    let [rows, seq, heads, d_v] = out.output.dims();
    let kv_heads = out.selected_blocks.dims()[1];
    let n = case.config.n_selected;
    // `[B, H_kv, T, n]` to the flattened `[1, H_kv, B * T, n]` of the reference.
    let blocks = out
        .selected_blocks
        .swap_dims(0, 1)
        .reshape([1, kv_heads, rows * seq, n])
        .into_data()
        .convert::<i64>();
    let got = results(
        packed_leaves,
        out.output.reshape([1, rows * seq, heads, d_v]),
        blocks,
        &weights,
    );
    let want = alone(case, &inputs, &weights);
    let ints = |d: TensorData| d.convert::<i64>().to_vec::<i64>().unwrap();
    assert_eq!(
        ints(got.blocks),
        ints(want.blocks),
        "{case:?} {dtype:?}: selected blocks differ between packed and alone"
    );
    let tolerance = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let names = ["output", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates"];
    let pairs =
        std::iter::once((&got.output, &want.output)).chain(got.grads.iter().zip(&want.grads));
    let mut worst = 0.0f64;
    for (name, (got, want)) in names.into_iter().zip(pairs) {
        let floats = |d: &TensorData| d.clone().convert::<f32>().to_vec::<f32>().unwrap();
        let error = relative_error(&floats(got), &floats(want));
        assert!(
            error <= tolerance,
            "{case:?} {dtype:?}: {name} packed differs from alone by {error:e}"
        );
        worst = worst.max(error);
    }
    worst
}
