//! The engine's jail: what a VM's engine process may see and do (`boxlite-jail`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Accel, JailConfig, VmConfig};
use crate::error::{BoxliteError, BoxliteResult, EngineError, IoContext};

/// Whether engines are jailed (on unless `BOXLITE_JAIL=0`: a host without user namespaces
/// for an unprivileged caller needs it off, and says so in the error).
pub(crate) fn enabled() -> bool {
    std::env::var("BOXLITE_JAIL").map_or(true, |v| v != "0")
}

/// What the engine binary needs to run (its libraries, firmware, modules): computed once per
/// binary and process (it runs `ldd` and the binary itself).
pub(crate) fn engine_binds(binary: &Path) -> BoxliteResult<Vec<PathBuf>> {
    static CACHE: Mutex<Option<HashMap<PathBuf, Vec<PathBuf>>>> = Mutex::new(None);
    let mut cache = CACHE
        .lock()
        .map_err(|_| BoxliteError::Internal("jail cache poisoned".into()))?;
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(binds) = cache.get(binary) {
        return Ok(binds.clone());
    }
    let binds = boxlite_jail::qemu_binds(binary).map_err(|e| EngineError::Unavailable {
        reason: format!(
            "cannot tell what {} needs in its jail: {e}",
            binary.display()
        ),
        hint: "see docs/security.md (BOXLITE_JAIL=0 runs the engine unconfined)".into(),
    })?;
    cache.insert(binary.to_path_buf(), binds.clone());
    Ok(binds)
}

/// The jail of one VM's engine: fresh namespaces, a root holding only the engine, the guest
/// bundle, the VM's disks and its box directory; as root, the box's own unprivileged id.
pub(crate) fn spec(
    binary: &Path,
    vm: &VmConfig,
    jail: &JailConfig,
) -> BoxliteResult<boxlite_jail::JailSpec> {
    std::fs::create_dir_all(&jail.root).ctx(|| format!("creating {}", jail.root.display()))?;
    let mut spec = boxlite_jail::JailSpec::new(&jail.root);
    let mut ro = if jail.engine_binds.is_empty() {
        engine_binds(binary)?
    } else {
        jail.engine_binds.clone()
    };
    ro.push(vm.kernel.clone());
    ro.extend(vm.initramfs.clone());
    ro.extend(jail.ro_paths.iter().cloned());
    spec.ro_binds = ro;
    spec.rw_binds = jail.rw_dirs.iter().chain(&jail.rw_files).cloned().collect();
    if vm.accel == Accel::Kvm {
        spec.devices.push("/dev/kvm".into());
    }
    spec.hostname = "boxlite-vmm".into();
    if spec.uid_gid.is_some() {
        let id = boxlite_jail::derived_jail_id(jail.id_key.as_bytes());
        spec.uid_gid = Some((id, id));
        if vm.accel == Accel::Kvm {
            spec.groups = kvm_group().into_iter().collect();
        }
        // The engine opens its overlay disk and connects to the box's sockets by path.
        for dir in &jail.rw_dirs {
            hand_over(dir, id)?;
        }
    }
    Ok(spec)
}

/// Gives `dir` and what is directly in it to the jail's id (root hosts only).
fn hand_over(dir: &Path, id: u32) -> BoxliteResult<()> {
    let chown = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(id), Some(id))
            .ctx(|| format!("handing {} to the engine's jail", path.display()))
    };
    chown(dir)?;
    for entry in std::fs::read_dir(dir).ctx(|| format!("reading {}", dir.display()))? {
        let entry = entry.ctx(|| format!("reading {}", dir.display()))?;
        chown(&entry.path())?;
    }
    Ok(())
}

fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/dev/kvm").ok().map(|m| m.gid())
}
