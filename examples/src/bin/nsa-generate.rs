//! A small decoder built from the NSA layer, with random weights, that prefills a random
//! prompt through the layer's cache and then generates tokens greedily, one step at a time,
//! printing the prefill time, per-step latency and tokens/s. `--check` runs the model's full
//! forward pass over the prompt and the generated tokens afterwards and compares: the
//! cached steps must give the same logits and the same tokens.
//!
//! ```text
//! cargo run --release -p nsa-examples --bin nsa-generate
//! cargo run --release -p nsa-examples --bin nsa-generate -- --prompt-len 4096 --batch 4 --check
//! ```

use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use clap::Parser;
use nsa_burn::{Nsa, NsaBackend, NsaCache, NsaCacheConfig, NsaConfig};
use nsa_examples::device::CompiledBackend;
use nsa_examples::preset::DeviceAndPreset;

/// Generates tokens with a random-weight NSA decoder and its cache.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    placement: DeviceAndPreset,
    /// Decoder blocks (attention + MLP).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    /// Sequences generated together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Prompt tokens per prefill call (the prompt is fed in chunks of this many).
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Compare the cached steps with one full forward pass afterwards.
    #[arg(long)]
    check: bool,
}

/// One pre-norm block: `x + attention(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
struct DecoderBlock<B: Backend> {
    attention_norm: LayerNorm<B>,
    attention: Nsa<B>,
    mlp_norm: LayerNorm<B>,
    mlp_in: Linear<B>,
    mlp_out: Linear<B>,
}

/// Token embedding, decoder blocks, final norm and the LM head.
#[derive(Module, Debug)]
struct Decoder<B: Backend> {
    embedding: Embedding<B>,
    blocks: Vec<DecoderBlock<B>>,
    norm: LayerNorm<B>,
    head: Linear<B>,
}

impl<B: NsaBackend> Decoder<B> {
    fn new(layer: &NsaConfig, layers: usize, vocab: usize, device: &B::Device) -> Self {
        let width = layer.d_model;
        let blocks = (0..layers)
            .map(|_| DecoderBlock {
                attention_norm: LayerNormConfig::new(width).init(device),
                attention: layer.init(device),
                mlp_norm: LayerNormConfig::new(width).init(device),
                mlp_in: LinearConfig::new(width, 4 * width).init(device),
                mlp_out: LinearConfig::new(4 * width, width).init(device),
            })
            .collect();
        Self {
            embedding: EmbeddingConfig::new(vocab, width).init(device),
            blocks,
            norm: LayerNormConfig::new(width).init(device),
            head: LinearConfig::new(width, vocab).init(device),
        }
    }

    /// Logits `[S, T, vocab]` of `tokens: [S, T]`: over whole sequences without caches, or
    /// continuing `sequences` of `caches` (one cache per block).
    fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut cached: Option<(&mut [NsaCache<B>], &[usize])>,
    ) -> Tensor<B, 3> {
        let mut x = self.embedding.forward(tokens);
        for (i, block) in self.blocks.iter().enumerate() {
            let input = block.attention_norm.forward(x.clone());
            let attended = match cached.as_mut() {
                None => block.attention.forward(input),
                Some((caches, sequences)) => {
                    block
                        .attention
                        .forward_cached(input, &mut caches[i], sequences)
                }
            };
            x = x + attended;
            let hidden = gelu(block.mlp_in.forward(block.mlp_norm.forward(x.clone())));
            x = x + block.mlp_out.forward(hidden);
        }
        self.head.forward(self.norm.forward(x))
    }
}

fn main() {
    let args = Args::parse();
    let (device, preset) = args.placement.start();
    let layer = preset.config();
    if args.chunk == 0 || args.prompt_len == 0 || args.batch == 0 || args.vocab == 0 {
        eprintln!("--chunk, --prompt-len, --batch and --vocab must be at least 1");
        std::process::exit(2);
    }
    match device.backend {
        #[cfg(feature = "cuda")]
        CompiledBackend::Cuda => run::<burn::backend::Cuda>(&args, &layer, &Default::default()),
        #[cfg(feature = "wgpu")]
        CompiledBackend::Wgpu => run::<burn::backend::Wgpu>(&args, &layer, &Default::default()),
        CompiledBackend::Flex => run::<Flex>(&args, &layer, &Default::default()),
    }
}

/// The last position's greedy token of each row of `logits: [S, T, vocab]` -> `[S, 1]`.
fn next_tokens<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 2, Int> {
    let [rows, len, vocab] = logits.dims();
    logits
        .narrow(1, len - 1, 1)
        .reshape([rows, vocab])
        .argmax(1)
}

fn run<B: NsaBackend>(args: &Args, layer: &NsaConfig, device: &B::Device) {
    B::seed(device, 7);
    let model = Decoder::<B>::new(layer, args.layers, args.vocab, device);
    println!(
        "model: {} blocks, d_model = {}, H = {}, H_kv = {}, d_k = {}, d_v = {}, vocab = {} ({} parameters)",
        args.layers,
        layer.d_model,
        layer.n_heads,
        layer.n_kv_heads,
        layer.d_k,
        layer.d_v,
        args.vocab,
        model.num_params()
    );
    let batch = args.batch;
    let total = args.prompt_len + args.new_tokens;
    let pages = batch * total.div_ceil(layer.select_block);
    let mut caches: Vec<NsaCache<B>> = model
        .blocks
        .iter()
        .map(|block| {
            block
                .attention
                .cache(&NsaCacheConfig::new(batch, pages), device)
        })
        .collect();
    let sequences: Vec<usize> = (0..batch).collect();
    let prompt = Tensor::<B, 2>::random(
        [batch, args.prompt_len],
        Distribution::Uniform(0.0, args.vocab as f64),
        device,
    )
    .int()
    .clamp(0, args.vocab as i64 - 1);

    // Prefill in chunks; the last chunk's last logits give the first new token.
    let start = Instant::now();
    let mut logits = Vec::new();
    let mut fed = 0;
    while fed < args.prompt_len {
        let len = args.chunk.min(args.prompt_len - fed);
        let chunk = prompt.clone().narrow(1, fed, len);
        logits.push(model.forward(chunk, Some((&mut caches, &sequences))));
        fed += len;
    }
    let mut token = next_tokens(logits.last().expect("a prompt token").clone());
    let _ = token.clone().into_data();
    let prefill = start.elapsed();
    println!(
        "prefill: {} sequences x {} tokens in chunks of {}: {:.1} ms ({:.0} tokens/s)",
        batch,
        args.prompt_len,
        args.chunk,
        ms(prefill),
        (batch * args.prompt_len) as f64 / prefill.as_secs_f64()
    );

    // Decode: one token per sequence per step; reading the tokens back synchronizes.
    let mut generated = vec![token.clone()];
    let mut steps = Vec::with_capacity(args.new_tokens);
    for _ in 1..args.new_tokens {
        let start = Instant::now();
        let step = model.forward(token, Some((&mut caches, &sequences)));
        token = next_tokens(step.clone());
        let _ = token.clone().into_data();
        steps.push(start.elapsed());
        logits.push(step);
        generated.push(token.clone());
    }
    report_steps(&steps, batch, args.prompt_len);

    if args.check {
        check(&model, prompt, &generated, &logits);
    }
}

/// Per-step latency (median, 90th percentile, slowest) and tokens/s.
fn report_steps(steps: &[Duration], batch: usize, prompt_len: usize) {
    if steps.is_empty() {
        println!("decode: no step after the first token (--new-tokens 1)");
        return;
    }
    let mut sorted = steps.to_vec();
    sorted.sort();
    let quantile = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let total: Duration = steps.iter().sum();
    println!(
        "decode: {} steps after a {}-token context, batch {}: median {:.2} ms, p90 {:.2} ms, slowest {:.2} ms per step; {:.1} tokens/s",
        steps.len(),
        prompt_len,
        batch,
        ms(quantile(0.5)),
        ms(quantile(0.9)),
        ms(*sorted.last().expect("a step")),
        (batch * steps.len()) as f64 / total.as_secs_f64()
    );
}

/// The full forward pass over the prompt and the generated tokens must give the cached
/// logits and choose the generated tokens.
fn check<B: NsaBackend>(
    model: &Decoder<B>,
    prompt: Tensor<B, 2, Int>,
    generated: &[Tensor<B, 2, Int>],
    cached: &[Tensor<B, 3>],
) {
    // Every generated token but the last was fed back; the logits cover all of those.
    let fed: Vec<_> = generated[..generated.len() - 1].to_vec();
    let tokens = Tensor::cat([vec![prompt], fed].concat(), 1);
    let full = model.forward(tokens, None);
    let cached = Tensor::cat(cached.to_vec(), 1);
    let (full_values, cached_values) = (values(full.clone()), values(cached));
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (a, b) in cached_values.iter().zip(&full_values) {
        diff += (a - b).powi(2);
        norm += b.powi(2);
    }
    let error = (diff / norm).sqrt();
    let [rows, len, vocab] = full.dims();
    let prompt_len = len + 1 - generated.len();
    let chosen = full
        .narrow(1, prompt_len - 1, generated.len())
        .argmax(2)
        .reshape([rows, generated.len()]);
    let same_tokens = chosen.into_data().convert::<i64>().to_vec::<i64>().unwrap()
        == Tensor::cat(generated.to_vec(), 1)
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap();
    println!(
        "check against the full forward over {rows} x {len} tokens (vocab {vocab}): logits relative error {error:.2e}, generated tokens {}",
        if same_tokens { "identical" } else { "DIFFER" }
    );
    if !same_tokens || !(error < 1e-3) {
        eprintln!("the cached generation does not match the full forward pass");
        std::process::exit(1);
    }
}

fn values<B: Backend>(tensor: Tensor<B, 3>) -> Vec<f64> {
    tensor.into_data().convert::<f64>().to_vec().unwrap()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
