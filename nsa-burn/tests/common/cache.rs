//! Cached forward passes against one forward pass over the whole sequence: sequences of a
//! case are prefilled in chunks, each alone, then decoded one token per step, all together
//! (a ragged batch), and every output and selection must equal [`Nsa::forward_detailed`]
//! over each whole sequence.

use burn::tensor::{DType, Distribution, Tensor};
use nsa_burn::{CompressorKind, KvSharing, NsaBackend, NsaCacheConfig, NsaConfig};

use super::relative_error;

/// Sequences of one layer: sequence `s` has `lengths[s]` tokens, of which the chunks
/// `prefill[s]` are fed first (alone, one call per chunk); the rest are decoded one token
/// per call, every unfinished sequence in the same call.
#[derive(Debug, Clone)]
pub struct CacheCase {
    pub layer: NsaConfig,
    pub lengths: Vec<usize>,
    pub prefill: Vec<Vec<usize>>,
}

/// Sequences prefilled with each of `prefixes` tokens (choose them around the block
/// boundaries `l = 8`, `d = 4`, `l' = 16`, `w = 24`) and then decoded for `steps` more
/// tokens in one ragged batch, with a sequence decoded from its first token (`T < l` at
/// first) and one prefilled in chunks off every boundary; then a second layout: G = 6,
/// `d_k != d_v`, one shared K/V projection, mean pooling, `l = d = l' = 4`, `n = 2`, a window
/// of one token.
pub fn cache_cases(prefixes: &[usize], steps: usize) -> Vec<CacheCase> {
    let mut lengths: Vec<usize> = prefixes.iter().map(|p| p + steps).collect();
    let mut prefill: Vec<Vec<usize>> = prefixes.iter().map(|&p| vec![p]).collect();
    lengths.extend([6, 70 + steps]);
    prefill.extend([vec![], vec![5, 11, 16, 1, 30, 7]]);
    let boundaries = CacheCase {
        layer: NsaConfig::new(24, 4, 2, 8, 6)
            .with_compress_block(8)
            .with_compress_stride(4)
            .with_select_block(16)
            .with_n_selected(4)
            .with_window(24)
            .with_query_chunk(16),
        lengths,
        prefill,
    };
    let other = CacheCase {
        layer: NsaConfig::new(24, 6, 1, 8, 4)
            .with_compress_block(4)
            .with_compress_stride(4)
            .with_select_block(4)
            .with_n_selected(2)
            .with_n_local_blocks(1)
            .with_window(1)
            .with_kv_sharing(KvSharing::Shared)
            .with_compressor(CompressorKind::MeanPool),
        lengths: vec![1, 5 + steps, 17 + steps],
        prefill: vec![vec![], vec![2, 3], vec![17]],
    };
    vec![boundaries, other]
}

/// Runs `case` on `B` and panics where a cached output passes `tolerance` (relative error
/// per sequence) or a selection differs; returns the worst relative error.
pub fn check_cached<B: NsaBackend>(case: &CacheCase, device: &B::Device, tolerance: f64) -> f64 {
    let layer = case.layer.init::<B>(device);
    let config = layer.attention_config().clone();
    let d_model = case.layer.d_model;
    let inputs: Vec<Tensor<B, 3>> = case
        .lengths
        .iter()
        .map(|&len| Tensor::random([1, len, d_model], Distribution::Normal(0.0, 1.0), device))
        .collect();
    let pages = case
        .lengths
        .iter()
        .map(|len| len.div_ceil(config.select_block))
        .sum();
    let count = case.lengths.len();
    let mut cache = layer.cache(&NsaCacheConfig::new(count, pages), device);

    // Outputs [1, t, d_model] and selections [1, H_kv, t, n] of every call, per sequence.
    let mut outputs: Vec<Vec<Tensor<B, 3>>> = vec![Vec::new(); count];
    let mut blocks: Vec<Vec<Tensor<B, 4, burn::tensor::Int>>> = vec![Vec::new(); count];
    let mut fed = vec![0; count];
    for (sequence, chunks) in case.prefill.iter().enumerate() {
        for &chunk in chunks {
            let x = inputs[sequence].clone().narrow(1, fed[sequence], chunk);
            let step = layer
                .try_forward_cached(x, &mut cache, &[sequence])
                .expect("a prefill chunk within the cache's capacity");
            outputs[sequence].push(step.output);
            blocks[sequence].push(step.selected_blocks);
            fed[sequence] += chunk;
        }
    }
    loop {
        let active: Vec<usize> = (0..count).filter(|&s| fed[s] < case.lengths[s]).collect();
        if active.is_empty() {
            break;
        }
        let x = Tensor::cat(
            active
                .iter()
                .map(|&s| inputs[s].clone().narrow(1, fed[s], 1))
                .collect(),
            0,
        );
        let step = layer
            .try_forward_cached(x, &mut cache, &active)
            .expect("a decoding step within the cache's capacity");
        for (row, &s) in active.iter().enumerate() {
            outputs[s].push(step.output.clone().narrow(0, row, 1));
            blocks[s].push(step.selected_blocks.clone().narrow(0, row, 1));
            fed[s] += 1;
        }
    }
    assert_eq!(cache.free_pages(), 0, "the case fills the pool exactly");

    let mut worst = 0.0f64;
    for (s, input) in inputs.into_iter().enumerate() {
        let full = layer.forward_detailed(input);
        let cached_output = Tensor::cat(outputs[s].clone(), 1);
        let cached_blocks = Tensor::cat(blocks[s].clone(), 2);
        let f32s = |t: Tensor<B, 3>| t.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        let ints = |t: Tensor<B, 4, burn::tensor::Int>| {
            t.into_data().convert::<i64>().to_vec::<i64>().unwrap()
        };
        let error = relative_error(&f32s(cached_output), &f32s(full.output));
        assert!(
            error <= tolerance,
            "sequence {s} (length {}, prefill {:?}): cached outputs differ from the full forward by {error:e}",
            case.lengths[s],
            case.prefill[s]
        );
        assert_eq!(
            ints(cached_blocks),
            ints(full.selected_blocks),
            "sequence {s} (length {}, prefill {:?}): cached selections differ from the full forward",
            case.lengths[s],
            case.prefill[s]
        );
        worst = worst.max(error);
    }
    worst
}
