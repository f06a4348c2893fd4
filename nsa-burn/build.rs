//! Decides at build time whether the wgpu tests can run, so that `cargo test` never reports
//! `ok` for a test that had no GPU adapter to run on.
//!
//! On Linux wgpu reaches a GPU (or Mesa's lavapipe, a Vulkan CPU driver) through Vulkan, and
//! the Vulkan loader finds drivers through their manifests: `*.json` files in the `vulkan/icd.d`
//! directories of the XDG config and data directories and `/etc`, or the files the variables
//! `VK_DRIVER_FILES` / `VK_ICD_FILENAMES` (which replace the search) and `VK_ADD_DRIVER_FILES`
//! name. When there is no manifest this emits the cfg `nsa_no_gpu_adapter`, and every test
//! that needs an adapter carries `#[cfg_attr(nsa_no_gpu_adapter, ignore = "...")]`: the test
//! summary lists it as ignored. Where the cfg is not emitted, such a test that still gets no
//! working adapter fails (it checks at run time).
//!
//! - `NSA_REQUIRE_GPU_ADAPTER` set (CI sets it): the cfg is never emitted, so a machine
//!   without an adapter fails the tests instead of ignoring them.
//! - `NSA_IGNORE_GPU_TESTS` set: the cfg is always emitted (for a machine whose driver is
//!   installed but whose adapter does not open).
//! - Other targets than Linux are not probed (wgpu has Metal and DX12 there).
//!
//! Cargo re-runs this when one of those variables changes, when a driver directory that
//! exists changes, and when the dynamic linker's cache (`/etc/ld.so.cache`) changes: a driver
//! is a shared library, so installing one updates the cache. (A directory that does not exist
//! yet cannot be watched: Cargo re-runs a build script on every build for a missing path. The
//! `HOME` and `XDG_*` variables are read but not watched, so that builds from environments
//! that differ only there do not rebuild the crate in turn.)

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The cfg that marks the wgpu tests ignored.
const NO_ADAPTER: &str = "nsa_no_gpu_adapter";

fn main() {
    println!("cargo::rustc-check-cfg=cfg({NO_ADAPTER})");
    for var in [
        "NSA_REQUIRE_GPU_ADAPTER",
        "NSA_IGNORE_GPU_TESTS",
        "VK_DRIVER_FILES",
        "VK_ICD_FILENAMES",
        "VK_ADD_DRIVER_FILES",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    watch(Path::new("/etc/ld.so.cache"));

    if env::var_os("NSA_REQUIRE_GPU_ADAPTER").is_some() {
        return;
    }
    let linux = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if env::var_os("NSA_IGNORE_GPU_TESTS").is_some() || (linux && !vulkan_driver_installed()) {
        println!("cargo::rustc-cfg={NO_ADAPTER}");
    }
}

/// Whether the Vulkan loader would find a driver manifest (its Linux search order).
fn vulkan_driver_installed() -> bool {
    let explicit = paths("VK_DRIVER_FILES").or_else(|| paths("VK_ICD_FILENAMES"));
    if let Some(explicit) = explicit {
        return explicit.iter().any(|path| has_manifest(path));
    }
    let added = paths("VK_ADD_DRIVER_FILES").unwrap_or_default();
    let home = env::var_os("HOME").map(PathBuf::from);
    let home_dir = |var: &str, default: &str| {
        env::var_os(var)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|home| home.join(default)))
    };
    let mut bases = Vec::new();
    bases.extend(home_dir("XDG_CONFIG_HOME", ".config"));
    bases.extend(paths("XDG_CONFIG_DIRS").unwrap_or_else(|| vec!["/etc/xdg".into()]));
    bases.extend(["/usr/local/etc".into(), "/etc".into()]);
    bases.extend(home_dir("XDG_DATA_HOME", ".local/share"));
    bases.extend(
        paths("XDG_DATA_DIRS")
            .unwrap_or_else(|| vec!["/usr/local/share".into(), "/usr/share".into()]),
    );
    let searched = bases.iter().map(|base| base.join("vulkan").join("icd.d"));
    // Every path is probed (not just up to the first hit) so that each one is watched.
    added
        .into_iter()
        .chain(searched)
        .fold(false, |found, path| has_manifest(&path) | found)
}

/// The paths a colon-separated variable lists; `None` when it is unset or empty.
fn paths(var: &str) -> Option<Vec<PathBuf>> {
    let value: OsString = env::var_os(var).filter(|value| !value.is_empty())?;
    Some(
        env::split_paths(&value)
            .filter(|path| !path.as_os_str().is_empty())
            .collect(),
    )
}

/// Whether `path` is a manifest file, or a directory holding one (`*.json`); watches it if it
/// exists.
fn has_manifest(path: &Path) -> bool {
    watch(path);
    if path.is_file() {
        return true;
    }
    let Ok(entries) = path.read_dir() else {
        return false;
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        path.extension().is_some_and(|ext| ext == "json") && path.is_file()
    })
}

/// Re-runs this script when `path` changes, if it exists.
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo::rerun-if-changed={}", path.display());
    }
}
