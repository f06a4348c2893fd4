//! The NSA layer with the paper's defaults on the best device available: forward and
//! backward on a random sequence, with shapes, timings and the sparsity achieved.
//!
//! ```text
//! cargo run -p nsa-examples -- --seq-len 1024
//! cargo run -p nsa-examples -- --device flex --seq-len 16384 --forward-only
//! ```

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor};
use clap::{Parser, ValueEnum};
use nsa_burn::{Nsa, NsaAttentionConfig, NsaBackend, NsaConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceChoice {
    /// CUDA if a GPU answers, else wgpu if an adapter answers, else flex (CPU).
    Auto,
    Cuda,
    Wgpu,
    Flex,
}

/// Runs the NSA layer (paper defaults: l = 32, d = 16, l' = 64, n = 16, w = 512; H = 64,
/// H_kv = 4, d_k = 192, d_v = 128) on a random sequence.
#[derive(Debug, Parser)]
struct Args {
    /// Device to run on.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Sequence length T.
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Model width d_model.
    #[arg(long, default_value_t = 1024)]
    d_model: usize,
    /// Query heads H.
    #[arg(long, default_value_t = 64)]
    heads: usize,
    /// Key/value heads H_kv.
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// Query/key head dimension d_k.
    #[arg(long, default_value_t = 192)]
    d_k: usize,
    /// Value head dimension d_v.
    #[arg(long, default_value_t = 128)]
    d_v: usize,
    /// Skip the backward pass (the reference keeps every chunk's activations for it, see
    /// the `nsa_burn::reference` docs; forward alone runs long sequences in little memory).
    #[arg(long)]
    forward_only: bool,
}

fn main() {
    let args = Args::parse();
    let config = NsaConfig::new(args.d_model, args.heads, args.kv_heads, args.d_k, args.d_v);
    if let Err(error) = config.validate() {
        eprintln!("invalid configuration: {error}");
        std::process::exit(2);
    }
    match resolve(args.device) {
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda => {
            run::<Autodiff<burn::backend::Cuda>>(&args, &config, "cuda", &Default::default())
        }
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => {
            run::<Autodiff<burn::backend::Wgpu>>(&args, &config, "wgpu", &Default::default())
        }
        DeviceChoice::Flex => run::<Autodiff<Flex>>(&args, &config, "flex", &Default::default()),
        other => {
            eprintln!(
                "{other:?} is not compiled in: enable the `{other:?}` feature of nsa-examples"
            );
            std::process::exit(2);
        }
    }
}

/// Picks the device: the one asked for, or for `Auto` the first that answers.
fn resolve(choice: DeviceChoice) -> DeviceChoice {
    if choice != DeviceChoice::Auto {
        return choice;
    }
    #[cfg(feature = "cuda")]
    if answers::<burn::backend::Cuda>() {
        return DeviceChoice::Cuda;
    }
    #[cfg(feature = "wgpu")]
    if answers::<burn::backend::Wgpu>() {
        return DeviceChoice::Wgpu;
    }
    DeviceChoice::Flex
}

/// Whether a backend's default device can run a tiny computation (its runtime panics when
/// no driver or adapter is present).
#[allow(dead_code)]
fn answers<B: Backend>() -> bool {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(|| {
        let device = B::Device::default();
        Tensor::<B, 1>::ones([4], &device).sum().into_data();
    })
    .is_ok();
    std::panic::set_hook(hook);
    ok
}

fn run<B>(args: &Args, config: &NsaConfig, name: &str, device: &B::Device)
where
    B: AutodiffBackend + NsaBackend,
    B::InnerBackend: NsaBackend,
{
    let nsa: Nsa<B> = config.init(device);
    let [batch, seq] = [args.batch, args.seq_len];
    println!("device: {name}");
    println!(
        "layer: d_model={} H={} H_kv={} d_k={} d_v={} l={} d={} l'={} n={} w={} ({} parameters)",
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.d_k,
        config.d_v,
        config.compress_block,
        config.compress_stride,
        config.select_block,
        config.n_selected,
        config.window,
        nsa.num_params()
    );
    let x = Tensor::<B, 3>::random(
        [batch, seq, config.d_model],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    println!("input x: {:?}", x.dims());

    let selected = if args.forward_only {
        let inner = nsa.valid();
        let start = Instant::now();
        let out = inner.forward_detailed(x.inner());
        B::InnerBackend::sync(device).expect("device sync");
        println!(
            "output: {:?}, forward: {:.3} s",
            out.output.dims(),
            seconds(start)
        );
        branch_times::<B::InnerBackend>(args, &config.attention_config(), device);
        out.selected_blocks
    } else {
        let x = x.require_grad();
        let start = Instant::now();
        let out = nsa.forward_detailed(x.clone());
        B::sync(device).expect("device sync");
        println!(
            "output: {:?}, forward: {:.3} s",
            out.output.dims(),
            seconds(start)
        );
        let start = Instant::now();
        let grads = out.output.sum().backward();
        B::sync(device).expect("device sync");
        let grad = x.grad(&grads).expect("input gradient");
        println!(
            "backward: {:.3} s (input gradient {:?})",
            seconds(start),
            grad.dims()
        );
        out.selected_blocks.inner()
    };
    println!(
        "selected blocks: {:?} (batch, KV head, t, n)",
        selected.dims()
    );
    report_sparsity::<B::InnerBackend>(selected, nsa.attention_config());
    if let Some(peak) = peak_rss_gib() {
        println!("peak resident memory of this process: {peak:.2} GiB");
    }
}

/// Times each branch of the attention operator on random heads of the layer's shapes (the
/// CubeCL kernels on CUDA and wgpu, the reference elsewhere), after one untimed call.
fn branch_times<B: NsaBackend>(args: &Args, config: &NsaAttentionConfig, device: &B::Device) {
    let blocks = config.num_compressed_blocks(args.seq_len);
    let random = |heads, len, dim| {
        Tensor::<B, 4>::random(
            [args.batch, len, heads, dim],
            Distribution::Normal(0.0, 1.0),
            device,
        )
        .into_primitive()
        .tensor()
    };
    let (q, k, v) = (
        random(args.heads, args.seq_len, args.d_k),
        random(args.kv_heads, args.seq_len, args.d_k),
        random(args.kv_heads, args.seq_len, args.d_v),
    );
    let timed = |name: &str, run: &dyn Fn()| {
        run();
        B::sync(device).expect("device sync");
        let start = Instant::now();
        run();
        B::sync(device).expect("device sync");
        println!("  {name}: {:.2} ms", seconds(start) * 1e3);
    };
    println!("branch times at T = {} (second call):", args.seq_len);
    if blocks > 0 {
        let k_cmp = random(args.kv_heads, blocks, args.d_k);
        let v_cmp = random(args.kv_heads, blocks, args.d_v);
        timed("compressed + top-n", &|| {
            B::nsa_compressed(q.clone(), k_cmp.clone(), v_cmp.clone(), config);
        });
        let (_, _, selected) = B::nsa_compressed(q.clone(), k_cmp, v_cmp, config);
        timed("selected", &|| {
            B::nsa_selected(q.clone(), k.clone(), v.clone(), selected.clone(), config);
        });
    }
    timed("window", &|| {
        B::nsa_window(q.clone(), k.clone(), v.clone(), config);
    });
}

fn seconds(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Average keys each query attends per branch, against dense causal attention.
fn report_sparsity<B: Backend>(selected: Tensor<B, 4, Int>, config: &NsaAttentionConfig) {
    let [batch, kv_heads, seq, n] = selected.dims();
    let blocks: Vec<i64> = selected
        .into_data()
        .convert::<i64>()
        .to_vec()
        .expect("indices");
    let block = config.select_block as i64;
    let (mut cmp, mut slc, mut win) = (0usize, 0usize, 0usize);
    for row in 0..batch * kv_heads * seq {
        let t = (row % seq) as i64;
        cmp += config.num_compressed_blocks(t as usize + 1);
        slc += blocks[row * n..(row + 1) * n]
            .iter()
            .filter(|&&j| j >= 0)
            .map(|&j| ((t - j * block + 1).clamp(0, block)) as usize)
            .sum::<usize>();
        win += (t as usize + 1).min(config.window);
    }
    let rows = (batch * kv_heads * seq) as f64;
    let (cmp, slc, win) = (cmp as f64 / rows, slc as f64 / rows, win as f64 / rows);
    let dense = (seq as f64 + 1.0) / 2.0;
    println!(
        "keys attended per query (average): {:.0} = {cmp:.0} compressed + {slc:.0} selected + {win:.0} window; dense causal: {dense:.0} ({:.1}% of dense)",
        cmp + slc + win,
        100.0 * (cmp + slc + win) / dense
    );
}

/// Peak resident set size of this process (Linux), in GiB.
fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}
