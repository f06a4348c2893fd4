//! The layer sizes the examples run: the paper's on a GPU, a small layer on a CPU.

use clap::ValueEnum;
use nsa_burn::NsaConfig;

use crate::device::{pick_device, DeviceChoice, PickedDevice};

/// The `--device` and `--preset` flags of the examples that run one layer configuration.
#[derive(Debug, clap::Args)]
pub struct DeviceAndPreset {
    /// Device to run on.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Layer sizes and blocks [default: paper on a GPU, small on a CPU].
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
}

impl DeviceAndPreset {
    /// Starts the device asked for and picks the preset, printing both; exits with status 2
    /// when the device's backend is not compiled in.
    pub fn start(&self) -> (PickedDevice, Preset) {
        let device = pick_device(self.device).unwrap_or_else(|error| {
            eprintln!("{error}");
            std::process::exit(2);
        });
        println!("device: {}", device.description);
        let preset = match self.preset {
            Some(preset) => {
                println!("preset: {}", preset.name());
                preset
            }
            None => {
                let preset = Preset::for_device(&device);
                println!("preset: {} ({})", preset.name(), preset.default_note());
                preset
            }
        };
        (device, preset)
    }
}

/// The layer's sizes and blocks, before the size flags override them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// The paper's layer: d_model = 1024, H = 64, H_kv = 4, d_k = 192, d_v = 128; blocks
    /// l = 32, d = 16, l' = 64, n = 16, w = 512.
    Paper,
    /// A layer for a CPU: d_model = 256, H = 8, H_kv = 2, d_k = d_v = 32; blocks l = 16,
    /// d = 8, l' = 32, n = 8, w = 128, which suit sequences of about a thousand tokens.
    Small,
}

impl Preset {
    /// The preset on a device: the paper's layer on a GPU, the small one on a CPU.
    pub fn for_device(device: &PickedDevice) -> Self {
        if device.on_cpu {
            Preset::Small
        } else {
            Preset::Paper
        }
    }

    /// The layer configuration of the preset.
    pub fn config(self) -> NsaConfig {
        match self {
            Preset::Paper => NsaConfig::new(1024, 64, 4, 192, 128),
            Preset::Small => NsaConfig::new(256, 8, 2, 32, 32)
                .with_compress_block(16)
                .with_compress_stride(8)
                .with_select_block(32)
                .with_n_selected(8)
                .with_window(128),
        }
    }

    /// The preset's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Paper => "paper",
            Preset::Small => "small",
        }
    }

    /// Why this preset runs when none is asked for, and how to get the other.
    pub fn default_note(self) -> &'static str {
        match self {
            Preset::Paper => "the default on a GPU; --preset small for a small layer",
            Preset::Small => "the default on a CPU; --preset paper for the paper's layer",
        }
    }
}
