//! Row-wise kernels with no attention tile: `delta = rowsum(dO * O)`, the gated sum of the
//! branches (Eq. 5) forward and backward, the sum of the key side's split copies, and the
//! merge of a forward pass split over its keys.

pub mod delta;
pub mod gated_sum;
pub mod key_splits;
pub mod query_splits;
