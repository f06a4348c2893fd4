//! Packed documents on Flex: the operator and the layer equal each document run alone, one
//! document equals the unpacked call, and bad boundaries are typed errors.

use burn::tensor::{DType, Int, Tensor, TensorData};
use nsa_burn::{
    nsa_attention, nsa_attention_packed, try_nsa_attention_packed, BranchKv, Documents,
    DocumentsError, NsaError,
};

use super::{device, normal, small_config, values, AD, B};
use crate::common::packed::{check_packed, PackedCase};

/// The cases of the list: lengths off every block size (`l = 8`, `d = 4`,
/// `l' = 16`, `w = 24`), documents shorter than `l`, one-token documents, two rows, G in
/// {1, 3, 16}, `d_k != d_v`.
pub fn packed_cases() -> Vec<PackedCase> {
    let config = small_config().attention_config();
    let base = PackedCase {
        rows: 1,
        seq: 128,
        lengths: vec![37, 5, 1, 24, 61],
        heads: 2,
        kv_heads: 2,
        d_k: 16,
        d_v: 8,
        config,
    };
    vec![
        base.clone(),
        PackedCase {
            rows: 2,
            seq: 100,
            lengths: vec![50, 1, 49, 7, 93],
            heads: 6,
            kv_heads: 2,
            ..base.clone()
        },
        PackedCase {
            seq: 90,
            lengths: vec![1, 1, 17, 33, 1, 2, 35],
            heads: 16,
            kv_heads: 1,
            d_k: 32,
            d_v: 16,
            ..base
        },
    ]
}

/// `count` documents of 1 to 6 positions, in a row of their total length.
pub fn many_short_documents(count: usize) -> PackedCase {
    let lengths: Vec<usize> = (0..count).map(|i| 1 + (i * 7) % 6).collect();
    PackedCase {
        rows: 1,
        seq: lengths.iter().sum(),
        lengths,
        heads: 3,
        kv_heads: 1,
        d_k: 8,
        d_v: 4,
        config: small_config().attention_config(),
    }
}

#[test]
fn packed_documents_equal_each_document_alone() {
    for case in packed_cases() {
        check_packed::<AD>(&case, DType::F32, &device());
    }
}

#[test]
fn hundreds_of_short_documents_equal_each_alone() {
    check_packed::<AD>(&many_short_documents(200), DType::F32, &device());
}

/// One document per row is the unpacked call, bit for bit.
#[test]
fn one_document_per_row_is_the_unpacked_call() {
    let config = small_config().attention_config();
    let (batch, seq) = (2, 45);
    let kv = || BranchKv {
        k: normal([batch, seq, 2, 16]),
        v: normal([batch, seq, 2, 8]),
    };
    let blocks = config.num_compressed_blocks(seq);
    let compressed = BranchKv {
        k: normal([batch, blocks, 2, 16]),
        v: normal([batch, blocks, 2, 8]),
    };
    let input = nsa_burn::NsaInput {
        q: normal([batch, seq, 4, 16]),
        compressed: Some(compressed.clone()),
        selected: kv(),
        window: kv(),
        gates: normal([batch, seq, 4, 3]),
    };
    let unpacked = nsa_attention(input.clone(), &config);
    // Packed compressed keys are one row: the rows' blocks one after another.
    let flat = |t: Tensor<B, 4>| {
        let [b, n, h, d] = t.dims();
        t.reshape([1, b * n, h, d])
    };
    let packed_input = nsa_burn::NsaInput {
        compressed: Some(BranchKv {
            k: flat(compressed.k),
            v: flat(compressed.v),
        }),
        ..input
    };
    let packed = nsa_attention_packed(packed_input, &Documents::rows(batch, seq), &config);
    assert_eq!(
        packed.output.into_data().to_vec::<f32>().unwrap(),
        unpacked.output.into_data().to_vec::<f32>().unwrap()
    );
    let ints = |t: Tensor<B, 4, Int>| t.into_data().convert::<i64>().to_vec::<i64>().unwrap();
    assert_eq!(ints(packed.selected_blocks), ints(unpacked.selected_blocks));
}

/// The layer over packed documents equals the layer on each document alone.
#[test]
fn layer_packed_equals_each_document_alone() {
    let layer = small_config().init::<B>(&device());
    // Rows of 36: documents of 3 and 33, then 9 and 27.
    let seq = 36;
    let x = normal([2, seq, 24]);
    let documents = Documents::try_new(&[0, 3, 36, 45, 72], 2, seq).unwrap();
    let packed = layer.forward_packed(x.clone(), &documents);
    let flat = x.reshape([1, 2 * seq, 24]);
    let alone: Vec<Tensor<B, 3>> = documents
        .ranges()
        .map(|range| layer.forward(flat.clone().slice_dim(1, range)))
        .collect();
    let alone = Tensor::cat(alone, 1).reshape([2, seq, 24]);
    let (got, want) = (values(packed), values(alone));
    let error = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(error < 1e-5, "packed layer differs from alone by {error}");
}

#[test]
fn bad_boundaries_are_typed_errors() {
    let check = |bounds: &[i64], batch, seq, want: DocumentsError| {
        assert_eq!(
            Documents::try_new(bounds, batch, seq),
            Err(want),
            "{bounds:?}"
        );
    };
    check(&[0], 1, 4, DocumentsError::TooFew { len: 1 });
    check(&[1, 4], 1, 4, DocumentsError::FirstNotZero { first: 1 });
    check(
        &[0, 3, 3, 4],
        1,
        4,
        DocumentsError::NotIncreasing {
            index: 2,
            previous: 3,
            value: 3,
        },
    );
    check(
        &[0, 5, 3],
        1,
        8,
        DocumentsError::NotIncreasing {
            index: 2,
            previous: 5,
            value: 3,
        },
    );
    check(
        &[0, 3, 7],
        1,
        8,
        DocumentsError::LastNotTotal { last: 7, total: 8 },
    );
    check(
        &[0, 6, 8],
        2,
        4,
        DocumentsError::CrossesRow { row_start: 4 },
    );
    // Boundaries checked for one row of 8 do not serve two rows of 4.
    let one_row = Documents::try_new(&[0, 6, 8], 1, 8).unwrap();
    assert_eq!(
        one_row.check_rows(2, 4),
        Err(DocumentsError::CrossesRow { row_start: 4 })
    );
    let floats = TensorData::new(vec![0.0f32, 4.0], [2]);
    assert_eq!(
        Documents::try_from_data(floats, 1, 4),
        Err(DocumentsError::NotInteger { dtype: DType::F32 })
    );
    let matrix = TensorData::new(vec![0i64, 4], [1, 2]);
    assert_eq!(
        Documents::try_from_data(matrix, 1, 4),
        Err(DocumentsError::NotOneDimensional { shape: vec![1, 2] })
    );
    let tensor = Tensor::<B, 1, Int>::from_ints([0, 2, 4], &device());
    assert!(Documents::try_from_tensor(tensor, 1, 4).is_ok());
}

/// Boundaries that do not cover the input, and packed compressed keys of the wrong length,
/// are typed errors of the operator.
#[test]
fn packed_operator_checks_its_inputs() {
    let config = small_config().attention_config();
    let seq = 20;
    let kv = |len| BranchKv {
        k: normal([1, len, 1, 4]),
        v: normal([1, len, 1, 4]),
    };
    let input = |blocks| nsa_burn::NsaInput {
        q: normal([1, seq, 2, 4]),
        compressed: Some(kv(blocks)),
        selected: kv(seq),
        window: kv(seq),
        gates: normal([1, seq, 2, 3]),
    };
    // Two documents of 10: two compression blocks each (l = 8, d = 4).
    let documents = Documents::try_new(&[0, 10, 20], 1, seq).unwrap();
    assert_eq!(documents.num_compressed_blocks(&config), 2);
    assert!(try_nsa_attention_packed(input(2), &documents, &config).is_ok());
    match try_nsa_attention_packed(input(4), &documents, &config) {
        Err(NsaError::Shape(error)) => assert_eq!(error.tensor, "compressed.k"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    // Packed queries cover whole rows: keys of another length are a shape error, not an
    // offset.
    let longer_keys = nsa_burn::NsaInput {
        window: kv(seq + 4),
        ..input(2)
    };
    match try_nsa_attention_packed(longer_keys, &documents, &config) {
        Err(NsaError::Shape(error)) => assert_eq!(error.tensor, "window.k"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    let short = Documents::try_new(&[0, 10], 1, 10).unwrap();
    assert_eq!(
        try_nsa_attention_packed(input(2), &short, &config).err(),
        Some(NsaError::Documents(DocumentsError::LastNotTotal {
            last: 10,
            total: 20
        }))
    );
}
