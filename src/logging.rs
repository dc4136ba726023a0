//! Logging setup for each role, and how a command ends: its last line ([`fatal`]) and its exit
//! code ([`exit`]). In CNI mode stdout carries the result, so records go to a log
//! file and to stderr; the long-running agent and the CLI log to stderr only.
//!
//! The plugins' log file is bounded: a plugin that finds it at [`MAX_LOG_BYTES`] or more renames
//! it to `<file>.1` (replacing the one before) and starts a new one, so the file and its one
//! predecessor hold at most about twice that. The rename happens under an exclusive lock on
//! the full file, and whoever waited for that lock opens the file anew instead of rotating the
//! fresh one: concurrent plugins rotate once.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Default log file of the CNI plugins.
pub const DEFAULT_LOG_FILE: &str = "/var/log/headcni/headcni.log";
/// Environment variable holding the log level (`error`, `warn`, `info`, `debug`, `trace`, or
/// env_logger filter syntax).
pub const LEVEL_ENV: &str = "HEADCNI_LOG_LEVEL";
/// Environment variable naming the plugins' log file; overrides the config's `log_file`.
pub const FILE_ENV: &str = "HEADCNI_LOG_FILE";
/// The size at which the plugins' log file is rotated.
pub const MAX_LOG_BYTES: u64 = 8 << 20;
/// Environment variable choosing the record format: `text` (default) or `json` (one object per
/// line, for log pipelines).
pub const FORMAT_ENV: &str = "HEADCNI_LOG_FORMAT";

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00.000Z INFO  role[pid] message`
    Text,
    /// `{"ts":"2026-01-01T00:00:00.000Z","level":"info","role":"agent","pid":1,"msg":"..."}`
    Json,
}

impl LogFormat {
    /// From HEADCNI_LOG_FORMAT; anything but `json` is text, so a typo never silences a log.
    pub fn from_env() -> Self {
        match std::env::var(FORMAT_ENV) {
            Ok(v) if v.trim().eq_ignore_ascii_case("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// Writes one record in `format` (the same shape for every role).
fn write_record(
    out: &mut env_logger::fmt::Formatter,
    format: LogFormat,
    role: &str,
    pid: u32,
    record: &log::Record,
) -> io::Result<()> {
    let ts = out.timestamp_millis();
    match format {
        LogFormat::Text => writeln!(out, "{ts} {:<5} {role}[{pid}] {}", record.level(), record.args()),
        LogFormat::Json => {
            let line = serde_json::json!({
                "ts": ts.to_string(),
                "level": record.level().as_str().to_ascii_lowercase(),
                "role": role,
                "pid": pid,
                "msg": record.args().to_string(),
            });
            writeln!(out, "{line}")
        }
    }
}

/// Exit codes, the same for every command (and listed in `headcni --help`).
pub mod exit {
    /// Done; for `status`, nothing is wrong.
    pub const OK: i32 = 0;
    /// The command ran and failed, or (`status`) found a problem.
    pub const FAILED: i32 = 1;
    /// Unusable command line or configuration: nothing was changed.
    pub const USAGE: i32 = 2;
}

/// The one way every command reports the error that ends it, on stderr: `headcni COMMAND: error:
/// MESSAGE`, or with HEADCNI_LOG_FORMAT=json a record of level `error` like every other line
/// (role COMMAND, msg MESSAGE), so that a log pipeline parses it. No log level silences it. The
/// caller returns the exit code (see `headcni --help`).
pub fn fatal(command: &str, err: &dyn std::fmt::Display) {
    fatal_in(LogFormat::from_env(), command, err);
}

fn fatal_in(format: LogFormat, command: &str, err: &dyn std::fmt::Display) {
    match format {
        LogFormat::Text => {
            let _ = writeln!(io::stderr(), "headcni {command}: error: {err}");
        }
        LogFormat::Json => {
            // A logger of its own, written by the same formatter as every record, past any filter.
            let role = command.to_string();
            let pid = std::process::id();
            let mut b = env_logger::Builder::new();
            b.filter_level(log::LevelFilter::Error);
            b.format(move |out, record| write_record(out, format, &role, pid, record));
            b.target(env_logger::Target::Stderr);
            let logger = b.build();
            log::Log::log(
                &logger,
                &log::Record::builder().level(log::Level::Error).target("headcni").args(format_args!("{err}")).build(),
            );
            log::Log::flush(&logger);
        }
    }
}

/// Copies every formatted record to the log file and to stderr.
struct Tee {
    file: Option<std::fs::File>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(file) = &mut self.file {
            // A full or read-only log disk must never fail a CNI operation.
            let _ = file.write_all(buf);
        }
        let _ = io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn builder(level: Option<&str>, default: &str) -> env_logger::Builder {
    let mut b = env_logger::Builder::new();
    let filter = std::env::var(LEVEL_ENV).ok().filter(|s| !s.is_empty());
    b.parse_filters(filter.as_deref().or(level).unwrap_or(default));
    b
}

/// CNI mode: append to `log_file` (default [`DEFAULT_LOG_FILE`]) and copy to stderr.
/// `level` comes from the config; HEADCNI_LOG_LEVEL and HEADCNI_LOG_FILE override.
fn init_cni(role: &'static str, log_file: Option<&Path>, level: Option<&str>) {
    let from_env = std::env::var_os(FILE_ENV).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let path = from_env.as_deref().or(log_file).unwrap_or(Path::new(DEFAULT_LOG_FILE));
    let file = open_log(path);
    let pid = std::process::id();
    let format = LogFormat::from_env();
    let mut b = builder(level, "info");
    b.format(move |out, record| write_record(out, format, role, pid, record));
    b.target(env_logger::Target::Pipe(Box::new(Tee { file })));
    let _ = b.try_init();
}

/// The logging of a CNI plugin role, from the `log_file` and `log_level` keys of the network
/// configuration on stdin (peeked at here; the protocol decodes the configuration itself
/// later). A version probe carries no configuration and logs nothing: it opens no log file.
pub fn init_plugin(role: &'static str, command: Option<crate::cni::Command>, config: &[u8]) {
    if command == Some(crate::cni::Command::Version) {
        init_stderr(role, "warn");
        return;
    }
    let peek: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(config).unwrap_or_default();
    let log_file = peek.get("log_file").and_then(serde_json::Value::as_str).map(Path::new);
    let log_level = peek.get("log_level").and_then(serde_json::Value::as_str);
    init_cni(role, log_file, log_level);
}

/// Agent and CLI: stderr only. `role` names the command in the records (`agent`, `install`).
pub fn init_stderr(role: &'static str, default: &str) {
    let pid = std::process::id();
    let format = LogFormat::from_env();
    let mut b = builder(None, default);
    b.format(move |out, record| write_record(out, format, role, pid, record));
    b.target(env_logger::Target::Stderr);
    let _ = b.try_init();
}

fn open_log(path: &Path) -> Option<std::fs::File> {
    if let Some(dir) = path.parent() {
        let _ = DirBuilder::new().recursive(true).mode(0o750).create(dir);
    }
    // Twice at most: once the full file, once the fresh one after the rotation.
    for _ in 0..2 {
        let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path).ok()?;
        let full = file.metadata().map(|m| m.len() >= MAX_LOG_BYTES).unwrap_or(false);
        // Only regular files rotate (not /dev/null, not a pipe).
        if !full || !file.metadata().is_ok_and(|m| m.is_file()) {
            return Some(file);
        }
        rotate(path, &file);
    }
    OpenOptions::new().create(true).append(true).mode(0o640).open(path).ok()
}

/// Renames the full log file `file` (open at `path`) to `<path>.1`, unless someone else did while
/// this process waited for the lock.
fn rotate(path: &Path, file: &std::fs::File) {
    use std::os::unix::fs::MetadataExt;
    if file.lock().is_err() {
        return;
    }
    let ours = file.metadata().ok().map(|m| (m.dev(), m.ino()));
    let current = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    if ours.is_some() && ours == current {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(path, old);
    }
    let _ = file.unlock();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_full_log_is_rotated_once_and_kept_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("headcni.log");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![b'x'; MAX_LOG_BYTES as usize]).unwrap();
        drop(f);
        let mut fresh = open_log(&path).unwrap();
        fresh.write_all(b"new line\n").unwrap();
        let old = dir.path().join("headcni.log.1");
        assert_eq!(std::fs::metadata(&old).unwrap().len(), MAX_LOG_BYTES);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new line\n");
        // A file below the limit is appended to; a second rotation replaces the first.
        assert!(open_log(&path).is_some());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new line\n");
        std::fs::write(&path, vec![b'y'; MAX_LOG_BYTES as usize + 1]).unwrap();
        open_log(&path).unwrap();
        assert_eq!(std::fs::metadata(&old).unwrap().len(), MAX_LOG_BYTES + 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert!(open_log(Path::new("/dev/null")).is_some(), "not a regular file: never rotated");
    }
}
