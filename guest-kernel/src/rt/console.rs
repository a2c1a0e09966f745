//! Console output from ring 3: the `log` facade (every line tagged with the
//! CPU id and level) and raw lines for machine-read output (test results).
//! Each line is formatted into a buffer and written with one kernel call, so
//! lines from different CPUs never interleave.

use crate::linebuf::LineBuf;
use crate::percpu;
use core::fmt::Write;

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = LineBuf::<512>::new();
        let _ = writeln!(
            line,
            "[cpu{} {:<5}] {}",
            percpu::cpu_id(),
            record.level(),
            record.args()
        );
        emit(&line);
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

fn emit<const N: usize>(line: &LineBuf<N>) {
    let mut bytes = line.as_bytes();
    if bytes.len() == N && bytes.last() != Some(&b'\n') {
        // Truncated: keep the line a line.
        bytes = &bytes[..N - 1];
        let _ = super::sys::write(bytes);
        let _ = super::sys::write(b"\n");
        return;
    }
    let _ = super::sys::write(bytes);
}

/// Installs the logger with the level named by `loglevel=` (default info).
pub fn init(level: Option<&str>) {
    let filter = match level {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        Some("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    // A second call keeps the first logger; that is harmless.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
}

/// Writes one raw line (no prefix), as one unit.
pub fn line(args: core::fmt::Arguments<'_>) {
    let mut buf = LineBuf::<1024>::new();
    let _ = buf.write_fmt(args);
    let _ = buf.write_char('\n');
    emit(&buf);
}

/// `println!` for raw console lines.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::rt::console::line(format_args!($($arg)*)) };
}
