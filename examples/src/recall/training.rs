//! Training with burn-train: the `Learner` with Adam, accuracy and loss metrics, a
//! checkpoint per epoch and the progress display; and what the report keeps of it (steps,
//! tokens per second, peak memory).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::config::Config;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::transform::{SamplerDataset, SamplerDatasetOptions};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::Module;
use burn::optim::AdamConfig;
use burn::record::CompactRecorder;
use burn::tensor::backend::AutodiffBackend;
use burn_train::metric::{
    AccuracyMetric, LossMetric, Metric, MetricMetadata, MetricName, SerializedEntry,
};
use burn_train::{Learner, SupervisedTraining};
use core::fmt;
use nsa_burn::NsaBackend;
use serde::Serialize;

use super::attention::AttentionKind;
use super::error::{nonzero, positive, RecallError};
use super::model::RecallModel;
use super::task::{RecallBatcher, RecallDataset};
use super::{Experiment, Stream};
use crate::memory::{MemoryProbe, GIB};

/// How each model trains.
#[derive(Config, Debug)]
pub struct TrainingConfig {
    /// Sequences per step. Default: 16.
    #[config(default = 16)]
    pub batch_size: usize,
    /// Steps per epoch. Default: 200.
    #[config(default = 200)]
    pub steps_per_epoch: usize,
    /// Epochs; each ends with a validation pass and a checkpoint. Default: 4.
    #[config(default = 4)]
    pub epochs: usize,
    /// Adam's learning rate (gradients clipped to norm 1). Default: 1e-3.
    #[config(default = 1e-3)]
    pub learning_rate: f64,
    /// Seconds after which a model's training stops, the epoch in progress ending without
    /// its validation pass; `None` trains every epoch. Default: `None`.
    #[config(default = "None")]
    pub time_limit: Option<f64>,
    /// Validation sequences per epoch. Default: 64.
    #[config(default = 64)]
    pub valid_samples: usize,
}

impl TrainingConfig {
    /// Checks the sizes, the learning rate and the time limit.
    pub fn validate(&self) -> Result<(), RecallError> {
        nonzero("batch_size", self.batch_size)?;
        nonzero("steps_per_epoch", self.steps_per_epoch)?;
        nonzero("epochs", self.epochs)?;
        nonzero("valid_samples", self.valid_samples)?;
        positive("learning_rate", self.learning_rate)?;
        if let Some(limit) = self.time_limit {
            positive("time_limit", limit)?;
        }
        Ok(())
    }
}

/// What the report keeps of a model's training.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingStats {
    /// Parameters of the model.
    pub parameters: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Tokens trained on: steps x batch size x sequence length.
    pub tokens: usize,
    /// Wall time of the whole training, validation passes and checkpoints included.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_second: f64,
    /// Whether the time limit ended the training before its last epoch.
    pub stopped_by_time_limit: bool,
    /// Peak memory while training.
    pub peak_memory: PeakMemory,
}

/// Peak memory of a training, where the backend reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PeakMemory {
    /// Measured.
    Measured {
        /// Bytes.
        bytes: u64,
        /// What was measured.
        measured_as: &'static str,
    },
    /// Not measured (the string "not measured").
    NotMeasured(&'static str),
}

impl fmt::Display for PeakMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Measured { bytes, .. } => write!(f, "{:.2} GiB", *bytes as f64 / GIB),
            Self::NotMeasured(text) => f.write_str(text),
        }
    }
}

/// A trained model and what its training measured.
pub struct Trained<B: NsaBackend> {
    /// The model after the last step.
    pub model: RecallModel<B>,
    /// Its training.
    pub stats: TrainingStats,
}

/// Trains a model with `attention` on the experiment's training data.
///
/// The learner's checkpoints and metric logs go to `<out>/<attention>/`.
pub fn train<B>(
    experiment: &Experiment<B>,
    attention: AttentionKind,
) -> Result<Trained<B::InnerBackend>, RecallError>
where
    B: AutodiffBackend + NsaBackend,
    B::InnerBackend: NsaBackend,
{
    let config = &experiment.config;
    let settings = &config.training;
    let device = &experiment.device;
    let placement = config.train_placement();
    let sequences = settings.steps_per_epoch * settings.batch_size;
    let train_data = SamplerDataset::new(
        RecallDataset::new(
            &config.task,
            placement,
            config.seed(Stream::Train),
            usize::MAX,
        )?,
        SamplerDatasetOptions::default()
            .with_replacement()
            .with_fixed_size(sequences)
            .with_seed(config.seed(Stream::TrainOrder)),
    );
    let valid_data = RecallDataset::new(
        &config.task,
        placement,
        config.seed(Stream::Valid),
        settings.valid_samples,
    )?;
    let monitor = Monitor::new(experiment.memory.clone());
    let training = SupervisedTraining::new(
        experiment.out.join(attention.name()),
        DataLoaderBuilder::<B, _, _>::new(RecallBatcher)
            .batch_size(settings.batch_size)
            .build(train_data),
        DataLoaderBuilder::<B::InnerBackend, _, _>::new(RecallBatcher)
            .batch_size(settings.batch_size)
            .build(valid_data),
    )
    .metrics((AccuracyMetric::new(), LossMetric::new()))
    .metric_train(monitor.clone())
    .with_file_checkpointer(CompactRecorder::new())
    .with_application_logger(None)
    .num_epochs(settings.epochs)
    .summary();
    let interrupter = training.interrupter();
    if let Some(limit) = settings.time_limit {
        let interrupter = interrupter.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(limit));
            interrupter.stop(Some("time limit reached"));
        });
    }

    B::seed(device, config.seed);
    let model: RecallModel<B> = config.model.init(attention, config.task.vocab(), device);
    let parameters = model.num_params();
    let optimizer = AdamConfig::new()
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init();
    let measuring = experiment.memory.start();
    let start = Instant::now();
    let result = training.launch(Learner::new(model, optimizer, settings.learning_rate));
    let seconds = start.elapsed().as_secs_f64();

    let steps = monitor.record.steps.load(Ordering::Relaxed);
    let tokens = steps * settings.batch_size * config.train_len;
    let peak_memory = match experiment.memory.read() {
        Some(bytes) if measuring => PeakMemory::Measured {
            bytes: bytes.max(monitor.record.peak.load(Ordering::Relaxed)),
            measured_as: experiment.memory.meaning(),
        },
        _ => PeakMemory::NotMeasured("not measured"),
    };
    Ok(Trained {
        model: result.model,
        stats: TrainingStats {
            parameters,
            steps,
            tokens,
            seconds,
            tokens_per_second: tokens as f64 / seconds,
            stopped_by_time_limit: interrupter.should_stop(),
            peak_memory,
        },
    })
}

/// A training metric that counts the steps and reads the memory after each, for the
/// report; the progress display shows the memory.
#[derive(Clone)]
struct Monitor {
    name: MetricName,
    probe: MemoryProbe,
    record: Arc<MonitorRecord>,
}

/// What [`Monitor`] saw.
#[derive(Debug, Default)]
struct MonitorRecord {
    steps: AtomicUsize,
    /// The largest memory reading, in bytes.
    peak: AtomicU64,
}

impl Monitor {
    fn new(probe: MemoryProbe) -> Self {
        Self {
            name: Arc::new("Memory".into()),
            probe,
            record: Arc::default(),
        }
    }
}

impl Metric for Monitor {
    type Input = ();

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(&mut self, _: &(), _: &MetricMetadata) -> SerializedEntry {
        self.record.steps.fetch_add(1, Ordering::Relaxed);
        match self.probe.read() {
            Some(bytes) => {
                self.record.peak.fetch_max(bytes, Ordering::Relaxed);
                SerializedEntry::new(format!("{:.2} GiB", bytes as f64 / GIB), bytes.to_string())
            }
            None => SerializedEntry::new("not measured".into(), String::new()),
        }
    }

    fn clear(&mut self) {}
}
