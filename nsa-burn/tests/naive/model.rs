//! A naive Native Sparse Attention in `f64`, written from the specification
//! (`the project specification `shared/NSA.md``) alone.
//!
//! Everything here is plain `Vec<f64>` arithmetic with explicit loops over batch, position,
//! head and key: no Burn, and nothing shared with `nsa_burn` (its `reference` module in
//! particular). It is slow on purpose; its only job is to be obviously right.
//!
//! Conventions: arrays are row-major; the shape of each one is written next to it. `B` is the
//! batch, `T` the sequence length, `H` / `H_kv` the query / key-value heads, `G = H / H_kv`,
//! `N_cmp` the number of compression blocks and `N_slc` the number of selection blocks.

/// A dense row-major `f64` array.
#[derive(Debug, Clone)]
pub struct Array {
    /// Extent of each dimension.
    pub shape: Vec<usize>,
    /// The elements, last dimension contiguous.
    pub data: Vec<f64>,
}

impl Array {
    /// An array of `shape` holding `data` (row-major).
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "data does not fill shape {shape:?}"
        );
        Self { shape, data }
    }

    /// Zeros of `shape`.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let len = shape.iter().product();
        Self::new(shape, vec![0.0; len])
    }

    /// Offset of the last-dimension vector at `prefix` (every coordinate but the last).
    fn offset(&self, prefix: &[usize]) -> usize {
        assert_eq!(prefix.len() + 1, self.shape.len(), "prefix rank");
        let mut offset = 0;
        for (axis, &index) in prefix.iter().enumerate() {
            assert!(
                index < self.shape[axis],
                "index {prefix:?} out of {:?}",
                self.shape
            );
            offset = offset * self.shape[axis] + index;
        }
        offset * self.shape[self.shape.len() - 1]
    }

    /// The last-dimension vector at `prefix`, e.g. `q.vec(&[b, t, h])` is query head `h` of
    /// token `t`, `[d_k]`.
    pub fn vec(&self, prefix: &[usize]) -> &[f64] {
        let start = self.offset(prefix);
        &self.data[start..start + self.shape[self.shape.len() - 1]]
    }

    /// Mutable [`Array::vec`].
    pub fn vec_mut(&mut self, prefix: &[usize]) -> &mut [f64] {
        let start = self.offset(prefix);
        let len = self.shape[self.shape.len() - 1];
        &mut self.data[start..start + len]
    }
}

/// An affine layer `y = x W + b`, `W: [d_in, d_out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// `[d_in, d_out]`, row-major.
    pub weight: Vec<f64>,
    /// `[d_out]`, if any.
    pub bias: Option<Vec<f64>>,
}

impl Linear {
    /// `y[o] = sum_i x[i] * W[i, o] + b[o]`; `x: [d_in]` -> `[d_out]`.
    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.d_in, "Linear input width");
        let mut y = match &self.bias {
            Some(bias) => bias.clone(),
            None => vec![0.0; self.d_out],
        };
        for (i, &xi) in x.iter().enumerate() {
            for (o, yo) in y.iter_mut().enumerate() {
                *yo += xi * self.weight[i * self.d_out + o];
            }
        }
        y
    }
}

/// The error function, to about 1e-14 (Taylor series near 0, continued fraction for erfc in
/// the tails). `std` has no stable `erf`.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let value = if a < 2.5 {
        // erf(a) = 2/sqrt(pi) * sum_n (-1)^n a^(2n+1) / (n! (2n+1))
        let mut term = a; // (-1)^n a^(2n+1) / n!
        let mut sum = a;
        for n in 1..200 {
            term *= -a * a / n as f64;
            let contribution = term / (2 * n + 1) as f64;
            sum += contribution;
            if contribution.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...)))))
        let mut fraction = a;
        for k in (1..=80).rev() {
            fraction = a + (k as f64 / 2.0) / fraction;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / fraction
    };
    value.copysign(x)
}

/// Exact GELU, `x/2 * (1 + erf(x / sqrt 2))`.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// Logistic sigmoid.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// SiLU, `x * sigmoid(x)`.
pub fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

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

/// The block-sparsity settings, named as in the spec.
#[derive(Debug, Clone, Copy)]
pub struct Sparsity {
    /// Compression block length `l`.
    pub l: usize,
    /// Compression stride `d`.
    pub stride: usize,
    /// Selection block length `l'`.
    pub l_sel: usize,
    /// Selected blocks per query `n`, forced ones included.
    pub n: usize,
    /// Forced initial blocks `0 .. n_initial`.
    pub n_initial: usize,
    /// Forced local blocks: the block holding `t` and the `n_local - 1` before it.
    pub n_local: usize,
    /// Sliding window `w`.
    pub window: usize,
    /// Softmax scale; `None` means `1 / sqrt(d_k)`.
    pub scale: Option<f64>,
}

impl Sparsity {
    /// Number of compression blocks of a length-`seq` sequence: blocks `i` whose span
    /// `[i*d, i*d + l)` lies inside `[0, seq)`.
    pub fn num_compressed(&self, seq: usize) -> usize {
        let mut count = 0;
        while count * self.stride + self.l <= seq {
            count += 1;
        }
        count
    }

    /// Number of selection blocks `[j*l', (j+1)*l')` that start inside `[0, seq)`.
    pub fn num_selection_blocks(&self, seq: usize) -> usize {
        let mut count = 0;
        while count * self.l_sel < seq {
            count += 1;
        }
        count
    }

    /// Whether query `t` sees compression block `i`: the block has ended, `i*d + l - 1 <= t`.
    pub fn compressed_visible(&self, i: usize, t: usize) -> bool {
        i * self.stride + self.l - 1 <= t
    }

    /// Whether compression block `i` (`[i*d, i*d+l)`) intersects selection block `j`
    /// (`[j*l', (j+1)*l')`): the overlap reading of Eq. 9.
    pub fn overlaps(&self, i: usize, j: usize) -> bool {
        let (c0, c1) = (i * self.stride, i * self.stride + self.l);
        let (s0, s1) = (j * self.l_sel, (j + 1) * self.l_sel);
        c0 < s1 && s0 < c1
    }

    /// Whether selection block `j` is forced for query `t`: one of the `n_initial` leading
    /// blocks, or one of the `n_local` blocks ending at the block holding `t`. (Only
    /// meaningful for candidates, `j <= t / l'`.)
    pub fn forced(&self, j: usize, t: usize) -> bool {
        let last = t / self.l_sel;
        j < self.n_initial || (j <= last && j + self.n_local > last)
    }

    /// The softmax scale for head dimension `d_k`.
    pub fn scale(&self, d_k: usize) -> f64 {
        self.scale.unwrap_or(1.0 / (d_k as f64).sqrt())
    }
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

/// What the attention operator consumes: projected heads and gates.
#[derive(Debug, Clone)]
pub struct AttentionInputs {
    /// Queries `[B, T, H, d_k]`.
    pub q: Array,
    /// Compressed keys `[B, N_cmp, H_kv, d_k]`.
    pub k_cmp: Array,
    /// Compressed values `[B, N_cmp, H_kv, d_v]`.
    pub v_cmp: Array,
    /// Selection-branch keys `[B, T, H_kv, d_k]`.
    pub k_slc: Array,
    /// Selection-branch values `[B, T, H_kv, d_v]`.
    pub v_slc: Array,
    /// Window-branch keys `[B, T, H_kv, d_k]`.
    pub k_win: Array,
    /// Window-branch values `[B, T, H_kv, d_v]`.
    pub v_win: Array,
    /// Gates `[B, T, H, 3]`.
    pub gates: Array,
}

impl AttentionInputs {
    /// `(B, T, H, H_kv, d_k, d_v)`.
    pub fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        let q = &self.q.shape;
        (
            q[0],
            q[1],
            q[2],
            self.k_slc.shape[2],
            q[3],
            self.v_slc.shape[3],
        )
    }
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

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Softmax attention of one query over an explicit list of `(key, value)` rows:
/// `sum_k softmax_k(scale * q.k) v_k`, `[d_v]`; exactly zero when the list is empty.
pub fn attend(q: &[f64], keys: &[(&[f64], &[f64])], scale: f64, d_v: usize) -> Vec<f64> {
    let mut out = vec![0.0; d_v];
    if keys.is_empty() {
        return out;
    }
    let logits: Vec<f64> = keys.iter().map(|(k, _)| scale * dot(q, k)).collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    for ((_, v), w) in keys.iter().zip(&weights) {
        for c in 0..d_v {
            out[c] += w / total * v[c];
        }
    }
    out
}

/// Selection-block scores (Eq. 8-10): for each batch, KV head and query `t`,
/// `score[j] = sum over the G heads h of the group, sum over visible compression blocks i
/// intersecting selection block j, of p_cmp(t, h)[i]`, where `p_cmp` is the softmax of
/// `scale * q.K_cmp` over the blocks `t` sees. Zero for every block when `t` sees none.
///
/// -> `[B, H_kv, T, N_slc]`.
pub fn block_scores(inputs: &AttentionInputs, sp: &Sparsity) -> Array {
    let (batch, seq, heads, kv_heads, d_k, _) = inputs.dims();
    let group = heads / kv_heads;
    let n_cmp = inputs.k_cmp.shape[1];
    let n_slc = sp.num_selection_blocks(seq);
    let scale = sp.scale(d_k);
    let mut scores = Array::zeros(vec![batch, kv_heads, seq, n_slc]);
    for b in 0..batch {
        for t in 0..seq {
            for h in 0..heads {
                let g = h / group;
                let q = inputs.q.vec(&[b, t, h]);
                let visible: Vec<usize> = (0..n_cmp)
                    .filter(|&i| sp.compressed_visible(i, t))
                    .collect();
                if visible.is_empty() {
                    continue;
                }
                let logits: Vec<f64> = visible
                    .iter()
                    .map(|&i| scale * dot(q, inputs.k_cmp.vec(&[b, i, g])))
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = logits.iter().map(|s| (s - max).exp()).sum();
                let row = scores.vec_mut(&[b, g, t]);
                for (&i, s) in visible.iter().zip(&logits) {
                    let p = (s - max).exp() / total;
                    for (j, score) in row.iter_mut().enumerate() {
                        if sp.overlaps(i, j) {
                            *score += p;
                        }
                    }
                }
            }
        }
    }
    scores
}

/// Top-n selection (Eq. 11) for query `t` from its block scores `[N_slc]`: the candidates are
/// blocks `j` with `j*l' <= t`; all of them when there are at most `n`; otherwise the forced
/// blocks ([`Sparsity::forced`]) and then the best remaining by descending score, ties to
/// the lower index. Returns `[n]`: ascending block indices, then -1 in unused slots.
pub fn select(scores: &[f64], t: usize, sp: &Sparsity) -> Vec<i64> {
    let candidates: Vec<usize> = (0..scores.len()).filter(|&j| j * sp.l_sel <= t).collect();
    let mut chosen: Vec<usize> = if candidates.len() <= sp.n {
        candidates
    } else {
        let mut chosen: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&j| sp.forced(j, t))
            .collect();
        let mut rest: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&j| !sp.forced(j, t))
            .collect();
        rest.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let free = sp.n - chosen.len();
        chosen.extend(rest.into_iter().take(free));
        chosen
    };
    chosen.sort_unstable();
    let mut out: Vec<i64> = chosen.into_iter().map(|j| j as i64).collect();
    out.resize(sp.n, -1);
    out
}

/// The three branches and their gated sum (Eq. 5), for every query head:
/// - compressed: attention over the compressed blocks `i` with `i*d + l - 1 <= t` (zero if none);
/// - selected: attention over the keys of the blocks in `selection[b, h / G, t]` at positions
///   `<= t`;
/// - window: attention over keys `max(0, t - w + 1) ..= t`;
///
/// then `g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`.
///
/// `selection: [B, H_kv, T, n]` (-1 = unused slot) -> `[B, T, H, d_v]`.
pub fn attention(inputs: &AttentionInputs, selection: &[i64], sp: &Sparsity) -> Array {
    let (batch, seq, heads, kv_heads, d_k, d_v) = inputs.dims();
    let group = heads / kv_heads;
    let n_cmp = inputs.k_cmp.shape[1];
    let scale = sp.scale(d_k);
    assert_eq!(selection.len(), batch * kv_heads * seq * sp.n);
    let mut out = Array::zeros(vec![batch, seq, heads, d_v]);
    for b in 0..batch {
        for t in 0..seq {
            for h in 0..heads {
                let g = h / group;
                let q = inputs.q.vec(&[b, t, h]);

                let cmp_keys: Vec<(&[f64], &[f64])> = (0..n_cmp)
                    .filter(|&i| sp.compressed_visible(i, t))
                    .map(|i| (inputs.k_cmp.vec(&[b, i, g]), inputs.v_cmp.vec(&[b, i, g])))
                    .collect();
                let o_cmp = attend(q, &cmp_keys, scale, d_v);

                let slot = ((b * kv_heads + g) * seq + t) * sp.n;
                let mut slc_keys: Vec<(&[f64], &[f64])> = Vec::new();
                for &j in &selection[slot..slot + sp.n] {
                    if j < 0 {
                        continue;
                    }
                    let j = j as usize;
                    for p in j * sp.l_sel..(j + 1) * sp.l_sel {
                        if p <= t {
                            slc_keys
                                .push((inputs.k_slc.vec(&[b, p, g]), inputs.v_slc.vec(&[b, p, g])));
                        }
                    }
                }
                let o_slc = attend(q, &slc_keys, scale, d_v);

                let first = (t + 1).saturating_sub(sp.window);
                let win_keys: Vec<(&[f64], &[f64])> = (first..=t)
                    .map(|p| (inputs.k_win.vec(&[b, p, g]), inputs.v_win.vec(&[b, p, g])))
                    .collect();
                let o_win = attend(q, &win_keys, scale, d_v);

                let gate = inputs.gates.vec(&[b, t, h]);
                let o = out.vec_mut(&[b, t, h]);
                for c in 0..d_v {
                    o[c] = gate[0] * o_cmp[c] + gate[1] * o_slc[c] + gate[2] * o_win[c];
                }
            }
        }
    }
    out
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
