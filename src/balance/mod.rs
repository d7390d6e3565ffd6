//! Backend pools: membership, balancing algorithms and health.

pub mod algorithm;
pub mod backend;
pub mod connect;
pub mod health;
pub mod pool;

pub use backend::{Backend, PassivePolicy};
pub use pool::{Member, Pool};
