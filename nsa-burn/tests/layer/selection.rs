//! The selection rules: forced blocks, top-n by score, ties, padding, and queries that see
//! no compressed block.

use burn::tensor::Tensor;
use nsa_burn::{nsa_attention, NsaAttentionConfig};

use crate::{device, indices, normal, operator_input, B};

fn selection(
    config: &NsaAttentionConfig,
    seq: usize,
    boost: impl Fn(usize) -> f32,
) -> Vec<Vec<i64>> {
    let out = nsa_attention(operator_input(config, seq, boost), config);
    let (flat, [_, _, t, n]) = indices(out.selected_blocks);
    (0..t).map(|t| flat[t * n..(t + 1) * n].to_vec()).collect()
}

#[test]
fn forced_blocks_are_always_selected_and_top_scores_fill_the_rest() {
    // l = d = 4, l' = 8: compression block 2j and 2j+1 lie inside selection block j.
    let config = NsaAttentionConfig::new()
        .with_compress_block(4)
        .with_compress_stride(4)
        .with_select_block(8)
        .with_n_selected(5)
        .with_query_chunk(7);
    // Compression blocks of selection blocks 3 and 6 score far above all others, and block 3
    // above block 6.
    let picks = selection(&config, 96, |i| match i / 2 {
        3 => 20.0,
        6 => 10.0,
        _ => 0.0,
    });
    for (t, picked) in picks.iter().enumerate() {
        let own = (t / 8) as i64;
        let mut expected: Vec<i64> = vec![0];
        expected.extend((own - 1).max(1)..=own);
        // Blocks 3 and 6 once they are visible (their first compression block has ended)
        // and not already forced.
        for (block, first_cmp_end) in [(3i64, 3 * 8 + 3), (6, 6 * 8 + 3)] {
            if t >= first_cmp_end && !expected.contains(&block) {
                expected.push(block);
            }
        }
        expected.sort();
        let chosen: Vec<i64> = picked.iter().copied().filter(|&j| j >= 0).collect();
        // Any slot left over goes to a tied zero-boost block; only inclusion is checked.
        for block in &expected {
            assert!(
                chosen.contains(block),
                "t={t}: {block} missing from {chosen:?}"
            );
        }
        assert!(
            chosen.windows(2).all(|w| w[0] < w[1]),
            "t={t}: not ascending {picked:?}"
        );
        assert!(
            chosen.iter().all(|&j| j <= own),
            "t={t}: future block in {picked:?}"
        );
    }
}

#[test]
fn ties_break_toward_the_lower_block_index() {
    // All compressed keys equal: every visible selection block scores the same.
    let config = NsaAttentionConfig::new()
        .with_compress_block(4)
        .with_compress_stride(4)
        .with_select_block(4)
        .with_n_selected(4)
        .with_n_local_blocks(1)
        .with_query_chunk(16);
    let picks = selection(&config, 64, |_| 0.0);
    for (t, picked) in picks.iter().enumerate() {
        let own = (t / 4) as i64;
        let expected: Vec<i64> = if own < 4 {
            (0..=own).chain(std::iter::repeat(-1)).take(4).collect()
        } else {
            // Forced 0 and own, then the two lowest tied blocks 1 and 2.
            vec![0, 1, 2, own]
        };
        assert_eq!(picked, &expected, "t={t}");
    }
}

#[test]
fn fewer_blocks_than_n_takes_all_and_pads() {
    let config = NsaAttentionConfig::new()
        .with_compress_block(4)
        .with_compress_stride(2)
        .with_select_block(8)
        .with_n_selected(6)
        .with_query_chunk(5);
    let picks = selection(&config, 30, |i| i as f32);
    for (t, picked) in picks.iter().enumerate() {
        let own = (t / 8) as i64;
        let expected: Vec<i64> = (0..=own).chain(std::iter::repeat(-1)).take(6).collect();
        assert_eq!(picked, &expected, "t={t}");
    }
}

#[test]
fn queries_that_see_no_compressed_block_get_exactly_zero() {
    let config = NsaAttentionConfig::new()
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(8)
        .with_n_selected(3)
        .with_query_chunk(3);
    for seq in [1, 5, 7, 8, 20] {
        let mut input = operator_input(&config, seq, |i| i as f32);
        input.q = normal([1, seq, 2, 4]);
        // Only the compression branch.
        let gates = Tensor::<B, 1>::from_floats([1.0, 0.0, 0.0], &device());
        input.gates = gates.reshape([1, 1, 1, 3]).expand([1, seq, 2, 3]);
        let out = nsa_attention(input, &config).output;
        let flat: Vec<f64> = out.into_data().convert::<f64>().to_vec().unwrap();
        assert!(
            flat.iter().all(|x| x.is_finite()),
            "T={seq}: non-finite output"
        );
        for t in 0..seq {
            let row = &flat[t * 8..(t + 1) * 8];
            if t < 7 {
                assert!(
                    row.iter().all(|&x| x == 0.0),
                    "T={seq} t={t}: {row:?} should be 0"
                );
            } else {
                assert!(row.iter().any(|&x| x != 0.0), "T={seq} t={t}: sees block 0");
            }
        }
    }
}
