//! Certificate renewal without a signal: every second, stat the
//! certificate, key and CA files of the running plan (`Origin::watched`)
//! and, when some changed, apply the running configuration again
//! (`Runtime::reload_certificates`), which re-reads them.
//!
//! A stat per file per second costs nothing next to a handshake, needs no
//! inotify descriptor per directory, and sees what inotify on the path
//! would miss: `metadata()` follows symlinks, so certbot's `live/` links
//! moving to a new `archive/` file and Kubernetes swapping its `..data`
//! link both change the (device, inode, size, mtime) of the path.
//!
//! A writer that takes several steps (the certificate, then the key; a
//! file written in two parts) is seen as one change: files are acted on
//! only once none of them changed during the last poll. A step that is
//! still incomplete then is refused by validation like any bad file (the
//! old material keeps serving, the reload counts as an error) and is
//! retried at the next change of a file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Weak;
use std::time::Duration;

use super::Runtime;

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(1);

use crate::config::FileStamp as Stamp;

struct File {
    /// As of the last reload this watch made (or when first seen).
    applied: Option<Stamp>,
    /// As of the last poll.
    seen: Option<Stamp>,
}

/// The watched files' stamps between polls.
#[derive(Default)]
struct Watch {
    files: BTreeMap<PathBuf, File>,
}

impl Watch {
    /// Look at `paths` (the running plan's) once. Returns the files that
    /// changed since the last reload, once none changed during this poll;
    /// they then count as applied, whatever the reload's result, so that a
    /// refused file is retried on its next change, not every second.
    fn poll(
        &mut self,
        paths: &[PathBuf],
        read_as: &BTreeMap<PathBuf, Stamp>,
    ) -> Option<Vec<PathBuf>> {
        // A reload may have changed the set: a new file starts from what
        // it was when the plan read it, so a change made since is seen.
        self.files.retain(|p, _| paths.contains(p));
        let mut moving = false;
        for p in paths {
            let now = Stamp::of(p);
            let then = read_as.get(p).copied();
            let f = self.files.entry(p.clone()).or_insert(File {
                applied: then,
                seen: then,
            });
            if f.seen != now {
                f.seen = now;
                moving = true;
            }
        }
        if moving {
            return None;
        }
        let changed: Vec<PathBuf> = self
            .files
            .iter_mut()
            .filter(|(_, f)| f.seen != f.applied)
            .map(|(p, f)| {
                f.applied = f.seen;
                p.clone()
            })
            .collect();
        (!changed.is_empty()).then_some(changed)
    }
}

/// The watch task, on the control plane next to `watch_backends`; ends
/// with the runtime or at the drain.
pub async fn run(rt: Weak<Runtime>) {
    let mut watch = Watch::default();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(rt) = rt.upgrade() else { return };
        if rt.drain.is_started() {
            return;
        }
        let plan = rt.plan();
        let Some(changed) = watch.poll(&plan.origin.watched, &plan.origin.read_as) else {
            continue;
        };
        drop(plan);
        let files = changed
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(%files, "certificate files changed: reloading them");
        crate::systemd::reloading();
        let result = rt.reload_certificates();
        crate::systemd::reloaded(&rt);
        match result {
            Ok(()) => tracing::info!(%files, "certificates reloaded; new handshakes use them"),
            Err(e) => tracing::error!(
                %files,
                "certificate reload refused, the running certificates stay (retried when a file changes again): {e:#}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    /// The stamps a plan that read `paths` now would carry.
    fn read(paths: &[PathBuf]) -> BTreeMap<PathBuf, Stamp> {
        paths
            .iter()
            .filter_map(|p| Some((p.clone(), Stamp::of(p)?)))
            .collect()
    }

    #[test]
    fn a_change_is_reported_once_it_held_for_a_poll() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.pem"), dir.path().join("b.key"));
        write(&a, "a1");
        write(&b, "b1");
        let paths = vec![a.clone(), b.clone()];
        let r = read(&paths);
        let mut w = Watch::default();
        assert_eq!(w.poll(&paths, &r), None, "the first poll is the baseline");
        assert_eq!(w.poll(&paths, &r), None);

        write(&a, "a2 longer");
        assert_eq!(w.poll(&paths, &r), None, "a.pem just changed");
        // The second step of the same writer, before the next poll.
        write(&b, "b2 longer");
        assert_eq!(w.poll(&paths, &r), None, "b.key just changed");
        assert_eq!(w.poll(&paths, &r), Some(paths.clone()), "both, at once");
        assert_eq!(w.poll(&paths, &r), None, "reported once");
    }

    #[test]
    fn a_swapped_symlink_a_vanished_file_and_a_new_path_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = (dir.path().join("cert1.pem"), dir.path().join("cert2.pem"));
        write(&v1, "same size");
        write(&v2, "same size");
        let live = dir.path().join("live.pem");
        std::os::unix::fs::symlink(&v1, &live).unwrap();
        let paths = vec![live.clone()];
        let r = read(&paths);
        let mut w = Watch::default();
        assert_eq!(w.poll(&paths, &r), None);

        // certbot: the link moves to a new file of the same size.
        let tmp = dir.path().join("live.tmp");
        std::os::unix::fs::symlink(&v2, &tmp).unwrap();
        std::fs::rename(&tmp, &live).unwrap();
        assert_eq!(w.poll(&paths, &r), None);
        assert_eq!(w.poll(&paths, &r), Some(paths.clone()));

        std::fs::remove_file(&v2).unwrap();
        assert_eq!(w.poll(&paths, &r), None);
        assert_eq!(w.poll(&paths, &r), Some(paths.clone()), "gone counts too");

        // A path that a reload added starts from what it was when read.
        let more = vec![live.clone(), v1.clone()];
        let r = read(&more);
        assert_eq!(w.poll(&more, &r), None);
        assert_eq!(w.poll(&more, &r), None);
    }

    /// A renewal that lands between the plan's read and the watch's first
    /// look (at start, or just after a reload) is not taken for the
    /// baseline.
    #[test]
    fn a_change_before_the_first_poll_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.pem");
        write(&a, "read by the plan");
        let paths = vec![a.clone()];
        let r = read(&paths);
        write(&a, "renewed before the watch looked");
        let mut w = Watch::default();
        assert_eq!(w.poll(&paths, &r), None, "just seen changing");
        assert_eq!(w.poll(&paths, &r), Some(paths.clone()));
    }
}
