//! Memory the examples report: the peak resident set of the process (a CPU backend's
//! memory) and the memory a CubeCL device's pool reserves.

#[cfg(feature = "wgpu")]
use burn::backend::wgpu::WgpuRuntime;
#[cfg(feature = "cuda")]
use cubecl::cuda::CudaRuntime;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use cubecl::{client::ComputeClient, Runtime};

use crate::device::CompiledBackend;

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Where the memory of a training run is read: chosen with the backend.
#[derive(Clone)]
pub enum MemoryProbe {
    /// The peak resident set of this process (Linux), reset when a measurement starts.
    Process,
    /// The bytes the memory pool of the default CUDA device reserves.
    #[cfg(feature = "cuda")]
    Cuda(ComputeClient<CudaRuntime>),
    /// The bytes the memory pool of the default wgpu device reserves.
    #[cfg(feature = "wgpu")]
    Wgpu(ComputeClient<WgpuRuntime>),
}

impl MemoryProbe {
    /// The probe for a backend's default device.
    pub fn for_backend(backend: CompiledBackend) -> Self {
        match backend {
            #[cfg(feature = "cuda")]
            CompiledBackend::Cuda => Self::Cuda(CudaRuntime::client(&Default::default())),
            #[cfg(feature = "wgpu")]
            CompiledBackend::Wgpu => Self::Wgpu(WgpuRuntime::client(&Default::default())),
            CompiledBackend::Flex => Self::Process,
        }
    }

    /// Starts a measurement: resets the process's peak (Linux `clear_refs`), or asks the
    /// device's pool to release the memory it holds unused. Returns whether readings
    /// from now on measure this run.
    pub fn start(&self) -> bool {
        match self {
            Self::Process => std::fs::write("/proc/self/clear_refs", "5").is_ok(),
            #[cfg(feature = "cuda")]
            Self::Cuda(client) => {
                client.memory_cleanup();
                true
            }
            #[cfg(feature = "wgpu")]
            Self::Wgpu(client) => {
                client.memory_cleanup();
                true
            }
        }
    }

    /// The current reading in bytes: the peak resident set since [`MemoryProbe::start`], or
    /// what the device's pool reserves now.
    pub fn read(&self) -> Option<u64> {
        match self {
            Self::Process => peak_resident_bytes(),
            #[cfg(feature = "cuda")]
            Self::Cuda(client) => client.memory_usage().ok().map(|usage| usage.bytes_reserved),
            #[cfg(feature = "wgpu")]
            Self::Wgpu(client) => client.memory_usage().ok().map(|usage| usage.bytes_reserved),
        }
    }

    /// What the largest reading of a run means, for the report.
    pub fn meaning(&self) -> &'static str {
        match self {
            Self::Process => {
                "peak resident memory of the process while the model trained (Linux VmHWM), \
                 the data, the model and everything else the process holds included"
            }
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => {
                "largest memory reserved by the device's memory pool, read after each training \
                 step (the pool was asked to release its unused memory before the model \
                 trained; a peak within a step can reserve more only by growing the pool, so \
                 it is counted once the step ends)"
            }
        }
    }
}
