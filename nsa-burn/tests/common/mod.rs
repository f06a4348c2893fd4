//! Helpers shared by the test files that run kernels.

#![allow(dead_code)]

pub mod cache;
pub mod packed;

use burn::backend::wgpu::WgpuDevice;
use burn::backend::Wgpu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `||a - b||_2 / ||b||_2`, infinite when either holds a NaN.
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            return f64::INFINITY;
        }
        diff += (x as f64 - y as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Whether the backend's device can run a tiny computation (the runtime panics without a
/// driver or adapter).
pub fn device_answers<B: Backend>(device: &B::Device) -> bool {
    let device = device.clone();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        Tensor::<B, 1>::ones([4], &device).sum().into_data();
    }))
    .is_ok()
}

/// The default wgpu device, which must answer. The tests that call this carry
/// `#[cfg_attr(nsa_no_gpu_adapter, ignore = ...)]`: the build marks them ignored when it finds
/// no Vulkan driver (see `nsa-burn/build.rs`). Getting here without a working adapter is a
/// failure, so that a test that ran nothing never reports `ok`.
pub fn wgpu_device() -> WgpuDevice {
    let device = WgpuDevice::default();
    assert!(
        device_answers::<Wgpu>(&device),
        "no wgpu adapter answered, although the build found a Vulkan driver (or \
         NSA_REQUIRE_GPU_ADAPTER is set); set NSA_IGNORE_GPU_TESTS=1 to build these tests \
         as ignored on this machine"
    );
    device
}
