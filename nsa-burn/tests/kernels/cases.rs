//! The parity cases: head layouts, sizes and block settings across every edge the
//! reference tests cover.

use nsa_burn::NsaAttentionConfig;

/// One parity case: head layout, sizes and block settings.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d_k: usize,
    pub d_v: usize,
    pub config: NsaAttentionConfig,
}

/// Small blocks so short sequences hit every branch: l = 8, d = 4, l' = 16, n = 4, w = 24.
pub fn small() -> NsaAttentionConfig {
    NsaAttentionConfig::new()
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(16)
        .with_n_selected(4)
        .with_window(24)
}

/// Batch 2, `d_k = 16`, `d_v = 8` (unequal head dims) with `config`.
fn small_case(seq: usize, heads: usize, kv_heads: usize, config: NsaAttentionConfig) -> Case {
    Case {
        batch: 2,
        seq,
        heads,
        kv_heads,
        d_k: 16,
        d_v: 8,
        config,
    }
}

/// Queries at an offset (a cache's prefill and decoding calls): the last `queries` of the
/// `keys.seq` positions, with the window branch given its last `window_rows` keys.
#[derive(Debug, Clone, Copy)]
pub struct OffsetCase {
    pub keys: Case,
    pub queries: usize,
    pub window_rows: usize,
}

/// Decoding steps (`T = 1`) at key lengths on and off every block edge and past them,
/// prefill chunks, window keys from the fewest the operator takes (`T + w - 1`) to all of
/// them, G in {2, 16}, `d_k != d_v`, batch 2, the paper's block sizes, fewer blocks than `n`
/// and a window of one token.
pub fn offset_cases() -> Vec<OffsetCase> {
    let decoding = |seq, heads, kv_heads, config: NsaAttentionConfig| OffsetCase {
        keys: small_case(seq, heads, kv_heads, config),
        queries: 1,
        window_rows: seq.min(config.window),
    };
    let mut cases: Vec<OffsetCase> = [2, 7, 8, 9, 16, 17, 24, 25, 100, 300]
        .into_iter()
        .map(|seq| decoding(seq, 4, 2, small()))
        .collect();
    let chunk = |queries, window_rows| OffsetCase {
        queries,
        window_rows,
        ..decoding(300, 4, 2, small())
    };
    cases.extend([chunk(37, 300), chunk(37, 60), chunk(299, 300)]);
    cases.push(OffsetCase {
        queries: 3,
        window_rows: 26,
        ..decoding(200, 16, 1, small())
    });
    cases.push(decoding(40, 4, 2, small().with_n_selected(8)));
    cases.push(OffsetCase {
        queries: 4,
        window_rows: 4,
        ..decoding(50, 4, 2, small().with_window(1))
    });
    let paper = OffsetCase {
        keys: Case {
            batch: 1,
            seq: 700,
            heads: 8,
            kv_heads: 2,
            d_k: 64,
            d_v: 128,
            config: NsaAttentionConfig::new().with_window(96),
        },
        queries: 1,
        window_rows: 96,
    };
    cases.extend([
        paper,
        OffsetCase {
            queries: 50,
            window_rows: 700,
            ..paper
        },
    ]);
    cases
}

pub fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    // G in {1, 2, 16}, d_k != d_v, batch 2, T across the block edges.
    for (heads, kv_heads) in [(2, 2), (4, 2), (16, 1)] {
        for seq in [1, 7, 8, 9, 100, 300] {
            cases.push(small_case(seq, heads, kv_heads, small()));
        }
    }
    // Fewer blocks than n, l = d = l', forced-block variants, the paper's block sizes and
    // head dims, G = 64.
    let base = Case {
        batch: 1,
        seq: 200,
        heads: 4,
        kv_heads: 1,
        d_k: 32,
        d_v: 32,
        config: small(),
    };
    cases.push(Case {
        seq: 40,
        config: small().with_n_selected(8),
        ..base
    });
    cases.push(Case {
        config: small().with_compress_block(16).with_compress_stride(16),
        ..base
    });
    cases.push(Case {
        config: small()
            .with_n_initial_blocks(2)
            .with_n_local_blocks(0)
            .with_n_selected(5),
        ..base
    });
    cases.push(Case {
        seq: 700,
        heads: 8,
        kv_heads: 2,
        d_k: 64,
        d_v: 128,
        config: NsaAttentionConfig::new().with_window(96),
        ..base
    });
    cases.push(Case {
        config: small().with_select_block(64),
        ..base
    });
    cases.push(Case {
        heads: 64,
        kv_heads: 1,
        d_k: 16,
        d_v: 16,
        seq: 70,
        ..base
    });
    // Head dims the tensor-core kernels take, at G = 1, 8 and 12: the compression
    // branch's scoring pass sums groups over lanes (G dividing 16) or over segments of
    // four rows spanning planes (G = 12).
    for (heads, kv_heads) in [(2, 2), (8, 1), (12, 1)] {
        cases.push(Case {
            heads,
            kv_heads,
            d_k: 32,
            d_v: 16,
            seq: 300,
            ..base
        });
    }
    // The widest head dims, d_k != d_v both ways (G = 4 and G = 16).
    cases.push(Case {
        seq: 150,
        d_k: 192,
        d_v: 256,
        ..base
    });
    cases.push(Case {
        seq: 150,
        heads: 16,
        d_k: 256,
        d_v: 192,
        ..base
    });
    // Large groups (G = 128 and 256) and many selected blocks (n = 64 of 69).
    cases.push(Case {
        seq: 100,
        heads: 128,
        kv_heads: 1,
        d_k: 16,
        d_v: 16,
        ..base
    });
    cases.push(Case {
        seq: 40,
        heads: 256,
        kv_heads: 1,
        d_k: 16,
        d_v: 16,
        ..base
    });
    cases.push(Case {
        seq: 1100,
        heads: 2,
        kv_heads: 1,
        d_k: 16,
        d_v: 16,
        config: small().with_n_selected(64),
        ..base
    });
    // A window far beyond the sequence (`u32::MAX`) is full causal attention: no index
    // arithmetic may wrap in 32 bits.
    cases.push(Case {
        config: small().with_window(u32::MAX as usize),
        ..base
    });
    // Batch 2 on tensor cores (head dims of 16s) with no key side split (T <= 2048): the
    // key-side kernel once took its split count from a stand-in buffer's shape and ran no
    // cube at batch 2.
    cases.push(Case {
        batch: 2,
        seq: 300,
        heads: 8,
        kv_heads: 2,
        d_k: 32,
        d_v: 32,
        config: small(),
    });
    cases
}

/// Cases for the tensor-core kernels' tiling alone, which the portable kernels (all that
/// wgpu runs) have no counterpart of; long, and slow on a CPU adapter. Run on CUDA after
/// [`cases`].
pub fn tensor_core_cases() -> Vec<Case> {
    let base = Case {
        batch: 1,
        seq: 1111,
        heads: 16,
        kv_heads: 1,
        d_k: 32,
        d_v: 16,
        config: NsaAttentionConfig::new(),
    };
    vec![
        // G = 16 on the paper's blocks, T not a multiple of the positions a tensor-core
        // selection cube holds: neighbouring positions share their forced blocks' tiles.
        base,
        // Long enough (T > 2048) that the tensor-core key-side backward splits the queries
        // of the compressed keys and of the initial selection block over several cubes.
        Case {
            batch: 2,
            seq: 4500,
            config: small(),
            ..base
        },
    ]
}

/// The cases whose gradients the wgpu test checks: [`cases`] less the head layouts at
/// T = 7, 8 and 100 (T = 1, 9 and 300 keep one position, a length off the blocks and
/// every branch in full) and the head dims of the tensor-core kernels at G = 1 and 8
/// (G = 12 stays), which the portable kernels run like the cases around them. A CPU
/// adapter compiles and runs each case slowly; CUDA checks the gradients of every case.
/// With `NSA_KERNEL_CASE` set, that case.
pub fn portable_gradient_cases() -> Vec<Case> {
    let all = selected_cases(Kernels::Portable);
    if std::env::var_os("NSA_KERNEL_CASE").is_some() {
        return all;
    }
    let layout_repeat = |c: &Case| c.d_k == 16 && c.d_v == 8 && [7, 8, 100].contains(&c.seq);
    let tensor_core_dims =
        |c: &Case| c.seq == 300 && c.d_k == 32 && c.d_v == 16 && [2, 8].contains(&c.heads);
    all.into_iter()
        .filter(|c| !layout_repeat(c) && !tensor_core_dims(c))
        .collect()
}

/// A key-side walk of thousands of steps: every compressed key and the first selection
/// block are seen by all 2560 positions of 64 query heads (163,840 query rows). Its loops
/// once passed llvmpipe's cap of 65,535 iterations per invocation, and lavapipe returned
/// wrong `dK`/`dV` without an error.
pub fn long_key_walk() -> Case {
    Case {
        batch: 1,
        seq: 2560,
        heads: 64,
        kv_heads: 1,
        d_k: 16,
        d_v: 16,
        config: small(),
    }
}

/// The tie cases of [`crate::forward::check_tied_selection`]: overlapping small blocks at
/// G = 4 (portable scoring everywhere) and G = 12 (tensor-core scoring over segments of
/// four rows), and with [`Kernels::All`] the paper's blocks at G = 16.
pub fn tied_cases(kernels: Kernels) -> Vec<Case> {
    let base = Case {
        batch: 2,
        seq: 300,
        heads: 4,
        kv_heads: 1,
        d_k: 16,
        d_v: 16,
        config: small(),
    };
    let mut cases = vec![
        base,
        Case {
            heads: 12,
            d_k: 32,
            ..base
        },
    ];
    if kernels == Kernels::All {
        cases.push(Case {
            seq: 1111,
            heads: 16,
            d_k: 32,
            config: NsaAttentionConfig::new(),
            ..base
        });
    }
    cases
}

/// Which kernels a test runs: wgpu runs the portable kernels only, CUDA both paths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kernels {
    /// [`cases`].
    Portable,
    /// [`cases`], then [`tensor_core_cases`].
    All,
}

/// The cases for `kernels`, or only case `i` of them when `NSA_KERNEL_CASE=i` is set (to
/// debug one).
pub fn selected_cases(kernels: Kernels) -> Vec<Case> {
    let mut cases = cases();
    if kernels == Kernels::All {
        cases.extend(tensor_core_cases());
    }
    match std::env::var("NSA_KERNEL_CASE") {
        Ok(index) => {
            let index: usize = index.parse().expect("NSA_KERNEL_CASE is a case index");
            vec![cases[index]]
        }
        Err(_) => cases,
    }
}
