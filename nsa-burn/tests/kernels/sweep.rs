//! A randomized sweep: valid configurations drawn from a seed (printed, and taken from
//! `NSA_SWEEP_SEED` to rerun one sweep), each checked forward (outputs, selected blocks) and
//! backward (every gradient) against the reference on fresh random inputs.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use nsa_burn::{NsaAttentionConfig, NsaBackend};

use crate::cases::Case;
use crate::forward::check_case;
use crate::gradients::check_gradients;

/// SplitMix64: a small, well-mixed generator, enough to draw configurations.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    fn range(&mut self, low: usize, high: usize) -> usize {
        low + (self.next() % (high - low + 1) as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() - 1)]
    }
}

/// How large the drawn cases may be.
#[derive(Debug, Clone, Copy)]
pub struct SweepLimits {
    /// Longest sequence.
    pub max_seq: usize,
    /// Most query heads.
    pub max_heads: usize,
    /// Largest batch.
    pub max_batch: usize,
}

/// One random valid case: `d | l`, `d | l'`, `l <= l'`, forced blocks within `n`, `G`
/// dividing `H`, head dims that the tensor-core kernels take and ones they do not.
fn draw_case(draw: &mut Draw, limits: SweepLimits) -> Case {
    let stride = draw.pick(&[1, 2, 4, 8, 16]);
    let compress_block = stride * draw.pick(&[1, 2, 4]);
    let select_block = compress_block * draw.pick(&[1, 2, 4]);
    let n_selected = draw.range(1, 20);
    let n_initial_blocks = draw.range(0, n_selected.min(2));
    let n_local_blocks = draw.range(0, (n_selected - n_initial_blocks).min(3));
    let seq = draw.range(1, limits.max_seq);
    let kv_heads = draw.pick(&[1, 2, 4]);
    let groups: Vec<usize> = [1, 2, 3, 4, 8, 12, 16, 64]
        .into_iter()
        .filter(|group| kv_heads * group <= limits.max_heads)
        .collect();
    let heads = kv_heads * draw.pick(&groups);
    let dims = [8, 16, 24, 32, 64, 128];
    let config = NsaAttentionConfig::new()
        .with_compress_block(compress_block)
        .with_compress_stride(stride)
        .with_select_block(select_block)
        .with_n_selected(n_selected)
        .with_n_initial_blocks(n_initial_blocks)
        .with_n_local_blocks(n_local_blocks)
        .with_window(draw.range(1, limits.max_seq + 64));
    Case {
        batch: draw.range(1, limits.max_batch),
        seq,
        heads,
        kv_heads,
        d_k: draw.pick(&dims),
        d_v: draw.pick(&dims),
        config,
    }
}

/// The sweep's seed: `NSA_SWEEP_SEED`, else drawn from the clock.
fn seed() -> u64 {
    match std::env::var("NSA_SWEEP_SEED") {
        Ok(seed) => seed.parse().expect("NSA_SWEEP_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_nanos() as u64,
    }
}

/// Checks `cases` random cases (`NSA_SWEEP_CASES` overrides it) on `B` in each of `dtypes`,
/// forward and backward. The seed is printed first, and a failing case's panic names it.
pub fn sweep<B: AutodiffBackend + NsaBackend>(
    cases: usize,
    limits: SweepLimits,
    dtypes: &[DType],
    device: &B::Device,
) {
    let seed = seed();
    let cases = std::env::var("NSA_SWEEP_CASES")
        .map(|n| n.parse().expect("NSA_SWEEP_CASES is a count"))
        .unwrap_or(cases);
    println!("sweep: seed {seed} (NSA_SWEEP_SEED={seed} reruns it), {cases} cases");
    let mut draw = Draw(seed);
    for index in 0..cases {
        let case = draw_case(&mut draw, limits);
        println!("case {index}: {case:?}");
        for &dtype in dtypes {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check_case::<B>(&case, dtype, device);
                check_gradients::<B>(&case, dtype, device);
            }));
            if let Err(panic) = run {
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("sweep seed {seed}, case {index} ({case:?}, {dtype:?}) failed: {text}");
            }
        }
    }
    println!("sweep: seed {seed}, {cases} cases x {dtypes:?} passed");
}
