//! The model: a small decoder-only transformer whose attention is NSA, full or
//! sliding-window attention, and its training and validation steps.

use std::ops::Range;

use burn::config::Config;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use burn_train::{ClassificationOutput, InferenceStep, TrainOutput, TrainStep};
use nsa_burn::{NsaBackend, NsaCache, NsaCacheConfig, NsaConfig};

use super::attention::{Attention, AttentionKind, DenseAttentionConfig};
use super::error::{nonzero, RecallError};
use super::task::RecallBatch;

/// Sizes of the model and of its attention; the vocabulary and the kind of attention are
/// given to [`RecallModelConfig::init`].
#[derive(Config, Debug)]
pub struct RecallModelConfig {
    /// Width `d_model`. Default: 128.
    #[config(default = 128)]
    pub d_model: usize,
    /// Blocks (attention + MLP). Default: 2.
    #[config(default = 2)]
    pub layers: usize,
    /// Query heads `H`. Default: 4.
    #[config(default = 4)]
    pub heads: usize,
    /// Key/value heads `H_kv` of NSA (dense attention has one per query head). Default: 2.
    #[config(default = 2)]
    pub kv_heads: usize,
    /// Head dimension of queries, keys and values. Default: 32.
    #[config(default = 32)]
    pub head_dim: usize,
    /// Hidden width of the MLP, in multiples of `d_model`. Default: 4.
    #[config(default = 4)]
    pub mlp_ratio: usize,
    /// NSA's compression block `l`. Default: 16.
    #[config(default = 16)]
    pub compress_block: usize,
    /// NSA's compression stride `d`. Default: 8.
    #[config(default = 8)]
    pub compress_stride: usize,
    /// NSA's selection block `l'`. Default: 32.
    #[config(default = 32)]
    pub select_block: usize,
    /// NSA's selected blocks per query `n`, the first block and two local ones included.
    /// Default: 8.
    #[config(default = 8)]
    pub selected: usize,
    /// Sliding window `w`: NSA's window branch, and the keys sliding-window attention
    /// sees. Default: 128.
    #[config(default = 128)]
    pub window: usize,
}

impl RecallModelConfig {
    /// The NSA layer of each block.
    pub fn nsa(&self) -> NsaConfig {
        NsaConfig::new(
            self.d_model,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.head_dim,
        )
        .with_compress_block(self.compress_block)
        .with_compress_stride(self.compress_stride)
        .with_select_block(self.select_block)
        .with_n_selected(self.selected)
        .with_window(self.window)
    }

    /// Checks the sizes, NSA's included.
    pub fn validate(&self) -> Result<(), RecallError> {
        nonzero("layers", self.layers)?;
        nonzero("mlp_ratio", self.mlp_ratio)?;
        Ok(self.nsa().validate()?)
    }

    /// Initializes the model for a vocabulary of `vocab` tokens.
    ///
    /// # Panics
    ///
    /// If the sizes are invalid (see [`RecallModelConfig::validate`]).
    pub fn init<B: Backend>(
        &self,
        attention: AttentionKind,
        vocab: usize,
        device: &B::Device,
    ) -> RecallModel<B> {
        let d_model = self.d_model;
        let block = || {
            let dense = DenseAttentionConfig::new(d_model, self.heads, self.head_dim);
            let attention = match attention {
                AttentionKind::Nsa => Attention::Nsa(self.nsa().init(device)),
                AttentionKind::Full => Attention::Dense(dense.init(device)),
                AttentionKind::Sliding => {
                    Attention::Dense(dense.with_window(Some(self.window)).init(device))
                }
            };
            Block {
                attention_norm: LayerNormConfig::new(d_model).init(device),
                attention,
                mlp_norm: LayerNormConfig::new(d_model).init(device),
                up: LinearConfig::new(d_model, self.mlp_ratio * d_model).init(device),
                activation: Gelu::new(),
                down: LinearConfig::new(self.mlp_ratio * d_model, d_model).init(device),
            }
        };
        RecallModel {
            embedding: EmbeddingConfig::new(vocab, d_model).init(device),
            previous: LinearConfig::new(d_model, d_model)
                .with_bias(false)
                .init(device),
            blocks: (0..self.layers).map(|_| block()).collect(),
            norm: LayerNormConfig::new(d_model).init(device),
            head: LinearConfig::new(d_model, vocab).init(device),
        }
    }
}

/// A pre-norm transformer block: attention and an MLP, each added to the residual stream.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    attention_norm: LayerNorm<B>,
    attention: Attention<B>,
    mlp_norm: LayerNorm<B>,
    up: Linear<B>,
    activation: Gelu,
    down: Linear<B>,
}

impl<B: NsaBackend> Block<B> {
    /// `x: [batch, T, d_model]` -> `[batch, T, d_model]`.
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with(x, |x| self.attention.forward(x))
    }

    /// The block with `attend` as its attention (the layer's own, or its cached forward).
    fn forward_with(
        &self,
        x: Tensor<B, 3>,
        attend: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let x = x.clone() + attend(self.attention_norm.forward(x));
        let hidden = self
            .activation
            .forward(self.up.forward(self.mlp_norm.forward(x.clone())));
        x + self.down.forward(hidden)
    }
}

/// A decoder-only language model for the recall task.
///
/// It has no positional encoding: each token's embedding is mixed with the previous
/// token's (a learned linear map, like the token shift of RWKV or the short convolutions
/// of H3), which gives attention the local order the task needs (a value is the token
/// after its key), while sequences longer than the training ones meet no unseen position.
#[derive(Module, Debug)]
pub struct RecallModel<B: Backend> {
    embedding: Embedding<B>,
    previous: Linear<B>,
    blocks: Vec<Block<B>>,
    norm: LayerNorm<B>,
    head: Linear<B>,
}

impl<B: NsaBackend> RecallModel<B> {
    /// Logits of the last `queries` positions.
    ///
    /// `tokens: [batch, T]` -> `[batch, queries, vocab]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, queries: usize) -> Tensor<B, 3> {
        let [batch, seq] = tokens.dims();
        let mut x = self.embed(tokens, 0..seq);
        for block in &self.blocks {
            x = block.forward(x);
        }
        let d_model = x.dims()[2];
        let last = x.slice([0..batch, seq - queries..seq, 0..d_model]);
        self.head.forward(self.norm.forward(last))
    }

    /// The inputs of the first block at `positions` of `tokens: [batch, T]`: each token's
    /// embedding plus the map of the previous token's (zero before the first token) ->
    /// `[batch, positions.len(), d_model]`.
    fn embed(&self, tokens: Tensor<B, 2, Int>, positions: Range<usize>) -> Tensor<B, 3> {
        let [batch, _] = tokens.dims();
        let embed = |range: Range<usize>| {
            self.embedding
                .forward(tokens.clone().slice([0..batch, range]))
        };
        let x = embed(positions.clone());
        let previous = match positions.start {
            0 => {
                let d_model = x.dims()[2];
                let zero = Tensor::zeros([batch, 1, d_model], &x.device());
                match positions.len() {
                    1 => zero,
                    len => Tensor::cat(vec![zero, embed(0..len - 1)], 1),
                }
            }
            start => embed(start - 1..positions.end - 1),
        };
        x + self.previous.forward(previous)
    }

    /// One cache per block for `batch` sequences of up to `len` tokens, or `None` when a
    /// block's attention is not NSA.
    pub fn caches(&self, batch: usize, len: usize, device: &B::Device) -> Option<Vec<NsaCache<B>>> {
        self.blocks
            .iter()
            .map(|block| {
                let nsa = block.attention.nsa()?;
                let pages = batch * len.div_ceil(nsa.attention_config().select_block);
                Some(nsa.cache(&NsaCacheConfig::new(batch, pages), device))
            })
            .collect()
    }

    /// Logits `[batch, positions.len(), vocab]` of `positions` of `tokens: [batch, T]`,
    /// through `caches` (from [`RecallModel::caches`]), which hold positions
    /// `0..positions.start` of every row and then these.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Range<usize>,
        caches: &mut [NsaCache<B>],
    ) -> Tensor<B, 3> {
        let [batch, _] = tokens.dims();
        let sequences: Vec<usize> = (0..batch).collect();
        let mut x = self.embed(tokens, positions);
        for (block, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            let nsa = block
                .attention
                .nsa()
                .expect("caches exist for NSA blocks only");
            x = block.forward_with(x, |x| nsa.forward_cached(x, cache, &sequences));
        }
        self.head.forward(self.norm.forward(x))
    }

    /// The loss and the answers' logits of a batch (`[batch * pairs, vocab]`).
    pub fn forward_recall(&self, batch: RecallBatch<B>) -> ClassificationOutput<B> {
        let [batch_size, queries] = batch.answers.dims();
        let logits = self.forward(batch.tokens, queries);
        let vocab = logits.dims()[2];
        let logits = logits.reshape([batch_size * queries, vocab]);
        let targets = batch.answers.reshape([batch_size * queries]);
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.clone(), targets.clone());
        ClassificationOutput::new(loss, logits, targets)
    }
}

impl<B: AutodiffBackend + NsaBackend> TrainStep for RecallModel<B> {
    type Input = RecallBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: RecallBatch<B>) -> TrainOutput<ClassificationOutput<B>> {
        let item = self.forward_recall(batch);
        TrainOutput::new(self, item.loss.backward(), item)
    }
}

impl<B: NsaBackend> InferenceStep for RecallModel<B> {
    type Input = RecallBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: RecallBatch<B>) -> ClassificationOutput<B> {
        self.forward_recall(batch)
    }
}
