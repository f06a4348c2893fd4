//! Time of the NSA kernels per branch and in total, at several sequence lengths: the forward
//! pass (`--phase forward`), or the backward kernels per branch and forward + backward of the
//! whole operator under autodiff (`--phase backward`).
//!
//! ```text
//! nsa-bench --seq-lens 8192 16384 32768 65536 --dtype bf16 --phase forward
//! ```
//! Paper defaults (l = 32, d = 16, l' = 64, n = 16, w = 512), batch 1, H = 64, H_kv = 4,
//! d_k = d_v = 128 unless given. Inputs are random normal; each number is the median of
//! `--reps` synchronized runs after `--warmup` runs (the first compiles the kernels).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use clap::Parser;
use nsa_burn::{nsa_attention, BranchKv, BranchSaved, NsaAttentionConfig, NsaBackend, NsaInput};

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
    /// forward, or backward (backward kernels per branch, and forward + backward in total).
    #[arg(long, default_value = "forward")]
    phase: String,
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
    match args.phase.as_str() {
        "forward" => forward::<B>(args, dtype),
        "backward" => backward::<B>(args, dtype),
        other => panic!("--phase must be forward or backward, got {other}"),
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
    let random = |shape: [usize; 4]| {
        Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let blocks = config.num_compressed_blocks(seq);
    let gates = Tensor::<B, 4>::random(
        [1, seq, args.heads, 3],
        Distribution::Uniform(0.0, 1.0),
        device,
    )
    .cast(dtype);
    [
        random([1, seq, args.heads, args.d_k]),
        random([1, seq, args.kv_heads, args.d_k]),
        random([1, seq, args.kv_heads, args.d_v]),
        random([1, blocks, args.kv_heads, args.d_k]),
        random([1, blocks, args.kv_heads, args.d_v]),
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
fn backward<B: NsaBackend>(args: &Args, dtype: DType) {
    let device = B::Device::default();
    let config = NsaAttentionConfig::new();
    let kernels = B::nsa_backward().expect("this backend has backward kernels");
    println!(
        "| T | compressed backward (ms) | selected backward (ms) | window backward (ms) | \
         NSA forward + backward total (ms) |"
    );
    println!("|---|---|---|---|---|");
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
        let (o, lse, selected) = B::nsa_compressed(p(&q), p(&k_cmp), p(&v_cmp), &config);
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
        println!("| {seq} | {compressed_ms:.2} | {selected_ms:.2} | {window_ms:.2} | {total:.2} |");
    }
}

/// Forward kernels per branch, then the whole operator.
fn forward<B: NsaBackend>(args: &Args, dtype: DType) {
    let device = B::Device::default();
    let config = NsaAttentionConfig::new();
    println!(
        "| T | compressed + top-n (ms) | selected (ms) | window (ms) | NSA forward total (ms) |"
    );
    println!("|---|---|---|---|---|");
    for &seq in &args.seq_lens {
        let tensors = inputs::<B>(args, &config, seq, dtype, &device);
        let [q, k, v, k_cmp, v_cmp, _] = tensors.clone();
        let p = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
        let (_, _, selected) = B::nsa_compressed(p(&q), p(&k_cmp), p(&v_cmp), &config);
        let compressed = time::<B, _>(args, &device, || {
            B::nsa_compressed(p(&q), p(&k_cmp), p(&v_cmp), &config)
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
        println!("| {seq} | {compressed:.2} | {selected_ms:.2} | {window:.2} | {total:.2} |");
    }
}
