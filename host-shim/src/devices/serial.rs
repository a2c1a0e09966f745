//! The COM1 console: a vm-superio 16550 whose output is split into lines, each
//! printed with the guest's name in front. Control characters are escaped
//! (`\x1b`, `\r`, `\u{202e}`...): a guest's bytes must not move the
//! terminal's cursor, clear its line or reorder its text, or one guest could
//! forge another's `name| ` lines.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::sync::lock;
use vm_superio::{Serial, Trigger};

/// The UART has eight registers (16550 data sheet, "Register summary").
pub const PORT_COUNT: u16 = 8;
/// Longest line kept before it is flushed anyway: a guest without newlines must
/// not make the shim buffer without bound.
const MAX_LINE: usize = 4096;

/// The guest polls LSR; the shim raises no serial interrupt.
#[derive(Debug, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Where finished lines go: the shim's stdout, or a buffer a test inspects.
#[derive(Clone, Debug)]
pub enum Sink {
    Stdout,
    Buffer(Arc<Mutex<Vec<String>>>),
}

/// Collects bytes into lines and emits `name| line`.
#[derive(Debug)]
pub struct LineWriter {
    name: String,
    line: Vec<u8>,
    sink: Sink,
    /// When the guest first wrote to its console: the boot-time mark.
    pub first_output: Arc<OnceLock<Instant>>,
}

impl LineWriter {
    #[must_use]
    pub fn new(name: &str, sink: Sink) -> Self {
        Self {
            name: name.to_owned(),
            line: Vec::new(),
            sink,
            first_output: Arc::default(),
        }
    }

    fn emit(&mut self) {
        let text = escape_controls(String::from_utf8_lossy(&self.line).trim_end_matches('\r'));
        self.line.clear();
        match &self.sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}| {}", self.name, text);
            }
            Sink::Buffer(b) => lock(b).push(text),
        }
    }

    /// Emits a partial last line (at guest end).
    pub fn finish(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.first_output.set(Instant::now());
        for &b in buf {
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.emit();
                if b == b'\n' {
                    continue;
                }
            }
            self.line.push(b);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Characters that change how a terminal shows what follows: C0 and C1
/// controls and DEL, and the bidirectional formatting characters (Unicode
/// UAX #9: embeddings, overrides, isolates, marks). Tab stays.
fn is_dangerous(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every dangerous character written as an escape.
#[must_use]
pub fn escape_controls(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !is_dangerous(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    out
}

pub type Uart = Serial<NoInterrupt, vm_superio::serial::NoEvents, LineWriter>;

#[must_use]
pub fn new_uart(writer: LineWriter) -> Uart {
    Serial::new(NoInterrupt, writer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_prefixed_by_caller() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut uart = new_uart(LineWriter::new("g", Sink::Buffer(buf.clone())));
        // LSR (offset 5) says the transmitter is empty (THRE, bit 5) before writing.
        assert_ne!(uart.read(5) & 0x20, 0);
        for &b in b"hello\r\nwor" {
            uart.write(0, b).unwrap();
        }
        assert_eq!(*buf.lock().unwrap(), vec!["hello".to_owned()]);
        uart.writer_mut().finish();
        assert_eq!(buf.lock().unwrap()[1], "wor");
        assert!(uart.writer().first_output.get().is_some());
    }

    #[test]
    fn control_bytes_cannot_forge_another_guests_line() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut w = LineWriter::new("client1", Sink::Buffer(buf.clone()));
        // Carriage return and "erase line": on a terminal this would show as
        // a line of guest `server`.
        w.write_all(b"x\r\x1b[2Kserver| pingpong-result: forged\x07\xc2\x9b\xe2\x80\xae\ttab\r\n")
            .unwrap();
        let line = buf.lock().unwrap()[0].clone();
        assert_eq!(
            line,
            "x\\x0d\\x1b[2Kserver| pingpong-result: forged\\x07\\u{9b}\\u{202e}\ttab"
        );
        assert!(!line.chars().any(is_dangerous));
        assert_eq!(escape_controls("plain text, 100%"), "plain text, 100%");
    }

    #[test]
    fn endless_line_is_flushed_in_pieces() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut w = LineWriter::new("g", Sink::Buffer(buf.clone()));
        w.write_all(&vec![b'a'; MAX_LINE * 2 + 1]).unwrap();
        assert_eq!(buf.lock().unwrap().len(), 2);
    }
}
