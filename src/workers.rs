//! Connection workers: one single-threaded tokio runtime per thread, each
//! accepting on its own SO_REUSEPORT socket of every listener and serving
//! the connections it accepted to their end.
//!
//! Why not the multi-threaded scheduler for connections: a proxied
//! keep-alive request is a few syscalls of real work, and on a small
//! appliance the scheduler's bookkeeping around them (waking an idle
//! worker with a futex, stealing, atomics on shared run queues) cost as
//! much again. With a runtime per thread a connection is woken, polled
//! and finished on the thread whose epoll saw its event, and the kernel
//! spreads new connections over the threads (SO_REUSEPORT), as HAProxy
//! and nginx do with their threads and processes. Admin, health checks,
//! discovery and modules' background tasks stay on the main runtime.
//!
//! With one worker per core, each worker is pinned to a core of its own
//! (`cpu_affinity = "auto"`, as nginx's `worker_cpu_affinity auto` and
//! HAProxy's `cpu-map`). Unpinned, the scheduler sometimes puts both
//! workers on one core while the other runs something else; every
//! connection of the waiting worker then stalls for a time slice, which
//! is what the slowest percent of requests measures.

use std::fmt;
use std::io;
use std::sync::Mutex;
use std::thread;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct Workers {
    handles: Vec<Handle>,
    /// Dropping a sender ends its worker's `block_on`.
    stops: Mutex<Vec<oneshot::Sender<()>>>,
}

impl Workers {
    /// Start `n` workers (at least one). The threads run until `Workers`
    /// is dropped; their runtimes are dropped on their own threads, never
    /// inside an async context.
    pub fn start(n: usize, affinity: &CpuAffinity) -> io::Result<Workers> {
        let n = n.max(1);
        let cores = affinity.placement(n, &allowed_cpus());
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for (i, core) in cores.into_iter().enumerate() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("fleetgate-w{i}"))
                .build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            thread::Builder::new()
                .name(format!("fleetgate-w{i}"))
                .spawn(move || {
                    if let Some(id) = core {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                            tracing::warn!(
                                worker = i,
                                cpu = id,
                                "cannot pin the worker to its CPU"
                            );
                        }
                    }
                    let _ = rt.block_on(stopped);
                })?;
        }
        Ok(Workers {
            handles,
            stops: Mutex::new(stops),
        })
    }

    /// How many workers to start for a configured `worker_threads`
    /// (0 = one per core).
    pub fn count(configured: usize) -> usize {
        if configured > 0 {
            return configured;
        }
        thread::available_parallelism().map_or(1, |n| n.get())
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// Where connection workers run (`[global] cpu_affinity`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CpuAffinity {
    /// Worker i on the i-th CPU this process may use, when there are no
    /// more workers than such CPUs; otherwise as `Off`.
    #[default]
    Auto,
    /// The scheduler places the workers.
    Off,
    /// Worker i on `cpus[i % cpus.len()]`, e.g. to keep cores free for
    /// the management servers on the same machine.
    Cpus(Vec<usize>),
}

impl CpuAffinity {
    /// The CPU of each of `n` workers, given the CPUs the process may use.
    pub fn placement(&self, n: usize, allowed: &[usize]) -> Vec<Option<usize>> {
        match self {
            CpuAffinity::Off => vec![None; n],
            CpuAffinity::Auto if n > allowed.len() || allowed.len() < 2 => vec![None; n],
            CpuAffinity::Auto => allowed[..n].iter().copied().map(Some).collect(),
            CpuAffinity::Cpus(cpus) if cpus.is_empty() => vec![None; n],
            CpuAffinity::Cpus(cpus) => (0..n).map(|i| Some(cpus[i % cpus.len()])).collect(),
        }
    }
}

/// The CPUs this process may run on (its affinity mask, which containers
/// and `taskset` narrow).
pub fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

/// `"auto"`, `"off"`, or a list of CPU numbers.
impl<'de> Deserialize<'de> for CpuAffinity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CpuAffinity;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""auto", "off", or a list of CPU numbers such as [0, 1]"#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<CpuAffinity, E> {
                match v {
                    "auto" => Ok(CpuAffinity::Auto),
                    "off" => Ok(CpuAffinity::Off),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CpuAffinity, A::Error> {
                let mut cpus = Vec::new();
                while let Some(c) = seq.next_element::<usize>()? {
                    cpus.push(c);
                }
                Ok(CpuAffinity::Cpus(cpus))
            }
        }
        d.deserialize_any(V)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stops.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pins_one_worker_per_allowed_cpu() {
        let a = CpuAffinity::Auto;
        assert_eq!(a.placement(2, &[0, 1]), vec![Some(0), Some(1)]);
        // A narrowed mask (container, taskset) is respected.
        assert_eq!(a.placement(2, &[2, 5, 7]), vec![Some(2), Some(5)]);
        // More workers than CPUs, or a single CPU: nothing to gain.
        assert_eq!(a.placement(3, &[0, 1]), vec![None; 3]);
        assert_eq!(a.placement(1, &[0]), vec![None]);
        assert_eq!(CpuAffinity::Off.placement(2, &[0, 1]), vec![None; 2]);
        let list = CpuAffinity::Cpus(vec![3, 1]);
        assert_eq!(
            list.placement(3, &[0, 1, 2, 3]),
            vec![Some(3), Some(1), Some(3)]
        );
    }

    #[test]
    fn a_pinned_worker_runs_on_its_cpu() {
        let cpu = *allowed_cpus()
            .last()
            .expect("this process may run somewhere");
        let workers = Workers::start(1, &CpuAffinity::Cpus(vec![cpu])).unwrap();
        // Read on the worker's own thread.
        let task = workers.handles()[0]
            .spawn(async { std::fs::read_to_string("/proc/thread-self/status") });
        let status = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(task)
            .unwrap()
            .unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(allowed, cpu.to_string());
    }
}
