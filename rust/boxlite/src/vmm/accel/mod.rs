//! Choosing the accelerator: hardware when it is real and fast, TCG otherwise.
//!
//! The existence of `/dev/kvm` proves little: under a paravirtual KVM a normal guest kernel
//! barely advances. So the verdict comes from timing a tiny real-mode loop through the KVM
//! ioctls; real hardware runs it at native speed, a slow KVM at about a microsecond per step.

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{BoxliteError, BoxliteResult};

/// The accelerator a box's VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Hvf,
    Tcg,
}

impl Accel {
    /// QEMU's name for it (`-accel NAME`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Hvf => "hvf",
            Self::Tcg => "tcg",
        }
    }

    /// Whether the hypervisor is a security boundary (QEMU's policy: only KVM and HVF are).
    pub fn is_hardware_isolated(self) -> bool {
        !matches!(self, Self::Tcg)
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// The chosen accelerator and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Loop steps the probe runs; with [`FAST_NS_PER_STEP`] this decides within milliseconds.
const PROBE_STEPS: u32 = 10_000;
/// Native speed is well under 1 ns a step; a paravirtual KVM takes about 1,000 ns.
const FAST_NS_PER_STEP: f64 = 50.0;

/// The accelerator for this process: `BOXLITE_ACCEL` if set, else probed once and cached.
pub fn choose() -> BoxliteResult<AccelChoice> {
    match std::env::var("BOXLITE_ACCEL")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        None | Some("") | Some("auto") => Ok(probed().clone()),
        Some("kvm") => Ok(forced(Accel::Kvm)),
        Some("hvf") => Ok(forced(Accel::Hvf)),
        Some("tcg") => Ok(forced(Accel::Tcg)),
        Some(other) => Err(BoxliteError::invalid(
            "BOXLITE_ACCEL",
            format!("{other:?} is not one of kvm, hvf, tcg, auto"),
        )),
    }
}

fn forced(accel: Accel) -> AccelChoice {
    AccelChoice {
        accel,
        reason: format!("forced by BOXLITE_ACCEL={accel}"),
    }
}

fn probed() -> &'static AccelChoice {
    static CHOICE: OnceLock<AccelChoice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let choice = auto_choice();
        tracing::info!(accel = %choice.accel, reason = %choice.reason, "accelerator chosen");
        choice
    })
}

#[cfg(target_os = "macos")]
fn auto_choice() -> AccelChoice {
    AccelChoice {
        accel: Accel::Hvf,
        reason: "macOS Hypervisor.framework".into(),
    }
}

#[cfg(not(target_os = "macos"))]
fn auto_choice() -> AccelChoice {
    let tcg = |reason: String| AccelChoice {
        accel: Accel::Tcg,
        reason,
    };
    if !std::path::Path::new("/dev/kvm").exists() {
        return tcg("no /dev/kvm: software emulation (TCG)".into());
    }
    let pvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        " (kvm_pvm loaded)"
    } else {
        ""
    };
    match kvm_probe::time_loop(PROBE_STEPS) {
        Ok(elapsed) => {
            let per_step = elapsed.as_nanos() as f64 / f64::from(PROBE_STEPS);
            let measured =
                format!("{PROBE_STEPS} guest loop steps took {elapsed:?} ({per_step:.1} ns/step)");
            if per_step <= FAST_NS_PER_STEP {
                AccelChoice {
                    accel: Accel::Kvm,
                    reason: format!("KVM runs guests natively: {measured}"),
                }
            } else {
                tcg(format!(
                    "/dev/kvm is too slow to boot a guest{pvm}: {measured}; using TCG"
                ))
            }
        }
        Err(e) => tcg(format!("/dev/kvm unusable{pvm}: {e}; using TCG")),
    }
}

/// A measured ratio for diagnostics (`boxlite info`): the probe's raw timing.
pub fn probe_kvm_loop() -> Result<Duration, String> {
    kvm_probe::time_loop(PROBE_STEPS)
}

#[cfg(target_os = "linux")]
#[path = "kvm_probe_linux.rs"]
mod kvm_probe;

#[cfg(not(target_os = "linux"))]
mod kvm_probe {
    pub fn time_loop(_steps: u32) -> Result<std::time::Duration, String> {
        Err("KVM exists only on Linux".into())
    }
}
