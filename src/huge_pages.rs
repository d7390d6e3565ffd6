//! `[global] transparent_huge_pages`: whether the kernel may back the
//! balancer's heap with 2 MiB pages.
//!
//! The allocator (mimalloc) asks for them on its arenas (`madvise`), and
//! they save CPU under load: fewer TLB misses (the offload path measured
//! about 10 % less CPU per request with them). The other side is memory
//! on a host holding many idle connections: the kernel's khugepaged
//! collapses a 2 MiB range into one huge page once a few of its 4 KiB
//! pages are in use, so the free holes between long-lived allocations
//! become resident. With 9,500 idle command channels the balancer's RSS
//! rose in 10 s steps (khugepaged's scan interval) from 73 to 104 MiB over
//! a minute of silence; without huge pages it stayed at 48 MiB.
//! `false` sets the process's "THP disable" flag (prctl
//! PR_SET_THP_DISABLE), which covers every mapping, those made before too.

/// Apply the setting at start; it holds for the process's life (a
/// reload cannot change it). An error is logged, not fatal: the balancer
/// runs either way, with more memory or more CPU.
pub fn apply(enabled: bool) {
    if enabled {
        return;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!("transparent_huge_pages = false: could not turn them off: {e}");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    tracing::warn!("transparent_huge_pages = false has no effect on this platform");
}

/// Whether huge pages are off for this process (Linux; None elsewhere or
/// when the kernel does not say).
pub fn disabled() -> Option<bool> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        rustix::thread::transparent_huge_pages_are_disabled().ok()
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        None
    }
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    /// In a child process: the flag is process-wide and cannot be cleared
    /// for the test binary's other tests afterwards without a race.
    #[test]
    fn false_turns_them_off_for_the_process() {
        let exe = std::env::current_exe().unwrap();
        if std::env::var_os("FLEETGATE_THP_CHILD").is_some() {
            super::apply(true);
            assert_eq!(super::disabled(), Some(false));
            super::apply(false);
            assert_eq!(super::disabled(), Some(true));
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            assert!(status.contains("THP_enabled:\t0"), "{status}");
            return;
        }
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "huge_pages::tests::false_turns_them_off_for_the_process",
            ])
            .env("FLEETGATE_THP_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
