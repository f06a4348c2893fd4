//! The merge of a forward pass split over its keys. A decoding step has too few query rows
//! to fill a device, so each row's keys are split over several cubes: each writes its
//! part's output, normalised over the part's keys, and the part's log-sum-exp, and this
//! kernel combines the parts in a fixed order (as flash-decoding does).

use cubecl::prelude::*;

use crate::common::geometry::{lse_at, NEG_BIG};

/// `o_parts: [S * B, T, H, d_v]` and `lse_parts: [S * B, H, T]` (f32; part `s` of batch row
/// `b` at row `s * B + b`, [`NEG_BIG`] for a part that attends no key) -> the row's output
/// `o: [B, T, H, d_v]` and log-sum-exp `lse: [B, H, T]` (f32; [`NEG_BIG`] and zeros for a
/// row that attends no key). One unit per output element.
#[cube(launch, address_type = "dynamic")]
pub fn merge_key_splits_kernel<F: Float>(
    o_parts: &Tensor<f32>,
    lse_parts: &Tensor<f32>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
) {
    let (batch, seq, heads, d_v) = (o.shape(0), o.shape(1), o.shape(2), o.shape(3));
    let idx = ABSOLUTE_POS;
    if idx < batch * seq * heads * d_v {
        let col = idx % d_v;
        let head = (idx / d_v) % heads;
        let t = (idx / (d_v * heads)) % seq;
        let b = idx / (d_v * heads * seq);
        let splits = o_parts.shape(0) / batch;
        let mut top = f32::new(NEG_BIG);
        for split in 0..splits {
            top = max(
                top,
                lse_parts[lse_at(lse_parts, split * batch + b, head, t)],
            );
        }
        let mut sum = 0.0f32;
        let mut acc = 0.0f32;
        if top > NEG_BIG {
            for split in 0..splits {
                let row = split * batch + b;
                let weight = (lse_parts[lse_at(lse_parts, row, head, t)] - top).exp();
                let at = row * o_parts.stride(0)
                    + t * o_parts.stride(1)
                    + head * o_parts.stride(2)
                    + col * o_parts.stride(3);
                sum += weight;
                acc += weight * o_parts[at];
            }
        }
        let mut value = 0.0f32;
        let mut row_lse = f32::new(NEG_BIG);
        if sum > 0.0 {
            value = acc / sum;
            row_lse = top + sum.ln();
        }
        o[b * o.stride(0) + t * o.stride(1) + head * o.stride(2) + col * o.stride(3)] =
            F::cast_from(value);
        if col == 0 {
            lse[lse_at(lse, b, head, t)] = row_lse;
        }
    }
}
