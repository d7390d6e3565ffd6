//! Backend pools: where members come from, the live pool handle, the
//! member set picks read, balancing algorithms and health.

pub mod algorithm;
pub mod backend;
pub mod connect;
pub mod health;
pub mod keepalive;
pub mod member_set;
pub mod pool;
pub mod settings;
pub mod source;

pub use backend::{Backend, PassivePolicy};
pub use member_set::{Member, MemberSet};
pub use pool::Pool;
pub use settings::{Algorithm, BackendPlan, CheckKind, HealthPlan, PoolPlan, MAX_WEIGHT};
pub use source::{MemberSource, MemberSpec, Origin, Role, StaticMembers};
