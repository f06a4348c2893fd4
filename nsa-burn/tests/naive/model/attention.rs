//! The attention operator: block scores (Eq. 8-10), top-n selection (Eq. 11), the three
//! branches and their gated sum (Eq. 5).

use super::math::Array;

/// The block-sparsity settings, named as in the algorithm's description.
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
