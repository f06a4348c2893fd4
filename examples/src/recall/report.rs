//! The report of an experiment: `recall.json` (settings, training measurements and every
//! accuracy), `accuracy_by_length.svg` and `accuracy_by_depth.svg`.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use burn::config::Config;
use serde::Serialize;

use super::attention::AttentionKind;
use super::error::RecallError;
use super::evaluation::LengthResult;
use super::plot;
use super::training::TrainingStats;
use super::ExperimentConfig;

/// Everything an experiment measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The device it ran on.
    pub device: String,
    /// Its settings.
    pub config: ExperimentConfig,
    /// One per attention kind, in the order they trained.
    pub models: Vec<ModelReport>,
}

/// What one model measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    /// Its attention.
    pub attention: AttentionKind,
    /// Its training.
    pub training: TrainingStats,
    /// Its accuracy per sequence length.
    pub evaluation: Vec<LengthResult>,
}

impl ModelReport {
    /// `nsa attention: accuracy 1024: 0.98, 4096: 0.97, ...`, `skipped` where it was.
    pub fn accuracy_line(&self) -> String {
        let cells: Vec<String> = self
            .evaluation
            .iter()
            .map(|result| format!("{}: {}", result.seq_len, accuracy_cell(result)))
            .collect();
        format!(
            "{} attention: accuracy {}",
            self.attention.name(),
            cells.join(", ")
        )
    }

    /// For a model answered by generation too: on how many queries generation through the
    /// cache gave the full forward pass's answer.
    pub fn generation_line(&self) -> Option<String> {
        let cells = self.evaluation.iter().flat_map(|result| &result.by_depth);
        let (mut agreeing, mut queries) = (0.0, 0);
        for cell in cells {
            agreeing += cell.generation_agreement? * cell.queries as f64;
            queries += cell.queries;
        }
        if queries == 0 {
            return None;
        }
        Some(format!(
            "{} attention: generation through the cache agrees with the full forward on {} of {queries} queries",
            self.attention.name(),
            agreeing.round() as usize
        ))
    }
}

impl Report {
    /// Writes `recall.json`, `accuracy_by_length.svg` and `accuracy_by_depth.svg` to `out`.
    pub fn write(&self, out: &Path) -> Result<(), RecallError> {
        let json = serde_json::to_string_pretty(self).expect("the report serializes");
        write(&out.join("recall.json"), json + "\n")?;
        write(
            &out.join("accuracy_by_length.svg"),
            plot::accuracy_by_length(self),
        )?;
        write(
            &out.join("accuracy_by_depth.svg"),
            plot::accuracy_by_depth(self),
        )
    }

    /// A table of the training measurements and the accuracy per length, one row per model.
    pub fn summary(&self) -> String {
        let lengths = &self.config.evaluation.seq_lens;
        let mut table = String::from("| attention | parameters | steps | tokens/s | peak memory |");
        for seq_len in lengths {
            let _ = write!(table, " T = {seq_len} |");
        }
        let _ = write!(
            table,
            "\n|---|---|---|---|---|{}",
            "---|".repeat(lengths.len())
        );
        for model in &self.models {
            let stats = &model.training;
            let _ = write!(
                table,
                "\n| {} | {} | {} | {:.0} | {} |",
                model.attention.name(),
                stats.parameters,
                stats.steps,
                stats.tokens_per_second,
                stats.peak_memory
            );
            for result in &model.evaluation {
                let _ = write!(table, " {} |", accuracy_cell(result));
            }
        }
        table
    }
}

/// The accuracy at a length to three decimals, or `skipped`.
fn accuracy_cell(result: &LengthResult) -> String {
    match result.accuracy {
        Some(accuracy) => format!("{accuracy:.3}"),
        None => "skipped".into(),
    }
}

/// Creates `out` and its parents.
pub(crate) fn create_dir(out: &Path) -> Result<(), RecallError> {
    fs::create_dir_all(out).map_err(|source| RecallError::Io {
        path: out.to_path_buf(),
        source,
    })
}

/// Saves the experiment's settings as `config.json`, which `ExperimentConfig::load` reads.
pub(crate) fn save_config(config: &ExperimentConfig, out: &Path) -> Result<(), RecallError> {
    let path = out.join("config.json");
    config
        .save(&path)
        .map_err(|source| RecallError::Io { path, source })
}

fn write(path: &Path, text: String) -> Result<(), RecallError> {
    fs::write(path, text).map_err(|source| RecallError::Io {
        path: path.to_path_buf(),
        source,
    })
}
