//! CubeCL kernels for Native Sparse Attention.
//!
//! Empty until the forward-kernel issue lands: the layer currently runs on the reference
//! implementation in `nsa-burn` on every backend.
