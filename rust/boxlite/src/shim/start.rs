//! Bringing a box's VM up: a cold boot, or a saved state loaded (a template's, or the box's
//! own after a pause).

use std::path::PathBuf;

use boxlite_proto::Message;
use serde::{Deserialize, Serialize};

use super::ShimConfig;
use crate::error::BoxliteResult;
use crate::templates::AgentInfo;
use crate::vm::{launch, restore, RunningVm, SavedState};
use crate::vmm::qemu::QemuEngine;

/// How the supervisor brings its VM up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub(crate) enum StartFrom {
    /// Boot the kernel.
    #[default]
    Boot,
    /// Load a template's device state; `vm.memory_source` maps the template's RAM file.
    Template { state: PathBuf, agent: AgentInfo },
    /// Load the box's own saved state, RAM included (a paused box resumed).
    Saved { state: PathBuf, agent: AgentInfo },
}

impl StartFrom {
    /// What the agent is told happened before its `Configure`.
    pub fn setup_after(&self) -> boxlite_proto::SetupAfter {
        match self {
            Self::Boot => boxlite_proto::SetupAfter::Boot,
            Self::Template { .. } => boxlite_proto::SetupAfter::Template,
            Self::Saved { .. } => boxlite_proto::SetupAfter::Resume,
        }
    }
}

pub(crate) async fn start_vm(engine: &QemuEngine, config: &ShimConfig) -> BoxliteResult<RunningVm> {
    let (state, agent, ram_shared) = match &config.start {
        StartFrom::Boot => return launch(engine, &config.vm, config.boot_timeout).await,
        StartFrom::Template { state, agent } => (state, agent, true),
        StartFrom::Saved { state, agent } => (state, agent, false),
    };
    let saved = SavedState {
        state: state.clone(),
        ram_shared,
        // The agent said this when the saved VM booted; it does not say it again.
        ready: Message::Ready {
            version: agent.protocol,
            agent_version: agent.agent_version.clone(),
            uptime_ms: 0,
            root_error: None,
        },
    };
    restore(engine, &config.vm, &saved).await
}
