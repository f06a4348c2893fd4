//! The sum of the key-side backward pass's split copies: the key rows every later query
//! may see are processed in several copies over disjoint query ranges, whose partial
//! `dK`/`dV` this kernel adds up in a fixed order.

use cubecl::prelude::*;

/// Adds up the split copies of [`grad_key_value_mma_kernel()`]:
/// `partial: [splits * B, split_keys, H_kv, d_k + d_v]` f32 -> the key rows
/// `0..split_keys` of `dk: [B, L, H_kv, d_k]` (times `scale`) and `dv: [B, L, H_kv, d_v]`,
/// one unit per output, copies summed in order (deterministic).
#[cube(launch, address_type = "dynamic")]
pub fn sum_key_splits_kernel<F: Float>(
    partial: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    #[comptime] d_k: usize,
    #[comptime] d_v: usize,
) {
    let batch = dk.shape(0);
    let split_keys = partial.shape(1);
    let kv_heads = partial.shape(2);
    let width = comptime!(d_k + d_v);
    let idx = ABSOLUTE_POS;
    if idx < batch * split_keys * kv_heads * width {
        let col = idx % width;
        let kv_head = (idx / width) % kv_heads;
        let key = (idx / (width * kv_heads)) % split_keys;
        let b = idx / (width * kv_heads * split_keys);
        let at = key * partial.stride(1) + kv_head * partial.stride(2) + col * partial.stride(3);
        let mut sum = 0.0f32;
        for split in 0..partial.shape(0) / batch {
            sum += partial[(split * batch + b) * partial.stride(0) + at];
        }
        if col < d_k {
            let out = b * dk.stride(0) + key * dk.stride(1) + kv_head * dk.stride(2);
            dk[out + col * dk.stride(3)] = F::cast_from(sum * scale);
        } else {
            let out = b * dv.stride(0) + key * dv.stride(1) + kv_head * dv.stride(2);
            dv[out + (col - d_k) * dv.stride(3)] = F::cast_from(sum);
        }
    }
}
