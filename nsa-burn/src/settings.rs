//! The attention settings a layer was built with, kept in its record, so that a record saved
//! with other settings is detected when it is loaded into a layer (the weights alone do not
//! show a different `n_selected` or `window`).

use burn::config::Config;
use burn::module::{
    AutodiffModule, Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper,
    ModuleVisitor,
};
use burn::record::{PrecisionSettings, Record};
use burn::tensor::backend::{AutodiffBackend, Backend};
use core::marker::PhantomData;

use crate::{NsaAttentionConfig, NsaError};

/// The settings of [`NsaAttentionConfig`] that change what the layer computes (all but
/// `query_chunk` and `kernel_strategy`), as saved in a layer's record.
#[derive(Config, Debug, PartialEq)]
pub struct NsaSettingsRecord {
    /// Compression block length `l`.
    pub compress_block: usize,
    /// Compression stride `d`.
    pub compress_stride: usize,
    /// Selection block length `l'`.
    pub select_block: usize,
    /// Selected blocks per query `n`.
    pub n_selected: usize,
    /// Forced leading blocks.
    pub n_initial_blocks: usize,
    /// Forced local blocks.
    pub n_local_blocks: usize,
    /// Sliding window `w`.
    pub window: usize,
    /// Softmax scale (`None`: `1 / sqrt(d_k)`).
    pub softmax_scale: Option<f64>,
}

impl NsaSettingsRecord {
    fn of(config: &NsaAttentionConfig) -> Self {
        Self {
            compress_block: config.compress_block,
            compress_stride: config.compress_stride,
            select_block: config.select_block,
            n_selected: config.n_selected,
            n_initial_blocks: config.n_initial_blocks,
            n_local_blocks: config.n_local_blocks,
            window: config.window,
            softmax_scale: config.softmax_scale,
        }
    }

    /// The first setting in which `self` (the layer's) and `saved` differ, as an error.
    fn compare(&self, saved: &Self) -> Result<(), NsaError> {
        let mismatch = |field: &'static str, layer: String, saved: String| {
            Err(NsaError::SettingsMismatch {
                field,
                layer,
                saved,
            })
        };
        let counts = [
            ("compress_block", self.compress_block, saved.compress_block),
            (
                "compress_stride",
                self.compress_stride,
                saved.compress_stride,
            ),
            ("select_block", self.select_block, saved.select_block),
            ("n_selected", self.n_selected, saved.n_selected),
            (
                "n_initial_blocks",
                self.n_initial_blocks,
                saved.n_initial_blocks,
            ),
            ("n_local_blocks", self.n_local_blocks, saved.n_local_blocks),
            ("window", self.window, saved.window),
        ];
        for (field, layer, saved) in counts {
            if layer != saved {
                return mismatch(field, layer.to_string(), saved.to_string());
            }
        }
        if self.softmax_scale != saved.softmax_scale {
            return mismatch(
                "softmax_scale",
                format!("{:?}", self.softmax_scale),
                format!("{:?}", saved.softmax_scale),
            );
        }
        Ok(())
    }
}

impl<B: Backend> Record<B> for NsaSettingsRecord {
    type Item<S: PrecisionSettings> = Self;

    fn into_item<S: PrecisionSettings>(self) -> Self {
        self
    }

    fn from_item<S: PrecisionSettings>(item: Self, _device: &B::Device) -> Self {
        item
    }
}

/// The settings a layer runs with and, once a record is loaded, the settings it was saved
/// with. A module without tensors: its record is [`NsaSettingsRecord`]. (Generic over the
/// backend so that Burn's `Module` derive persists it.)
#[derive(Debug, Clone)]
pub struct NsaSettings<B: Backend> {
    layer: NsaSettingsRecord,
    loaded: Option<NsaSettingsRecord>,
    backend: PhantomData<B>,
}

impl<B: Backend> NsaSettings<B> {
    pub(crate) fn new(config: &NsaAttentionConfig) -> Self {
        Self {
            layer: NsaSettingsRecord::of(config),
            loaded: None,
            backend: PhantomData,
        }
    }

    /// An error naming the first setting in which a loaded record differs from the layer.
    pub(crate) fn check(&self) -> Result<(), NsaError> {
        match &self.loaded {
            Some(saved) => self.layer.compare(saved),
            None => Ok(()),
        }
    }

    /// The same settings on backend `O`.
    fn on<O: Backend>(&self) -> NsaSettings<O> {
        NsaSettings {
            layer: self.layer.clone(),
            loaded: self.loaded.clone(),
            backend: PhantomData,
        }
    }
}

impl<B: Backend> Module<B> for NsaSettings<B> {
    type Record = NsaSettingsRecord;

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        devices
    }

    fn fork(self, _device: &B::Device) -> Self {
        self
    }

    fn to_device(self, _device: &B::Device) -> Self {
        self
    }

    fn visit<V: ModuleVisitor<B>>(&self, _visitor: &mut V) {}

    fn map<M: ModuleMapper<B>>(self, _mapper: &mut M) -> Self {
        self
    }

    fn load_record(self, record: NsaSettingsRecord) -> Self {
        Self {
            loaded: Some(record),
            ..self
        }
    }

    fn into_record(self) -> NsaSettingsRecord {
        self.layer
    }
}

impl<B: AutodiffBackend> AutodiffModule<B> for NsaSettings<B> {
    type InnerModule = NsaSettings<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        self.on()
    }

    fn from_inner(module: Self::InnerModule) -> Self {
        module.on()
    }
}

impl<B: Backend> ModuleDisplayDefault for NsaSettings<B> {
    fn content(&self, content: Content) -> Option<Content> {
        content
            .add_formatted(&format!("{:?}", self.layer))
            .optional()
    }
}

impl<B: Backend> ModuleDisplay for NsaSettings<B> {}
