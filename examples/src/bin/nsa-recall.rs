//! Trains small language models with NSA, full and sliding-window attention on multi-query
//! associative recall (key-value pairs scattered through filler, queried at the end) with
//! burn-train, then measures each one's recall accuracy by sequence length and by the depth
//! of the pairs, and writes `recall.json`, `accuracy_by_length.svg` and
//! `accuracy_by_depth.svg` to `--out`.
//!
//! ```text
//! cargo run --release -p nsa-examples --bin nsa-recall -- --device cuda --time-limit 100
//! cargo run --release -p nsa-examples --bin nsa-recall -- --device flex --train-len 256 \
//!     --eval-lens 256 1024 --d-model 64 --steps-per-epoch 50
//! ```

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use clap::{Args as ClapArgs, Parser};
use nsa_burn::NsaBackend;
use nsa_examples::device::{pick_device, CompiledBackend, DeviceChoice, PickedDevice};
use nsa_examples::memory::MemoryProbe;
use nsa_examples::recall::{
    run, AttentionKind, DepthBand, EvaluationConfig, Experiment, ExperimentConfig, RecallError,
    RecallModelConfig, RecallTaskConfig, Report, TrainingConfig,
};

/// Trains a small language model per attention kind on associative recall and compares
/// their accuracy by sequence length and depth.
#[derive(Debug, Parser)]
struct Args {
    /// Device to run on.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Folder of the report, the plots and each model's checkpoints and logs.
    #[arg(long, default_value = "target/recall")]
    out: PathBuf,
    /// Attention kinds to train, one model each.
    #[arg(long, value_enum, num_args = 1.., default_values_t = defaults().attention)]
    attention: Vec<AttentionKind>,
    /// Seed of the data and of the initial weights.
    #[arg(long, default_value_t = defaults().seed)]
    seed: u64,
    #[command(flatten)]
    task: TaskArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    training: TrainingArgs,
    #[command(flatten)]
    evaluation: EvaluationArgs,
}

/// The default experiment.
fn defaults() -> ExperimentConfig {
    ExperimentConfig::new(
        RecallTaskConfig::new(),
        RecallModelConfig::new(),
        TrainingConfig::new(),
        EvaluationConfig::new(),
    )
}

#[derive(Debug, ClapArgs)]
#[command(next_help_heading = "Task")]
struct TaskArgs {
    /// Length of the training sequences.
    #[arg(long, default_value_t = defaults().train_len)]
    train_len: usize,
    /// Key-value pairs per sequence, each queried once at the end.
    #[arg(long, default_value_t = defaults().task.pairs)]
    pairs: usize,
    /// Where the pairs of training sequences start, as a fraction of the context (0: its
    /// first token).
    #[arg(long, default_value_t = defaults().train_depth.from)]
    train_depth_from: f64,
    /// Where the pairs of training sequences end (exclusive; 1: the end of the context).
    #[arg(long, default_value_t = defaults().train_depth.to)]
    train_depth_to: f64,
    /// Distinct key tokens.
    #[arg(long, default_value_t = defaults().task.keys)]
    keys: usize,
    /// Distinct value tokens.
    #[arg(long, default_value_t = defaults().task.values)]
    values: usize,
    /// Distinct filler tokens.
    #[arg(long, default_value_t = defaults().task.fillers)]
    fillers: usize,
}

#[derive(Debug, ClapArgs)]
#[command(next_help_heading = "Model")]
struct ModelArgs {
    /// Model width d_model.
    #[arg(long, default_value_t = defaults().model.d_model)]
    d_model: usize,
    /// Blocks (attention + MLP).
    #[arg(long, default_value_t = defaults().model.layers)]
    layers: usize,
    /// Query heads H.
    #[arg(long, default_value_t = defaults().model.heads)]
    heads: usize,
    /// Key/value heads H_kv of NSA (dense attention has one per query head).
    #[arg(long, default_value_t = defaults().model.kv_heads)]
    kv_heads: usize,
    /// Head dimension of queries, keys and values.
    #[arg(long, default_value_t = defaults().model.head_dim)]
    head_dim: usize,
    /// Hidden width of the MLP, in multiples of d_model.
    #[arg(long, default_value_t = defaults().model.mlp_ratio)]
    mlp_ratio: usize,
    /// NSA's compression block l.
    #[arg(long, default_value_t = defaults().model.compress_block)]
    compress_block: usize,
    /// NSA's compression stride d.
    #[arg(long, default_value_t = defaults().model.compress_stride)]
    compress_stride: usize,
    /// NSA's selection block l'.
    #[arg(long, default_value_t = defaults().model.select_block)]
    select_block: usize,
    /// NSA's selected blocks per query n, the first block and two local ones included.
    #[arg(long, default_value_t = defaults().model.selected)]
    selected: usize,
    /// Sliding window w: NSA's window branch, and the keys sliding-window attention sees.
    #[arg(long, default_value_t = defaults().model.window)]
    window: usize,
}

#[derive(Debug, ClapArgs)]
#[command(next_help_heading = "Training")]
struct TrainingArgs {
    /// Sequences per step.
    #[arg(long, default_value_t = defaults().training.batch_size)]
    batch_size: usize,
    /// Steps per epoch.
    #[arg(long, default_value_t = defaults().training.steps_per_epoch)]
    steps_per_epoch: usize,
    /// Epochs; each ends with a validation pass and a checkpoint.
    #[arg(long, default_value_t = defaults().training.epochs)]
    epochs: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = defaults().training.learning_rate)]
    learning_rate: f64,
    /// Seconds after which each model's training stops (the epoch in progress ends without
    /// its validation pass) [default: none].
    #[arg(long)]
    time_limit: Option<f64>,
    /// Validation sequences per epoch.
    #[arg(long, default_value_t = defaults().training.valid_samples)]
    valid_samples: usize,
}

#[derive(Debug, ClapArgs)]
#[command(next_help_heading = "Evaluation")]
struct EvaluationArgs {
    /// Sequence lengths to evaluate at (in any order; evaluated and plotted ascending).
    #[arg(long, num_args = 1.., default_values_t = defaults().evaluation.seq_lens)]
    eval_lens: Vec<usize>,
    /// Equal depth bins of the context, each with its own sequences.
    #[arg(long, default_value_t = defaults().evaluation.depth_bins)]
    depth_bins: usize,
    /// Sequences per length and depth bin.
    #[arg(long, default_value_t = defaults().evaluation.samples)]
    eval_samples: usize,
    /// Tokens per evaluation forward pass (at least one sequence).
    #[arg(long, default_value_t = defaults().evaluation.batch_tokens)]
    eval_batch_tokens: usize,
    /// Longest sequence full and sliding-window attention are evaluated at (their scores
    /// are T x T per head).
    #[arg(long, default_value_t = defaults().evaluation.max_dense_len)]
    max_dense_len: usize,
}

impl Args {
    /// The experiment the flags describe.
    fn config(&self) -> ExperimentConfig {
        let (task, model, training, evaluation) =
            (&self.task, &self.model, &self.training, &self.evaluation);
        ExperimentConfig {
            task: RecallTaskConfig {
                keys: task.keys,
                values: task.values,
                fillers: task.fillers,
                pairs: task.pairs,
            },
            model: RecallModelConfig {
                d_model: model.d_model,
                layers: model.layers,
                heads: model.heads,
                kv_heads: model.kv_heads,
                head_dim: model.head_dim,
                mlp_ratio: model.mlp_ratio,
                compress_block: model.compress_block,
                compress_stride: model.compress_stride,
                select_block: model.select_block,
                selected: model.selected,
                window: model.window,
            },
            training: TrainingConfig {
                batch_size: training.batch_size,
                steps_per_epoch: training.steps_per_epoch,
                epochs: training.epochs,
                learning_rate: training.learning_rate,
                time_limit: training.time_limit,
                valid_samples: training.valid_samples,
            },
            evaluation: EvaluationConfig {
                seq_lens: ascending(&evaluation.eval_lens),
                depth_bins: evaluation.depth_bins,
                samples: evaluation.eval_samples,
                batch_tokens: evaluation.eval_batch_tokens,
                max_dense_len: evaluation.max_dense_len,
            },
            attention: self.attention.clone(),
            train_len: task.train_len,
            train_depth: DepthBand {
                from: task.train_depth_from,
                to: task.train_depth_to,
            },
            seed: self.seed,
        }
    }
}

fn main() {
    let args = Args::parse();
    let config = args.config();
    if let Err(error) = config.validate() {
        eprintln!("invalid configuration: {error}");
        std::process::exit(2);
    }
    let device = pick_device(args.device).unwrap_or_else(|error| {
        eprintln!("{error}");
        std::process::exit(2);
    });
    println!("device: {}", device.description);
    let result = match device.backend {
        #[cfg(feature = "cuda")]
        CompiledBackend::Cuda => run_on::<Autodiff<burn::backend::Cuda>>(config, &device, &args),
        #[cfg(feature = "wgpu")]
        CompiledBackend::Wgpu => run_on::<Autodiff<burn::backend::Wgpu>>(config, &device, &args),
        CompiledBackend::Flex => run_on::<Autodiff<Flex>>(config, &device, &args),
    };
    match result {
        Ok(report) => {
            println!("\n{}\n", report.summary());
            println!(
                "report and plots: {}",
                args.out.join("recall.json").display()
            );
        }
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(1);
        }
    }
}

/// Runs the experiment on the default device of `B`.
fn run_on<B>(
    config: ExperimentConfig,
    device: &PickedDevice,
    args: &Args,
) -> Result<Report, RecallError>
where
    B: AutodiffBackend + NsaBackend,
    B::InnerBackend: NsaBackend,
{
    run(&Experiment::<B> {
        config,
        device: Default::default(),
        device_name: device.description.clone(),
        memory: MemoryProbe::for_backend(device.backend),
        out: args.out.clone(),
    })
}

/// `lengths` in ascending order without repeats (the plots draw them left to right).
fn ascending(lengths: &[usize]) -> Vec<usize> {
    let mut lengths = lengths.to_vec();
    lengths.sort_unstable();
    lengths.dedup();
    lengths
}
