//! One guest under one `host-shim` child process: its command line, its
//! console carried to the task's stdout, and its end.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use thiserror::Error;

use crate::exit::{HostEnd, Stats};
use crate::spec::GuestSpec;

/// Where the host-shim binary is looked for when this variable is unset:
/// next to this shim's own binary, then on PATH.
pub const HOST_SHIM_ENV: &str = "EXITLESS_HOST_SHIM";

#[derive(Debug, Error)]
pub enum GuestError {
    #[error(
        "the guest ELF {path} is not a regular file inside the container's root filesystem {rootfs}: {why}"
    )]
    Kernel {
        path: String,
        rootfs: String,
        why: String,
    },
    #[error("cannot open the task's {what} {path}: {source}")]
    Stdio {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the task's {what} {uri} is not supported: give a FIFO or file path (or file://PATH), or nothing"
    )]
    StdioUri { what: &'static str, uri: String },
    #[error(
        "cannot start the host shim {path} (set {HOST_SHIM_ENV} to its path, or install it next to this binary or on PATH): {source}"
    )]
    Spawn {
        path: String,
        source: std::io::Error,
    },
    #[error("signal {0} is not a signal number")]
    BadSignal(u32),
    #[error("cannot signal the host shim: {0}")]
    Kill(nix::Error),
}

/// The host-shim binary to run.
#[must_use]
pub fn host_shim_binary() -> PathBuf {
    if let Some(p) = std::env::var_os(HOST_SHIM_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("host-shim")));
    match beside {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from("host-shim"),
    }
}

/// `rootfs` + the spec's kernel path, refusing a file that is missing, not a
/// regular file, or (through a symbolic link) outside `rootfs`.
pub fn resolve_kernel(rootfs: &Path, kernel: &Path) -> Result<PathBuf, GuestError> {
    let fail = |why: String| GuestError::Kernel {
        path: kernel.display().to_string(),
        rootfs: rootfs.display().to_string(),
        why,
    };
    let top = rootfs.canonicalize().map_err(|e| fail(e.to_string()))?;
    let real = top
        .join(kernel.strip_prefix("/").unwrap_or(kernel))
        .canonicalize()
        .map_err(|e| fail(e.to_string()))?;
    if !real.starts_with(&top) {
        return Err(fail("a symbolic link leads out of it".into()));
    }
    if !real.is_file() {
        return Err(fail("not a regular file".into()));
    }
    // The host shim's --guest list is comma-separated; only cmdline= may
    // hold commas.
    if real.to_string_lossy().contains(',') {
        return Err(fail("its path contains a comma".into()));
    }
    Ok(real)
}

/// A name for the guest's console prefix: the host shim allows at most 24
/// bytes of [A-Za-z0-9_-]; container ids are longer and freer.
#[must_use]
pub fn guest_name(task_id: &str) -> String {
    let name: String = task_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(24)
        .collect();
    if name.is_empty() {
        "guest".into()
    } else {
        name
    }
}

/// The host shim's arguments for one guest.
#[must_use]
pub fn host_shim_args(name: &str, kernel: &Path, guest: &GuestSpec, stats: &Path) -> Vec<OsString> {
    let mut spec = OsString::from(format!(
        "name={name},vcpus={},mem={}M,kernel=",
        guest.vcpus, guest.memory_mib
    ));
    spec.push(kernel);
    if !guest.cmdline.is_empty() {
        spec.push(format!(",cmdline={}", guest.cmdline));
    }
    vec![
        "--guest".into(),
        spec,
        "--stats-json".into(),
        stats.into(),
        "--quiet".into(),
    ]
}

/// Where one of the task's output streams goes.
#[derive(Debug)]
pub enum Sink {
    Null,
    File(File),
}

impl Sink {
    /// Opens the stream containerd named: a FIFO it reads (or a file), a
    /// `file://` URI, or nothing.
    pub fn open(what: &'static str, uri: &str) -> Result<Self, GuestError> {
        if uri.is_empty() {
            return Ok(Self::Null);
        }
        let path = match uri.split_once("://") {
            None => uri,
            Some(("file", path)) => path,
            Some(_) => {
                return Err(GuestError::StdioUri {
                    what,
                    uri: uri.to_owned(),
                });
            }
        };
        // containerd holds the read end of its FIFOs open before it asks for
        // the task, so a blocking open for writing returns at once.
        OpenOptions::new()
            .append(true)
            .create(uri.starts_with("file://"))
            .open(path)
            .map(Self::File)
            .map_err(|source| GuestError::Stdio {
                what,
                path: path.to_owned(),
                source,
            })
    }
}

/// Opens the task's stdin FIFO for reading without blocking, so a writer
/// containerd starts (ctr run without -d) never waits for a reader that does
/// not come. Guests have no console input; the bytes are never read.
pub fn open_stdin(uri: &str) -> Result<Option<File>, GuestError> {
    if uri.is_empty() {
        return Ok(None);
    }
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(uri)
        .map(Some)
        .map_err(|source| GuestError::Stdio {
            what: "stdin",
            path: uri.to_owned(),
            source,
        })
}

/// One of the host shim's output pipes.
type Output = Box<dyn std::io::Read + Send>;

/// A running host-shim child.
#[derive(Debug)]
pub struct Running {
    child: Child,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Starts the host shim with `args`; its stdout (the guest's console,
    /// each line prefixed `NAME| `) goes to `stdout` without the prefix, its
    /// stderr (its own log) to `stderr`. Both pass through pipes this shim
    /// drains: handed a FIFO directly, the host shim would die of EPIPE on
    /// its next log line once the reader left (`ctr run -d` exits at once).
    pub fn spawn(
        binary: &Path,
        args: &[OsString],
        name: &str,
        stdout: Sink,
        stderr: Sink,
    ) -> Result<Self, GuestError> {
        let spawn_err = |source| GuestError::Spawn {
            path: binary.display().to_string(),
            source,
        };
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        let mut pumps = Vec::new();
        let streams: [(Option<Output>, Vec<u8>, Sink); 2] = [
            (
                child.stdout.take().map(|o| Box::new(o) as _),
                format!("{name}| ").into_bytes(),
                stdout,
            ),
            (
                child.stderr.take().map(|e| Box::new(e) as _),
                Vec::new(),
                stderr,
            ),
        ];
        for (i, (out, prefix, sink)) in streams.into_iter().enumerate() {
            let Some(out) = out else { continue };
            let pump = std::thread::Builder::new()
                .name(if i == 0 { "console" } else { "log" }.into())
                .spawn(move || pump_console(out, &prefix, sink));
            match pump {
                Ok(p) => pumps.push(p),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(spawn_err(e));
                }
            }
        }
        Ok(Self { child, pumps })
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the host shim. Safe from pid reuse: the child is
    /// reaped only through [`Running::reap`], which the caller serialises
    /// with this.
    /// Signal 0 only asks whether it lives, as kill(2) does.
    pub fn signal(&self, signal: u32) -> Result<(), GuestError> {
        let sig = match signal {
            0 => None,
            s => Some(
                i32::try_from(s)
                    .ok()
                    .and_then(|s| Signal::try_from(s).ok())
                    .ok_or(GuestError::BadSignal(signal))?,
            ),
        };
        let pid =
            Pid::from_raw(i32::try_from(self.pid()).map_err(|_| GuestError::BadSignal(signal))?);
        kill(pid, sig).map_err(GuestError::Kill)
    }

    /// Waits until the child has ended without reaping it (its pid stays
    /// reserved), then until its output has been copied out.
    pub fn wait_ended(pid: u32, pumps: Vec<std::thread::JoinHandle<()>>) {
        let Ok(raw) = i32::try_from(pid) else { return };
        while let Err(nix::errno::Errno::EINTR) = waitid(
            Id::Pid(Pid::from_raw(raw)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {}
        for p in pumps {
            let _ = p.join();
        }
    }

    /// The output pumps, for [`Running::wait_ended`].
    pub fn take_pumps(&mut self) -> Vec<std::thread::JoinHandle<()>> {
        std::mem::take(&mut self.pumps)
    }

    /// Reaps the ended child and reads what the host shim wrote.
    pub fn reap(mut self, stats_file: &Path) -> (HostEnd, Option<Stats>) {
        let end = match self.child.wait() {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                match (status.code(), status.signal()) {
                    (Some(c), _) => HostEnd::Code(c),
                    (None, Some(s)) => HostEnd::Signal(s),
                    (None, None) => HostEnd::Code(1),
                }
            }
            Err(e) => {
                log::error!("waiting for the host shim: {e}");
                HostEnd::Code(1)
            }
        };
        let stats = std::fs::read(stats_file).ok().and_then(|b| {
            serde_json::from_slice::<Stats>(&b)
                .map_err(|e| {
                    log::warn!("the host shim's stats JSON does not parse: {e}");
                })
                .ok()
        });
        (end, stats)
    }
}

/// Copies the host shim's output to the task's, dropping the `prefix`
/// (`NAME| `) console lines start with; other lines pass unchanged. A
/// reader that goes away only ends the copying, never the reading.
fn pump_console(out: impl std::io::Read, prefix: &[u8], sink: Sink) {
    let Sink::File(mut sink) = sink else {
        // Read it all anyway: a full pipe would stall the guest's console.
        let _ = std::io::copy(&mut BufReader::new(out), &mut std::io::sink());
        return;
    };
    let mut reader = BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = if prefix.is_empty() {
                    &line[..]
                } else {
                    line.strip_prefix(prefix).unwrap_or(&line)
                };
                if sink.write_all(text).is_err() {
                    // The reader went away (ctr exited): keep draining.
                    let _ = std::io::copy(&mut reader, &mut std::io::sink());
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_lose_their_prefix_and_other_lines_pass() {
        let path = std::env::temp_dir().join(format!("exitless-pump-{}", std::process::id()));
        let sink = Sink::open("stdout", path.to_str().unwrap());
        // A missing plain path is not created: containerd's FIFO must exist.
        assert!(sink.is_err());
        let sink = Sink::open("stdout", &format!("file://{}", path.display())).unwrap();
        let input = b"g| hello\nhost-shim: guest g failed: exit status 1 (tests failed)\ng| g| x\n";
        pump_console(&input[..], b"g| ", sink);
        let got = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            got,
            "hello\nhost-shim: guest g failed: exit status 1 (tests failed)\ng| x\n"
        );
    }

    #[test]
    fn unsupported_stdio_uris_are_refused() {
        assert!(matches!(
            Sink::open("stdout", "binary:///usr/bin/logger"),
            Err(GuestError::StdioUri { .. })
        ));
        assert!(matches!(Sink::open("stdout", ""), Ok(Sink::Null)));
    }

    #[test]
    fn names_fit_the_host_shim_and_args_carry_the_spec() {
        assert_eq!(guest_name("a.b/c"), "abc");
        assert_eq!(guest_name("..."), "guest");
        assert_eq!(guest_name(&"x".repeat(64)).len(), 24);
        let g = GuestSpec {
            kernel: "/kernel".into(),
            cmdline: "a=1,2 b".into(),
            vcpus: 2,
            memory_mib: 64,
        };
        let args = host_shim_args("n", Path::new("/r/kernel"), &g, Path::new("/b/s.json"));
        assert_eq!(
            args[1],
            OsString::from("name=n,vcpus=2,mem=64M,kernel=/r/kernel,cmdline=a=1,2 b")
        );
    }

    #[test]
    fn kernels_outside_the_rootfs_are_refused() {
        let dir = std::env::temp_dir().join(format!("exitless-rootfs-{}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(dir.join("outside"), b"x").unwrap();
        std::fs::write(root.join("kernel"), b"x").unwrap();
        std::os::unix::fs::symlink("../outside", root.join("escape")).unwrap();
        assert!(resolve_kernel(&root, Path::new("/kernel")).is_ok());
        assert!(resolve_kernel(&root, Path::new("/escape")).is_err());
        assert!(resolve_kernel(&root, Path::new("/d")).is_err());
        assert!(resolve_kernel(&root, Path::new("/missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
