//! Network namespace handles. Entering a namespace happens only here, on a short-lived thread
//! of its own, so no other code ever runs switched.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// An open network namespace (a file descriptor keeps it alive).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` (e.g. CNI_NETNS) and checks that it is a network namespace.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // A wrong path (a plain file, a directory) must fail here with a clear error, not later
        // inside setns. The namespace type itself is enforced by setns(CLONE_NEWNET).
        const NSFS_MAGIC: i64 = 0x6e73_6673;
        let fs = rustix::fs::fstatfs(file.as_fd())?;
        if fs.f_type as i64 != NSFS_MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a namespace file"));
        }
        Ok(Self { file, path: path.to_path_buf() })
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Identity of the namespace (device and inode), for comparing two handles.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let st = rustix::fs::fstat(self.file.as_fd())?;
        Ok((st.st_dev, st.st_ino))
    }

    /// A UDP socket bound to `addr` in this namespace: a socket stays in the namespace it was
    /// created in, whichever thread uses it later.
    pub fn bind_udp(&self, addr: std::net::SocketAddr) -> io::Result<std::net::UdpSocket> {
        self.run(|| std::net::UdpSocket::bind(addr))?
    }

    /// A TCP listener bound to `addr` in this namespace (like [`Netns::bind_udp`]).
    pub fn bind_tcp(&self, addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
        self.run(|| std::net::TcpListener::bind(addr))?
    }

    /// Runs `f` on a new thread that has entered this namespace. The calling thread never
    /// changes namespace; the helper thread ends with `f`. Private to this module's parent:
    /// entering a namespace is what only `netlink` does.
    pub(super) fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let fd = self.file.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    rustix::thread::move_into_link_name_space(fd, Some(rustix::thread::LinkNameSpaceType::Network))?;
                    Ok(f())
                })
                .join()
                .map_err(|_| io::Error::other("namespace helper thread panicked"))?
        })
    }
}
