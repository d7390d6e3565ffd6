//! Binary upgrade without dropping a connection (`fleetgate upgrade`,
//! SIGUSR2): the running process starts the new binary, which takes over
//! its listening sockets by fd passing over the control socket (the same
//! sockets with the same accept queues: nothing queued is lost, no bind
//! can fail), then its stores, and serves; the old process drains and
//! exits. The sequence is in protocol.rs, the procedure in
//! docs/upgrade.md.
//!
//! Not SO_REUSEPORT side by side: the kernel would hash new connections
//! to either process's socket, and closing the old one drops the
//! connections queued on it.

pub mod child;
pub mod client;
mod control;
pub mod fdpass;
pub mod protocol;

pub use child::{Received, Takeover};
pub use control::{handed_over, requested_by_signal, start};
