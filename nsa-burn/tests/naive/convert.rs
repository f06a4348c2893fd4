//! Reading Flex tensors and the weights of an `Nsa` layer into the naive model.

use burn::backend::Flex;
use burn::module::Param;
use burn::tensor::{Int, Tensor};
use nsa_burn::{Nsa, NsaAttentionConfig, NsaConfig};

use crate::model::{self, Array, Sparsity};

pub fn to_array<const D: usize>(tensor: Tensor<Flex, D>) -> Array {
    let shape = tensor.dims().to_vec();
    let data = tensor.into_data().convert::<f64>().to_vec::<f64>().unwrap();
    Array::new(shape, data)
}

pub fn to_indices(tensor: Tensor<Flex, 4, Int>) -> Vec<i64> {
    tensor.into_data().convert::<i64>().to_vec::<i64>().unwrap()
}

pub fn param_vec<const D: usize>(param: &Param<Tensor<Flex, D>>) -> Vec<f64> {
    to_array(param.val()).data
}

pub fn to_linear(linear: &burn::nn::Linear<Flex>) -> model::Linear {
    let [d_in, d_out] = linear.weight.dims();
    model::Linear {
        d_in,
        d_out,
        weight: param_vec(&linear.weight),
        bias: linear.bias.as_ref().map(param_vec),
    }
}

pub fn to_compressor(compressor: &nsa_burn::Compressor<Flex>) -> Option<model::CompressorMlp> {
    compressor.mlp.as_ref().map(|mlp| model::CompressorMlp {
        position: param_vec(&mlp.position),
        hidden: to_linear(&mlp.hidden),
        output: to_linear(&mlp.output),
    })
}

/// Every weight of `nsa` (reading each parameter also forces its lazy initialisation).
pub fn to_layer(nsa: &Nsa<Flex>, config: &NsaConfig) -> model::Layer {
    model::Layer {
        n_heads: config.n_heads,
        n_kv_heads: config.n_kv_heads,
        d_k: config.d_k,
        d_v: config.d_v,
        query: to_linear(&nsa.query),
        kv: nsa
            .kv
            .iter()
            .map(|kv| (to_linear(&kv.key), to_linear(&kv.value)))
            .collect(),
        compress_key: to_compressor(&nsa.compress_key),
        compress_value: to_compressor(&nsa.compress_value),
        gate_hidden: nsa.gate.hidden.as_ref().map(to_linear),
        gate_output: to_linear(&nsa.gate.output),
        output: to_linear(&nsa.output),
    }
}

pub fn sparsity(config: &NsaAttentionConfig) -> Sparsity {
    Sparsity {
        l: config.compress_block,
        stride: config.compress_stride,
        l_sel: config.select_block,
        n: config.n_selected,
        n_initial: config.n_initial_blocks,
        n_local: config.n_local_blocks,
        window: config.window,
        scale: config.softmax_scale,
    }
}
