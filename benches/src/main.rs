//! Time of the NSA kernels per branch and in total, at several sequence lengths: the forward
//! pass (`--phase forward`), or the backward kernels per branch and forward + backward of the
//! whole operator under autodiff (`--phase backward`); or packed documents
//! (`--phase packed-forward`, `--phase packed-backward`): documents of random lengths
//! (`--doc-lens`, seeded by `--seed`) filling each sequence length, run packed, each alone,
//! and padded to the longest one as a batch; or decoding (`--phase decode`): one step of
//! `--batch` sequences after a context of each sequence length, the operator alone and the
//! layer through its cache; or a check of long sequences (`--phase long-check`): the
//! forward pass, with its outputs at sampled query positions compared with the reference
//! (queries at an offset, in f32), failing past `--tolerance`.
//!
//! ```text
//! nsa-bench --seq-lens 8192 16384 32768 65536 --dtype bf16 --phase forward --json forward.json
//! ```
//! Paper defaults (l = 32, d = 16, l' = 64, n = 16, w = 512), batch 1, H = 64, H_kv = 4,
//! d_k = d_v = 128 unless given. Inputs are random normal; each number is the median of
//! `--reps` synchronized runs after `--warmup` runs (the first compiles the kernels).
//!
//! The results go to standard output as a markdown table, one row per sequence length as it
//! is measured, and with `--json` to a file as a [`Report`] (what `cargo xtask bench` reads).

use std::path::PathBuf;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, ElementConversion, Tensor};
use clap::Parser;
use nsa_burn::reference;
use nsa_burn::{
    nsa_attention, nsa_attention_packed, BranchKv, BranchSaved, Documents, NsaAttentionConfig,
    NsaBackend, NsaCacheConfig, NsaConfig, NsaInput,
};
use serde::Serialize;

#[derive(Debug, Parser)]
struct Args {
    /// Sequence lengths.
    #[arg(long, num_args = 1.., default_values_t = [8192usize, 16384, 32768, 65536])]
    seq_lens: Vec<usize>,
    /// Element type: f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 64)]
    heads: usize,
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    d_k: usize,
    #[arg(long, default_value_t = 128)]
    d_v: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Backend: cuda or wgpu.
    #[arg(long, default_value = "cuda")]
    backend: String,
    /// forward, backward (backward kernels per branch, and forward + backward in total),
    /// packed-forward or packed-backward (packed documents, forward or forward + backward).
    #[arg(long, default_value = "forward")]
    phase: String,
    /// Shortest and longest document of the packed phases.
    #[arg(long, num_args = 2, default_values_t = [1024usize, 16384])]
    doc_lens: Vec<usize>,
    /// Seed of the packed phases' document lengths.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences decoded together (decode phase).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Width of the layer timed by the decode phase.
    #[arg(long, default_value_t = 1024)]
    d_model: usize,
    /// Largest relative error the long-check phase accepts at its sampled positions.
    #[arg(long, default_value_t = 2e-2)]
    tolerance: f64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The results of one run, as written by `--json`: the run's settings and one measurement
/// per (sequence length, series).
#[derive(Debug, Serialize)]
struct Report<'a> {
    backend: &'a str,
    dtype: &'a str,
    phase: &'a str,
    heads: usize,
    kv_heads: usize,
    d_k: usize,
    d_v: usize,
    warmup: usize,
    reps: usize,
    results: Vec<Measurement>,
}

/// One number of the table.
#[derive(Debug, Serialize)]
struct Measurement {
    seq_len: usize,
    /// The table column, e.g. `selected` or `NSA forward total`.
    series: &'static str,
    /// Median time in milliseconds.
    ms: f64,
}

/// The table being measured: printed as markdown on standard output, a row as soon as it is
/// measured, and kept for `--json`.
struct Table {
    series: Vec<&'static str>,
    results: Vec<Measurement>,
}

impl Table {
    /// Prints the header of a table with a column per series.
    fn new(series: Vec<&'static str>) -> Self {
        let header: Vec<String> = series
            .iter()
            .map(|name| format!(" {name} (ms) |"))
            .collect();
        println!("| T |{}", header.concat());
        println!("|---|{}", "---|".repeat(series.len()));
        Self {
            series,
            results: Vec::new(),
        }
    }

    /// Prints and keeps the row of one sequence length (`ms` in the order of the series).
    fn push(&mut self, seq_len: usize, ms: &[f64]) {
        let cells: Vec<String> = ms.iter().map(|ms| format!(" {ms:.2} |")).collect();
        println!("| {seq_len} |{}", cells.concat());
        self.results.extend(
            self.series
                .iter()
                .zip(ms)
                .map(|(&series, &ms)| Measurement {
                    seq_len,
                    series,
                    ms,
                }),
        );
    }
}

fn main() {
    let args = Args::parse();
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => panic!("--dtype must be f32, f16 or bf16, got {other}"),
    };
    match args.backend.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => run::<burn::backend::Cuda>(&args, dtype),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<burn::backend::Wgpu>(&args, dtype),
        other => panic!("backend {other} is not compiled in"),
    }
}

/// Median of `reps` timings (ms) of `f`, synchronized, after `warmup` runs.
fn time<B: Backend, T>(args: &Args, device: &B::Device, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..args.warmup {
        drop(f());
        B::sync(device).expect("sync");
    }
    let mut times: Vec<f64> = (0..args.reps)
        .map(|_| {
            let start = Instant::now();
            let out = f();
            B::sync(device).expect("sync");
            let ms = start.elapsed().as_secs_f64() * 1e3;
            drop(out);
            ms
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn run<B: NsaBackend>(args: &Args, dtype: DType) {
    let table = match args.phase.as_str() {
        "forward" => forward::<B>(args, dtype),
        "backward" => backward::<B>(args, dtype),
        "packed-forward" => packed::<B>(args, dtype, false),
        "packed-backward" => packed::<B>(args, dtype, true),
        "decode" => decode::<B>(args, dtype),
        "long-check" => long_check::<B>(args, dtype),
        other => panic!(
            "--phase must be forward, backward, packed-forward, packed-backward, decode or long-check, got {other}"
        ),
    };
    if let Some(path) = &args.json {
        let report = Report {
            backend: &args.backend,
            dtype: &args.dtype,
            phase: &args.phase,
            heads: args.heads,
            kv_heads: args.kv_heads,
            d_k: args.d_k,
            d_v: args.d_v,
            warmup: args.warmup,
            reps: args.reps,
            results: table.results,
        };
        let json = serde_json::to_string_pretty(&report).expect("the report serializes");
        std::fs::write(path, json + "\n")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// Random operator inputs `[q, k, v, k_cmp, v_cmp, gates]` for `seq` positions.
fn inputs<B: Backend>(
    args: &Args,
    config: &NsaAttentionConfig,
    seq: usize,
    dtype: DType,
    device: &B::Device,
) -> [Tensor<B, 4>; 6] {
    batch_inputs(
        args,
        1,
        seq,
        config.num_compressed_blocks(seq),
        dtype,
        device,
    )
}

/// Random operator inputs for `batch` rows of `seq` positions and `blocks` compressed keys.
fn batch_inputs<B: Backend>(
    args: &Args,
    batch: usize,
    seq: usize,
    blocks: usize,
    dtype: DType,
    device: &B::Device,
) -> [Tensor<B, 4>; 6] {
    let random = |shape: [usize; 4]| {
        Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let gates = Tensor::<B, 4>::random(
        [batch, seq, args.heads, 3],
        Distribution::Uniform(0.0, 1.0),
        device,
    )
    .cast(dtype);
    [
        random([batch, seq, args.heads, args.d_k]),
        random([batch, seq, args.kv_heads, args.d_k]),
        random([batch, seq, args.kv_heads, args.d_v]),
        random([batch, blocks, args.kv_heads, args.d_k]),
        random([batch, blocks, args.kv_heads, args.d_v]),
        gates,
    ]
}

/// The operator's input (the same keys and values for the selected and window branches).
fn operator_input<B: Backend>([q, k, v, k_cmp, v_cmp, gates]: [Tensor<B, 4>; 6]) -> NsaInput<B> {
    NsaInput {
        q,
        compressed: Some(BranchKv { k: k_cmp, v: v_cmp }),
        selected: BranchKv {
            k: k.clone(),
            v: v.clone(),
        },
        window: BranchKv { k, v },
        gates,
    }
}

/// Backward kernels per branch, then forward + backward of the operator under autodiff.
fn backward<B: NsaBackend>(args: &Args, dtype: DType) -> Table {
    let device = B::Device::default();
    let config = NsaAttentionConfig::new();
    let kernels = B::nsa_backward().expect("this backend has backward kernels");
    let mut table = Table::new(vec![
        "compressed backward",
        "selected backward",
        "window backward",
        "NSA forward + backward total",
    ]);
    for &seq in &args.seq_lens {
        let tensors = inputs::<B>(args, &config, seq, dtype, &device);
        let [q, k, v, k_cmp, v_cmp, _] = tensors.clone();
        let p = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
        let grad = p(&Tensor::<B, 4>::random(
            [1, seq, args.heads, args.d_v],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
        .cast(dtype));
        let saved =
            |q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>, (output, lse)| BranchSaved {
                q: p(q),
                k: p(k),
                v: p(v),
                output,
                lse,
            };
        let (o, lse, selected) = B::nsa_compressed(p(&q), p(&k_cmp), p(&v_cmp), 0, &config);
        let compressed = saved(&q, &k_cmp, &v_cmp, (o, lse));
        let selected_saved = saved(
            &q,
            &k,
            &v,
            B::nsa_selected(p(&q), p(&k), p(&v), selected.clone(), &config),
        );
        let window_saved = saved(&q, &k, &v, B::nsa_window(p(&q), p(&k), p(&v), &config));
        let compressed_ms = time::<B, _>(args, &device, || {
            (kernels.compressed)(compressed.clone(), grad.clone(), &config)
        });
        let selected_ms = time::<B, _>(args, &device, || {
            (kernels.selected)(
                selected_saved.clone(),
                selected.clone(),
                grad.clone(),
                &config,
            )
        });
        let window_ms = time::<B, _>(args, &device, || {
            (kernels.window)(window_saved.clone(), grad.clone(), &config)
        });
        let total = time::<B, _>(args, &device, || {
            let leaves = tensors
                .clone()
                .map(|t| Tensor::<Autodiff<B>, 4>::from_inner(t).require_grad());
            let output = nsa_attention(operator_input(leaves), &config).output;
            output.sum().backward()
        });
        table.push(seq, &[compressed_ms, selected_ms, window_ms, total]);
    }
    table
}

/// Forward kernels per branch, then the whole operator.
fn forward<B: NsaBackend>(args: &Args, dtype: DType) -> Table {
    let device = B::Device::default();
    let config = NsaAttentionConfig::new();
    let mut table = Table::new(vec![
        "compressed + top-n",
        "selected",
        "window",
        "NSA forward total",
    ]);
    for &seq in &args.seq_lens {
        let tensors = inputs::<B>(args, &config, seq, dtype, &device);
        let [q, k, v, k_cmp, v_cmp, _] = tensors.clone();
        let p = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
        let (_, _, selected) = B::nsa_compressed(p(&q), p(&k_cmp), p(&v_cmp), 0, &config);
        let compressed = time::<B, _>(args, &device, || {
            B::nsa_compressed(p(&q), p(&k_cmp), p(&v_cmp), 0, &config)
        });
        let selected_ms = time::<B, _>(args, &device, || {
            B::nsa_selected(p(&q), p(&k), p(&v), selected.clone(), &config)
        });
        let window = time::<B, _>(args, &device, || {
            B::nsa_window(p(&q), p(&k), p(&v), &config)
        });
        let total = time::<B, _>(args, &device, || {
            nsa_attention(operator_input(tensors.clone()), &config).output
        });
        table.push(seq, &[compressed, selected_ms, window, total]);
    }
    table
}

/// The operator's output over `documents`, or unpacked.
fn attend<B: NsaBackend>(
    input: NsaInput<B>,
    documents: Option<&Documents>,
    config: &NsaAttentionConfig,
) -> Tensor<B, 4> {
    match documents {
        Some(documents) => nsa_attention_packed(input, documents, config).output,
        None => nsa_attention(input, config).output,
    }
}

/// Document lengths between `--doc-lens` drawn from `--seed` until they fill `total`
/// positions (the last one takes the rest when less than the shortest would remain).
fn document_lengths(args: &Args, total: usize) -> Vec<usize> {
    let (shortest, longest) = (args.doc_lens[0], args.doc_lens[1].max(args.doc_lens[0]));
    let mut state = args
        .seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut lengths = Vec::new();
    let mut left = total;
    while left > 0 {
        // xorshift64*: a fixed sequence per seed, no dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let draw = state.wrapping_mul(2685821657736338717) >> 11;
        let mut len = (shortest + (draw as usize) % (longest - shortest + 1)).min(left);
        if left - len < shortest {
            len = left;
        }
        lengths.push(len);
        left -= len;
    }
    lengths
}

/// Packed documents: each document alone (the sum of their medians), the documents packed
/// into one row, and the documents padded to the longest one as a batch; forward, or
/// forward + backward under autodiff when `backward`.
fn packed<B: NsaBackend>(args: &Args, dtype: DType, backward: bool) -> Table {
    let device = B::Device::default();
    let config = NsaAttentionConfig::new();
    let mut table = Table::new(vec![
        "each document alone (sum)",
        "packed",
        "padded to the longest document",
    ]);
    // The operator, and with `backward` the gradients of `sum(output)` under autodiff.
    let run = |tensors: [Tensor<B, 4>; 6], documents: Option<&Documents>| {
        if backward {
            let leaves = tensors.map(|t| Tensor::<Autodiff<B>, 4>::from_inner(t).require_grad());
            attend(operator_input(leaves), documents, &config)
                .sum()
                .backward();
        } else {
            attend(operator_input(tensors), documents, &config);
        }
    };
    for &seq in &args.seq_lens {
        let lengths = document_lengths(args, seq);
        let documents = Documents::try_from_lengths(&lengths, 1, seq).expect("valid documents");
        println!(
            "T = {seq}: {} documents of {lengths:?} positions",
            lengths.len()
        );
        let blocks = documents.num_compressed_blocks(&config);
        let packed_inputs = batch_inputs::<B>(args, 1, seq, blocks, dtype, &device);
        let alone: f64 = lengths
            .iter()
            .map(|&len| {
                let tensors = inputs::<B>(args, &config, len, dtype, &device);
                time::<B, _>(args, &device, || run(tensors.clone(), None))
            })
            .sum();
        let packed = time::<B, _>(args, &device, || {
            run(packed_inputs.clone(), Some(&documents))
        });
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let padded_inputs = batch_inputs::<B>(
            args,
            lengths.len(),
            longest,
            config.num_compressed_blocks(longest),
            dtype,
            &device,
        );
        let padded = time::<B, _>(args, &device, || run(padded_inputs.clone(), None));
        table.push(seq, &[alone, packed, padded]);
    }
    table
}

/// The last `len` positions of `t` (dimension 1).
fn last<B: Backend>(t: Tensor<B, 4>, len: usize) -> Tensor<B, 4> {
    let total = t.dims()[1];
    t.narrow(1, total - len, len)
}

/// The operator's input for the queries `end - len..end` of a sequence whose inputs are
/// `[q, k, v, k_cmp, v_cmp, gates]` (compressed keys of the whole sequence): the keys of
/// positions `0..end`, the window keys the queries reach, the compression blocks ended by
/// `end`.
fn offset_input<B: Backend>(
    tensors: &[Tensor<B, 4>; 6],
    end: usize,
    len: usize,
    config: &NsaAttentionConfig,
) -> NsaInput<B> {
    let [q, k, v, k_cmp, v_cmp, gates] = tensors.clone();
    let (k, v) = (k.narrow(1, 0, end), v.narrow(1, 0, end));
    let reach = end.min(len + config.window - 1);
    let blocks = config.num_compressed_blocks(end);
    NsaInput {
        q: last(q.narrow(1, 0, end), len),
        compressed: (blocks > 0).then(|| BranchKv {
            k: k_cmp.narrow(1, 0, blocks),
            v: v_cmp.narrow(1, 0, blocks),
        }),
        selected: BranchKv {
            k: k.clone(),
            v: v.clone(),
        },
        window: BranchKv {
            k: last(k, reach),
            v: last(v, reach),
        },
        gates: last(gates.narrow(1, 0, end), len),
    }
}

/// One decoding step after a context of each sequence length, for `--batch` sequences: the
/// operator alone (one query per sequence at position `T`, keys `0..=T`), and a layer of
/// `--d-model` through its cache (projections, compressor, gates and output included, the
/// host's work too, in f32), after a prefill of the context.
fn decode<B: NsaBackend>(args: &Args, dtype: DType) -> Table {
    let device = B::Device::default();
    let layer_config = NsaConfig::new(args.d_model, args.heads, args.kv_heads, args.d_k, args.d_v);
    let config = layer_config.attention_config();
    let mut table = Table::new(vec!["operator decode step", "layer decode step (cache)"]);
    let batch = args.batch;
    for &seq in &args.seq_lens {
        let context = seq + 1;
        let blocks = config.num_compressed_blocks(context);
        let tensors = batch_inputs::<B>(args, batch, context, blocks, dtype, &device);
        let operator = time::<B, _>(args, &device, || {
            nsa_attention(offset_input(&tensors, context, 1, &config), &config).output
        });
        let layer = layer_config.init::<B>(&device);
        // The context, then one token per warm-up and timed step.
        let capacity = seq + args.warmup + args.reps + 1;
        let pages = batch * capacity.div_ceil(config.select_block);
        let mut cache = layer.cache(&NsaCacheConfig::new(batch, pages), &device);
        let sequences: Vec<usize> = (0..batch).collect();
        // The layer's weights are f32, so its step runs in f32 whatever `--dtype` says.
        let x = |len| {
            Tensor::<B, 3>::random(
                [batch, len, args.d_model],
                Distribution::Normal(0.0, 1.0),
                &device,
            )
        };
        layer.forward_cached(x(seq), &mut cache, &sequences);
        let step = x(1);
        let layer_ms = time::<B, _>(args, &device, || {
            layer.forward_cached(step.clone(), &mut cache, &sequences)
        });
        table.push(seq, &[operator, layer_ms]);
    }
    table
}

/// The forward pass at each sequence length, and its outputs at sampled query positions
/// (16 queries from position 1, in the middle and at the end) against the reference
/// operator (`nsa_burn::reference::operator`, Burn ops) run on the same backend in f32 with
/// the queries at an offset. Panics past `--tolerance`.
fn long_check<B: NsaBackend>(args: &Args, dtype: DType) -> Table {
    let device = B::Device::default();
    let config = NsaAttentionConfig::new();
    let mut table = Table::new(vec!["NSA forward total"]);
    for &seq in &args.seq_lens {
        let tensors = inputs::<B>(args, &config, seq, dtype, &device);
        let total = time::<B, _>(args, &device, || {
            nsa_attention(operator_input(tensors.clone()), &config).output
        });
        let output = nsa_attention(operator_input(tensors.clone()), &config).output;
        let single = tensors.clone().map(|t| t.cast(DType::F32));
        // Queries at an offset of at least 1 (`T < T_k`), as a cache calls the operator.
        let len = 16.min(seq.saturating_sub(1)).max(1);
        let mut worst = 0.0f64;
        for end in [len + 1, seq / 2, seq] {
            let end = end.clamp(len + 1, seq.max(len + 1));
            if end > seq {
                println!("T = {seq}: too short to check at an offset");
                break;
            }
            let reference = reference::operator(offset_input(&single, end, len, &config), &config)
                .expect("valid inputs")
                .output;
            let kernel = output.clone().narrow(1, end - len, len).cast(DType::F32);
            let square_sum = |t: Tensor<B, 4>| (t.clone() * t).sum().into_scalar().elem::<f64>();
            let error = (square_sum(kernel - reference.clone()) / square_sum(reference)).sqrt();
            println!(
                "T = {seq}: queries {}..{end}: relative error {error:.2e}",
                end - len
            );
            assert!(
                error.is_finite() && error <= args.tolerance,
                "T = {seq}: the kernels' outputs at {}..{end} differ from the reference by {error:e}",
                end - len
            );
            worst = worst.max(error);
        }
        println!(
            "T = {seq}: worst relative error {worst:.2e} (tolerance {:e})",
            args.tolerance
        );
        table.push(seq, &[total]);
    }
    table
}
