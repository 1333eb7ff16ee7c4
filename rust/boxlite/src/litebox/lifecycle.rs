//! Starting, stopping and removing a box. Each holds the box's lifecycle lock (a mutex within
//! this process, a file lock across processes) and moves its status in the state database.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use boxlite_proto::Message;

use super::connection::{kill_gone, wait_gone};
use super::{BoxStatus, Connection, Event, LiteBox};
use crate::error::{BoxliteError, BoxliteResult, IoContext};
use crate::options::PortSpec;
use crate::shim::{self, ShimConfig, ShimNetwork};
use crate::state::ProcessId;
use crate::vm::socket_path;
use crate::vmm::{DiskAttachment, DiskFormat, NetDevice, VmConfig};

impl LiteBox {
    /// Boots the box's VM from its disk (state kept from earlier runs). `InvalidState` if it
    /// is already starting or running.
    pub async fn start(&self) -> BoxliteResult<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let _cross_process = self.inner.runtime.lock_box(&self.inner.id).await?;
        let status = self.record()?.status;
        let store = &self.inner.runtime.store;
        if store.apply(&self.inner.id, Event::Start, None)?.is_none() {
            return Err(self.wrong_state(status, "start"));
        }
        let booted = {
            let _slot = self.inner.runtime.boot_slot().await?;
            self.boot().await
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

    async fn boot(&self) -> BoxliteResult<(Arc<Connection>, u32, Vec<PortSpec>)> {
        let started = Instant::now();
        let runtime = &self.inner.runtime;
        let env = runtime.vm_env().await?;
        let id = self.inner.id.to_string();
        let options = &self.inner.options;
        let vm = VmConfig {
            name: format!("boxlite-{id}"),
            kernel: env.bundle.kernel.clone(),
            initramfs: env.bundle.initramfs.clone(),
            kernel_args: vec!["boxlite.root=/dev/vda".into(), "boxlite.mode=box".into()],
            cpus: options.cpus,
            memory: options.memory,
            disks: vec![DiskAttachment {
                path: self.inner.dir.join("disk.qcow2"),
                format: DiskFormat::Qcow2,
                volatile: false,
            }],
            agent_socket: socket_path(self.inner.dir.join("agent.sock"), &format!("{id}-agent"))?,
            console_log: self.inner.dir.join("console.log"),
            accel: env.accel,
            network: options
                .network
                .enabled
                .then(|| {
                    let mac = boxlite_net::guest_mac(&id);
                    Ok::<_, BoxliteError>(NetDevice {
                        socket: socket_path(self.inner.dir.join("net.sock"), &format!("{id}-net"))?,
                        mac: mac_text(mac),
                    })
                })
                .transpose()?,
        };
        let client_socket = runtime.shim_socket(&self.inner.id)?;
        let config = ShimConfig {
            qemu: env.qemu.clone(),
            vm,
            boot_timeout: env.boot_timeout,
            client_socket: client_socket.clone(),
            hostname: self.inner.name.clone().unwrap_or_else(|| id.to_lowercase()),
            network: options.network.enabled.then(|| ShimNetwork {
                mac: boxlite_net::guest_mac(&id),
                allow_net: options.network.allow_net.clone(),
                ports: options.ports.clone(),
            }),
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

    fn remove_files(&self) -> BoxliteResult<()> {
        self.inner.runtime.store.delete(&self.inner.id)?;
        self.inner.runtime.forget(&self.inner.id);
        match std::fs::remove_dir_all(&self.inner.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other.ctx(|| format!("removing {}", self.inner.dir.display())),
        }
    }

    /// Whether the box is running now (as far as the state database and the supervisor say).
    pub fn is_running(&self) -> bool {
        self.status() == BoxStatus::Running
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
