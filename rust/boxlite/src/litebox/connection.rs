//! Reaching a running box: this process's connection to its supervisor (made when this process
//! started it, or attached on first use when another did), and noticing when it ends.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{BoxInner, BoxStatus, LiteBox};
use crate::agent::AgentClient;
use crate::error::{BoxliteError, BoxliteResult};
use crate::process::GuardedChild;
use crate::shim;
use crate::state::ProcessId;

/// This process's connection to a running box's supervisor.
#[derive(Debug)]
pub(crate) struct Connection {
    pub client: AgentClient,
    /// Set when this process started the supervisor without `detach`: dropping it ends the
    /// box. The runtime keeps such connections until it closes, so a dropped box handle does
    /// not stop its box.
    pub owned: Option<GuardedChild>,
    pub shim: ProcessId,
}

impl LiteBox {
    /// The connection to the running box, attaching to its supervisor if another process
    /// started it.
    pub(super) async fn client(&self) -> BoxliteResult<AgentClient> {
        let record = self.record()?;
        if record.status != BoxStatus::Running {
            return Err(self.wrong_state(record.status, "exec in"));
        }
        let current = self.inner.conn.lock().ok().and_then(|c| c.clone());
        if let Some(conn) = current.filter(|c| c.client.closed_reason().is_none()) {
            return Ok(conn.client.clone());
        }
        let shim = record
            .shim
            .ok_or_else(|| self.wrong_state(BoxStatus::Stopped, "exec in"))?;
        let client = shim::connect(&self.inner.runtime.shim_socket(&self.inner.id)?).await?;
        let conn = Arc::new(Connection {
            client: client.clone(),
            owned: None,
            shim,
        });
        self.adopt(conn);
        Ok(client)
    }

    /// Like `client`, starting the box first if it is not running (the published package's
    /// `exec` on a stopped box does the same).
    pub(super) async fn running_client(&self) -> BoxliteResult<AgentClient> {
        let status = self.record()?.status;
        if matches!(
            status,
            BoxStatus::Configured | BoxStatus::Stopped | BoxStatus::Failed | BoxStatus::Paused
        ) {
            match self.start().await {
                Ok(()) => {}
                // Started meanwhile by another task or process.
                Err(BoxliteError::InvalidState { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.client().await
    }

    /// Makes `conn` this process's connection to the box and watches for its end.
    pub(super) fn adopt(&self, conn: Arc<Connection>) {
        if let Ok(mut current) = self.inner.conn.lock() {
            *current = Some(conn.clone());
        }
        if conn.owned.is_some() {
            self.inner.runtime.keep_owned(self.inner.id, conn.clone());
        }
        tokio::spawn(watch_connection(
            Arc::downgrade(&self.inner),
            Arc::downgrade(&conn),
            conn.client.clone(),
        ));
    }

    /// Forgets this process's connection (the box stopped): its executions fail, the
    /// supervisor it owned is let go, the running count drops.
    pub(super) fn drop_connection(&self, reason: &str) {
        let conn = self.inner.conn.lock().ok().and_then(|mut c| c.take());
        if let Some(conn) = conn {
            conn.client.close(reason);
        }
        self.inner.runtime.release_owned(&self.inner.id);
        if self.inner.counted.swap(false, Ordering::Relaxed) {
            self.inner.runtime.metrics.box_stopped();
        }
    }
}

/// Notices a connection that ends without `stop` (the VM was killed, or another process
/// stopped the box) and records the engine as gone. Holds no strong reference to the box.
async fn watch_connection(inner: Weak<BoxInner>, conn: Weak<Connection>, client: AgentClient) {
    client.closed().await;
    let (Some(inner), Some(conn)) = (inner.upgrade(), conn.upgrade()) else {
        return;
    };
    let litebox = LiteBox { inner };
    let current = litebox.inner.conn.lock().ok().and_then(|c| c.clone());
    if !current.is_some_and(|c| Arc::ptr_eq(&c, &conn)) {
        return;
    }
    // Give the supervisor a moment to exit after its VM did.
    let _ = tokio::time::timeout(Duration::from_secs(2), wait_gone(conn.shim)).await;
    if conn.shim.is_alive() {
        // Only our connection broke: reconnect on next use.
        if let Ok(mut current) = litebox.inner.conn.lock() {
            *current = None;
        }
        return;
    }
    let current = litebox.inner.conn.lock().ok().and_then(|c| c.clone());
    if !current.is_some_and(|c| Arc::ptr_eq(&c, &conn)) {
        return; // stopped (and maybe started again) meanwhile
    }
    tracing::warn!(box_id = %litebox.id(), "the box's VM exited");
    let _ = litebox
        .inner
        .runtime
        .store
        .engine_gone(&litebox.inner.id, conn.shim);
    litebox.drop_connection("the box's VM exited");
    if litebox.inner.options.auto_remove {
        let _ = litebox.remove(false).await;
    }
}

/// Waits until the process is gone (polling: it may not be our child).
pub(super) async fn wait_gone(process: ProcessId) {
    while process.is_alive() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the process if it is still the one recorded, and waits until it is gone.
pub(crate) async fn kill_gone(process: ProcessId) {
    if process.is_alive() {
        // SAFETY: kill(2) on a pid whose start time we just checked.
        unsafe { libc::kill(process.pid as libc::pid_t, libc::SIGKILL) };
        let _ = tokio::time::timeout(Duration::from_secs(10), wait_gone(process)).await;
    }
}
