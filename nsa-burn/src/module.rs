//! The NSA layer: projections, compressors, gates and the attention operator.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::{
    try_nsa_attention, try_nsa_attention_packed, BranchKv, Compressor, Documents, Gate, KvSharing,
    NsaAttentionConfig, NsaBackend, NsaConfig, NsaConfigError, NsaError, NsaInput, NsaOutput,
    NsaSettings, NsaShapeError,
};

/// Key and value projections of one branch (or of all three when shared).
#[derive(Module, Debug)]
pub struct KvProjection<B: Backend> {
    /// `d_model -> H_kv * d_k`.
    pub key: Linear<B>,
    /// `d_model -> H_kv * d_v`.
    pub value: Linear<B>,
}

/// Native Sparse Attention (Yuan et al., 2025): causal self-attention whose output is the
/// gated sum of a compressed, a selected-block and a sliding-window branch.
///
/// Create it with [`NsaConfig::init`] (or [`NsaConfig::try_init`]).
///
/// # Params
///
/// - `query`: `d_model -> H * d_k`; `output`: `H * d_v -> d_model`.
/// - `kv`: three [`KvProjection`]s (compressed, selected, window) with
///   [`KvSharing::Independent`], one with [`KvSharing::Shared`].
/// - `compress_key`, `compress_value`: the [`Compressor`]s of the compression branch.
/// - `gate`: the [`Gate`] MLP.
#[derive(Module, Debug)]
pub struct Nsa<B: Backend> {
    /// Query projection.
    pub query: Linear<B>,
    /// Key/value projections per branch (one when shared).
    pub kv: Vec<KvProjection<B>>,
    /// Compressor of the compression branch's keys.
    pub compress_key: Compressor<B>,
    /// Compressor of the compression branch's values.
    pub compress_value: Compressor<B>,
    /// Branch gates.
    pub gate: Gate<B>,
    /// Output projection.
    pub output: Linear<B>,
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) d_k: usize,
    pub(crate) d_v: usize,
    /// The attention settings, saved in the record and compared on load.
    pub settings: NsaSettings<B>,
    #[module(skip)]
    pub(crate) attention: NsaAttentionConfig,
}

/// What [`Nsa::forward_detailed`] returns.
#[derive(Debug, Clone)]
pub struct NsaForward<B: Backend> {
    /// Layer output `[B, T, d_model]`.
    pub output: Tensor<B, 3>,
    /// Selected blocks `[B, H_kv, T, n]` Int, ascending, -1 in unused slots.
    pub selected_blocks: Tensor<B, 4, Int>,
    /// Branch gates `[B, T, H, 3]` (compressed, selected, window).
    pub gates: Tensor<B, 4>,
}

impl NsaConfig {
    /// Initializes the layer, or returns the first rule the configuration breaks.
    pub fn try_init<B: Backend>(&self, device: &B::Device) -> Result<Nsa<B>, NsaConfigError> {
        self.validate()?;
        let linear = |input, output| {
            LinearConfig::new(input, output)
                .with_initializer(self.initializer.clone())
                .init(device)
        };
        let branches = match self.kv_sharing {
            KvSharing::Independent => 3,
            KvSharing::Shared => 1,
        };
        let kv = (0..branches)
            .map(|_| KvProjection {
                key: linear(self.d_model, self.n_kv_heads * self.d_k),
                value: linear(self.d_model, self.n_kv_heads * self.d_v),
            })
            .collect();
        Ok(Nsa {
            query: linear(self.d_model, self.n_heads * self.d_k),
            kv,
            compress_key: Compressor::new(self, self.d_k, device),
            compress_value: Compressor::new(self, self.d_v, device),
            gate: Gate::new(self, device),
            output: linear(self.n_heads * self.d_v, self.d_model),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            d_k: self.d_k,
            d_v: self.d_v,
            settings: NsaSettings::new(&self.attention_config()),
            attention: self.attention_config(),
        })
    }

    /// Initializes the layer.
    ///
    /// # Panics
    ///
    /// If the configuration is invalid, with the field and the rule
    /// (see [`NsaConfig::validate`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Nsa<B> {
        self.try_init(device)
            .unwrap_or_else(|error| panic!("invalid NsaConfig: {error}"))
    }
}

/// What [`Nsa::project`] makes of the layer input: every operator input but the
/// compressed keys and values, and the compression branch's keys and values before the
/// compressor.
pub(crate) struct Projected<B: Backend> {
    /// `[B, T, H, d_k]`.
    pub q: Tensor<B, 4>,
    /// The compression branch's keys and values, `[B, T, H_kv, d]`.
    pub raw: BranchKv<B>,
    /// `[B, T, H_kv, d]`.
    pub selected: BranchKv<B>,
    /// `[B, T, H_kv, d]`.
    pub window: BranchKv<B>,
    /// `[B, T, H, 3]`.
    pub gates: Tensor<B, 4>,
}

/// Which branch a K/V projection feeds.
#[derive(Debug, Clone, Copy)]
enum Branch {
    Compressed = 0,
    Selected = 1,
    Window = 2,
}

impl<B: NsaBackend> Nsa<B> {
    /// Causal NSA self-attention.
    ///
    /// `x: [B, T, d_model]` -> `[B, T, d_model]`.
    ///
    /// # Panics
    ///
    /// Where [`Nsa::try_forward`] returns an error, with its message.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_detailed(x).output
    }

    /// [`Nsa::forward`] returning a typed error instead of panicking: `x` must be
    /// `[B, T, d_model]` with every dimension at least 1, in a float dtype the backend's NSA
    /// operations take (see [`NsaBackend::nsa_supports_dtype`]), and a loaded record must
    /// have been saved with the layer's attention settings
    /// ([`NsaError::SettingsMismatch`]).
    pub fn try_forward(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, NsaError> {
        self.try_forward_detailed(x).map(|forward| forward.output)
    }

    /// [`Nsa::forward`] that also returns the selected blocks and the gates.
    ///
    /// `x: [B, T, d_model]`.
    ///
    /// # Panics
    ///
    /// Where [`Nsa::try_forward_detailed`] returns an error, with its message.
    pub fn forward_detailed(&self, x: Tensor<B, 3>) -> NsaForward<B> {
        self.try_forward_detailed(x)
            .unwrap_or_else(|error| panic!("Nsa::forward: {error}"))
    }

    /// [`Nsa::forward_detailed`] returning a typed error instead of panicking.
    pub fn try_forward_detailed(&self, x: Tensor<B, 3>) -> Result<NsaForward<B>, NsaError> {
        self.attend(x, None)
    }

    /// Causal NSA self-attention over packed documents: each document of `documents` is
    /// attended to as if it were alone (see [`crate::nsa_attention_packed`]).
    ///
    /// `x: [B, T, d_model]` with `documents` over its `B * T` positions (every row start a
    /// boundary) -> `[B, T, d_model]`.
    ///
    /// # Panics
    ///
    /// Where [`Nsa::try_forward_packed`] returns an error, with its message.
    pub fn forward_packed(&self, x: Tensor<B, 3>, documents: &Documents) -> Tensor<B, 3> {
        self.try_forward_packed(x, documents)
            .unwrap_or_else(|error| panic!("Nsa::forward_packed: {error}"))
            .output
    }

    /// [`Nsa::forward_packed`] returning a typed error instead of panicking, and the selected
    /// blocks (counted from each position's document start) and the gates.
    pub fn try_forward_packed(
        &self,
        x: Tensor<B, 3>,
        documents: &Documents,
    ) -> Result<NsaForward<B>, NsaError> {
        self.attend(x, Some(documents))
    }

    /// The forward pass, over packed `documents` when given.
    fn attend(
        &self,
        x: Tensor<B, 3>,
        documents: Option<&Documents>,
    ) -> Result<NsaForward<B>, NsaError> {
        self.settings.check()?;
        let [batch, seq, _] = x.dims();
        self.check_input(&x)?;
        if let Some(documents) = documents {
            documents.check_rows(batch, seq)?;
        }
        let projected = self.project(x);
        let compressed = match documents {
            None => self.compress(projected.raw),
            Some(documents) => self.compress_documents(projected.raw, documents),
        };
        let input = NsaInput {
            q: projected.q,
            compressed,
            selected: projected.selected,
            window: projected.window,
            gates: projected.gates.clone(),
        };
        let attention = match documents {
            None => try_nsa_attention(input, &self.attention)?,
            Some(documents) => try_nsa_attention_packed(input, documents, &self.attention)?,
        };
        Ok(self.finish(attention, projected.gates))
    }

    /// A shape error unless `x` is `[B, T, d_model]` with every dimension at least 1.
    pub(crate) fn check_input(&self, x: &Tensor<B, 3>) -> Result<(), NsaError> {
        let d_model = self.query.weight.dims()[0];
        if x.dims()[2] != d_model || x.dims().contains(&0) {
            return Err(NsaError::Shape(NsaShapeError {
                tensor: "x",
                actual: x.dims().to_vec(),
                expected: format!(
                    "[B, T, d_model] with d_model = {d_model} and every dimension at least 1"
                ),
            }));
        }
        Ok(())
    }

    /// The queries, the branch keys and values and the gates of `x: [B, T, d_model]`.
    pub(crate) fn project(&self, x: Tensor<B, 3>) -> Projected<B> {
        let [batch, seq, _] = x.dims();
        let heads = |t: Tensor<B, 3>, n: usize, d: usize| t.reshape([batch, seq, n, d]);
        let project = |branch: Branch| {
            let kv = &self.kv[(branch as usize).min(self.kv.len() - 1)];
            BranchKv {
                k: heads(kv.key.forward(x.clone()), self.n_kv_heads, self.d_k),
                v: heads(kv.value.forward(x.clone()), self.n_kv_heads, self.d_v),
            }
        };
        Projected {
            q: heads(self.query.forward(x.clone()), self.n_heads, self.d_k),
            raw: project(Branch::Compressed),
            selected: project(Branch::Selected),
            window: project(Branch::Window),
            gates: self.gate.forward(x),
        }
    }

    /// The layer output of the operator's `attention` and the `gates` it used.
    pub(crate) fn finish(&self, attention: NsaOutput<B>, gates: Tensor<B, 4>) -> NsaForward<B> {
        let [batch, seq, _, _] = attention.output.dims();
        let output = attention
            .output
            .reshape([batch, seq, self.n_heads * self.d_v]);
        NsaForward {
            output: self.output.forward(output),
            selected_blocks: attention.selected_blocks,
            gates,
        }
    }

    /// The compression branch's keys and values of one sequence per row.
    pub(crate) fn compress(&self, raw: BranchKv<B>) -> Option<BranchKv<B>> {
        self.compress_key
            .forward(raw.k)
            .zip(self.compress_value.forward(raw.v))
            .map(|(k, v)| BranchKv { k, v })
    }

    /// The compression branch's keys and values of each document, one after another:
    /// `[1, N_cmp, H_kv, d]` (`None` when no document holds a whole block). `documents`
    /// cover the rows of `raw`.
    fn compress_documents(&self, raw: BranchKv<B>, documents: &Documents) -> Option<BranchKv<B>> {
        let [batch, seq, kv_heads, _] = raw.k.dims();
        let flat = |t: Tensor<B, 4>, d: usize| t.reshape([1, batch * seq, kv_heads, d]);
        let (k, v) = (flat(raw.k, self.d_k), flat(raw.v, self.d_v));
        let parts: Vec<BranchKv<B>> = documents
            .ranges()
            .filter_map(|range| {
                self.compress(BranchKv {
                    k: k.clone().slice_dim(1, range.clone()),
                    v: v.clone().slice_dim(1, range),
                })
            })
            .collect();
        if parts.is_empty() {
            return None;
        }
        let (keys, values) = parts.into_iter().map(|kv| (kv.k, kv.v)).unzip();
        Some(BranchKv {
            k: Tensor::cat(keys, 1),
            v: Tensor::cat(values, 1),
        })
    }

    /// The attention operator's configuration.
    pub fn attention_config(&self) -> &NsaAttentionConfig {
        &self.attention
    }
}
