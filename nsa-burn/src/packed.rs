//! Packed sequences: several documents in one row, each attended to as if it were alone.
//!
//! Long-context training packs documents of different lengths into one row instead of
//! padding them. [`Documents`] holds the boundaries as cumulative lengths (`cu_seqlens`:
//! `[0, T_0, T_0 + T_1, ..., total]`), and [`nsa_attention_packed`] runs the operator so
//! that compression blocks, selection blocks, the forced initial and local blocks and the
//! window all restart at each document's first position.
//!
//! A batch of packed rows `[B, T, ...]` is one sequence of `B * T` positions whose
//! boundaries include every row start (`0, T, 2T, ...`): documents never cross rows.

use core::fmt;
use core::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::{
    try_nsa_attention, BranchKv, NsaAttentionConfig, NsaBackend, NsaError, NsaInput, NsaOutput,
    NsaShapeError,
};

/// Boundaries that break a rule of [`Documents`]: each variant names the rule.
#[derive(Debug, Clone, PartialEq)]
pub enum DocumentsError {
    /// Fewer than two boundaries: even one document needs `[0, total]`.
    TooFew {
        /// How many boundaries were given.
        len: usize,
    },
    /// The first boundary is not 0.
    FirstNotZero {
        /// The first boundary given.
        first: i64,
    },
    /// A boundary is not greater than the one before it: every document holds at least one
    /// position.
    NotIncreasing {
        /// Index of the offending boundary.
        index: usize,
        /// The boundary before it.
        previous: i64,
        /// The offending boundary.
        value: i64,
    },
    /// The last boundary is not the number of positions.
    LastNotTotal {
        /// The last boundary given.
        last: i64,
        /// The number of positions, `B * T`.
        total: usize,
    },
    /// A row start (a multiple of `T` in a batch of `B` rows) is not a boundary: a document
    /// would cross two rows.
    CrossesRow {
        /// The row start missing from the boundaries.
        row_start: usize,
    },
    /// The boundaries are not integers.
    NotInteger {
        /// Their dtype.
        dtype: DType,
    },
    /// The boundaries tensor is not one-dimensional.
    NotOneDimensional {
        /// Its shape.
        shape: Vec<usize>,
    },
}

impl fmt::Display for DocumentsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document boundaries (`cu_seqlens`): ")?;
        match self {
            Self::TooFew { len } => {
                write!(f, "{len} given, at least two (`[0, total]`) required")
            }
            Self::FirstNotZero { first } => write!(f, "the first is {first}, it must be 0"),
            Self::NotIncreasing {
                index,
                previous,
                value,
            } => write!(
                f,
                "entry {index} is {value}, not greater than the entry before it ({previous}): \
                 boundaries must strictly increase"
            ),
            Self::LastNotTotal { last, total } => write!(
                f,
                "the last is {last}, it must be the number of positions B * T = {total}"
            ),
            Self::CrossesRow { row_start } => write!(
                f,
                "the row start {row_start} is not a boundary: documents cannot cross rows"
            ),
            Self::NotInteger { dtype } => {
                write!(f, "they are {dtype:?}, they must be an integer tensor")
            }
            Self::NotOneDimensional { shape } => {
                write!(f, "shape {shape:?}, they must be one-dimensional")
            }
        }
    }
}

impl std::error::Error for DocumentsError {}

/// Document boundaries of packed rows, checked: cumulative lengths starting at 0, strictly
/// increasing, ending at the number of positions, with every row start among them.
///
/// ```
/// use nsa_burn::Documents;
/// // Three documents of 5, 2 and 9 positions in one row of 16.
/// let documents = Documents::try_new(&[0, 5, 7, 16], 1, 16).unwrap();
/// assert_eq!(documents.lengths().collect::<Vec<_>>(), [5, 2, 9]);
/// // Two rows of 8: one document in the first, two in the second.
/// assert!(Documents::try_new(&[0, 8, 12, 16], 2, 8).is_ok());
/// assert!(Documents::try_new(&[0, 12, 16], 2, 8).is_err()); // crosses the row start 8
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Documents {
    bounds: Vec<usize>,
}

impl Documents {
    /// Checks `cu_seqlens` for `batch` packed rows of `seq` positions each.
    pub fn try_new(cu_seqlens: &[i64], batch: usize, seq: usize) -> Result<Self, DocumentsError> {
        let first = match cu_seqlens {
            [first, _, ..] => *first,
            _ => {
                return Err(DocumentsError::TooFew {
                    len: cu_seqlens.len(),
                })
            }
        };
        if first != 0 {
            return Err(DocumentsError::FirstNotZero { first });
        }
        for (index, pair) in cu_seqlens.windows(2).enumerate() {
            if pair[1] <= pair[0] {
                return Err(DocumentsError::NotIncreasing {
                    index: index + 1,
                    previous: pair[0],
                    value: pair[1],
                });
            }
        }
        // From 0 and strictly increasing, every boundary is positive.
        let documents = Self {
            bounds: cu_seqlens.iter().map(|&b| b as usize).collect(),
        };
        documents.check_rows(batch, seq)?;
        Ok(documents)
    }

    /// Checks that the boundaries cover `batch` rows of `seq` positions with every row start
    /// among them.
    pub fn check_rows(&self, batch: usize, seq: usize) -> Result<(), DocumentsError> {
        if self.total() != batch * seq {
            return Err(DocumentsError::LastNotTotal {
                last: self.total() as i64,
                total: batch * seq,
            });
        }
        match (1..batch)
            .map(|row| row * seq)
            .find(|row_start| self.bounds.binary_search(row_start).is_err())
        {
            Some(row_start) => Err(DocumentsError::CrossesRow { row_start }),
            None => Ok(()),
        }
    }

    /// Checks documents of `lengths` positions, one after another, for `batch` packed rows
    /// of `seq` positions each: the boundaries are their cumulative sums.
    pub fn try_from_lengths(
        lengths: &[usize],
        batch: usize,
        seq: usize,
    ) -> Result<Self, DocumentsError> {
        let bounds: Vec<i64> = std::iter::once(0)
            .chain(lengths.iter().scan(0i64, |end, &len| {
                *end += len as i64;
                Some(*end)
            }))
            .collect();
        Self::try_new(&bounds, batch, seq)
    }

    /// Checks boundaries held in a tensor's data (any integer dtype, one dimension).
    pub fn try_from_data(
        data: TensorData,
        batch: usize,
        seq: usize,
    ) -> Result<Self, DocumentsError> {
        if data.shape.len() != 1 {
            return Err(DocumentsError::NotOneDimensional {
                shape: data.shape.to_vec(),
            });
        }
        if !matches!(
            data.dtype,
            DType::I64
                | DType::I32
                | DType::I16
                | DType::I8
                | DType::U64
                | DType::U32
                | DType::U16
                | DType::U8
        ) {
            return Err(DocumentsError::NotInteger { dtype: data.dtype });
        }
        let bounds = data
            .convert::<i64>()
            .into_vec::<i64>()
            .map_err(|_| DocumentsError::NotInteger { dtype: DType::I64 })?;
        Self::try_new(&bounds, batch, seq)
    }

    /// Checks boundaries held in an Int tensor `[N_docs + 1]`; reads them back to the host.
    pub fn try_from_tensor<B: Backend>(
        cu_seqlens: Tensor<B, 1, Int>,
        batch: usize,
        seq: usize,
    ) -> Result<Self, DocumentsError> {
        Self::try_from_data(cu_seqlens.into_data(), batch, seq)
    }

    /// One document per row: the boundaries of an unpacked batch.
    pub fn rows(batch: usize, seq: usize) -> Self {
        Self {
            bounds: (0..=batch).map(|row| row * seq).collect(),
        }
    }

    /// The boundaries, `[0, ..., total]`.
    pub fn bounds(&self) -> &[usize] {
        &self.bounds
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Always false: there is at least one document.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of positions, `B * T`.
    pub fn total(&self) -> usize {
        self.bounds[self.bounds.len() - 1]
    }

    /// Each document's positions in the flattened rows.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.bounds.windows(2).map(|pair| pair[0]..pair[1])
    }

    /// Each document's length.
    pub fn lengths(&self) -> impl Iterator<Item = usize> + '_ {
        self.ranges().map(|range| range.len())
    }

    /// Each document's compression blocks in the packed compressed keys: document `i` owns
    /// `config.num_compressed_blocks(T_i)` consecutive rows (an empty range when `T_i < l`).
    pub fn compressed_ranges(&self, config: &NsaAttentionConfig) -> Vec<Range<usize>> {
        let mut start = 0;
        self.lengths()
            .map(|len| {
                let end = start + config.num_compressed_blocks(len);
                let range = start..end;
                start = end;
                range
            })
            .collect()
    }

    /// Number of packed compression blocks, the sum over documents.
    pub fn num_compressed_blocks(&self, config: &NsaAttentionConfig) -> usize {
        self.compressed_ranges(config)
            .last()
            .map_or(0, |range| range.end)
    }
}

impl From<DocumentsError> for NsaError {
    fn from(error: DocumentsError) -> Self {
        Self::Documents(error)
    }
}

/// [`crate::nsa_attention`] over packed documents: each document of `documents` is attended
/// to as if it were alone (its own compression and selection blocks, forced blocks and
/// window, all counted from its first position).
///
/// Shapes, with `B` packed rows of `T` positions and `documents` over their `B * T`
/// positions: `q: [B, T, H, d_k]`; `selected`, `window: [B, T, H_kv, d_k | d_v]`;
/// `gates: [B, T, H, 3]`; `compressed: [1, N_cmp, H_kv, d_k | d_v]`, the compressed keys of
/// every document one after another (`N_cmp = documents.num_compressed_blocks(config)`,
/// `None` when it is 0) -> `output: [B, T, H, d_v]`, `selected_blocks: [B, H_kv, T, n]`
/// with block indices counted from the start of each position's document.
///
/// Each backend runs the operator document by document today (a launch sequence per
/// document): exact, and cheap for documents of a few thousand positions or more.
///
/// # Panics
///
/// Where [`try_nsa_attention_packed`] returns an error, with its message.
pub fn nsa_attention_packed<B: NsaBackend>(
    input: NsaInput<B>,
    documents: &Documents,
    config: &NsaAttentionConfig,
) -> NsaOutput<B> {
    try_nsa_attention_packed(input, documents, config).unwrap_or_else(|error| panic!("{error}"))
}

/// [`nsa_attention_packed`] returning a typed error ([`NsaError`]): the errors of
/// [`try_nsa_attention`], documents that do not cover the `B` rows of `T` positions or
/// cross a row ([`NsaError::Documents`]), or packed compressed keys of the wrong length.
pub fn try_nsa_attention_packed<B: NsaBackend>(
    input: NsaInput<B>,
    documents: &Documents,
    config: &NsaAttentionConfig,
) -> Result<NsaOutput<B>, NsaError> {
    config.validate()?;
    let [batch, seq, heads, _] = input.q.dims();
    documents.check_rows(batch, seq)?;
    check_packed_rows(&input)?;
    let num_compressed = documents.num_compressed_blocks(config);
    check_packed_compressed(&input, num_compressed)?;
    let rows = |t: Tensor<B, 4>| {
        let [_, _, n, d] = t.dims();
        t.reshape([1, batch * seq, n, d])
    };
    let q = rows(input.q);
    let selected = BranchKv {
        k: rows(input.selected.k),
        v: rows(input.selected.v),
    };
    let window = BranchKv {
        k: rows(input.window.k),
        v: rows(input.window.v),
    };
    let gates = rows(input.gates);
    let mut outputs = Vec::with_capacity(documents.len());
    let mut blocks = Vec::with_capacity(documents.len());
    for (range, compressed_range) in documents.ranges().zip(documents.compressed_ranges(config)) {
        let part = |t: &Tensor<B, 4>, range: &Range<usize>| t.clone().slice_dim(1, range.clone());
        let compressed = match (&input.compressed, compressed_range.is_empty()) {
            (Some(kv), false) => Some(BranchKv {
                k: part(&kv.k, &compressed_range),
                v: part(&kv.v, &compressed_range),
            }),
            _ => None,
        };
        let document = try_nsa_attention(
            NsaInput {
                q: part(&q, &range),
                compressed,
                selected: BranchKv {
                    k: part(&selected.k, &range),
                    v: part(&selected.v, &range),
                },
                window: BranchKv {
                    k: part(&window.k, &range),
                    v: part(&window.v, &range),
                },
                gates: part(&gates, &range),
            },
            config,
        )?;
        outputs.push(document.output);
        blocks.push(document.selected_blocks);
    }
    let d_v = outputs[0].dims()[3];
    let kv_heads = blocks[0].dims()[1];
    let output = Tensor::cat(outputs, 1).reshape([batch, seq, heads, d_v]);
    let selected_blocks = Tensor::cat(blocks, 2)
        .reshape([kv_heads, batch, seq, config.n_selected])
        .swap_dims(0, 1);
    Ok(NsaOutput {
        output,
        selected_blocks,
    })
}

/// Every position-wise input covers the rows and positions of `q`: packed documents take
/// queries over whole rows, not at an offset into longer keys.
fn check_packed_rows<B: Backend>(input: &NsaInput<B>) -> Result<(), NsaShapeError> {
    let [batch, seq, _, _] = input.q.dims();
    let tensors = [
        ("selected.k", &input.selected.k),
        ("selected.v", &input.selected.v),
        ("window.k", &input.window.k),
        ("window.v", &input.window.v),
        ("gates", &input.gates),
    ];
    match tensors
        .into_iter()
        .find(|(_, tensor)| tensor.dims()[..2] != [batch, seq])
    {
        None => Ok(()),
        Some((name, tensor)) => Err(NsaShapeError {
            tensor: name,
            actual: tensor.dims().to_vec(),
            expected: format!(
                "[B, T, ..] with [B, T] = [{batch}, {seq}] from `q`: packed documents take queries over whole rows"
            ),
        }),
    }
}

/// The packed compressed keys and values hold `num_compressed` rows (or are `None` when
/// that is 0); the per-document calls check the rest.
fn check_packed_compressed<B: Backend>(
    input: &NsaInput<B>,
    num_compressed: usize,
) -> Result<(), NsaShapeError> {
    let [_, _, heads_kv, d_v] = input.selected.v.dims();
    let d_k = input.q.dims()[3];
    match (&input.compressed, num_compressed) {
        (None, 0) => Ok(()),
        (Some(kv), 1..) => {
            for (name, tensor, dim) in [("compressed.k", &kv.k, d_k), ("compressed.v", &kv.v, d_v)]
            {
                let expected = [1, num_compressed, heads_kv, dim];
                if tensor.dims() != expected {
                    return Err(NsaShapeError {
                        tensor: name,
                        actual: tensor.dims().to_vec(),
                        expected: format!(
                            "[1, N_cmp, H_kv, d] = {expected:?}: every document's compressed keys, one after another"
                        ),
                    });
                }
            }
            Ok(())
        }
        (Some(kv), 0) => Err(NsaShapeError {
            tensor: "compressed",
            actual: kv.k.dims().to_vec(),
            expected: "None: no document is as long as one compression block".to_string(),
        }),
        (None, _) => Err(NsaShapeError {
            tensor: "compressed",
            actual: Vec::new(),
            expected: format!("[1, N_cmp, H_kv, d] with N_cmp = {num_compressed}, got None"),
        }),
    }
}
