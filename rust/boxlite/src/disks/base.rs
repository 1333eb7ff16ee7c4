//! Base disks: an image's layers applied onto a fresh ext4 filesystem *inside a VM*, so that a
//! crafted layer can only ever touch that disk. Built in an ingest area, then renamed into
//! place: a crash leaves no half-built base behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use boxlite_proto::{Message, MAX_DATA_CHUNK};
use tokio::sync::mpsc;

use super::tools::{find_tool, run_tool};
use crate::agent::ChannelEvent;
use crate::error::{BoxliteError, BoxliteResult, IoContext};
use crate::fsutil::{sync_dir, write_atomically, FileLock, LockMode};
use crate::images::{ImageConfig, OciLayout, ResolvedImage};
use crate::units::Bytes;
use crate::vm::{launch, socket_path, VmEnv};
use crate::vmm::{DiskAttachment, DiskFormat, VmConfig};

/// A built base disk and the config of the image it holds.
#[derive(Debug, Clone)]
pub(crate) struct BaseDisk {
    pub path: PathBuf,
    pub config: ImageConfig,
}

/// The base disks of one runtime home: `disks/` holds finished ones, `ingest/` the ones being
/// built, `locks/` one lock file per image so that one process builds while the others wait.
#[derive(Debug, Clone)]
pub(crate) struct BaseDiskStore {
    root: PathBuf,
}

/// The smallest base disk: boxes write into their overlays on top of this filesystem.
const MIN_BASE_SIZE: Bytes = Bytes::from_gib(1);
/// Memory of the VM that unpacks layers.
const UNPACK_VM_MEMORY: Bytes = Bytes::from_mib(256);

impl BaseDiskStore {
    pub fn new(images_dir: &Path) -> BoxliteResult<Self> {
        for sub in ["disks", "ingest", "locks"] {
            let dir = images_dir.join(sub);
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        Ok(Self {
            root: images_dir.to_path_buf(),
        })
    }

    fn disk_path(&self, image: &ResolvedImage) -> PathBuf {
        self.root
            .join("disks")
            .join(format!("sha256-{}.ext4", image.manifest_digest.hex()))
    }

    fn config_path(&self, image: &ResolvedImage) -> PathBuf {
        self.root
            .join("disks")
            .join(format!("sha256-{}.json", image.manifest_digest.hex()))
    }

    /// The base disk of `image`, built first if this is its first use.
    pub async fn ensure(
        &self,
        layout: &OciLayout,
        image: &ResolvedImage,
        env: &VmEnv,
    ) -> BoxliteResult<BaseDisk> {
        let found = BaseDisk {
            path: self.disk_path(image),
            config: image.config.clone(),
        };
        if found.path.is_file() {
            return Ok(found);
        }
        let lock_path = self
            .root
            .join("locks")
            .join(format!("{}.lock", image.manifest_digest.hex()));
        let _lock = FileLock::acquire(lock_path, LockMode::Exclusive).await?;
        // Someone else may have built it while we waited for the lock.
        if found.path.is_file() {
            return Ok(found);
        }
        self.build(layout, image, env).await?;
        Ok(found)
    }

    async fn build(
        &self,
        layout: &OciLayout,
        image: &ResolvedImage,
        env: &VmEnv,
    ) -> BoxliteResult<()> {
        let started = std::time::Instant::now();
        let size = measure(layout, image).await?;
        let id = ulid::Ulid::new().to_string();
        let mut ingest = Ingest { paths: vec![] };
        let disk = self.root.join("ingest").join(format!("{id}.ext4"));
        ingest.paths.push(disk.clone());
        make_filesystem(&disk, size).await?;

        let console_log = self.root.join("ingest").join(format!("{id}.console.log"));
        ingest.paths.extend([
            console_log.clone(),
            PathBuf::from(format!("{}.1", console_log.display())),
        ]);
        let config = VmConfig {
            name: format!("boxlite-unpack-{id}"),
            kernel: env.bundle.kernel.clone(),
            initramfs: env.bundle.initramfs.clone(),
            kernel_args: vec!["boxlite.root=/dev/vda".into(), "boxlite.mode=unpack".into()],
            cpus: 1,
            memory: UNPACK_VM_MEMORY,
            disks: vec![DiskAttachment {
                path: disk.clone(),
                format: DiskFormat::Raw,
                volatile: true,
            }],
            agent_socket: socket_path(self.root.join("ingest").join(format!("{id}.sock")), &id)?,
            console_log,
            accel: env.accel,
            network: None,
        };
        let vm = launch(env.engine.as_ref(), &config, env.boot_timeout).await?;
        let applied = apply_layers(&vm, layout, image).await;
        vm.shutdown(env.stop_timeout).await;
        applied?;

        let config_json = serde_json::to_vec_pretty(&image.config)
            .map_err(|e| BoxliteError::Internal(format!("serializing image config: {e}")))?;
        write_atomically(&self.config_path(image), &config_json)?;
        sync_file(&disk)?;
        let final_path = self.disk_path(image);
        std::fs::rename(&disk, &final_path)
            .ctx(|| format!("committing {}", final_path.display()))?;
        sync_dir(&self.root.join("disks"));
        tracing::info!(image = %image.manifest_digest, ms = started.elapsed().as_millis() as u64, %size, "base disk built");
        Ok(())
    }
}

/// Paths removed on drop: whatever a failed build left in the ingest area.
struct Ingest {
    paths: Vec<PathBuf>,
}

impl Drop for Ingest {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Reads every layer once (verifying digests) to size the filesystem: the tar bytes plus a
/// block per entry plus room for metadata, never less than [`MIN_BASE_SIZE`].
async fn measure(layout: &OciLayout, image: &ResolvedImage) -> BoxliteResult<Bytes> {
    let layout = layout.clone();
    let layers = image.layers.clone();
    let reference = layout.dir().display().to_string();
    tokio::task::spawn_blocking(move || {
        let mut total: u64 = 0;
        for layer in &layers {
            let reader = layout.open_layer(layer)?;
            let mut archive = tar::Archive::new(reader);
            let entries = archive.entries().map_err(|e| pull_failed(&reference, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| pull_failed(&reference, e))?;
                total = total.saturating_add(entry.size().div_ceil(4096) * 4096 + 4096);
            }
            // Reach the end of the stream so the digests are checked.
            std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
                .map_err(|e| pull_failed(&reference, e))?;
        }
        let with_slack = total.saturating_mul(3) / 2 + Bytes::from_mib(64).as_u64();
        let mib = with_slack.div_ceil(1024 * 1024);
        Ok(Bytes::from_mib(mib).max(MIN_BASE_SIZE))
    })
    .await
    .map_err(|e| BoxliteError::Internal(format!("measuring layers: {e}")))?
}

fn pull_failed(reference: &str, e: std::io::Error) -> BoxliteError {
    BoxliteError::pull_failed(reference.to_owned(), e.to_string())
}

/// Inode tables are written now, not by the guest's lazy-init thread, so a box does not
/// spend its first seconds writing zeros into its overlay.
async fn make_filesystem(path: &Path, size: Bytes) -> BoxliteResult<()> {
    let mkfs = find_tool("mkfs.ext4", "e2fsprogs")?;
    let file = std::fs::File::create(path).ctx(|| format!("creating {}", path.display()))?;
    file.set_len(size.as_u64())
        .ctx(|| format!("sizing {}", path.display()))?;
    drop(file);
    let mut command = Command::new(mkfs);
    command
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
        ])
        .args(["-L", "boxlite-root"])
        .arg(path);
    run_tool(command).await
}

/// Streams each layer's verified tar into the guest, which applies it to the disk.
async fn apply_layers(
    vm: &crate::vm::RunningVm,
    layout: &OciLayout,
    image: &ResolvedImage,
) -> BoxliteResult<()> {
    for layer in &image.layers {
        let mut channel = vm.client.open(Message::UnpackLayer)?;
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(8);
        let mut reader = layout.open_layer(layer)?;
        let producer = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            loop {
                let mut chunk = vec![0u8; MAX_DATA_CHUNK];
                match reader.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => {
                        chunk.truncate(n);
                        if tx.blocking_send(Ok(chunk)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        });
        while let Some(chunk) = rx.recv().await {
            // A bad layer stops the build before EOF: the guest never sees it complete.
            let chunk = chunk.map_err(|e| {
                BoxliteError::pull_failed(layout.dir().display().to_string(), e.to_string())
            })?;
            channel.handle.send_stdin(&chunk).await?;
        }
        let _ = producer.await;
        channel.handle.send_eof(boxlite_proto::StreamId::Stdin)?;
        loop {
            match channel.recv().await? {
                ChannelEvent::Message(Message::Done) => break,
                ChannelEvent::Message(Message::Error { kind, message }) => {
                    return Err(BoxliteError::guest_storage(
                        format!(
                            "applying layer {} failed in the guest ({kind:?})",
                            layer.digest
                        ),
                        message,
                    ))
                }
                ChannelEvent::Message(other) => {
                    return Err(BoxliteError::protocol(format!(
                        "unexpected reply to UnpackLayer: {other:?}"
                    )))
                }
                ChannelEvent::Data(..) | ChannelEvent::Eof(_) => {}
            }
        }
    }
    Ok(())
}

fn sync_file(path: &Path) -> BoxliteResult<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("syncing {}", path.display()))
}
