//! The module kinds that `fleetgate run` knows without any embedding code.

use std::sync::Arc;

use super::{devices, revocations, Registry};

pub fn registry() -> Registry {
    let mut r = Registry::new();
    // Each devices module keeps the revocation list shared under its own
    // name, which listeners using its CA consult.
    r.register(
        "devices",
        Arc::new(|value, env| {
            devices::factory_with_revocations(revocations(&env.name))(value, env)
        }),
    );
    r
}
