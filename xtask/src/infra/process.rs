//! Runs a child process under a wall-clock limit, handing each line of its
//! stdout to the caller as it arrives (with the time since start), and makes
//! sure the child and everything it started are gone when we return.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::infra::sys;

/// One line of the child's stdout, without its line ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Wall time from just before the child was started.
    pub at: Duration,
    pub text: String,
}

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signalled(i32),
    /// Still running at the deadline: we killed it.
    TimedOut,
}

/// What to do with the child's stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stderr {
    /// Keep it apart (returned in [`Finished::stderr`]).
    Capture,
    /// Interleave it with stdout, as on a terminal: both become [`Line`]s.
    Merge,
}

#[derive(Debug)]
pub struct Finished {
    pub ending: Ending,
    pub lines: Vec<Line>,
    /// Captured stderr (empty with [`Stderr::Merge`]).
    pub stderr: String,
    pub elapsed: Duration,
}

/// How long we wait for output still in the pipes once the child is gone.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Kills the child's process group unless it has been reaped: no return path
/// (error, panic) leaves it running.
struct Reaper {
    child: Child,
    reaped: bool,
}

impl Reaper {
    fn kill(&mut self) {
        sys::kill_group(self.child.id());
        let _ = self.child.wait();
        self.reaped = true;
        sys::clear_child_group();
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
        }
    }
}

/// Runs `cmd` (stdin from /dev/null, stdout piped) until it exits or
/// `timeout` passes, calling `on_line` for each stdout line as it arrives.
pub fn run(
    cmd: &mut Command,
    timeout: Duration,
    stderr: Stderr,
    mut on_line: impl FnMut(&Line),
) -> Result<Finished> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let pipe_error =
        |e: io::Error| Error::failed(format!("cannot create a pipe for {program}: {e}"));
    cmd.stdin(Stdio::null());
    let merged = match stderr {
        Stderr::Capture => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            None
        }
        Stderr::Merge => {
            let (read_end, write_end) = io::pipe().map_err(pipe_error)?;
            cmd.stdout(write_end.try_clone().map_err(pipe_error)?)
                .stderr(write_end);
            Some(read_end)
        }
    };
    sys::contain(cmd);

    let start = Instant::now();
    let spawned = cmd.spawn();
    // The command holds our copies of the merged pipe's write end: drop them,
    // or the reader would never see end-of-file.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let child = spawned.map_err(|e| Error::failed(format!("cannot start {program}: {e}")))?;
    sys::set_child_group(child.id());
    let mut reaper = Reaper {
        child,
        reaped: false,
    };

    let output: Box<dyn Read + Send> = match (merged, reaper.child.stdout.take()) {
        (Some(read_end), _) => Box::new(read_end),
        (None, Some(stdout)) => Box::new(stdout),
        (None, None) => return Err(Error::failed(format!("no stdout pipe from {program}"))),
    };
    let (line_tx, line_rx) = mpsc::channel();
    thread::spawn(move || forward_lines(output, start, &line_tx));
    let (err_tx, err_rx) = mpsc::channel();
    if let Some(mut pipe) = reaper.child.stderr.take() {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = err_tx.send(String::from_utf8_lossy(&bytes).into_owned());
        });
    }

    let deadline = start + timeout;
    let mut lines = Vec::new();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        match line_rx.recv_timeout(left) {
            Ok(line) => {
                on_line(&line);
                lines.push(line);
            }
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }

    let status = if timed_out {
        None
    } else {
        wait_until(&mut reaper, deadline)?
    };
    let ending = if let Some(status) = status {
        ending_of(status)
    } else {
        reaper.kill();
        Ending::TimedOut
    };
    let elapsed = start.elapsed();

    // Whatever was still in the pipe when the child went away.
    let drain_deadline = Instant::now() + DRAIN_GRACE;
    while let Ok(line) =
        line_rx.recv_timeout(drain_deadline.saturating_duration_since(Instant::now()))
    {
        on_line(&line);
        lines.push(line);
    }
    let stderr = err_rx
        .recv_timeout(drain_deadline.saturating_duration_since(Instant::now()))
        .unwrap_or_default();

    Ok(Finished {
        ending,
        lines,
        stderr,
        elapsed,
    })
}

fn forward_lines(output: Box<dyn Read + Send>, start: Instant, tx: &mpsc::Sender<Line>) {
    let mut reader = BufReader::new(output);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                let line = Line {
                    at: start.elapsed(),
                    text: String::from_utf8_lossy(&buf).into_owned(),
                };
                if tx.send(line).is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits for the child to exit, up to `deadline` (`None`: still running).
fn wait_until(reaper: &mut Reaper, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        match reaper.child.try_wait() {
            Ok(Some(status)) => {
                reaper.reaped = true;
                sys::clear_child_group();
                // The child is gone but what it started may not be.
                sys::kill_group(reaper.child.id());
                return Ok(Some(status));
            }
            Ok(None) if Instant::now() >= deadline => return Ok(None),
            Ok(None) => thread::sleep(POLL_INTERVAL),
            Err(e) => return Err(Error::failed(format!("cannot wait for child process: {e}"))),
        }
    }
}

fn ending_of(status: ExitStatus) -> Ending {
    match (status.code(), status.signal()) {
        (Some(code), _) => Ending::Exited(code),
        (None, Some(signal)) => Ending::Signalled(signal),
        (None, None) => Ending::Exited(-1),
    }
}

/// The last `n` lines.
#[must_use]
pub fn tail(lines: &[Line], n: usize) -> &[Line] {
    &lines[lines.len().saturating_sub(n)..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    /// Alive: listed in /proc and not a zombie waiting for init to reap it.
    fn process_exists(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    }

    #[test]
    fn lines_and_exit_code_come_back() {
        let mut seen = Vec::new();
        let done = run(
            &mut sh("printf 'one\\r\\ntwo\\nthree'; echo oops >&2; exit 3"),
            Duration::from_secs(20),
            Stderr::Capture,
            |l| {
                seen.push(l.text.clone());
            },
        )
        .unwrap();
        assert_eq!(done.ending, Ending::Exited(3));
        assert_eq!(seen, ["one", "two", "three"]);
        assert_eq!(done.lines.len(), 3);
        assert_eq!(done.stderr, "oops\n");
    }

    #[test]
    fn a_hanging_child_is_killed_with_everything_it_started() {
        // The shell starts a background sleeper, reports its pid, then hangs.
        let started = Instant::now();
        let done = run(
            &mut sh("sleep 300 & echo $!; sleep 300"),
            Duration::from_millis(700),
            Stderr::Capture,
            |_| {},
        )
        .unwrap();
        assert_eq!(done.ending, Ending::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        let grandchild = &done.lines[0].text;
        // Reaped by init shortly after the kill; allow it a moment.
        let gone_by = Instant::now() + Duration::from_secs(5);
        while process_exists(grandchild) && Instant::now() < gone_by {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !process_exists(grandchild),
            "process {grandchild} survived the timeout"
        );
    }

    #[test]
    fn merged_stderr_arrives_as_lines_in_order() {
        let script = "echo out1; echo err1 >&2; sleep 0.1; echo out2";
        let done = run(
            &mut sh(script),
            Duration::from_secs(20),
            Stderr::Merge,
            |_| {},
        )
        .unwrap();
        assert_eq!(done.ending, Ending::Exited(0));
        let texts: Vec<&str> = done.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["out1", "err1", "out2"]);
        assert_eq!(done.stderr, "");
    }

    #[test]
    fn a_killed_child_reports_its_signal() {
        let done = run(
            &mut sh("kill -9 $$"),
            Duration::from_secs(20),
            Stderr::Capture,
            |_| {},
        )
        .unwrap();
        assert_eq!(done.ending, Ending::Signalled(9));
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let err = run(
            &mut Command::new("/nonexistent/qemu"),
            Duration::from_secs(1),
            Stderr::Capture,
            |_| {},
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("cannot start /nonexistent/qemu"),
            "{err}"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let lines: Vec<Line> = (0..5)
            .map(|i| Line {
                at: Duration::ZERO,
                text: i.to_string(),
            })
            .collect();
        let texts: Vec<&str> = tail(&lines, 2).iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["3", "4"]);
        assert_eq!(tail(&lines, 40).len(), 5);
    }
}
