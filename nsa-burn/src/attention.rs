//! The NSA attention operator on projected heads: the level public kernels expose, and the
//! function the CubeCL kernels slot in beneath.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};
use core::fmt;

use burn::tensor::TensorPrimitive;

use nsa_cubecl::{AttentionShape, PlanError};

use crate::{GatedRest, NsaAttentionConfig, NsaBackend, NsaConfigError};

/// Keys and values of one branch.
#[derive(Debug, Clone)]
pub struct BranchKv<B: Backend> {
    /// `[B, L, H_kv, d_k]`
    pub k: Tensor<B, 4>,
    /// `[B, L, H_kv, d_v]`
    pub v: Tensor<B, 4>,
}

/// Inputs of [`nsa_attention`].
///
/// The `T` queries are the last `T` of `T_k` positions: `T = T_k` is causal
/// self-attention over a whole sequence; `T < T_k` puts the queries at positions
/// `T_k - T..T_k` of a longer sequence whose keys are given (a chunk of a prompt after the
/// chunks before it, or one decoding step after a prefix).
#[derive(Debug, Clone)]
pub struct NsaInput<B: Backend> {
    /// Queries `[B, T, H, d_k]`; query head `h` belongs to KV head `h / G`, `G = H / H_kv`.
    pub q: Tensor<B, 4>,
    /// Compressed keys and values `[B, N_cmp, H_kv, d]`, `N_cmp =
    /// config.num_compressed_blocks(T_k)`: the compressor's output (see
    /// [`crate::Compressor`]). `None` exactly when `N_cmp = 0` (`T_k < l`): GPU runtimes
    /// cannot hold empty tensors.
    pub compressed: Option<BranchKv<B>>,
    /// Keys and values of the selection branch, `[B, T_k, H_kv, d]`.
    pub selected: BranchKv<B>,
    /// Keys and values of the sliding-window branch for the last `L_w` positions,
    /// `[B, L_w, H_kv, d]`: `L_w = T_k` always works, and `min(T_k, T + w - 1) <= L_w` is
    /// required (the keys the first query's window reaches).
    pub window: BranchKv<B>,
    /// Branch gates in `[0, 1]`, `[B, T, H, 3]`, in the order (compressed, selected, window).
    pub gates: Tensor<B, 4>,
}

/// Output of [`nsa_attention`].
#[derive(Debug, Clone)]
pub struct NsaOutput<B: Backend> {
    /// Gated sum of the three branches (Eq. 5), `[B, T, H, d_v]`.
    pub output: Tensor<B, 4>,
    /// Blocks each `(batch, KV head, t)` selected, `[B, H_kv, T, n]` Int: indices of
    /// selection blocks (keys `[j*l', (j+1)*l')`) in ascending order, -1 in unused slots
    /// (when fewer than `n` blocks exist).
    pub selected_blocks: Tensor<B, 4, Int>,
}

/// A tensor given to [`try_nsa_attention`] whose shape breaks a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct NsaShapeError {
    /// Which tensor, e.g. `selected.k`.
    pub tensor: &'static str,
    /// The shape it has.
    pub actual: Vec<usize>,
    /// The rule, e.g. `[B, T, H_kv, d_k] = [1, 64, 2, 32]`.
    pub expected: String,
}

impl fmt::Display for NsaShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NSA attention: `{}` has shape {:?}, expected {}",
            self.tensor, self.actual, self.expected
        )
    }
}

impl std::error::Error for NsaShapeError {}

/// Any error of [`try_nsa_attention`].
#[derive(Debug, Clone, PartialEq)]
pub enum NsaError {
    /// The attention configuration is invalid.
    Config(NsaConfigError),
    /// An input tensor has the wrong shape.
    Shape(NsaShapeError),
    /// A float input's dtype differs from the queries'.
    MixedDType {
        /// Which tensor, e.g. `window.v`.
        tensor: &'static str,
        /// Its dtype.
        dtype: DType,
        /// The queries' dtype, which every float input must have.
        q_dtype: DType,
    },
    /// The backend's NSA operations do not take this dtype (the CubeCL kernels take f32,
    /// f16 and bf16; see [`NsaBackend::nsa_supports_dtype`]).
    UnsupportedDType {
        /// The inputs' dtype.
        dtype: DType,
    },
    /// Document boundaries of packed rows break a rule (see [`crate::Documents`]).
    Documents(crate::DocumentsError),
    /// A cached forward pass cannot be done (see [`crate::NsaCache`]).
    Cache(crate::NsaCacheError),
    /// No kernel path fits a device limit for this call (see [`NsaBackend::nsa_plan`]):
    /// units per cube or shared memory, with what was needed and what the device has.
    Kernels(PlanError),
    /// The layer loaded a record saved with other attention settings (see
    /// [`crate::NsaSettings`]).
    SettingsMismatch {
        /// The first setting that differs, e.g. `n_selected`.
        field: &'static str,
        /// The layer's value (from its [`crate::NsaConfig`]).
        layer: String,
        /// The value in the loaded record.
        saved: String,
    },
}

impl fmt::Display for NsaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(error) => write!(f, "invalid NSA configuration: {error}"),
            Self::Shape(error) => error.fmt(f),
            Self::Documents(error) => write!(f, "NSA attention: {error}"),
            Self::Cache(error) => error.fmt(f),
            Self::Kernels(error) => error.fmt(f),
            Self::MixedDType {
                tensor,
                dtype,
                q_dtype,
            } => write!(
                f,
                "NSA attention: `{tensor}` is {dtype:?}, but every float input must have `q`'s dtype {q_dtype:?}"
            ),
            Self::UnsupportedDType { dtype } => write!(
                f,
                "NSA attention: this backend's NSA operations do not take {dtype:?} tensors"
            ),
            Self::SettingsMismatch {
                field,
                layer,
                saved,
            } => write!(
                f,
                "NSA layer: the loaded record was saved with `{field}` = {saved}, but the layer was built with {layer}"
            ),
        }
    }
}

impl std::error::Error for NsaError {}

impl From<NsaConfigError> for NsaError {
    fn from(error: NsaConfigError) -> Self {
        Self::Config(error)
    }
}

impl From<crate::NsaCacheError> for NsaError {
    fn from(error: crate::NsaCacheError) -> Self {
        Self::Cache(error)
    }
}

impl From<NsaShapeError> for NsaError {
    fn from(error: NsaShapeError) -> Self {
        Self::Shape(error)
    }
}

fn expect_shape(
    tensor: &'static str,
    actual: [usize; 4],
    expected: [usize; 4],
    names: &str,
) -> Result<(), NsaShapeError> {
    if actual == expected {
        Ok(())
    } else {
        Err(NsaShapeError {
            tensor,
            actual: actual.to_vec(),
            expected: format!("{names} = {expected:?}"),
        })
    }
}

/// A shape error unless every dimension of `tensor` is at least 1.
fn expect_nonempty<const D: usize>(
    tensor: &'static str,
    actual: [usize; D],
    names: &str,
) -> Result<(), NsaShapeError> {
    if actual.contains(&0) {
        Err(NsaShapeError {
            tensor,
            actual: actual.to_vec(),
            expected: format!("{names} with every dimension at least 1"),
        })
    } else {
        Ok(())
    }
}

impl<B: Backend> NsaInput<B> {
    /// Every float input with its name.
    fn float_tensors(&self) -> Vec<(&'static str, &Tensor<B, 4>)> {
        let mut tensors = vec![("q", &self.q)];
        if let Some(compressed) = &self.compressed {
            tensors.extend([
                ("compressed.k", &compressed.k),
                ("compressed.v", &compressed.v),
            ]);
        }
        tensors.extend([
            ("selected.k", &self.selected.k),
            ("selected.v", &self.selected.v),
            ("window.k", &self.window.k),
            ("window.v", &self.window.v),
            ("gates", &self.gates),
        ]);
        tensors
    }

    /// Position of the first query: `T_k - T` (0 for self-attention).
    pub(crate) fn query_start(&self) -> usize {
        self.selected.v.dims()[1] - self.q.dims()[1]
    }

    /// Checks every shape against `q`, `selected.v` (for `T_k`, `H_kv` and `d_v`) and
    /// `config`.
    pub(crate) fn check(&self, config: &NsaAttentionConfig) -> Result<(), NsaShapeError> {
        expect_nonempty("q", self.q.dims(), "[B, T, H, d_k]")?;
        expect_nonempty("selected.v", self.selected.v.dims(), "[B, T_k, H_kv, d_v]")?;
        let [batch, seq, heads, d_k] = self.q.dims();
        let [_, key_len, kv_heads, d_v] = self.selected.v.dims();
        if seq > key_len {
            return Err(NsaShapeError {
                tensor: "q",
                actual: self.q.dims().to_vec(),
                expected: format!(
                    "[B, T, H, d_k] with T <= T_k = {key_len} (from `selected.v`): the queries are the last T of the T_k positions"
                ),
            });
        }
        if heads % kv_heads != 0 {
            return Err(NsaShapeError {
                tensor: "q",
                actual: self.q.dims().to_vec(),
                expected: format!(
                    "[B, T, H, d_k] with H a multiple of H_kv = {kv_heads} (from `selected.v`)"
                ),
            });
        }
        let num_compressed = config.num_compressed_blocks(key_len);
        match (&self.compressed, num_compressed) {
            (None, 0) => {}
            (Some(compressed), 1..) => {
                let kv = [
                    ("compressed.k", &compressed.k, d_k, "[B, N_cmp, H_kv, d_k]"),
                    ("compressed.v", &compressed.v, d_v, "[B, N_cmp, H_kv, d_v]"),
                ];
                for (name, tensor, dim, names) in kv {
                    expect_shape(
                        name,
                        tensor.dims(),
                        [batch, num_compressed, kv_heads, dim],
                        names,
                    )?;
                }
            }
            (Some(compressed), 0) => {
                return Err(NsaShapeError {
                    tensor: "compressed",
                    actual: compressed.k.dims().to_vec(),
                    expected: format!(
                        "None: T_k = {key_len} < l = {} leaves no compression block",
                        config.compress_block
                    ),
                })
            }
            (None, _) => {
                return Err(NsaShapeError {
                    tensor: "compressed",
                    actual: Vec::new(),
                    expected: format!(
                        "[B, N_cmp, H_kv, d] with N_cmp = {num_compressed} for T_k = {key_len}, got None"
                    ),
                })
            }
        }
        let window_len = self.window.v.dims()[1];
        // The window keys must reach back to the first query's window.
        let least = key_len.min(seq.saturating_add(config.window - 1));
        if !(least..=key_len).contains(&window_len) {
            return Err(NsaShapeError {
                tensor: "window.v",
                actual: self.window.v.dims().to_vec(),
                expected: format!(
                    "[B, L_w, H_kv, d_v]: the last L_w keys, min(T_k, T + w - 1) = {least} <= L_w <= T_k = {key_len}"
                ),
            });
        }
        let kv = [
            (
                "selected.k",
                &self.selected.k,
                key_len,
                d_k,
                "[B, T_k, H_kv, d_k]",
            ),
            (
                "selected.v",
                &self.selected.v,
                key_len,
                d_v,
                "[B, T_k, H_kv, d_v]",
            ),
            (
                "window.k",
                &self.window.k,
                window_len,
                d_k,
                "[B, L_w, H_kv, d_k]",
            ),
            (
                "window.v",
                &self.window.v,
                window_len,
                d_v,
                "[B, L_w, H_kv, d_v]",
            ),
        ];
        for (name, tensor, len, dim, names) in kv {
            expect_shape(name, tensor.dims(), [batch, len, kv_heads, dim], names)?;
        }
        expect_shape(
            "gates",
            self.gates.dims(),
            [batch, seq, heads, 3],
            "[B, T, H, 3]",
        )
    }

    /// Checks that every float input has `q`'s dtype.
    pub(crate) fn check_same_dtype(&self) -> Result<(), NsaError> {
        let q_dtype = self.q.dtype();
        match self
            .float_tensors()
            .into_iter()
            .find(|(_, tensor)| tensor.dtype() != q_dtype)
        {
            None => Ok(()),
            Some((tensor, other)) => Err(NsaError::MixedDType {
                tensor,
                dtype: other.dtype(),
                q_dtype,
            }),
        }
    }
}

impl<B: NsaBackend> NsaInput<B> {
    /// Checks that every float input has `q`'s dtype and that the backend takes it.
    fn check_dtypes(&self) -> Result<(), NsaError> {
        self.check_same_dtype()?;
        let q_dtype = self.q.dtype();
        if B::nsa_supports_dtype(q_dtype) {
            Ok(())
        } else {
            Err(NsaError::UnsupportedDType { dtype: q_dtype })
        }
    }

    /// Plans every kernel of the call on the backend ([`NsaBackend::nsa_plan`]), so that a
    /// call no kernel path fits is an error before anything runs.
    fn plan(&self, config: &NsaAttentionConfig) -> Result<(), NsaError> {
        let shape =
            AttentionShape::from_dims(self.q.dims(), self.selected.v.dims(), self.query_start());
        B::nsa_plan(&self.q.device(), self.q.dtype(), shape, config)
            .map(|_| ())
            .map_err(NsaError::Kernels)
    }
}

/// NSA attention (Eq. 5): `o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`, causal, GQA.
///
/// Runs on the backend's [`NsaBackend`] implementation: the CubeCL kernels on Burn's CubeCL
/// backends, the reference in Burn tensor ops elsewhere (see [`crate::reference`] for its
/// memory use). Panics with a message naming the tensor and the rule when the inputs
/// disagree (a shape, an empty dimension, a dtype other than `q`'s, a dtype the backend
/// does not take) or when `config` is invalid; [`try_nsa_attention`] returns those errors
/// instead.
///
/// Shapes: `q: [B, T, H, d_k]`; `compressed: [B, N_cmp, H_kv, d_k | d_v]` (or `None` when
/// `T_k < l`); `selected: [B, T_k, H_kv, d_k | d_v]`; `window: [B, L_w, H_kv, d_k | d_v]`;
/// `gates: [B, T, H, 3]` -> `output: [B, T, H, d_v]`, `selected_blocks: [B, H_kv, T, n]`.
/// With `T = T_k = L_w` this is causal self-attention; with `T < T_k` the queries are the
/// last `T` positions (see [`NsaInput`]), as a cache's prefill and decoding steps call it:
/// the kernels run such calls forward on their portable path, and `Autodiff` differentiates
/// them in the reference.
pub fn nsa_attention<B: NsaBackend>(
    input: NsaInput<B>,
    config: &NsaAttentionConfig,
) -> NsaOutput<B> {
    try_nsa_attention(input, config).unwrap_or_else(|error| panic!("{error}"))
}

/// [`nsa_attention`] returning a typed error ([`NsaError`]) for an invalid configuration,
/// shape or dtype.
pub fn try_nsa_attention<B: NsaBackend>(
    input: NsaInput<B>,
    config: &NsaAttentionConfig,
) -> Result<NsaOutput<B>, NsaError> {
    config.validate()?;
    input.check(config)?;
    input.check_dtypes()?;
    input.plan(config)?;
    let query_start = input.query_start();
    let NsaInput {
        q,
        compressed,
        selected,
        window,
        gates,
    } = input;
    let float = |t: Tensor<B, 4>| t.into_primitive().tensor();
    let (o_cmp, selected_blocks) = match compressed {
        Some(compressed) => {
            let (o, _, blocks) = B::nsa_compressed(
                float(q.clone()),
                float(compressed.k),
                float(compressed.v),
                query_start,
                config,
            );
            (Some(o), Tensor::<B, 4, Int>::from_primitive(blocks))
        }
        None => (None, first_block_only(&selected, q.dims()[1], config)),
    };
    let (o_win, _) = B::nsa_window(float(q.clone()), float(window.k), float(window.v), config);
    let tensor = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
    // Without compression blocks the compressed branch is exactly zero.
    let o_cmp = o_cmp.unwrap_or_else(|| float(tensor(o_win.clone()).zeros_like()));
    let output = tensor(B::nsa_selected_gated_sum(
        float(q),
        float(selected.k),
        float(selected.v),
        selected_blocks.clone().into_primitive(),
        GatedRest {
            compressed: o_cmp,
            window: o_win,
            gates: float(gates),
        },
        config,
    ));
    Ok(NsaOutput {
        output,
        selected_blocks,
    })
}

/// The selection of every query when no compression block has ended (`T_k < l <= l'`):
/// block 0, the only selection block, then `n - 1` empty slots -> `[B, H_kv, T, n]`.
pub(crate) fn first_block_only<B: Backend>(
    selected: &BranchKv<B>,
    seq: usize,
    config: &NsaAttentionConfig,
) -> Tensor<B, 4, Int> {
    let [batch, _, kv_heads, _] = selected.k.dims();
    let device = selected.k.device();
    let first = Tensor::<B, 4, Int>::zeros([batch, kv_heads, seq, 1], &device);
    match config.n_selected {
        1 => first,
        n => {
            let empty = Tensor::full([batch, kv_heads, seq, n - 1], -1, &device);
            Tensor::cat(vec![first, empty], 3)
        }
    }
}
