//! The NSA layer on the best device available: forward and backward on a random sequence,
//! with the device, shapes, timings and the sparsity achieved.
//!
//! On a GPU the layer has the paper's sizes; on a CPU (flex, or a wgpu CPU adapter such as
//! Mesa's lavapipe) a small layer, so that the example finishes in seconds. `--preset`
//! picks either anywhere, and the size flags override single sizes of the preset.
//!
//! ```text
//! cargo run -p nsa-examples
//! cargo run -p nsa-examples -- --preset paper --seq-len 4096
//! cargo run -p nsa-examples -- --device flex --seq-len 16384 --forward-only
//! ```

use std::io::Write;
use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor};
use clap::Parser;
use nsa_burn::{Nsa, NsaAttentionConfig, NsaBackend, NsaConfig};
use nsa_examples::device::CompiledBackend;
use nsa_examples::preset::{DeviceAndPreset, Preset};

/// Runs the NSA layer on a random sequence: the paper's layer on a GPU, a small one on a CPU
/// (see `--preset`).
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    placement: DeviceAndPreset,
    /// Sequence length T.
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Model width d_model [default: the preset's].
    #[arg(long)]
    d_model: Option<usize>,
    /// Query heads H [default: the preset's].
    #[arg(long)]
    heads: Option<usize>,
    /// Key/value heads H_kv [default: the preset's].
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Query/key head dimension d_k [default: the preset's].
    #[arg(long)]
    d_k: Option<usize>,
    /// Value head dimension d_v [default: the preset's].
    #[arg(long)]
    d_v: Option<usize>,
    /// Skip the backward pass (the reference keeps every chunk's activations for it, see
    /// the `nsa_burn::reference` docs; forward alone runs long sequences in little memory).
    #[arg(long)]
    forward_only: bool,
}

impl Args {
    /// The layer to run: the preset's, with the sizes given on the command line.
    fn layer_config(&self, preset: Preset) -> NsaConfig {
        let base = preset.config();
        NsaConfig {
            d_model: self.d_model.unwrap_or(base.d_model),
            n_heads: self.heads.unwrap_or(base.n_heads),
            n_kv_heads: self.kv_heads.unwrap_or(base.n_kv_heads),
            d_k: self.d_k.unwrap_or(base.d_k),
            d_v: self.d_v.unwrap_or(base.d_v),
            ..base
        }
    }
}

fn main() {
    let args = Args::parse();
    let (device, preset) = args.placement.start();
    let config = args.layer_config(preset);
    if let Err(error) = config.validate() {
        eprintln!("invalid configuration: {error}");
        std::process::exit(2);
    }
    match device.backend {
        #[cfg(feature = "cuda")]
        CompiledBackend::Cuda => {
            run::<Autodiff<burn::backend::Cuda>>(&args, &config, &Default::default())
        }
        #[cfg(feature = "wgpu")]
        CompiledBackend::Wgpu => {
            run::<Autodiff<burn::backend::Wgpu>>(&args, &config, &Default::default())
        }
        CompiledBackend::Flex => run::<Autodiff<Flex>>(&args, &config, &Default::default()),
    }
}

fn run<B>(args: &Args, config: &NsaConfig, device: &B::Device)
where
    B: AutodiffBackend + NsaBackend,
    B::InnerBackend: NsaBackend,
{
    let nsa: Nsa<B> = config.init(device);
    let [batch, seq] = [args.batch, args.seq_len];
    println!("backend: {}", B::name(device));
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
    println!("input x: {:?} (batch, T, d_model)", x.dims());

    let selected = if args.forward_only {
        let inner = nsa.valid();
        let out =
            step::<B::InnerBackend, _>("forward", device, || inner.forward_detailed(x.inner()));
        println!("output: {:?}", out.output.dims());
        branch_times::<B::InnerBackend>(args, config, device);
        out.selected_blocks
    } else {
        let x = x.require_grad();
        let out = step::<B, _>("forward", device, || nsa.forward_detailed(x.clone()));
        println!("output: {:?}", out.output.dims());
        let grads = step::<B, _>("backward", device, || out.output.sum().backward());
        let grad = x.grad(&grads).expect("input gradient");
        println!("input gradient: {:?}", grad.dims());
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

/// Runs one step of the example, announced before and timed (synchronized) after, so that a
/// slow device does not look hung.
fn step<B: Backend, T>(name: &str, device: &B::Device, run: impl FnOnce() -> T) -> T {
    print!("{name} ... ");
    std::io::stdout().flush().expect("stdout");
    let start = Instant::now();
    let out = run();
    B::sync(device).expect("device sync");
    println!("done in {:.3} s", seconds(start));
    out
}

/// Times each branch of the attention operator on random heads of the layer's shapes (the
/// CubeCL kernels on CUDA and wgpu, the reference elsewhere), after one untimed call.
fn branch_times<B: NsaBackend>(args: &Args, layer: &NsaConfig, device: &B::Device) {
    let config = &layer.attention_config();
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
        random(layer.n_heads, args.seq_len, layer.d_k),
        random(layer.n_kv_heads, args.seq_len, layer.d_k),
        random(layer.n_kv_heads, args.seq_len, layer.d_v),
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
        let k_cmp = random(layer.n_kv_heads, blocks, layer.d_k);
        let v_cmp = random(layer.n_kv_heads, blocks, layer.d_v);
        timed("compressed + top-n", &|| {
            B::nsa_compressed(q.clone(), k_cmp.clone(), v_cmp.clone(), 0, config);
        });
        let (_, _, selected) = B::nsa_compressed(q.clone(), k_cmp, v_cmp, 0, config);
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
