//! Forward time of the NSA kernels per branch and in total, at several sequence lengths.
//!
//! ```text
//! nsa-bench --seq-lens 8192 16384 32768 65536 --dtype bf16
//! ```
//! Paper defaults (l = 32, d = 16, l' = 64, n = 16, w = 512), batch 1, H = 64, H_kv = 4,
//! d_k = d_v = 128 unless given. Inputs are random normal; each number is the median of
//! `--reps` synchronized runs after `--warmup` runs (the first compiles the kernels).

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use clap::Parser;
use nsa_burn::{nsa_attention, BranchKv, NsaAttentionConfig, NsaBackend, NsaInput};

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
        "cuda" => bench::<burn::backend::Cuda>(&args, dtype),
        #[cfg(feature = "wgpu")]
        "wgpu" => bench::<burn::backend::Wgpu>(&args, dtype),
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

fn bench<B: NsaBackend>(args: &Args, dtype: DType) {
    let device = B::Device::default();
    let config = NsaAttentionConfig::new();
    println!(
        "| T | compressed + top-n (ms) | selected (ms) | window (ms) | NSA forward total (ms) |"
    );
    println!("|---|---|---|---|---|");
    for &seq in &args.seq_lens {
        let random = |shape: [usize; 4]| {
            Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(dtype)
        };
        let blocks = config.num_compressed_blocks(seq);
        let q = random([1, seq, args.heads, args.d_k]);
        let k = random([1, seq, args.kv_heads, args.d_k]);
        let v = random([1, seq, args.kv_heads, args.d_v]);
        let k_cmp = random([1, blocks, args.kv_heads, args.d_k]);
        let v_cmp = random([1, blocks, args.kv_heads, args.d_v]);
        let gates = Tensor::<B, 4>::random(
            [1, seq, args.heads, 3],
            Distribution::Uniform(0.0, 1.0),
            &device,
        )
        .cast(dtype);
        let p = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
        let (_, selected) = B::nsa_compressed(p(&q), p(&k_cmp), p(&v_cmp), &config);
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
            nsa_attention(
                NsaInput {
                    q: q.clone(),
                    compressed: Some(BranchKv {
                        k: k_cmp.clone(),
                        v: v_cmp.clone(),
                    }),
                    selected: BranchKv {
                        k: k.clone(),
                        v: v.clone(),
                    },
                    window: BranchKv {
                        k: k.clone(),
                        v: v.clone(),
                    },
                    gates: gates.clone(),
                },
                &config,
            )
            .output
        });
        println!("| {seq} | {compressed:.2} | {selected_ms:.2} | {window:.2} | {total:.2} |");
    }
}
