//! `fleetgate --version`: the version and what this build can do, one
//! feature a line (`-V` prints the version alone). The lines come from
//! `fleetgate::build_info`; the allocator is the binary's own.

use std::sync::OnceLock;

pub fn long() -> &'static str {
    // clap wants a `'static` string; it is built once, on the first parse.
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        fleetgate::build_info::long_version(std::any::type_name_of_val(&crate::ALLOCATOR))
    })
}
