//! The module kinds that `fleetgate run` knows without any embedding code.

use super::{devices, Registry};

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register("devices", devices::factory());
    r
}
