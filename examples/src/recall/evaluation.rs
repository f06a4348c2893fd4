//! Evaluation: recall accuracy of a trained model by context length and by the depth of
//! the pairs in the context.

use burn::config::Config;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::{Bool, ElementConversion, Int, Tensor};
use nsa_burn::NsaBackend;
use serde::Serialize;

use super::attention::AttentionKind;
use super::error::{nonzero, RecallError};
use super::model::RecallModel;
use super::task::{DepthBand, Placement, RecallBatch, RecallBatcher, RecallDataset};
use super::{ExperimentConfig, Stream};

/// What each trained model is evaluated on.
#[derive(Config, Debug)]
pub struct EvaluationConfig {
    /// Sequence lengths. Default: 1024, 4096, 16384 and 65536.
    #[config(default = "vec![1024, 4096, 16384, 65536]")]
    pub seq_lens: Vec<usize>,
    /// Equal depth bins of the context; at each length, each bin has its own sequences,
    /// all pairs of a sequence in the bin. Default: 5.
    #[config(default = 5)]
    pub depth_bins: usize,
    /// Sequences per length and depth bin. Default: 32.
    #[config(default = 32)]
    pub samples: usize,
    /// Tokens per forward pass (at least one sequence). Default: 65536.
    #[config(default = 65536)]
    pub batch_tokens: usize,
    /// Longest sequence full and sliding-window attention are evaluated at: their scores
    /// are a `T x T` matrix per head. Default: 16384.
    #[config(default = 16384)]
    pub max_dense_len: usize,
}

impl EvaluationConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), RecallError> {
        if self.seq_lens.is_empty() {
            return Err(RecallError::Empty { field: "seq_lens" });
        }
        nonzero("depth_bins", self.depth_bins)?;
        nonzero("samples", self.samples)?;
        nonzero("batch_tokens", self.batch_tokens)
    }
}

/// Accuracy at one sequence length.
#[derive(Debug, Clone, Serialize)]
pub struct LengthResult {
    /// Sequence length `T`.
    pub seq_len: usize,
    /// Fraction of queries answered right over all depths; `None` when skipped.
    pub accuracy: Option<f64>,
    /// Per depth bin, from the start of the context to its end; empty when skipped.
    pub by_depth: Vec<DepthResult>,
    /// Why this length was not evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Accuracy at one sequence length and depth bin.
#[derive(Debug, Clone, Serialize)]
pub struct DepthResult {
    /// Where the pairs sat.
    pub depth: DepthBand,
    /// Fraction of queries answered right.
    pub accuracy: f64,
    /// Queries asked.
    pub queries: usize,
    /// For NSA: the fraction of queries whose answer, generated step by step through the
    /// layer's cache (the context prefilled, then one query token per step), is the answer
    /// of the forward pass over the whole sequence. 1 when generation agrees everywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_agreement: Option<f64>,
}

/// Recall accuracy of `model` at every length and depth bin of the evaluation.
pub fn evaluate<B: NsaBackend>(
    model: &RecallModel<B>,
    attention: AttentionKind,
    config: &ExperimentConfig,
    device: &B::Device,
) -> Result<Vec<LengthResult>, RecallError> {
    let settings = &config.evaluation;
    settings
        .seq_lens
        .iter()
        .map(|&seq_len| {
            if attention.is_dense() && seq_len > settings.max_dense_len {
                return Ok(LengthResult {
                    seq_len,
                    accuracy: None,
                    by_depth: Vec::new(),
                    skipped: Some(format!(
                        "longer than max_dense_len ({}): {} attention's scores are T x T",
                        settings.max_dense_len,
                        attention.name()
                    )),
                });
            }
            let by_depth = (0..settings.depth_bins)
                .map(|bin| {
                    let placement = Placement {
                        seq_len,
                        depth: DepthBand::bin(bin, settings.depth_bins),
                    };
                    let seed = config.seed(Stream::Evaluation { seq_len, bin });
                    let data = RecallDataset::new(&config.task, placement, seed, settings.samples)?;
                    let batch_size = (settings.batch_tokens / seq_len).max(1);
                    Ok(accuracy(model, &data, batch_size, device))
                })
                .collect::<Result<Vec<_>, RecallError>>()?;
            let queries: usize = by_depth.iter().map(|cell| cell.queries).sum();
            let right: f64 = by_depth
                .iter()
                .map(|cell| cell.accuracy * cell.queries as f64)
                .sum();
            Ok(LengthResult {
                seq_len,
                accuracy: Some(right / queries as f64),
                by_depth,
                skipped: None,
            })
        })
        .collect()
}

/// Accuracy of `model` on every query of `data`, `batch_size` sequences at a time.
fn accuracy<B: NsaBackend>(
    model: &RecallModel<B>,
    data: &RecallDataset,
    batch_size: usize,
    device: &B::Device,
) -> DepthResult {
    let (mut right, mut queries, mut agreeing) = (0, 0, None);
    let indices: Vec<usize> = (0..data.len()).collect();
    let count = |equal: Tensor<B, 2, Bool>| equal.int().sum().into_scalar().elem::<i64>() as usize;
    for chunk in indices.chunks(batch_size) {
        let items = chunk.iter().filter_map(|&index| data.get(index)).collect();
        let RecallBatch { tokens, answers } = RecallBatcher.batch(items, device);
        let [_, pairs] = answers.dims();
        let predicted = model
            .forward(tokens.clone(), pairs)
            .argmax(2)
            .squeeze_dim::<2>(2);
        if let Some(generated) = generate(model, tokens, pairs, device) {
            *agreeing.get_or_insert(0) += count(generated.equal(predicted.clone()));
        }
        right += count(predicted.equal(answers));
        queries += chunk.len() * pairs;
    }
    DepthResult {
        depth: data.placement().depth,
        accuracy: right as f64 / queries as f64,
        queries,
        generation_agreement: agreeing.map(|agreeing| agreeing as f64 / queries as f64),
    }
}

/// The answers to the last `queries` positions of `tokens: [batch, T]` generated through the
/// layers' caches: the context prefilled in one call, then one query token per call ->
/// `[batch, queries]`; `None` for a model without NSA caches.
fn generate<B: NsaBackend>(
    model: &RecallModel<B>,
    tokens: Tensor<B, 2, Int>,
    queries: usize,
    device: &B::Device,
) -> Option<Tensor<B, 2, Int>> {
    let [batch, seq] = tokens.dims();
    let mut caches = model.caches(batch, seq, device)?;
    let context = seq - queries;
    model.forward_cached(tokens.clone(), 0..context, &mut caches);
    let steps = (context..seq)
        .map(|t| model.forward_cached(tokens.clone(), t..t + 1, &mut caches))
        .collect();
    Some(Tensor::cat(steps, 1).argmax(2).squeeze_dim::<2>(2))
}
