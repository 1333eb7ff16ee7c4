//! The host end of the agent protocol: one multiplexed connection per running box.

mod client;

pub(crate) use client::{
    bounded, read_frame, write_frames, AgentClient, Channel, ChannelEvent, ChannelHandle,
    MESSAGE_LIMIT, REQUEST_TIMEOUT,
};
