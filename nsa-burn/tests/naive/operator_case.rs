//! One operator case: random inputs fed to `nsa_attention` and to the naive operator.

use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};
use nsa_burn::{nsa_attention, BranchKv, NsaAttentionConfig, NsaInput};

use crate::compare::{check_selection, relative_error, within, Ties};
use crate::convert::{sparsity, to_array, to_indices};
use crate::model::{self, AttentionInputs};
use crate::runner::{seeded, CaseResult};

/// One test of the operator on random inputs.
#[derive(Debug, Clone)]
pub struct OperatorCase {
    pub label: &'static str,
    pub config: NsaAttentionConfig,
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d_k: usize,
    pub d_v: usize,
    /// All compressed keys zero: every visible compressed block gets the same logit, so
    /// with `l = d = l'` and `G <= 2` every candidate's score is the same number in every
    /// precision and the selection must follow the tie rule exactly ([`Ties::Exact`]).
    pub zero_compressed_keys: bool,
}

impl OperatorCase {
    /// A case of `config` at these sizes, with random compressed keys.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        label: &'static str,
        config: NsaAttentionConfig,
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        d_k: usize,
        d_v: usize,
    ) -> Self {
        Self {
            label,
            config,
            batch,
            seq,
            heads,
            kv_heads,
            d_k,
            d_v,
            zero_compressed_keys: false,
        }
    }

    /// Random `q`, compressed and raw keys/values (standard normal) and gates (uniform in
    /// `[0, 1]`), fed to `nsa_attention` directly and to the naive operator.
    pub fn run(&self, seed: u64) -> CaseResult {
        let Self {
            config,
            batch,
            seq,
            heads,
            kv_heads,
            d_k,
            d_v,
            ..
        } = *self;
        let device = Default::default();
        let n_cmp = config.num_compressed_blocks(seq);
        let normal = Distribution::Normal(0.0, 1.0);
        let mut input = seeded(seed, || {
            let random = |shape: [usize; 4]| Tensor::<Flex, 4>::random(shape, normal, &device);
            let k_cmp = if self.zero_compressed_keys {
                Tensor::zeros([batch, n_cmp, kv_heads, d_k], &device)
            } else {
                random([batch, n_cmp, kv_heads, d_k])
            };
            NsaInput {
                q: random([batch, seq, heads, d_k]),
                compressed: Some(BranchKv {
                    k: k_cmp,
                    v: random([batch, n_cmp, kv_heads, d_v]),
                }),
                selected: BranchKv {
                    k: random([batch, seq, kv_heads, d_k]),
                    v: random([batch, seq, kv_heads, d_v]),
                },
                window: BranchKv {
                    k: random([batch, seq, kv_heads, d_k]),
                    v: random([batch, seq, kv_heads, d_v]),
                },
                gates: Tensor::random(
                    [batch, seq, heads, 3],
                    Distribution::Uniform(0.0, 1.0),
                    &device,
                ),
            }
        });
        let inputs = AttentionInputs {
            q: to_array(input.q.clone()),
            k_cmp: to_array(input.compressed.as_ref().expect("built above").k.clone()),
            v_cmp: to_array(input.compressed.as_ref().expect("built above").v.clone()),
            k_slc: to_array(input.selected.k.clone()),
            v_slc: to_array(input.selected.v.clone()),
            k_win: to_array(input.window.k.clone()),
            v_win: to_array(input.window.v.clone()),
            gates: to_array(input.gates.clone()),
        };
        // The operator takes `None` when no compression block exists (T < l).
        if n_cmp == 0 {
            input.compressed = None;
        }
        let sp = sparsity(&config);
        let result = nsa_attention(input, &config);
        let ties_mode = if self.zero_compressed_keys {
            Ties::Exact
        } else {
            Ties::NearTiesAllowed
        };
        let selection = to_indices(result.selected_blocks);
        let (selection, ties) = check_selection(&inputs, &selection, &sp, ties_mode)?;
        let naive = model::attention(&inputs, &selection, &sp);
        let error = within(
            "attention output",
            relative_error(&to_array(result.output), &naive),
        )?;
        Ok(format!("output error {error:.1e}, {ties} near-ties"))
    }
}
