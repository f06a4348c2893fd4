//! Moving test data between Flex (f32 host data) and the backend under test.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData, TensorPrimitive};
use nsa_burn::{BranchKv, NsaBackend, NsaInput};

use crate::cases::Case;

pub fn floats(data: TensorData) -> Vec<f32> {
    data.convert::<f32>().to_vec().unwrap()
}

pub fn ints(data: TensorData) -> Vec<i64> {
    data.convert::<i64>().to_vec().unwrap()
}

/// Random `shape` rounded to `dtype`, as f32 data.
pub fn random(shape: [usize; 4], dtype: DType) -> TensorData {
    let x = Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default());
    x.cast(dtype).cast(DType::F32).into_data()
}

/// Fresh random operator inputs `[q, k, v, k_cmp, v_cmp, gates]` of `case`, rounded to
/// `dtype` (`k_cmp` and `v_cmp` empty when `T < l`; the gates uniform in `[0, 1]`).
pub fn case_inputs(case: &Case, dtype: DType) -> [TensorData; 6] {
    let Case {
        batch,
        seq,
        heads,
        kv_heads,
        d_k,
        d_v,
        config,
    } = *case;
    let blocks = config.num_compressed_blocks(seq);
    [
        random([batch, seq, heads, d_k], dtype),
        random([batch, seq, kv_heads, d_k], dtype),
        random([batch, seq, kv_heads, d_v], dtype),
        random([batch, blocks, kv_heads, d_k], dtype),
        random([batch, blocks, kv_heads, d_v], dtype),
        Tensor::<Flex, 4>::random(
            [batch, seq, heads, 3],
            Distribution::Uniform(0.0, 1.0),
            &Default::default(),
        )
        .into_data(),
    ]
}

/// The operator's input from `[q, k, v, k_cmp, v_cmp, gates]` (the same keys and values
/// for the selected and window branches; no compressed keys when they are empty, `None`).
pub fn operator_input<Bk: Backend>(tensors: [Option<Tensor<Bk, 4>>; 6]) -> NsaInput<Bk> {
    let [q, k, v, k_cmp, v_cmp, gates] = tensors;
    let (k, v) = (k.expect("k"), v.expect("v"));
    NsaInput {
        q: q.expect("q"),
        compressed: k_cmp.zip(v_cmp).map(|(k, v)| BranchKv { k, v }),
        selected: BranchKv {
            k: k.clone(),
            v: v.clone(),
        },
        window: BranchKv { k, v },
        gates: gates.expect("gates"),
    }
}

/// `data` on `B` in `dtype`.
pub fn tensor<B: NsaBackend>(data: &TensorData, dtype: DType, device: &B::Device) -> Tensor<B, 4> {
    Tensor::<B, 4>::from_data(data.clone(), device).cast(dtype)
}

pub fn on<B: NsaBackend>(
    data: &TensorData,
    dtype: DType,
    device: &B::Device,
) -> B::FloatTensorPrimitive {
    tensor::<B>(data, dtype, device).into_primitive().tensor()
}

pub fn back<B: NsaBackend>(tensor: B::FloatTensorPrimitive) -> TensorData {
    Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(tensor))
        .cast(DType::F32)
        .into_data()
}

pub fn reference(data: &TensorData) -> Tensor<Flex, 4> {
    Tensor::from_data(data.clone(), &Default::default())
}
