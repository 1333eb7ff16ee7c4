//! Memory templates: a VM of one image and shape, booted once, stopped with its agent ready
//! and saved (RAM in a file, device state beside it, disk frozen). Boxes of the same key start
//! from it: RAM mapped copy-on-write, device state loaded, disk an overlay on the template's.
//! See docs/templates.md for the design and its measurements.

mod digest;
mod key;
mod service;
mod store;

pub(crate) use key::KeyInputs;
pub(crate) use service::{Templates, BUILD_LOG_LIMIT};
pub(crate) use store::{
    AgentInfo, Lookup, Template, TemplateStore, CLONE_FILE, OVERLAY_FILE, RAM_FILE, STATE_FILE,
};
