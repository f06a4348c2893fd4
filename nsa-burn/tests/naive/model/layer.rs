//! The layer around the attention operator: projections, compressors (Eq. 7), gates and
//! the output projection.

use super::attention::{AttentionInputs, Sparsity};
use super::math::{gelu, sigmoid, silu, Array, Linear};

/// The paper's compressor `phi` (Eq. 7) for one head dimension `dim`.
#[derive(Debug, Clone)]
pub struct CompressorMlp {
    /// Intra-block position embedding `[l, dim]`.
    pub position: Vec<f64>,
    /// `l * dim -> hidden`, followed by GELU.
    pub hidden: Linear,
    /// `hidden -> dim`.
    pub output: Linear,
}

/// Every weight of an NSA layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// `H`.
    pub n_heads: usize,
    /// `H_kv`.
    pub n_kv_heads: usize,
    /// `d_k`.
    pub d_k: usize,
    /// `d_v`.
    pub d_v: usize,
    /// `d_model -> H * d_k`.
    pub query: Linear,
    /// `(key: d_model -> H_kv * d_k, value: d_model -> H_kv * d_v)` for the compressed,
    /// selected and window branch in that order; a single entry means all branches share it.
    pub kv: Vec<(Linear, Linear)>,
    /// Key compressor; `None` is mean pooling.
    pub compress_key: Option<CompressorMlp>,
    /// Value compressor; `None` is mean pooling.
    pub compress_value: Option<CompressorMlp>,
    /// Optional gate hidden layer (followed by SiLU).
    pub gate_hidden: Option<Linear>,
    /// Gate output layer, `3 * H` logits laid out `[H, 3]`.
    pub gate_output: Linear,
    /// `H * d_v -> d_model`.
    pub output: Linear,
}

/// Applies `linear` to every token and splits the result into heads:
/// `x: [B, T, d_in]` -> `[B, T, heads, dim]` (head `h` is output columns `h*dim .. (h+1)*dim`).
pub fn project(x: &Array, linear: &Linear, heads: usize, dim: usize) -> Array {
    let (batch, seq) = (x.shape[0], x.shape[1]);
    assert_eq!(linear.d_out, heads * dim);
    let mut out = Array::zeros(vec![batch, seq, heads, dim]);
    for b in 0..batch {
        for t in 0..seq {
            let y = linear.apply(x.vec(&[b, t]));
            for h in 0..heads {
                out.vec_mut(&[b, t, h])
                    .copy_from_slice(&y[h * dim..(h + 1) * dim]);
            }
        }
    }
    out
}

/// Compresses each block `[i*d, i*d + l)` of every KV head into one vector (Eq. 7):
/// mean pooling when `mlp` is `None`, else `phi(block) = W2 gelu(W1 flat(block + pos) + b1) + b2`
/// where row `r` of the block is position `i*d + r` and `flat` is row-major.
///
/// `x: [B, T, H_kv, dim]` -> `[B, N_cmp, H_kv, dim]`.
pub fn compress(x: &Array, mlp: Option<&CompressorMlp>, sp: &Sparsity) -> Array {
    let (batch, seq, heads, dim) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let blocks = sp.num_compressed(seq);
    let mut out = Array::zeros(vec![batch, blocks, heads, dim]);
    for b in 0..batch {
        for i in 0..blocks {
            for h in 0..heads {
                let compressed = match mlp {
                    None => {
                        let mut mean = vec![0.0; dim];
                        for r in 0..sp.l {
                            let row = x.vec(&[b, i * sp.stride + r, h]);
                            for c in 0..dim {
                                mean[c] += row[c] / sp.l as f64;
                            }
                        }
                        mean
                    }
                    Some(mlp) => {
                        // flat[r*dim + c] = x[b, i*d + r, h, c] + position[r, c]: [l * dim]
                        let mut flat = vec![0.0; sp.l * dim];
                        for r in 0..sp.l {
                            let row = x.vec(&[b, i * sp.stride + r, h]);
                            for c in 0..dim {
                                flat[r * dim + c] = row[c] + mlp.position[r * dim + c];
                            }
                        }
                        let hidden: Vec<f64> =
                            mlp.hidden.apply(&flat).into_iter().map(gelu).collect();
                        mlp.output.apply(&hidden)
                    }
                };
                out.vec_mut(&[b, i, h]).copy_from_slice(&compressed);
            }
        }
    }
    out
}

/// Branch gates: `sigmoid(W_o [silu(W_h x + b_h)] + b_o)`, logits laid out `[H, 3]`.
///
/// `x: [B, T, d_model]` -> `[B, T, H, 3]` (compressed, selected, window).
pub fn gates(x: &Array, layer: &Layer) -> Array {
    let (batch, seq) = (x.shape[0], x.shape[1]);
    let mut out = Array::zeros(vec![batch, seq, layer.n_heads, 3]);
    for b in 0..batch {
        for t in 0..seq {
            let input = match &layer.gate_hidden {
                Some(hidden) => hidden.apply(x.vec(&[b, t])).into_iter().map(silu).collect(),
                None => x.vec(&[b, t]).to_vec(),
            };
            let logits = layer.gate_output.apply(&input);
            for h in 0..layer.n_heads {
                for branch in 0..3 {
                    out.vec_mut(&[b, t, h])[branch] = sigmoid(logits[h * 3 + branch]);
                }
            }
        }
    }
    out
}

/// Runs the whole layer's projections, compressors and gates on `x: [B, T, d_model]`.
pub fn layer_inputs(x: &Array, layer: &Layer, sp: &Sparsity) -> AttentionInputs {
    let kv = |branch: usize| &layer.kv[branch.min(layer.kv.len() - 1)];
    let (h, h_kv, d_k, d_v) = (layer.n_heads, layer.n_kv_heads, layer.d_k, layer.d_v);
    let k_raw = project(x, &kv(0).0, h_kv, d_k);
    let v_raw = project(x, &kv(0).1, h_kv, d_v);
    AttentionInputs {
        q: project(x, &layer.query, h, d_k),
        k_cmp: compress(&k_raw, layer.compress_key.as_ref(), sp),
        v_cmp: compress(&v_raw, layer.compress_value.as_ref(), sp),
        k_slc: project(x, &kv(1).0, h_kv, d_k),
        v_slc: project(x, &kv(1).1, h_kv, d_v),
        k_win: project(x, &kv(2).0, h_kv, d_k),
        v_win: project(x, &kv(2).1, h_kv, d_v),
        gates: gates(x, layer),
    }
}

/// Output projection of the concatenated heads: `o: [B, T, H, d_v]` -> `[B, T, d_model]`,
/// input column `h*d_v + c` being head `h`, channel `c`.
pub fn output_projection(o: &Array, layer: &Layer) -> Array {
    let (batch, seq) = (o.shape[0], o.shape[1]);
    let width = o.shape[2] * o.shape[3];
    let d_model = layer.output.d_out;
    let mut out = Array::zeros(vec![batch, seq, d_model]);
    for b in 0..batch {
        for t in 0..seq {
            let start = (b * seq + t) * width;
            let y = layer.output.apply(&o.data[start..start + width]);
            out.vec_mut(&[b, t]).copy_from_slice(&y);
        }
    }
    out
}
