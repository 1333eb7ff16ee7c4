//! The host end of the agent protocol: one multiplexed connection per running box.

mod client;

pub(crate) use client::{AgentClient, Channel, ChannelEvent, ChannelHandle};
