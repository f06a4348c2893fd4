//! One layer case: a fresh `Nsa` layer against the naive layer on its weights.

use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};
use nsa_burn::{KvSharing, NsaConfig};

use crate::compare::{check_selection, relative_error, within, Ties};
use crate::convert::{sparsity, to_array, to_indices, to_layer};
use crate::model;
use crate::runner::{seeded, Case, CaseResult};

pub const D_MODEL: usize = 32;
pub const BATCH: usize = 2;

/// The small-block base configuration: `l = 8`, `d = 4`, `l' = 16`, `n = 4` (1 initial +
/// 2 local), `w = 24`, `d_k = 16 != d_v = 8`, MLP compressor, independent K/V.
pub fn base_config(heads: usize, kv_heads: usize) -> NsaConfig {
    NsaConfig::new(D_MODEL, heads, kv_heads, 16, 8)
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(16)
        .with_n_selected(4)
        .with_n_initial_blocks(1)
        .with_n_local_blocks(2)
        .with_window(24)
}

/// One layer case: a fresh layer and `x: [BATCH, seq, d_model]`; the library's
/// `forward_detailed` against the naive layer on the extracted weights.
pub fn layer_case(config: &NsaConfig, seq: usize, seed: u64) -> CaseResult {
    let device = Default::default();
    let (nsa, layer, x) = seeded(seed, || {
        let nsa = config.init::<Flex>(&device);
        let layer = to_layer(&nsa, config);
        let x = Tensor::<Flex, 3>::random(
            [BATCH, seq, D_MODEL],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        (nsa, layer, x)
    });
    let projections = match config.kv_sharing {
        KvSharing::Independent => 3,
        KvSharing::Shared => 1,
    };
    if layer.kv.len() != projections {
        return Err(format!(
            "{:?} needs {projections} K/V projections, the layer has {}",
            config.kv_sharing,
            layer.kv.len()
        ));
    }
    let sp = sparsity(nsa.attention_config());
    let result = nsa.forward_detailed(x.clone());

    let x = to_array(x);
    let inputs = model::layer_inputs(&x, &layer, &sp);
    let gate_error = within(
        "gates",
        relative_error(&to_array(result.gates), &inputs.gates),
    )?;

    let selection = to_indices(result.selected_blocks);
    let (selection, ties) = check_selection(&inputs, &selection, &sp, Ties::NearTiesAllowed)?;
    let naive = model::output_projection(&model::attention(&inputs, &selection, &sp), &layer);
    let error = within(
        "layer output",
        relative_error(&to_array(result.output), &naive),
    )?;
    Ok(format!(
        "output error {error:.1e}, gate error {gate_error:.1e}, {ties} near-ties"
    ))
}

/// Layer cases for each `(label, config)` at each sequence length.
pub fn layer_cases(configs: Vec<(String, NsaConfig)>, seqs: &[usize]) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for (label, config) in configs {
        for &seq in seqs {
            let config = config.clone();
            cases.push((
                format!("{label}, T={seq}"),
                Box::new(move |seed| layer_case(&config, seq, seed)),
            ));
        }
    }
    cases
}

/// Sequence lengths around every edge of the base config (`l - 1 = 7`, `l = 8`, `l + 1`,
/// `l' = 16`, `l' + 1`) and long enough for many candidate blocks (`T / l' = 6, 18`).
pub const SEQS: &[usize] = &[1, 7, 8, 9, 16, 17, 100, 300];
