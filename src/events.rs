//! The event spool between the short-lived plugin processes and the agent's metrics.
//!
//! Plugins append one line per event to `<run_dir>/events` under a shared lock; the agent
//! renames the file away, takes the exclusive lock (so in-flight appends finish), counts and
//! deletes it. A plugin never blocks for long or fails because of the spool: with no agent
//! around, the file stops growing at [`MAX_SPOOL_BYTES`] and events are dropped. Each event is
//! counted once: a drained file is deleted, and a writer that loses the race with a rename
//! re-opens the new file before appending.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const FILE_NAME: &str = "events";
const DRAINING_NAME: &str = "events.draining";
/// The longest a plugin waits for the spool's lock before dropping its events.
const LOCK_WAIT: Duration = Duration::from_millis(100);
/// Beyond this size nobody is draining the spool; further events are dropped.
pub const MAX_SPOOL_BYTES: u64 = 1 << 20;

/// Something the agent turns into a metric.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An address was handed out (headcni_ip_allocations_total).
    IpAllocated { ipv6: bool },
    /// An address was given back (headcni_ip_releases_total).
    IpReleased { ipv6: bool },
    /// A pod's network was set up in this many seconds (headcni_pod_network_setup_duration_seconds).
    PodSetup { seconds: f64 },
    /// A pod's network was removed in this many seconds
    /// (headcni_pod_network_teardown_duration_seconds).
    PodTeardown { seconds: f64 },
    /// A CNI operation failed (headcni_network_errors_total{operation}).
    NetworkError { operation: String },
}

fn family(ipv6: bool) -> &'static str {
    if ipv6 { "6" } else { "4" }
}

impl Event {
    fn encode(&self) -> String {
        match self {
            Event::IpAllocated { ipv6 } => format!("alloc {}\n", family(*ipv6)),
            Event::IpReleased { ipv6 } => format!("release {}\n", family(*ipv6)),
            Event::PodSetup { seconds } => format!("setup {seconds:.6}\n"),
            Event::PodTeardown { seconds } => format!("teardown {seconds:.6}\n"),
            Event::NetworkError { operation } => format!("error {operation}\n"),
        }
    }

    fn decode(line: &str) -> Option<Self> {
        let (kind, value) = line.split_once(' ')?;
        Some(match kind {
            "alloc" => Event::IpAllocated { ipv6: value == "6" },
            "release" => Event::IpReleased { ipv6: value == "6" },
            "setup" => Event::PodSetup { seconds: value.parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0)? },
            "teardown" => {
                Event::PodTeardown { seconds: value.parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0)? }
            }
            "error" if value.chars().all(|c| c.is_ascii_lowercase()) && !value.is_empty() => {
                Event::NetworkError { operation: value.to_string() }
            }
            _ => return None,
        })
    }
}

pub fn spool_path(run_dir: &Path) -> PathBuf {
    run_dir.join(FILE_NAME)
}

/// Appends events to the spool. Best effort by design: any problem is logged at debug level and
/// the events are dropped, because metrics must never fail or stall a pod's network setup.
pub fn record(run_dir: &Path, events: &[Event]) {
    if events.is_empty() || !run_dir.is_dir() {
        return;
    }
    let line: String = events.iter().map(Event::encode).collect();
    if let Err(e) = append(&spool_path(run_dir), line.as_bytes()) {
        log::debug!("metrics events dropped: {e}");
    }
}

fn append(path: &Path, data: &[u8]) -> io::Result<()> {
    for _ in 0..3 {
        let mut file = OpenOptions::new().append(true).create(true).mode(0o600).open(path)?;
        if !lock_shared_briefly(&file)? {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "spool is locked"));
        }
        // The agent may have renamed the file between our open and our lock: append to the new one.
        let same = match fs::metadata(path) {
            Ok(m) => m.ino() == file.metadata()?.ino(),
            Err(_) => false,
        };
        if !same {
            continue;
        }
        if file.metadata()?.len() >= MAX_SPOOL_BYTES {
            return Err(io::Error::other("spool is full (no agent draining it)"));
        }
        file.write_all(data)?;
        return Ok(());
    }
    Err(io::Error::other("spool kept moving"))
}

/// Waits at most [`LOCK_WAIT`]: the agent holds the exclusive lock only while it reads the file,
/// so a longer wait means the agent is stuck, and the event is not worth stalling a pod for.
fn lock_shared_briefly(file: &File) -> io::Result<bool> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock_shared() {
            Ok(()) => return Ok(true),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Takes every event recorded so far out of the spool (agent side).
pub fn drain(run_dir: &Path) -> io::Result<Vec<Event>> {
    let spool = spool_path(run_dir);
    let draining = run_dir.join(DRAINING_NAME);
    // A drain interrupted by a crash left its file behind: count it first.
    if !draining.exists() {
        match fs::rename(&spool, &draining) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
    }
    let mut file = File::open(&draining)?;
    file.lock()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    fs::remove_file(&draining)?;
    let events: Vec<Event> = text.lines().filter_map(Event::decode).collect();
    let skipped = text.lines().count() - events.len();
    if skipped > 0 {
        log::warn!("skipped {skipped} malformed lines in the event spool");
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_events_are_drained_once() {
        let dir = tempfile::tempdir().unwrap();
        let events = vec![
            Event::IpAllocated { ipv6: false },
            Event::IpAllocated { ipv6: true },
            Event::PodSetup { seconds: 0.0042 },
            Event::NetworkError { operation: "add".into() },
            Event::IpReleased { ipv6: false },
        ];
        record(dir.path(), &events[..3]);
        record(dir.path(), &events[3..]);
        assert_eq!(drain(dir.path()).unwrap(), events);
        assert!(drain(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn no_run_dir_means_no_spool() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent");
        record(&missing, &[Event::IpReleased { ipv6: false }]);
        assert!(!missing.exists());
    }

    #[test]
    fn a_full_spool_drops_events_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(spool_path(dir.path()), vec![b'x'; MAX_SPOOL_BYTES as usize]).unwrap();
        record(dir.path(), &[Event::IpAllocated { ipv6: false }]);
        assert_eq!(fs::metadata(spool_path(dir.path())).unwrap().len(), MAX_SPOOL_BYTES);
    }

    #[test]
    fn an_interrupted_drain_is_finished_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DRAINING_NAME), "alloc 4\nbogus line\n").unwrap();
        record(dir.path(), &[Event::IpReleased { ipv6: false }]);
        assert_eq!(drain(dir.path()).unwrap(), vec![Event::IpAllocated { ipv6: false }]);
        assert_eq!(drain(dir.path()).unwrap(), vec![Event::IpReleased { ipv6: false }]);
    }

    #[test]
    fn concurrent_writers_lose_nothing_across_drains() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        record(&p, &[Event::IpAllocated { ipv6: false }]);
                    }
                })
            })
            .collect();
        let mut total = 0;
        // Drains back to back (the agent drains every few seconds): the writers must still get
        // every event in between.
        while writers.iter().any(|w| !w.is_finished()) {
            total += drain(&path).unwrap().len();
            std::thread::sleep(Duration::from_micros(200));
        }
        for w in writers {
            w.join().unwrap();
        }
        total += drain(&path).unwrap().len();
        assert_eq!(total, 800);
    }
}
