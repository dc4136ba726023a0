//! The on-disk store of one network: `<dataDir>/<network>/`.
//!
//! ```text
//! lock                      flock target; never renamed, never removed
//! state.<boot id>           the state (see `state.rs`), replaced atomically
//! .state.<boot id>.tmp.<pid> a writer's new state before the swap, or the old one after it
//!                           (removed by the next writer if its writer died)
//! corrupt.<boot id>.<time>  a damaged state file kept by `headcni ipam repair`
//! ```
//!
//! Every change takes the exclusive lock, reads the state, and writes a whole new file that
//! atomically takes the old one's place (see `replace`): a writer killed at any instant leaves
//! either the old state or the new, never a mix, and its temporary file is removed by the next
//! writer. Readers (STATUS, CHECK, `headcni ipam list|stats`) take no lock: the swap is atomic,
//! so they always see one complete state, and they never wait behind a queue of writers.
//!
//! The boot id is part of the state file's name. Allocations die with the pods at a reboot, so
//! the first writer of a new boot deletes the files of earlier boots without reading them, and
//! readers simply do not look at them. That is also why no write is fsynced: the only failure
//! that loses page-cache data is a power loss or kernel crash, which reboots the node; whatever
//! such a crash leaves in the file (nothing, zeros, an older version) carries the old boot id in
//! its name and is never parsed.

use super::state::{self, FormatError, Header, State};
use crate::fsutil::{self, LockFile};
use rustix::fs::{CWD, RenameFlags};
use rustix::io::Errno;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const LOCK_NAME: &str = "lock";
const STATE_PREFIX: &str = "state.";
const CORRUPT_PREFIX: &str = "corrupt.";
/// Up to this size STATUS verifies the whole file; above it, the header and the end line.
const FULL_CHECK_LIMIT: u64 = 1 << 20;
/// How much of a large file STATUS reads to find the header.
const HEADER_READ: usize = 64 << 10;
/// Room STATUS wants on the file system beyond the current state's size.
const SPARE_BYTES: u64 = 8 << 10;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "IPAM state file {} is damaged ({source}); nothing was changed. Run `{repair}` to salvage its valid records (the damaged file is kept as a copy)",
        path.display()
    )]
    Corrupt { path: PathBuf, source: FormatError, repair: String },
    #[error("IPAM state file {}: {source}; upgrade headcni on this node", path.display())]
    NewerFormat { path: PathBuf, source: FormatError },
    #[error("the kernel's boot id \"{}\" is not a UUID", .0.escape_debug())]
    BootId(String),
    #[error("network name \"{}\" is not usable as a directory name", .0.escape_debug())]
    NetworkName(String),
}

fn io_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> StoreError + 'p {
    move |source| StoreError::Io { action, path: path.to_path_buf(), source }
}

/// Boot ids are UUIDs in text form; nothing else ever becomes part of a file name.
pub fn is_valid_boot_id(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() })
}

/// The store of one network.
#[derive(Debug, Clone)]
pub struct Store {
    data_dir: PathBuf,
    network: String,
    dir: PathBuf,
    boot_id: String,
}

impl Store {
    /// The store of `network` under `data_dir`, for the boot `boot_id`.
    pub fn new(data_dir: &Path, network: &str, boot_id: &str) -> Result<Self, StoreError> {
        if !crate::cni::is_safe_name(network) {
            return Err(StoreError::NetworkName(network.to_string()));
        }
        if !is_valid_boot_id(boot_id) {
            return Err(StoreError::BootId(boot_id.to_string()));
        }
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            network: network.to_string(),
            dir: data_dir.join(network),
            boot_id: boot_id.to_ascii_lowercase(),
        })
    }

    /// The store of `network` for the running boot.
    pub fn for_this_boot(data_dir: &Path, network: &str) -> Result<Self, StoreError> {
        let boot = fsutil::boot_id().map_err(io_err("reading the boot id from", Path::new(BOOT_ID_PATH)))?;
        Self::new(data_dir, network, &boot)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(format!("{STATE_PREFIX}{}", self.boot_id))
    }

    /// The command that repairs this store, as shown in error messages.
    pub fn repair_command(&self) -> String {
        let mut cmd = format!("headcni ipam repair --network {}", self.network);
        if self.data_dir != Path::new(super::config::DEFAULT_DATA_DIR) {
            cmd.push_str(&format!(" --data-dir {}", self.data_dir.display()));
        }
        cmd
    }

    /// Takes the exclusive lock, creating the store's directory if needed (ADD), and tidies up
    /// after writers that died and after earlier boots.
    pub fn lock_creating(&self) -> Result<Locked<'_>, StoreError> {
        fsutil::ensure_dir(&self.dir, 0o700).map_err(io_err("creating", &self.dir))?;
        self.lock_dir()
    }

    /// Like [`lock_creating`](Self::lock_creating) for operations that only remove (DEL, GC,
    /// repair): `None` when there is no directory, hence nothing stored, and none is created.
    pub fn lock_existing(&self) -> Result<Option<Locked<'_>>, StoreError> {
        if !self.dir.is_dir() {
            return Ok(None);
        }
        self.lock_dir().map(Some)
    }

    fn lock_dir(&self) -> Result<Locked<'_>, StoreError> {
        let lock_path = self.dir.join(LOCK_NAME);
        let lock = LockFile::exclusive(&lock_path).map_err(io_err("locking", &lock_path))?;
        let locked = Locked { store: self, _lock: lock };
        locked.tidy()?;
        Ok(locked)
    }

    /// The current boot's state file, or `None` when there is none. Needs no lock.
    pub fn read(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.state_path();
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// Parses bytes read from this store's state file.
    pub fn parse<'a>(&self, bytes: &'a [u8]) -> Result<State<'a>, StoreError> {
        State::parse(bytes, &self.boot_id).map_err(|e| self.format_error(e))
    }

    /// Reads and parses the state; an absent file is an empty state.
    pub fn load_owned(&self) -> Result<State<'static>, StoreError> {
        match self.read()? {
            Some(bytes) => Ok(self.parse(&bytes)?.into_owned()),
            None => Ok(State::new(&self.boot_id)),
        }
    }

    fn format_error(&self, source: FormatError) -> StoreError {
        if source.newer_version.is_some() {
            StoreError::NewerFormat { path: self.state_path(), source }
        } else {
            StoreError::Corrupt { path: self.state_path(), source, repair: self.repair_command() }
        }
    }

    /// The header of the current state, cheaply: a small file is verified completely; of a
    /// large one only the header and the end line are read (a mismatch between the two is
    /// truncation; damage in between is caught by the next writer, which verifies everything).
    /// Also returns the file's size. `None`: no state yet.
    pub fn read_header(&self) -> Result<Option<(Header, u64)>, StoreError> {
        let path = self.state_path();
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let len = file.metadata().map_err(io_err("reading", &path))?.len();
        if len <= FULL_CHECK_LIMIT {
            let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            file.read_to_end(&mut bytes).map_err(io_err("reading", &path))?;
            return Ok(Some((self.parse(&bytes)?.header(), len)));
        }
        let mut head = vec![0u8; HEADER_READ];
        let got = read_fully_at(&file, &mut head, 0).map_err(io_err("reading", &path))?;
        head.truncate(got);
        let text = match std::str::from_utf8(&head) {
            Ok(t) => t,
            Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default(),
        };
        let header = match state::parse_header(text, false) {
            Ok((header, _, _)) => header,
            // A header larger than the first read (thousands of exclusions): read it all.
            Err(e) if e.line == 0 => return Ok(Some((self.load_owned()?.header(), len))),
            Err(e) => return Err(self.format_error(e)),
        };
        if header.boot_id != self.boot_id {
            return Err(self.format_error(FormatError {
                line: 2,
                reason: format!("boot id {} does not match its file name", header.boot_id),
                newer_version: None,
            }));
        }
        let mut tail = [0u8; 128];
        let tail_len = tail.len().min(usize::try_from(len).unwrap_or(0));
        let got =
            read_fully_at(&file, &mut tail[..tail_len], len - tail_len as u64).map_err(io_err("reading", &path))?;
        let trailer = state::parse_trailer(&tail[..got]).map_err(|e| self.format_error(e))?;
        if trailer.records != header.records {
            return Err(self.format_error(FormatError {
                line: 0,
                reason: format!("header announces {} records, the end line {}", header.records, trailer.records),
                newer_version: None,
            }));
        }
        Ok(Some((header, len)))
    }

    /// Why a write would fail right now, if it would: the directory (or the one it would be
    /// created in) is not writable, or its file system lacks room for a new copy of the state.
    pub fn write_problem(&self, state_len: u64) -> Option<String> {
        let mut dir = self.dir.as_path();
        while !dir.exists() {
            dir = dir.parent()?;
        }
        if let Err(e) = rustix::fs::access(dir, rustix::fs::Access::WRITE_OK) {
            return Some(format!("{} is not writable: {}", dir.display(), io::Error::from(e)));
        }
        match rustix::fs::statvfs(dir) {
            Ok(vfs) => {
                let free = vfs.f_bfree.saturating_mul(vfs.f_frsize);
                let needed = state_len.saturating_add(SPARE_BYTES);
                if free < needed {
                    return Some(format!("{} has {free} bytes free, a state update needs {needed}", dir.display()));
                }
                if vfs.f_files > 0 && vfs.f_ffree == 0 {
                    return Some(format!("{} has no free inodes", dir.display()));
                }
                None
            }
            Err(e) => Some(format!("{}: {}", dir.display(), io::Error::from(e))),
        }
    }
}

const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

fn read_fully_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The store while this process holds its exclusive lock (released on drop or process death).
#[derive(Debug)]
pub struct Locked<'s> {
    store: &'s Store,
    _lock: LockFile,
}

impl Locked<'_> {
    pub fn store(&self) -> &Store {
        self.store
    }

    /// Removes what dead writers and earlier boots left behind. Only this boot's state, the
    /// lock and kept copies of damaged files stay.
    fn tidy(&self) -> Result<(), StoreError> {
        let dir = &self.store.dir;
        let current = format!("{STATE_PREFIX}{}", self.store.boot_id);
        let entries = fs::read_dir(dir).map_err(io_err("listing", dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("listing", dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale_state = name.starts_with(STATE_PREFIX) && name != current;
            if !(fsutil::is_temp_file(name) || stale_state) {
                continue;
            }
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) if stale_state => log::info!(
                    "network {}: released every allocation of an earlier boot ({} removed unread)",
                    self.store.network,
                    path.display()
                ),
                Ok(()) => log::info!("removed {}, left by a writer that died", path.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            }
        }
        Ok(())
    }

    /// Replaces the state file with `state`. On failure (full disk, read-only file system) the
    /// previous state stays as it was.
    pub fn write(&self, state: &State<'_>) -> Result<(), StoreError> {
        let path = self.store.state_path();
        replace(&path, &state.encode()).map_err(io_err("writing", &path))
    }

    /// Renames the current state file to `corrupt.<boot>.<unix time>` and returns the new path.
    pub fn set_aside(&self) -> Result<PathBuf, StoreError> {
        let from = self.store.state_path();
        let now = super::entropy::unix_now();
        let to = self.store.dir.join(format!("{CORRUPT_PREFIX}{}.{now}", self.store.boot_id));
        fs::rename(&from, &to).map_err(io_err("setting aside", &from))?;
        Ok(to)
    }
}

/// Atomically replaces `path` with `data` (no fsync, see the module docs).
///
/// The new content goes to a temporary file that is then swapped with the old one by
/// `renameat2(RENAME_EXCHANGE)` and the old content unlinked. A plain rename over an existing
/// file would do the same for readers, but ext4 (auto_da_alloc) turns every rename-over into a
/// forced block allocation and writeback start of the new file: milliseconds per update for a
/// large state, and disk writes on every ADD, to protect against exactly the power loss that
/// the boot id in the file name already makes harmless. Where the file system cannot exchange
/// (or on the first write), a plain rename does the job. A writer killed after the exchange
/// leaves the old content under the temporary name, which the next writer removes.
fn replace(path: &Path, data: &[u8]) -> io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| io::Error::other("state path has no name"))?;
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let written = (|| {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(data)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    match rustix::fs::renameat_with(CWD, &tmp, CWD, path, RenameFlags::EXCHANGE) {
        Ok(()) => {
            if let Err(e) = fs::remove_file(&tmp) {
                log::debug!("removing the previous state {}: {e}", tmp.display());
            }
            Ok(())
        }
        // No file to exchange with yet, or a file system without RENAME_EXCHANGE.
        Err(Errno::NOENT | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
            fs::rename(&tmp, path).inspect_err(|_| {
                let _ = fs::remove_file(&tmp);
            })
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e.into())
        }
    }
}

/// The network names that have a store under `data_dir`.
pub fn networks(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", data_dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", data_dir))?;
        if let Some(name) = entry.file_name().to_str()
            && crate::cni::is_safe_name(name)
            && entry.path().join(LOCK_NAME).exists()
        {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::state::Allocation;

    const BOOT_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const BOOT_B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

    fn alloc(ip: &str, cid: &str) -> Allocation {
        Allocation {
            address: ip.parse().unwrap(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            allocated_at: 1,
            pod_namespace: String::new(),
            pod_name: String::new(),
            netns: String::new(),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        n.sort();
        n
    }

    #[test]
    fn boot_ids_and_network_names_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        assert!(is_valid_boot_id(BOOT_A));
        for bad in
            ["", "../../etc/passwd", "aaaaaaaa-0000-4000-8000-00000000000/", "aaaaaaaa00000-4000-8000-000000000001"]
        {
            assert!(matches!(Store::new(dir.path(), "n", bad), Err(StoreError::BootId(_))), "{bad}");
        }
        assert!(matches!(Store::new(dir.path(), "../x", BOOT_A), Err(StoreError::NetworkName(_))));
        assert!(Store::for_this_boot(dir.path(), "n").is_ok());
    }

    #[test]
    fn write_read_and_unlocked_reads_see_whole_states() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "net", BOOT_A).unwrap();
        assert!(store.lock_existing().unwrap().is_none(), "no directory, nothing to lock");
        assert!(store.read().unwrap().is_none());
        let locked = store.lock_creating().unwrap();
        let mut state = State::new(BOOT_A);
        state.insert(&alloc("10.0.0.2", "a"));
        locked.write(&state).unwrap();
        drop(locked);
        assert_eq!(
            store.load_owned().unwrap().held_by("a", "eth0"),
            vec!["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(names(store.dir()), vec!["lock".to_string(), format!("state.{BOOT_A}")]);
        let (header, len) = store.read_header().unwrap().unwrap();
        assert_eq!((header.records, len), (1, fs::metadata(store.state_path()).unwrap().len()));
        assert_eq!(networks(dir.path()).unwrap(), vec!["net".to_string()]);
    }

    #[test]
    fn a_new_boot_drops_earlier_state_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let old = Store::new(dir.path(), "net", BOOT_A).unwrap();
        fsutil::ensure_dir(old.dir(), 0o700).unwrap();
        // What a power loss can leave behind: garbage under the old boot's name.
        fs::write(old.state_path(), b"\0\0\0\0garbage").unwrap();
        let new = Store::new(dir.path(), "net", BOOT_B).unwrap();
        // Readers of the new boot do not even look at it.
        assert!(new.read().unwrap().is_none());
        assert!(new.read_header().unwrap().is_none());
        // The first writer removes it.
        let locked = new.lock_existing().unwrap().unwrap();
        assert_eq!(names(new.dir()), vec!["lock".to_string()]);
        locked.write(&State::new(BOOT_B)).unwrap();
        assert_eq!(names(new.dir()), vec!["lock".to_string(), format!("state.{BOOT_B}")]);
    }

    #[test]
    fn leftover_temp_files_are_removed_by_the_next_writer_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "net", BOOT_A).unwrap();
        let locked = store.lock_creating().unwrap();
        locked.write(&State::new(BOOT_A)).unwrap();
        drop(locked);
        let temp = store.dir().join(format!(".state.{BOOT_A}.tmp.999999"));
        fs::write(&temp, b"half a state").unwrap();
        fs::write(store.dir().join(format!("corrupt.{BOOT_A}.5")), b"kept").unwrap();
        store.read_header().unwrap();
        assert!(temp.exists(), "readers leave it alone");
        drop(store.lock_existing().unwrap());
        assert!(!temp.exists());
        assert!(store.dir().join(format!("corrupt.{BOOT_A}.5")).exists());
    }

    #[test]
    fn damage_is_reported_with_the_file_and_the_repair_command() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "net", BOOT_A).unwrap();
        let locked = store.lock_creating().unwrap();
        let mut state = State::new(BOOT_A);
        state.insert(&alloc("10.0.0.2", "a"));
        locked.write(&state).unwrap();
        let good = fs::read(store.state_path()).unwrap();
        for bad in [Vec::new(), good[..good.len() - 3].to_vec(), b"\x7fELF garbage".to_vec()] {
            fs::write(store.state_path(), &bad).unwrap();
            let err = store.load_owned().unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{msg}");
            assert!(msg.contains(&store.state_path().display().to_string()), "{msg}");
            assert!(msg.contains(&format!("headcni ipam repair --network net --data-dir {}", dir.path().display())));
            assert!(store.read_header().is_err());
        }
        let aside = locked.set_aside().unwrap();
        assert!(aside.file_name().unwrap().to_string_lossy().starts_with(&format!("corrupt.{BOOT_A}.")));
        assert!(store.read().unwrap().is_none());
    }

    #[test]
    fn large_files_are_checked_by_header_and_end_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "net", BOOT_A).unwrap();
        let locked = store.lock_creating().unwrap();
        let mut state = State::new(BOOT_A);
        for i in 0..12_000u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i + 2);
            let mut a = alloc(&ip.to_string(), &format!("c{i}"));
            a.netns = format!("/var/run/netns/cni-{i:060}");
            state.insert(&a);
        }
        locked.write(&state).unwrap();
        let len = fs::metadata(store.state_path()).unwrap().len();
        assert!(len > FULL_CHECK_LIMIT, "{len}");
        assert_eq!(store.read_header().unwrap().unwrap().0.records, 12_000);
        let bytes = fs::read(store.state_path()).unwrap();
        fs::write(store.state_path(), &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(store.read_header(), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn write_problems_are_found_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("not/yet"), "net", BOOT_A).unwrap();
        assert_eq!(store.write_problem(0), None, "creatable is fine");
        assert!(store.write_problem(u64::MAX / 2).unwrap().contains("bytes free"));
    }
}
