//! The device an example runs on: the one asked for with `--device`, or the best that answers.

#[cfg(any(feature = "cuda", feature = "wgpu"))]
use burn::tensor::{backend::Backend, Tensor};
use clap::ValueEnum;
use core::fmt;

/// The `--device` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// CUDA if a GPU answers, else wgpu if a GPU adapter answers, else flex (CPU). A wgpu
    /// CPU adapter (Mesa's lavapipe) runs the kernels far slower than flex runs the
    /// reference, so it runs only when asked for.
    Auto,
    Cuda,
    Wgpu,
    Flex,
}

/// A backend this binary is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompiledBackend {
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "wgpu")]
    Wgpu,
    Flex,
}

/// The device the example runs on.
#[derive(Debug)]
pub struct PickedDevice {
    /// Its backend; the device is the backend's default one.
    pub backend: CompiledBackend,
    /// What the user is told about it.
    pub description: String,
    /// Whether it computes on the CPU: flex, or a wgpu CPU adapter such as Mesa's lavapipe.
    pub on_cpu: bool,
}

/// `--device` named a backend this binary is built without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCompiled {
    /// The cargo feature that builds it in.
    pub feature: &'static str,
}

impl fmt::Display for NotCompiled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let feature = self.feature;
        write!(
            f,
            "{feature} is not compiled in: enable the `{feature}` feature of nsa-examples"
        )
    }
}

impl std::error::Error for NotCompiled {}

/// Picks the device asked for, or for `Auto` the first that answers, and starts it.
///
/// # Panics
///
/// If the backend asked for by name cannot start (no driver or adapter).
pub fn pick_device(choice: DeviceChoice) -> Result<PickedDevice, NotCompiled> {
    match choice {
        DeviceChoice::Auto => {
            #[cfg(feature = "cuda")]
            if let Some(device) = quietly(cuda_device) {
                return Ok(device);
            }
            #[cfg(feature = "wgpu")]
            match quietly(wgpu_device) {
                Some(device) if !device.on_cpu => return Ok(device),
                Some(cpu_adapter) => {
                    let mut flex = flex_device();
                    flex.description += &format!(
                        "\n  skipped {}: a CPU adapter runs the kernels slower than flex runs \
                         the reference (--device wgpu runs it anyway)",
                        cpu_adapter.description
                    );
                    return Ok(flex);
                }
                None => {}
            }
            Ok(flex_device())
        }
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda => Ok(cuda_device()),
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => Ok(wgpu_device()),
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda => Err(NotCompiled { feature: "cuda" }),
        #[cfg(not(feature = "wgpu"))]
        DeviceChoice::Wgpu => Err(NotCompiled { feature: "wgpu" }),
        DeviceChoice::Flex => Ok(flex_device()),
    }
}

/// Runs `start`, or returns `None` if it panics (a backend's runtime panics when no driver
/// or adapter is present), without printing the panic.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn quietly<T>(start: fn() -> T) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = std::panic::catch_unwind(start).ok();
    std::panic::set_hook(hook);
    started
}

/// Runs a tiny computation on a backend's default device (panics if it cannot).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn compute_on<B: Backend>() {
    let device = B::Device::default();
    Tensor::<B, 1>::ones([4], &device).sum().into_data();
}

#[cfg(feature = "cuda")]
fn cuda_device() -> PickedDevice {
    compute_on::<burn::backend::Cuda>();
    PickedDevice {
        backend: CompiledBackend::Cuda,
        description: format!("cuda, {:?}", burn::backend::cuda::CudaDevice::default()),
        on_cpu: false,
    }
}

/// Starts wgpu's default device the way its runtime would, keeping the adapter's name and
/// type to print.
#[cfg(feature = "wgpu")]
fn wgpu_device() -> PickedDevice {
    use burn::backend::wgpu::{graphics::AutoGraphicsApi, init_setup, RuntimeOptions};

    let setup = init_setup::<AutoGraphicsApi>(&Default::default(), RuntimeOptions::default());
    compute_on::<burn::backend::Wgpu>();
    let adapter = setup.adapter.get_info();
    PickedDevice {
        backend: CompiledBackend::Wgpu,
        description: format!(
            "wgpu, adapter {} ({:?}, {:?})",
            adapter.name, adapter.device_type, adapter.backend
        ),
        on_cpu: adapter.device_type == wgpu::DeviceType::Cpu,
    }
}

fn flex_device() -> PickedDevice {
    PickedDevice {
        backend: CompiledBackend::Flex,
        description: "flex (the reference implementation on the CPU)".into(),
        on_cpu: true,
    }
}
