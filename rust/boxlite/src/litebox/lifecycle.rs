//! Starting, stopping and removing a box. Each holds the box's lifecycle lock (a mutex within
//! this process, a file lock across processes) and moves its status in the state database.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use boxlite_proto::Message;

use super::connection::{kill_gone, wait_gone};
use super::{BoxStatus, Connection, Event, LiteBox};
use crate::disks::create_overlay;
use crate::error::{BoxliteError, BoxliteResult, IoContext};
use crate::options::PortSpec;
use crate::shim::{self, ShimConfig, ShimNetwork, StartFrom};
use crate::state::ProcessId;
use crate::templates::Template;
use crate::vm::VmEnv;
use crate::vmm::{
    DiskAttachment, DiskFormat, FsDevice, JailConfig, MemorySource, NetDevice, VmConfig,
};

impl LiteBox {
    /// Boots the box's VM from its disk (state kept from earlier runs). `InvalidState` if it
    /// is already starting or running.
    pub async fn start(&self) -> BoxliteResult<()> {
        self.start_from(None).await
    }

    /// Starts the box, from `template` if given (its first start only: the box's disk is an
    /// overlay on the template's). A template that fails to load is retired and the box boots
    /// cold from a fresh overlay on its base disk instead.
    pub(crate) async fn start_from(&self, template: Option<&Template>) -> BoxliteResult<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let _cross_process = self.inner.runtime.lock_box(&self.inner.id).await?;
        let status = self.settled_status().await?;
        let store = &self.inner.runtime.store;
        if store.apply(&self.inner.id, Event::Start, None)?.is_some() {
            if let Err(e) = check_free_space(&self.inner.dir) {
                let _ = store.apply(&self.inner.id, Event::BootFailed, None);
                return Err(e);
            }
        } else {
            return Err(self.wrong_state(status, "start"));
        }
        let saved = self.saved_state_path();
        // What a supervisor killed while pausing left.
        let _ = std::fs::remove_file(self.inner.dir.join("saved.state.partial"));
        let resume = status == BoxStatus::Paused && saved.is_file();
        if !resume {
            // A saved state is only ever resumed from a paused box.
            let _ = std::fs::remove_file(&saved);
        }
        let booted = {
            let _slot = self.inner.runtime.boot_slot().await?;
            match template {
                _ if resume => {
                    let booted = self.boot(Source::Saved(&saved)).await;
                    // Resumed, the box's disk moves on; failed, the next start boots cold.
                    let _ = std::fs::remove_file(&saved);
                    booted
                }
                Some(template) => match self.boot(Source::Template(template)).await {
                    Ok(booted) => Ok(booted),
                    Err(e) => {
                        tracing::warn!(box_id = %self.id(), error = %e, key = %template.manifest.key,
                            "the box did not start from its template; retiring it and booting cold");
                        self.inner.runtime.retire_template(&template.manifest.key);
                        self.reset_disk().await?;
                        self.boot(Source::Cold).await
                    }
                },
                None => self.boot(Source::Cold).await,
            }
        };
        match booted {
            Ok((conn, engine_pid, ports)) => {
                if store
                    .apply(&self.inner.id, Event::Booted, Some((conn.shim, engine_pid)))?
                    .is_none()
                {
                    // Someone ended this start; do not leave its VM running.
                    let shim = conn.shim;
                    drop(conn);
                    kill_gone(shim).await;
                    return Err(BoxliteError::Internal(
                        "the box's status changed while it booted".into(),
                    ));
                }
                store.set_ports(&self.inner.id, &ports)?;
                self.inner.counted.store(true, Ordering::Relaxed);
                self.inner.runtime.metrics.box_started();
                self.adopt(conn);
                Ok(())
            }
            Err(e) => {
                let _ = store.apply(&self.inner.id, Event::BootFailed, None);
                Err(e)
            }
        }
    }

    /// The status for a start: a box that says it runs but whose engine was just killed (the
    /// signal sent, the process not yet gone) gets a moment to be seen stopped.
    async fn settled_status(&self) -> BoxliteResult<BoxStatus> {
        let deadline = Instant::now() + ENGINE_DEATH_GRACE;
        loop {
            let record = self.record()?;
            let dying = record.status == BoxStatus::Running
                && record.engine_pid.is_some_and(crate::sys::is_being_killed);
            if !dying || Instant::now() >= deadline {
                return Ok(record.status);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The box's VM: its shape (from its options) and its own paths.
    pub(crate) fn vm_config(&self, env: &VmEnv) -> BoxliteResult<VmConfig> {
        let runtime = &self.inner.runtime;
        let id = self.inner.id.to_string();
        let options = &self.inner.options;
        let sockets = runtime.socket_dir(&self.inner.id)?;
        let disk = self.inner.dir.join("disk.qcow2");
        // What the disk rests on: the base disk, and for a box made from a template the
        // template's frozen overlay between them.
        let backing = match crate::images::gc::backing_chain(&disk) {
            Ok(chain) if !chain.is_empty() => chain,
            _ => vec![self.record()?.base_disk],
        };
        Ok(VmConfig {
            name: format!("boxlite-{id}"),
            kernel: env.bundle.kernel.clone(),
            initramfs: Some(env.bundle.initramfs.clone()),
            kernel_args: vec!["boxlite.root=/dev/vda".into(), "boxlite.mode=box".into()],
            cpus: options.cpus,
            memory: options.memory,
            disks: vec![DiskAttachment {
                path: disk,
                format: DiskFormat::Qcow2,
                volatile: false,
            }],
            agent_socket: sockets.join("agent.sock"),
            console_log: self.inner.dir.join("console.log"),
            accel: env.accel,
            network: options
                .network
                .enabled
                .then(|| {
                    let mac = boxlite_net::guest_mac(&id);
                    Ok::<_, BoxliteError>(NetDevice {
                        socket: sockets.join("net.sock"),
                        mac: mac_text(mac),
                    })
                })
                .transpose()?,
            jail: crate::vmm::jail::enabled().then(|| JailConfig {
                root: self.inner.dir.join("jail"),
                id_key: id.clone(),
                engine_binds: env.engine_binds.clone(),
                rw_dirs: std::iter::once(self.inner.dir.clone())
                    .chain((sockets != self.inner.dir).then(|| sockets.clone()))
                    .collect(),
                ro_paths: backing,
                rw_files: Vec::new(),
            }),
            memory_source: Default::default(),
            qmp_socket: Some(sockets.join("qmp.sock")),
            incoming: false,
            volumes: (0..options.volumes.len())
                .map(|index| FsDevice {
                    tag: format!("vol{index}"),
                    socket: sockets.join(format!("fs{index}.sock")),
                })
                .collect(),
        })
    }

    /// The disk of a box whose template failed: a fresh overlay on its base disk.
    async fn reset_disk(&self) -> BoxliteResult<()> {
        let disk = self.inner.dir.join("disk.qcow2");
        let _ = std::fs::remove_file(&disk);
        let base_disk = self.record()?.base_disk;
        create_overlay(&base_disk, &disk, self.inner.options.disk_size).await
    }

    async fn boot(
        &self,
        source: Source<'_>,
    ) -> BoxliteResult<(Arc<Connection>, u32, Vec<PortSpec>)> {
        let started = Instant::now();
        let runtime = &self.inner.runtime;
        let env = runtime.vm_env().await?;
        let id = self.inner.id.to_string();
        let options = &self.inner.options;
        let sockets = runtime.socket_dir(&self.inner.id)?;
        let mut vm = self.vm_config(&env)?;
        if !matches!(source, Source::Cold) {
            // The guest's kernel is already in the saved RAM.
            vm.kernel = env.resume_kernel.clone();
            vm.initramfs = None;
        }
        let start = match source {
            Source::Template(template) => {
                vm.memory_source = MemorySource::PrivateFile(template.ram());
                vm.incoming = true;
                if let Some(jail) = &mut vm.jail {
                    jail.ro_paths.push(template.overlay());
                    jail.rw_files.push(template.ram());
                }
                StartFrom::Template {
                    state: template.state(),
                    agent: template.manifest.agent.clone(),
                }
            }
            Source::Saved(state) => {
                vm.incoming = true;
                StartFrom::Saved {
                    state: state.to_path_buf(),
                    agent: crate::templates::AgentInfo {
                        protocol: boxlite_proto::PROTOCOL_VERSION,
                        agent_version: String::new(),
                    },
                }
            }
            Source::Cold => StartFrom::Boot,
        };
        let client_socket = sockets.join("shim.sock");
        let config = ShimConfig {
            qemu: env.qemu.clone(),
            box_id: id.clone(),
            start,
            vm,
            boot_timeout: env.boot_timeout,
            client_socket: client_socket.clone(),
            hostname: self.inner.name.clone().unwrap_or_else(|| id.to_lowercase()),
            network: options.network.enabled.then(|| ShimNetwork {
                mac: boxlite_net::guest_mac(&id),
                allow_net: options.network.allow_net.clone(),
                ports: options.ports.clone(),
            }),
            sandbox: options.sandbox.clone(),
            saved_state: Some(self.saved_state_path()),
            volumes: options.volumes.clone(),
            virtiofsd: if options.volumes.is_empty() {
                None
            } else {
                Some(crate::shim::locate_virtiofsd(&env.shim)?)
            },
        };
        let box_config_ms = started.elapsed().as_millis();
        let detach = options.detach;
        let handle = shim::spawn(&env.shim, &self.inner.dir, &config, detach, |shim| {
            let _ = runtime.store.set_supervisor(&self.inner.id, shim, 0);
        })
        .await?;
        let client = match shim::connect(&client_socket).await {
            Ok(client) => client,
            Err(e) => {
                handle.child.kill_and_wait().await;
                return Err(e);
            }
        };
        if let Ok(mut stages) = self.inner.stages.lock() {
            stages.box_config_ms = Some(box_config_ms);
            stages.box_spawn_ms = Some(handle.spawn_ms);
            stages.container_init_ms = Some(handle.boot_ms.saturating_sub(handle.spawn_ms));
            stages.guest_boot_ms = Some(handle.boot_ms);
            stages.from_template = matches!(source, Source::Template(_));
        }
        let conn = Arc::new(Connection {
            client,
            owned: (!detach).then_some(handle.child),
            shim: handle.process,
        });
        Ok((conn, handle.engine_pid, handle.ports))
    }

    /// Syncs and powers the guest off (killing it after the stop timeout); a no-op for a box
    /// that is not running. Works on boxes started by other processes too. A box with
    /// `auto_remove` is deleted once stopped.
    pub async fn stop(&self) -> BoxliteResult<()> {
        if self.status() == BoxStatus::Paused {
            // Its file writes may still be in its saved memory: it shuts down from a resume,
            // and only a box that cannot resume loses them.
            if let Err(e) = self.resume().await {
                tracing::warn!(box_id = %self.id(), error = %e, "a paused box did not resume to stop; discarding its memory");
            }
        }
        let _serial = self.inner.lifecycle.lock().await;
        let _cross_process = self.inner.runtime.lock_box(&self.inner.id).await?;
        self.stop_locked().await?;
        if self.inner.options.auto_remove {
            self.remove_files()?;
        }
        Ok(())
    }

    async fn stop_locked(&self) -> BoxliteResult<()> {
        let record = match self.record() {
            Ok(record) => record,
            // Removed meanwhile (an auto-removed box stopped by someone else): nothing to stop.
            Err(BoxliteError::BoxNotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let store = &self.inner.runtime.store;
        if record.status == BoxStatus::Paused {
            // Removed, or it could not resume: its memory goes.
            store.apply(&self.inner.id, Event::Discard, None)?;
            let _ = std::fs::remove_file(self.saved_state_path());
            return Ok(());
        }
        let Some(shim) = record.shim else {
            return Ok(());
        };
        if store.apply(&self.inner.id, Event::Stop, None)?.is_none() {
            return Ok(());
        }
        let current = self.inner.conn.lock().ok().and_then(|c| c.clone());
        let client = match current {
            Some(conn) => Some(conn.client.clone()),
            None => match self.inner.runtime.shim_socket(&self.inner.id) {
                Ok(socket) => shim::connect(&socket).await.ok(),
                Err(_) => None,
            },
        };
        let timeout = self.inner.runtime.options.stop_timeout.as_duration();
        let graceful = async {
            if let Some(client) = &client {
                // The guest may power off before its reply leaves; the exit is what counts.
                let _ = client.request(Message::Shutdown).await;
            }
            wait_gone(shim).await;
        };
        if tokio::time::timeout(timeout, graceful).await.is_err() {
            tracing::warn!(box_id = %self.id(), "graceful stop timed out; killing the box");
        }
        kill_gone(shim).await;
        if let Some(engine) = record.engine_pid.and_then(ProcessId::of) {
            kill_gone(engine).await;
        }
        // Forget the connection first, so its watcher sees a deliberate stop.
        self.drop_connection("the box was stopped");
        if let Some(client) = client {
            client.close("the box was stopped");
        }
        store.engine_gone(&self.inner.id, shim)?;
        Ok(())
    }

    /// Saves the running box's memory and devices and ends its VM, freeing its CPU and RAM;
    /// `start()` (or `resume()`) brings it back with its processes where they were. Its
    /// published ports are released meanwhile. Clients of the box see their running
    /// commands' streams end (the commands themselves go on after the resume, unobserved). A
    /// save that fails (a full disk) stops the box: its disk is kept, its memory is lost.
    pub async fn pause(&self) -> BoxliteResult<()> {
        if !self.inner.options.volumes.is_empty() {
            // vhost-user-fs devices cannot be migrated, so the VM cannot be saved.
            return Err(BoxliteError::Unsupported(
                "pausing a box with volumes (its host folders cannot be saved with the VM); stop it instead".into(),
            ));
        }
        let _serial = self.inner.lifecycle.lock().await;
        let _cross_process = self.inner.runtime.lock_box(&self.inner.id).await?;
        let record = self.record()?;
        let store = &self.inner.runtime.store;
        let Some(shim) = record.shim.filter(|_| record.status == BoxStatus::Running) else {
            return Err(self.wrong_state(record.status, "pause"));
        };
        let existing = self.inner.conn.lock().ok().and_then(|c| c.clone());
        let client = match &existing {
            Some(conn) => conn.client.clone(),
            None => shim::connect(&self.inner.runtime.shim_socket(&self.inner.id)?).await?,
        };
        if store.apply(&self.inner.id, Event::Pause, None)?.is_none() {
            return Err(self.wrong_state(record.status, "pause"));
        }
        // This process's connection leaves before the engine ends: its watcher must not take
        // that for a crash.
        let current = self.inner.conn.lock().ok().and_then(|mut c| c.take());
        let outcome = client.request_within(Message::Pause, PAUSE_TIMEOUT).await;
        let saved = outcome.is_ok() && self.saved_state_path().is_file();
        if saved {
            store.apply(&self.inner.id, Event::Saved, None)?;
        }
        let _ = tokio::time::timeout(PAUSE_TIMEOUT, wait_gone(shim)).await;
        kill_gone(shim).await;
        if let Some(engine) = record.engine_pid.and_then(ProcessId::of) {
            kill_gone(engine).await;
        }
        client.close("the box was paused");
        drop(current);
        self.drop_connection("the box was paused");
        if saved {
            return Ok(());
        }
        store.engine_gone(&self.inner.id, shim)?;
        let _ = std::fs::remove_file(self.saved_state_path());
        Err(match outcome {
            Err(e) => e,
            Ok(_) => BoxliteError::Internal("the box's supervisor saved no state".into()),
        })
    }

    /// Brings a paused box back (its processes carry on); `InvalidState` for any other box.
    pub async fn resume(&self) -> BoxliteResult<()> {
        let status = self.record()?.status;
        if status != BoxStatus::Paused {
            return Err(self.wrong_state(status, "resume"));
        }
        self.start().await
    }

    /// Where a paused box's memory and device state are kept.
    pub(crate) fn saved_state_path(&self) -> std::path::PathBuf {
        self.inner.dir.join("saved.state")
    }

    /// Stops (if `force`) and deletes the box: disk, directory and record.
    pub(crate) async fn remove(&self, force: bool) -> BoxliteResult<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let _cross_process = self.inner.runtime.lock_box(&self.inner.id).await?;
        let status = self.record()?.status;
        if status.has_engine() {
            if !force {
                return Err(self.wrong_state(status, "remove (use force=True to stop it first)"));
            }
            self.stop_locked().await?;
        }
        self.remove_files()
    }

    pub(super) fn remove_files(&self) -> BoxliteResult<()> {
        self.inner.runtime.store.delete(&self.inner.id)?;
        self.inner.runtime.forget(&self.inner.id);
        let _ = std::fs::remove_dir_all(crate::vm::fallback_socket_dir(&self.inner.id.to_string()));
        let removed = match std::fs::remove_dir_all(&self.inner.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other.ctx(|| format!("removing {}", self.inner.dir.display())),
        };
        // Layers only this box's disk and snapshots rested on.
        self.inner.runtime.sweep_layers();
        removed
    }

    /// Whether the box is running now (as far as the state database and the supervisor say).
    pub fn is_running(&self) -> bool {
        self.status() == BoxStatus::Running
    }
}

/// Where a box starts from.
#[derive(Clone, Copy)]
enum Source<'a> {
    Cold,
    Template(&'a Template),
    /// Its own saved state (a paused box).
    Saved(&'a std::path::Path),
}

/// How long a start waits for an engine with a fatal signal pending to be gone.
const ENGINE_DEATH_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Longest a pause may take: writing up to the box's RAM to disk, under TCG.
const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// Below this, a box's first writes (console log, overlay growth, the guest's journal) would
/// fail half-way through its boot: refuse at once instead.
const MIN_FREE_TO_START: u64 = 64 * 1024 * 1024;

fn check_free_space(dir: &std::path::Path) -> BoxliteResult<()> {
    let free =
        crate::sys::free_bytes(dir).ctx(|| format!("checking free space in {}", dir.display()))?;
    if free < MIN_FREE_TO_START {
        return Err(crate::error::StorageError::NoSpace {
            context: format!(
                "{} MiB free where the box lives ({}), at least {} MiB needed to start it",
                free / (1024 * 1024),
                dir.display(),
                MIN_FREE_TO_START / (1024 * 1024)
            ),
        }
        .into());
    }
    Ok(())
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
