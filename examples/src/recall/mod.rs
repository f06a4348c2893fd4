//! Small language models trained with burn-train on multi-query associative recall, with
//! NSA, full or sliding-window attention, and evaluated by context length and by the depth
//! of the pairs in the context.
//!
//! [`run`] trains one model per attention kind on sequences of `train_len` tokens
//! ([`task`]), evaluates each at every length and depth bin of the evaluation
//! ([`evaluation`]), and writes `recall.json` and two SVG plots ([`report`]).

pub mod attention;
pub mod error;
pub mod evaluation;
pub mod model;
pub mod plot;
pub mod report;
pub mod task;
pub mod training;

use std::path::PathBuf;

use burn::config::Config;
use burn::tensor::backend::{AutodiffBackend, Backend};
use nsa_burn::NsaBackend;

pub use attention::AttentionKind;
pub use error::RecallError;
pub use evaluation::EvaluationConfig;
pub use model::RecallModelConfig;
pub use report::{ModelReport, Report};
pub use task::{DepthBand, RecallTaskConfig};
pub use training::TrainingConfig;

use crate::memory::MemoryProbe;
use task::{derive_seed, Placement};

/// An experiment: the task, the models, how they train and how they are evaluated.
#[derive(Config, Debug)]
pub struct ExperimentConfig {
    /// The recall task.
    pub task: RecallTaskConfig,
    /// The model's sizes.
    pub model: RecallModelConfig,
    /// The training of each model.
    pub training: TrainingConfig,
    /// The evaluation of each model.
    pub evaluation: EvaluationConfig,
    /// The attention kinds to train, one model each, in order. Default: NSA, full, sliding.
    #[config(default = "vec![AttentionKind::Nsa, AttentionKind::Full, AttentionKind::Sliding]")]
    pub attention: Vec<AttentionKind>,
    /// Length of the training sequences. Default: 2048.
    #[config(default = 2048)]
    pub train_len: usize,
    /// Where the pairs of the training sequences sit. Default: anywhere in the context.
    #[config(default = "DepthBand::ALL")]
    pub train_depth: DepthBand,
    /// Seed of the data and of the initial weights. Default: 0.
    #[config(default = 0)]
    pub seed: u64,
}

/// The data streams an experiment draws, each from its own seed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    /// The training sequences.
    Train,
    /// The order the training sequences are drawn in.
    TrainOrder,
    /// The validation sequences.
    Valid,
    /// The evaluation sequences of one length and depth bin (the same for every model).
    Evaluation { seq_len: usize, bin: usize },
}

impl ExperimentConfig {
    /// Checks everything before anything trains: the sizes, and that the pairs fit every
    /// placement of training and evaluation.
    pub fn validate(&self) -> Result<(), RecallError> {
        self.task.validate()?;
        self.model.validate()?;
        self.training.validate()?;
        self.evaluation.validate()?;
        if self.attention.is_empty() {
            return Err(RecallError::Empty { field: "attention" });
        }
        self.task.band(self.train_placement())?;
        let bins = self.evaluation.depth_bins;
        for &seq_len in &self.evaluation.seq_lens {
            for bin in 0..bins {
                let depth = DepthBand::bin(bin, bins);
                self.task.band(Placement { seq_len, depth })?;
            }
        }
        Ok(())
    }

    /// Where the pairs of the training sequences sit.
    pub fn train_placement(&self) -> Placement {
        Placement {
            seq_len: self.train_len,
            depth: self.train_depth,
        }
    }

    /// The seed of a data stream.
    pub(crate) fn seed(&self, stream: Stream) -> u64 {
        let id = match stream {
            Stream::Train => 0,
            Stream::TrainOrder => 1,
            Stream::Valid => 2,
            Stream::Evaluation { seq_len, bin } => 3 + ((seq_len as u64) << 16) + bin as u64,
        };
        derive_seed(self.seed, id)
    }
}

/// An experiment on a device.
pub struct Experiment<B: Backend> {
    /// What runs.
    pub config: ExperimentConfig,
    /// The device it runs on.
    pub device: B::Device,
    /// The device as the report names it.
    pub device_name: String,
    /// Where the memory of each training is read.
    pub memory: MemoryProbe,
    /// The folder the report, the plots and each model's checkpoints and logs go to.
    pub out: PathBuf,
}

/// Trains and evaluates a model per attention kind, then writes the report and the plots.
///
/// Prints its progress; each training shows burn-train's progress display.
pub fn run<B>(experiment: &Experiment<B>) -> Result<Report, RecallError>
where
    B: AutodiffBackend + NsaBackend,
    B::InnerBackend: NsaBackend,
{
    let config = &experiment.config;
    config.validate()?;
    report::create_dir(&experiment.out)?;
    report::save_config(config, &experiment.out)?;
    let mut models = Vec::with_capacity(config.attention.len());
    for &attention in &config.attention {
        println!(
            "{} attention: training on {} tokens a sequence",
            attention.name(),
            config.train_len
        );
        let trained = training::train(experiment, attention)?;
        let stats = &trained.stats;
        println!(
            "{} attention: {} steps in {:.1} s ({:.0} tokens/s), peak memory {}",
            attention.name(),
            stats.steps,
            stats.seconds,
            stats.tokens_per_second,
            stats.peak_memory
        );
        let evaluation =
            evaluation::evaluate(&trained.model, attention, config, &experiment.device)?;
        let model = ModelReport {
            attention,
            training: trained.stats,
            evaluation,
        };
        println!("{}", model.accuracy_line());
        if let Some(line) = model.generation_line() {
            println!("{line}");
        }
        models.push(model);
    }
    let report = Report {
        device: experiment.device_name.clone(),
        config: config.clone(),
        models,
    };
    report.write(&experiment.out)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use std::fs;

    /// The whole loop at a tiny size on flex: data, training with burn-train, evaluation,
    /// and the report's files.
    #[test]
    fn trains_evaluates_and_writes_the_report() {
        let out = std::env::temp_dir().join(format!("nsa-recall-test-{}", std::process::id()));
        let config = ExperimentConfig::new(
            RecallTaskConfig::new()
                .with_keys(8)
                .with_values(8)
                .with_fillers(8)
                .with_pairs(2),
            RecallModelConfig::new()
                .with_d_model(16)
                .with_layers(1)
                .with_heads(2)
                .with_kv_heads(1)
                .with_head_dim(8)
                .with_mlp_ratio(2)
                .with_compress_block(8)
                .with_compress_stride(4)
                .with_select_block(8)
                .with_selected(4)
                .with_window(16),
            TrainingConfig::new()
                .with_batch_size(2)
                .with_steps_per_epoch(3)
                .with_epochs(1)
                .with_valid_samples(2),
            EvaluationConfig::new()
                .with_seq_lens(vec![32, 64])
                .with_depth_bins(2)
                .with_samples(2)
                .with_max_dense_len(32),
        )
        .with_train_len(32);
        let experiment = Experiment::<Autodiff<Flex>> {
            config,
            device: Default::default(),
            device_name: "flex".into(),
            memory: MemoryProbe::Process,
            out: out.clone(),
        };

        let report = run(&experiment).expect("the experiment runs");

        assert_eq!(report.models.len(), 3);
        for model in &report.models {
            assert_eq!(model.training.steps, 3);
            assert_eq!(model.training.tokens, 3 * 2 * 32);
            assert_eq!(model.evaluation.len(), 2);
            let at_32 = &model.evaluation[0];
            assert_eq!(at_32.by_depth.len(), 2);
            assert!(at_32.by_depth.iter().all(|cell| cell.queries == 2 * 2));
            let accuracy = at_32.accuracy.expect("evaluated at T = 32");
            assert!((0.0..=1.0).contains(&accuracy));
            let agreement = at_32.by_depth.iter().map(|cell| cell.generation_agreement);
            if model.attention.is_dense() {
                assert!(agreement.clone().all(|cell| cell.is_none()));
            } else {
                assert!(agreement.clone().all(|cell| cell == Some(1.0)), "{model:?}");
            }
            let at_64 = &model.evaluation[1];
            assert_eq!(at_64.skipped.is_some(), model.attention.is_dense());
        }
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join("recall.json")).unwrap()).unwrap();
        assert_eq!(json["models"].as_array().map(Vec::len), Some(3));
        let loaded = ExperimentConfig::load(out.join("config.json")).expect("config.json loads");
        assert_eq!(loaded.train_len, 32);
        let depth = fs::read_to_string(out.join("accuracy_by_depth.svg")).unwrap();
        // The background, then a cell per model, length and depth bin.
        assert_eq!(depth.matches("<rect").count(), 1 + 3 * 2 * 2);
        let length = fs::read_to_string(out.join("accuracy_by_length.svg")).unwrap();
        assert_eq!(length.matches("<polyline").count(), 3);
        assert!(length.ends_with("</svg>\n"));
        for attention in ["nsa", "full", "sliding"] {
            assert!(
                out.join(attention).join("checkpoint").is_dir(),
                "{attention}"
            );
        }
        fs::remove_dir_all(&out).unwrap();
    }
}
