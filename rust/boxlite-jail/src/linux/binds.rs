//! Which host files a program needs inside a jail.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::JailError;

fn run(program: &Path, args: &[&str]) -> Result<std::process::Output, JailError> {
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| JailError::io(format!("running {}", program.display()), e))
}

/// Parses `ldd` output: `name => /path (addr)`, `/path (addr)`, vdso lines without a path.
fn parse_ldd(binary: &Path, output: &str) -> Result<Vec<PathBuf>, JailError> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim) {
        if line.contains("=> not found") {
            return Err(JailError::InvalidSpec(format!(
                "{} needs a library that is not installed: {line}",
                binary.display()
            )));
        }
        let path = match line.split_once("=>") {
            Some((_, right)) => right.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

pub(crate) fn program_binds(binary: &Path) -> Result<Vec<PathBuf>, JailError> {
    if !binary.is_absolute() || !binary.is_file() {
        return Err(JailError::InvalidSpec(format!(
            "{} is not an absolute path to a file",
            binary.display()
        )));
    }
    let mut binds = BTreeSet::from([binary.to_path_buf()]);
    binds.extend(libraries(binary)?);
    Ok(binds.into_iter().collect())
}

/// The interpreter and libraries of `binary`, plus the loader cache when there are any.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>, JailError> {
    let binary_arg = binary.to_string_lossy();
    let output = run(Path::new("ldd"), &[&binary_arg])
        .or_else(|_| run(Path::new("/usr/bin/ldd"), &[&binary_arg]))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Static binaries: "not a dynamic executable" (status 1) or "statically linked".
    if !output.status.success() || stdout.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut libs = parse_ldd(binary, &stdout)?;
    if !libs.is_empty() && Path::new("/etc/ld.so.cache").is_file() {
        libs.push("/etc/ld.so.cache".into());
    }
    Ok(libs)
}

/// The data directories `qemu -L help` prints (firmware, option ROMs), canonicalized.
fn qemu_data_dirs(qemu: &Path) -> Vec<PathBuf> {
    let from_qemu = run(qemu, &["-L", "help"])
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| PathBuf::from(l.trim()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let prefix = qemu.parent().and_then(Path::parent);
    let fallback = prefix.map(|p| p.join("share/qemu"));
    from_qemu
        .into_iter()
        .chain(fallback)
        .filter_map(|p| p.canonicalize().ok())
        .filter(|p| p.is_dir())
        .collect()
}

/// QEMU's module directories (Debian: /usr/lib/<triplet>/qemu), found where QEMU looks:
/// relative to its binary.
fn qemu_module_dirs(qemu: &Path) -> Vec<PathBuf> {
    let Some(prefix) = qemu.parent().and_then(Path::parent) else {
        return Vec::new();
    };
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    [
        prefix.join("lib").join(triplet).join("qemu"),
        prefix.join("lib64/qemu"),
        prefix.join("lib/qemu"),
    ]
    .into_iter()
    .filter(|dir| {
        // Only directories holding modules (/usr/lib/qemu holds setuid helpers instead).
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".so"))
        })
    })
    .collect()
}

pub(crate) fn qemu_binds(qemu: &Path) -> Result<Vec<PathBuf>, JailError> {
    let given = qemu;
    let qemu = qemu
        .canonicalize()
        .map_err(|e| JailError::io(format!("resolving {}", qemu.display()), e))?;
    let mut binds: BTreeSet<PathBuf> = program_binds(&qemu)?.into_iter().collect();
    // A symlinked path (e.g. /usr/bin/qemu -> ...) stays executable under its own name.
    if given.is_absolute() {
        binds.insert(given.to_path_buf());
    }
    binds.extend(qemu_data_dirs(&qemu));
    for dir in qemu_module_dirs(&qemu) {
        // Accelerator modules load at every start (TCG is a module in Debian's build);
        // display/audio/usb modules load only when asked for and are left out.
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| JailError::io(format!("listing {}", dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("accel-") {
                binds.extend(libraries(&entry.path())?);
            }
        }
        binds.insert(dir);
    }
    Ok(binds.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f01)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f02)\n";
        let libs = parse_ldd(Path::new("/bin/x"), out).expect("parsed");
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let missing = "\tlibnope.so.9 => not found\n";
        assert!(parse_ldd(Path::new("/bin/x"), missing).is_err());
    }

    #[test]
    fn static_binaries_need_only_themselves() {
        let busybox = Path::new("/bin/busybox");
        if !busybox.is_file() {
            return;
        }
        let binds = program_binds(busybox).expect("binds");
        assert_eq!(binds, [busybox.to_path_buf()]);
    }
}
