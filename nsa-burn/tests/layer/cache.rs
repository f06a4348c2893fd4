//! The cache on Flex: prefill in chunks and token-by-token decoding equal the full forward,
//! queries at an offset equal the last rows of the full operator call, and every misuse of
//! the cache is a typed error that leaves it unchanged.

use burn::tensor::Tensor;
use nsa_burn::{
    nsa_attention, reference, try_nsa_attention, BranchKv, NsaCacheConfig, NsaCacheError, NsaError,
    NsaInput,
};

use super::{device, indices, normal, small_config, values, B};
use crate::common::cache::{cache_cases, check_cached};

#[test]
fn cached_prefill_and_decoding_equal_the_full_forward() {
    for case in cache_cases(&[1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 24, 25, 40], 9) {
        check_cached::<B>(&case, &device(), 1e-5);
    }
}

/// Queries at an offset (`T < T_k`, with the window keys cut to what they reach) give the
/// last rows of the self-attention call over all `T_k` positions.
#[test]
fn queries_at_an_offset_equal_the_last_rows_of_the_full_call() {
    let config = small_config().attention_config();
    let (heads, kv_heads, d_k, d_v) = (4, 2, 8, 6);
    for (key_len, seq) in [(40, 1), (40, 7), (100, 33), (7, 2), (64, 63)] {
        let blocks = config.num_compressed_blocks(key_len);
        let kv = |len| BranchKv {
            k: normal([2, len, kv_heads, d_k]),
            v: normal([2, len, kv_heads, d_v]),
        };
        let full = NsaInput {
            q: normal([2, key_len, heads, d_k]),
            compressed: (blocks > 0).then(|| kv(blocks)),
            selected: kv(key_len),
            window: kv(key_len),
            gates: normal([2, key_len, heads, 3]),
        };
        let start = key_len - seq;
        let reach = key_len.min(seq + config.window - 1);
        let last = |t: Tensor<B, 4>, len: usize| t.clone().narrow(1, t.dims()[1] - len, len);
        let offset = NsaInput {
            q: last(full.q.clone(), seq),
            window: BranchKv {
                k: last(full.window.k.clone(), reach),
                v: last(full.window.v.clone(), reach),
            },
            gates: last(full.gates.clone(), seq),
            ..full.clone()
        };
        let expected = nsa_attention(full, &config);
        let actual = nsa_attention(offset, &config);
        let flat = |t: Tensor<B, 4>| values(t.flatten(2, 3));
        let difference: f64 = flat(expected.output.narrow(1, start, seq))
            .iter()
            .zip(flat(actual.output))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            difference < 1e-5,
            "T_k = {key_len}, T = {seq}: outputs differ by {difference}"
        );
        assert_eq!(
            indices(expected.selected_blocks.narrow(2, start, seq)),
            indices(actual.selected_blocks),
            "T_k = {key_len}, T = {seq}: selections differ"
        );
    }
}

#[test]
fn offset_inputs_with_wrong_lengths_are_shape_errors() {
    let config = small_config().attention_config();
    let kv = |len| BranchKv {
        k: normal([1, len, 1, 4]),
        v: normal([1, len, 1, 4]),
    };
    let input = |seq, key_len, window_len| NsaInput::<B> {
        q: normal([1, seq, 2, 4]),
        compressed: Some(kv(config.num_compressed_blocks(key_len))),
        selected: kv(key_len),
        window: kv(window_len),
        gates: normal([1, seq, 2, 3]),
    };
    let tensor_of = |result: Result<_, NsaError>| match result {
        Err(NsaError::Shape(error)) => error.tensor,
        other => panic!(
            "expected a shape error, got {:?}",
            other.map(|_: nsa_burn::NsaOutput<B>| ())
        ),
    };
    // The operator and the reference operator check alike.
    let operators: [fn(NsaInput<B>, &_) -> Result<_, NsaError>; 2] =
        [try_nsa_attention, reference::operator];
    for operator in operators {
        // More queries than keys.
        assert_eq!(tensor_of(operator(input(50, 40, 40), &config)), "q");
        // The window keys must reach the first query's window (w = 24: 3 + 23 = 26 keys)
        // ...
        assert_eq!(tensor_of(operator(input(3, 40, 25), &config)), "window.v");
        // ... and cannot be longer than the sequence.
        assert_eq!(tensor_of(operator(input(3, 40, 41), &config)), "window.v");
        assert!(operator(input(3, 40, 26), &config).is_ok());
    }
}

/// Capacity, sequence numbers, row counts and the layer are checked before anything
/// changes; a released sequence starts afresh.
#[test]
fn cache_misuse_is_a_typed_error_and_changes_nothing() {
    let layer = small_config().init::<B>(&device());
    let mut cache = layer.cache(&NsaCacheConfig::new(2, 3), &device());
    let x = |rows, len| normal([rows, len, 24]);
    let error = |result: Result<_, NsaError>| match result {
        Err(NsaError::Cache(error)) => error,
        other => panic!(
            "expected a cache error, got {:?}",
            other.map(|_: nsa_burn::NsaForward<B>| ())
        ),
    };

    layer.forward_cached(x(1, 20), &mut cache, &[0]);
    assert_eq!(cache.free_pages(), 1);
    // 20 + 30 tokens need 4 pages, 2 more than sequence 0 holds.
    assert_eq!(
        error(layer.try_forward_cached(x(1, 30), &mut cache, &[0])),
        NsaCacheError::OutOfPages { needed: 2, free: 1 }
    );
    assert_eq!(cache.len(0), Ok(20));
    assert_eq!(
        error(layer.try_forward_cached(x(1, 1), &mut cache, &[2])),
        NsaCacheError::UnknownSequence {
            sequence: 2,
            max_sequences: 2
        }
    );
    assert_eq!(
        error(layer.try_forward_cached(x(2, 1), &mut cache, &[1, 1])),
        NsaCacheError::RepeatedSequence { sequence: 1 }
    );
    assert_eq!(
        error(layer.try_forward_cached(x(2, 1), &mut cache, &[1])),
        NsaCacheError::RowsMismatch {
            rows: 2,
            sequences: 1
        }
    );
    let other = small_config().with_select_block(32).init::<B>(&device());
    assert_eq!(
        error(other.try_forward_cached(x(1, 1), &mut cache, &[1])),
        NsaCacheError::WrongLayer {
            field: "select_block",
            layer: 32,
            cache: 16
        }
    );
    assert_eq!((cache.len(0), cache.len(1)), (Ok(20), Ok(0)));
    assert_eq!(cache.free_pages(), 1);

    // Released, sequence 0 gives back its pages and starts again at position 0.
    cache.release(0).unwrap();
    assert_eq!((cache.len(0), cache.free_pages()), (Ok(0), 3));
    let fresh = x(1, 5);
    let cached = layer.forward_cached(fresh.clone(), &mut cache, &[0]);
    let full = layer.forward(fresh);
    assert_eq!(values(cached), values(full));
}
