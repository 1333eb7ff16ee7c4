//! The template key: everything a saved VM depends on. QEMU does not check all of it when it
//! loads a state (a different `-cpu` loads "fine" and hangs), so the key must.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::digest::{file_digest, FileStamp};
use crate::fsutil::write_atomically;
use crate::vmm::qemu::QemuEngine;
use crate::vmm::VmConfig;

/// Bumped when the template layout or what a template holds changes.
pub(crate) const TEMPLATE_FORMAT: u32 = 2;

/// The inputs of a key, kept in each template's manifest so a mismatch can be explained.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct KeyInputs {
    pub format: u32,
    /// `qemu-system-* --version`, first line (names the distribution build).
    pub engine_version: String,
    pub engine_sha256: String,
    /// The engine's arguments with every per-box value replaced: machine, accelerator, CPU
    /// model and count, memory, devices in order, kernel command line.
    pub engine_args: Vec<String>,
    pub kernel_sha256: String,
    /// Holds the agent.
    pub initramfs_sha256: String,
    pub protocol: u32,
    /// The image's manifest digest.
    pub image: String,
    /// The base disk the template's overlay sits on.
    pub base_disk: PathBuf,
    /// The box disk's virtual size: the guest caches it at boot.
    pub disk_size: u64,
}

impl KeyInputs {
    /// The key: sha256 of the inputs' canonical JSON (fields in declaration order), hex.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("key inputs serialize");
        hex::encode(Sha256::digest(json))
    }
}

/// The engine arguments of `vm` with its per-box values (name, sockets, disk paths, MAC,
/// console) replaced by fixed placeholders, so boxes of one shape share a key.
pub(crate) fn normalized_args(engine: &QemuEngine, vm: &VmConfig) -> Vec<String> {
    let mut shape = vm.clone();
    shape.name = "box".into();
    shape.agent_socket = "/box/agent.sock".into();
    shape.console_log = "/box/console.log".into();
    shape.jail = None;
    shape.memory_source = Default::default();
    shape.qmp_socket = None;
    shape.incoming = false;
    for (index, disk) in shape.disks.iter_mut().enumerate() {
        disk.path = format!("/box/disk{index}").into();
    }
    if let Some(net) = &mut shape.network {
        net.socket = "/box/net.sock".into();
        net.mac = "52:54:00:00:00:00".into();
    }
    engine
        .args(&shape)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// sha256 of files, remembered in `<templates>/hashes.json` by the file's stamp, so a process
/// that starts one box does not hash QEMU and the kernel again (~50 ms).
#[derive(Debug)]
pub(crate) struct HashCache {
    path: PathBuf,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct CacheFile {
    entries: BTreeMap<PathBuf, CachedHash>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CachedHash {
    stamp: FileStamp,
    sha256: String,
    /// Other facts derived from the same file contents (the engine's version line).
    #[serde(default)]
    facts: BTreeMap<String, String>,
}

impl HashCache {
    pub fn new(templates_dir: &Path) -> Self {
        Self {
            path: templates_dir.join("hashes.json"),
        }
    }

    fn load(&self) -> CacheFile {
        std::fs::read(&self.path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn save(&self, cache: &mut CacheFile) {
        cache.entries.retain(|path, _| path.exists());
        if let Ok(bytes) = serde_json::to_vec(cache) {
            // A cache that cannot be written is only slower next time.
            let _ = write_atomically(&self.path, &bytes);
        }
    }

    /// A fact about `file` computed by `derive`, remembered while the file is unchanged (its
    /// digest is taken first if the cache has none).
    pub fn remembered(
        &self,
        file: &Path,
        name: &str,
        derive: impl FnOnce() -> std::io::Result<String>,
    ) -> std::io::Result<String> {
        let stamp = FileStamp::of(file)?;
        let cache = self.load();
        if let Some(value) = cache
            .entries
            .get(file)
            .filter(|hit| hit.stamp == stamp)
            .and_then(|hit| hit.facts.get(name))
        {
            return Ok(value.clone());
        }
        let value = derive()?;
        self.digests(&[file])?;
        let mut cache = self.load();
        if let Some(entry) = cache.entries.get_mut(file).filter(|e| e.stamp == stamp) {
            entry.facts.insert(name.to_string(), value.clone());
            self.save(&mut cache);
        }
        Ok(value)
    }

    /// The sha256 of each file, from the cache when its stamp is unchanged.
    pub fn digests(&self, files: &[&Path]) -> std::io::Result<Vec<String>> {
        let mut cache = self.load();
        let mut changed = false;
        let mut out = Vec::with_capacity(files.len());
        for &file in files {
            let stamp = FileStamp::of(file)?;
            match cache.entries.get(file) {
                Some(hit) if hit.stamp == stamp => out.push(hit.sha256.clone()),
                _ => {
                    let sha256 = file_digest(file)?;
                    // A file written while it was hashed is hashed again next time.
                    if FileStamp::of(file)? == stamp {
                        cache.entries.insert(
                            file.to_path_buf(),
                            CachedHash {
                                stamp,
                                sha256: sha256.clone(),
                                facts: BTreeMap::new(),
                            },
                        );
                        changed = true;
                    }
                    out.push(sha256);
                }
            }
        }
        if changed {
            self.save(&mut cache);
        }
        Ok(out)
    }
}

/// `--version`'s first line of an engine binary.
pub(crate) fn engine_version(binary: &Path) -> std::io::Result<String> {
    let output = std::process::Command::new(binary)
        .arg("--version")
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Bytes;
    use crate::vmm::{Accel, DiskAttachment, DiskFormat, NetDevice};

    fn vm(id: &str) -> VmConfig {
        VmConfig {
            name: format!("boxlite-{id}"),
            kernel: "/g/vmlinuz".into(),
            initramfs: Some("/g/initramfs.cpio".into()),
            kernel_args: vec!["boxlite.root=/dev/vda".into()],
            cpus: 1,
            memory: Bytes::from_mib(1024),
            disks: vec![DiskAttachment {
                path: format!("/h/boxes/{id}/disk.qcow2").into(),
                format: DiskFormat::Qcow2,
                volatile: false,
            }],
            agent_socket: format!("/h/boxes/{id}/agent.sock").into(),
            console_log: format!("/h/boxes/{id}/console.log").into(),
            accel: Accel::Tcg,
            network: Some(NetDevice {
                socket: format!("/h/boxes/{id}/net.sock").into(),
                mac: format!("52:54:00:00:00:{}", &id[..2]),
            }),
            jail: None,
            memory_source: Default::default(),
            qmp_socket: Some(format!("/h/boxes/{id}/qmp.sock").into()),
            incoming: false,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn boxes_of_one_shape_share_args_and_shapes_differ() {
        let engine = QemuEngine::at("/usr/bin/qemu-system-x86_64".into());
        let a = normalized_args(&engine, &vm("aa"));
        assert_eq!(a, normalized_args(&engine, &vm("bb")));
        assert!(!a.join(" ").contains("/h/boxes"));
        let mut bigger = vm("cc");
        bigger.memory = Bytes::from_mib(2048);
        assert_ne!(a, normalized_args(&engine, &bigger));
        let mut offline = vm("dd");
        offline.network = None;
        assert_ne!(a, normalized_args(&engine, &offline));
    }

    #[test]
    fn every_input_moves_the_key() {
        let base = KeyInputs {
            format: TEMPLATE_FORMAT,
            engine_version: "QEMU emulator version 7.2.22".into(),
            engine_sha256: "e".into(),
            engine_args: vec!["-smp".into(), "1".into()],
            kernel_sha256: "k".into(),
            initramfs_sha256: "i".into(),
            protocol: 2,
            image: "sha256:abc".into(),
            base_disk: "/h/images/disks/sha256-abc.ext4".into(),
            disk_size: 1 << 30,
        };
        let key = base.key();
        assert_eq!(key.len(), 64);
        let variants = [
            KeyInputs {
                engine_version: "QEMU 8.2".into(),
                ..base.clone()
            },
            KeyInputs {
                engine_sha256: "f".into(),
                ..base.clone()
            },
            KeyInputs {
                engine_args: vec!["-smp".into(), "2".into()],
                ..base.clone()
            },
            KeyInputs {
                kernel_sha256: "k2".into(),
                ..base.clone()
            },
            KeyInputs {
                initramfs_sha256: "i2".into(),
                ..base.clone()
            },
            KeyInputs {
                protocol: 3,
                ..base.clone()
            },
            KeyInputs {
                image: "sha256:def".into(),
                ..base.clone()
            },
            KeyInputs {
                disk_size: 2 << 30,
                ..base.clone()
            },
        ];
        for variant in variants {
            assert_ne!(variant.key(), key, "{variant:?}");
        }
    }

    #[test]
    fn the_hash_cache_notices_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HashCache::new(dir.path());
        let file = dir.path().join("vmlinuz");
        std::fs::write(&file, b"kernel one").unwrap();
        let first = cache.digests(&[&file]).unwrap();
        assert_eq!(first, cache.digests(&[&file]).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"kernel two").unwrap();
        let second = cache.digests(&[&file]).unwrap();
        assert_ne!(first, second);
        assert_eq!(second[0], file_digest(&file).unwrap());
        let mut calls = 0;
        let mut version = || {
            calls += 1;
            Ok("v1".to_string())
        };
        assert_eq!(
            cache.remembered(&file, "version", &mut version).unwrap(),
            "v1"
        );
        assert_eq!(
            cache.remembered(&file, "version", &mut version).unwrap(),
            "v1"
        );
        assert_eq!(calls, 1, "a remembered fact is not derived again");
    }
}
