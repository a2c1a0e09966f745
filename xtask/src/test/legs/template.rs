//! Leg `template`: what a new user does first, end to end. `cargo xtask new`
//! makes an app outside the repository's crates; it builds for the guest
//! target, boots under the host shim and says hello, and under QEMU serves a
//! host TCP client through a forwarded port and exits 0 when idle.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::app;
use crate::infra::workspace;
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::verdict;

pub struct Template;

const NAME: &str = "hello-app";
const MESSAGE: &[u8] = b"exitless template echo\n";

impl Leg for Template {
    fn name(&self) -> &'static str {
        "template"
    }

    fn about(&self) -> &'static str {
        "cargo xtask new makes an app outside the repository's crates; it builds, says hello under the host shim, and under QEMU echoes a host TCP client's bytes and exits 0"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        let dir = workspace::target_dir().join("xtask").join("template-leg");
        let _ = std::fs::remove_dir_all(&dir);
        let path = match app::new::create(NAME, &dir) {
            Ok(p) => p,
            Err(e) => return LegRun::broken(format!("cargo xtask new: {e}")),
        };
        let mut checks = Vec::new();
        let base = app::run::Options {
            path,
            vmm: app::run::Vmm::Shim,
            cmdline: Some("ip=10.0.0.2/24 app.idle_s=1".into()),
            hostfwd: Vec::new(),
            vcpus: 2,
            timeout: opts.timeout,
            show: opts.verbose,
            gdb: None,
        };
        let hello = format!("hello from {NAME}");
        match app::run::boot(&base) {
            Ok((exit, lines)) => {
                checks.push((
                    format!("shim: the app exited with status 0 ({exit})"),
                    exit.passed(),
                ));
                checks.push((
                    format!("shim: the app said `{hello}`"),
                    lines.iter().any(|l| l.contains(&hello)),
                ));
            }
            Err(e) => checks.push((format!("shim: {e}"), false)),
        }
        let port = free_port();
        let client = std::thread::spawn(move || echo_client(port, Duration::from_secs(90)));
        let qemu = app::run::Options {
            vmm: app::run::Vmm::Qemu,
            cmdline: Some("ip=10.0.2.15/24 gw=10.0.2.2 app.idle_s=3".into()),
            hostfwd: vec![format!("tcp:127.0.0.1:{port}-:7")],
            ..base
        };
        match app::run::boot(&qemu) {
            Ok((exit, lines)) => {
                checks.push((
                    format!("qemu: the app exited with status 0 ({exit})"),
                    exit.passed(),
                ));
                checks.push((
                    format!("qemu: the app said `{hello}`"),
                    lines.iter().any(|l| l.contains(&hello)),
                ));
                checks.push((
                    "qemu: the app saw the connection end".into(),
                    lines.iter().any(|l| l.contains("connection 1 done")),
                ));
            }
            Err(e) => checks.push((format!("qemu: {e}"), false)),
        }
        let echoed = client
            .join()
            .unwrap_or_else(|_| Err("the client thread panicked".into()));
        checks.push((
            format!(
                "qemu: a host TCP client got its {} bytes back through port 7 ({})",
                MESSAGE.len(),
                echoed.as_ref().map_or_else(Clone::clone, |()| "ok".into())
            ),
            echoed.is_ok(),
        ));
        LegRun {
            outcome: verdict::judge_checks(&checks),
            reports: crate::test::leg::check_reports(&checks),
            log: None,
        }
    }
}

/// Connects to the forwarded port until the guest answers (QEMU's user
/// network accepts on the host side before the guest listens, then drops
/// the connection), sends [`MESSAGE`] and reads it back.
fn echo_client(port: u16, limit: Duration) -> Result<(), String> {
    let end = Instant::now() + limit;
    let mut last = String::from("never connected");
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if let Err(e) = s.write_all(MESSAGE) {
            last = format!("write: {e}");
            continue;
        }
        let mut got = vec![0u8; MESSAGE.len()];
        match s.read_exact(&mut got) {
            Ok(()) if got == MESSAGE => return Ok(()),
            Ok(()) => last = format!("read back {:?}", String::from_utf8_lossy(&got)),
            Err(e) => last = format!("read: {e}"),
        }
    }
    Err(last)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(18_007, |a| a.port())
}
