//! Node binding for lazy-restore-core. Conversion only: no logic lives here.

use napi_derive::napi;

/// The core crate's version.
#[napi]
pub fn core_version() -> String {
    lazy_restore_core::VERSION.to_string()
}

/// What this kernel's userfaultfd supports.
#[napi(object)]
pub struct UffdCapabilities {
    /// Feature bits as a hex string (they do not fit a JS number safely).
    pub features_hex: String,
    pub ioctls_hex: String,
    pub features: Vec<String>,
    pub ioctls: Vec<String>,
    /// True when fork, remap, remove and unmap events are all available.
    pub criu_noncoop: bool,
}

/// Probes userfaultfd. Throws with the OS error (e.g. EPERM without privilege).
#[napi]
pub fn probe_uffd() -> napi::Result<UffdCapabilities> {
    let caps = lazy_restore_core::probe::probe()
        .map_err(|e| napi::Error::from_reason(format!("userfaultfd probe failed: {e}")))?;
    Ok(UffdCapabilities {
        features_hex: format!("{:#x}", caps.features),
        ioctls_hex: format!("{:#x}", caps.ioctls),
        features: caps.feature_names.iter().map(|s| s.to_string()).collect(),
        ioctls: caps.ioctl_names.iter().map(|s| s.to_string()).collect(),
        criu_noncoop: caps.criu_noncoop,
    })
}
