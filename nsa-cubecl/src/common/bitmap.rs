//! The selection inverted for the key-side backward pass: which positions chose each
//! selection block, as a bitmap.
//!
//! The key-side kernel of the selection branch needs, for its key block, the positions whose
//! group selected it. Reading every later position's `n` indices per key tile costs `n` loads
//! per position; the bitmap answers with one bit. It is built without atomics: each unit
//! owns one word column (32 positions) of every block's row.

use cubecl::prelude::*;

use crate::common::keys::index_min;

/// Positions per bitmap word.
pub const WORD_BITS: usize = 32;

/// `selected: [B, H_kv, T, n]` (block indices, -1 for an empty slot) ->
/// `bitmap: [B, H_kv, n_blocks, ceil(T / 32)]` (`I`, read as 32 bits): bit `t % 32` of word
/// `t / 32` of block `j`'s row is set iff position `t`'s group selected block `j`. One unit
/// per `(b, KV head, word)`: it clears its word of every block's row, then sets the bits of
/// its 32 positions; no two units write the same word.
#[cube(launch, address_type = "dynamic")]
pub fn selection_bitmap_kernel<I: Int>(selected: &Tensor<I>, bitmap: &mut Tensor<I>) {
    let words = bitmap.shape(3);
    let kv_heads = bitmap.shape(1);
    let unit = ABSOLUTE_POS;
    if unit < bitmap.shape(0) * kv_heads * words {
        let word = unit % words;
        let head = (unit / words) % kv_heads;
        let b = unit / (words * kv_heads);
        let column = b * bitmap.stride(0) + head * bitmap.stride(1) + word * bitmap.stride(3);
        for block in 0..bitmap.shape(2) {
            bitmap[column + block * bitmap.stride(2)] = I::cast_from(0u32);
        }
        let first = word * WORD_BITS;
        let last = index_min(first + WORD_BITS, selected.shape(2));
        let slots = b * selected.stride(0) + head * selected.stride(1);
        for t in first..last {
            let bit = 1u32 << u32::cast_from(t - first);
            for slot in 0..selected.shape(3) {
                let index = i32::cast_from(
                    selected[slots + t * selected.stride(2) + slot * selected.stride(3)],
                );
                if index >= 0 {
                    let at = column + usize::cast_from(index) * bitmap.stride(2);
                    bitmap[at] = I::cast_from(u32::cast_from(bitmap[at]) | bit);
                }
            }
        }
    }
}

/// Whether position `t`'s group selected block `block`: bit `t % 32` of word `t / 32` of
/// the block's row of `bitmap` (`column` is the offset of `bitmap[b, kv_head, 0, 0]`).
#[cube]
pub fn bitmap_selects<I: Int>(bitmap: &Tensor<I>, column: usize, t: usize, block: usize) -> bool {
    let word = u32::cast_from(
        bitmap[column + block * bitmap.stride(2) + (t / WORD_BITS) * bitmap.stride(3)],
    );
    (word >> u32::cast_from(t % WORD_BITS)) & 1u32 == 1u32
}
