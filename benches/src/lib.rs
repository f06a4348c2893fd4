//! Benchmarks of the NSA kernels against dense attention.
//!
//! Empty until the CubeCL forward kernels land: timing the reference implementation would
//! measure nothing the project promises.
