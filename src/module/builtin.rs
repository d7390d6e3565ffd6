//! The module kinds that `fleetgate run` knows without any embedding code.

use super::Registry;

pub fn registry() -> Registry {
    Registry::new()
}
