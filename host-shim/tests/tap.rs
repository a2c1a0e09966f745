//! `--tap` against Linux's own TCP/IP: a tcp-echo guest behind the shim's switch and
//! a client in the host kernel, both in a network namespace this test creates.
//!
//! Needs root (network namespaces, `CAP_NET_ADMIN` for the TAP), `ip` (iproute2),
//! `/dev/kvm`, and the tcp-echo image in `EXITLESS_TCP_ECHO_IMAGE`. Ignored by
//! default; run it with
//! `EXITLESS_TCP_ECHO_IMAGE=... cargo test -p host-shim --test tap -- --ignored`.
//! When anything it needs is missing it fails and says what: it never passes
//! without having talked to the guest.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const TAP: &str = "extap0";
const HOST_ADDR: &str = "10.0.77.1/24";
const GUEST_IP: [u8; 4] = [10, 0, 77, 2];
/// The guest's console line once it listens (demos/src/bin/tcp_echo.rs).
const READY: &str = "TCP echo on 7, HTTP on 80";
const SHIM: &str = env!("CARGO_BIN_EXE_host-shim");

/// Fails the test with a reason that says what to fix.
macro_rules! need {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            panic!("tap test cannot run: {}", format!($($why)+));
        }
    };
}

/// Runs `ip ARGS`; Err with its stderr when it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespace and the shim: removed and stopped when the test ends, pass or fail.
struct Cleanup {
    ns: String,
    shim: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.shim.take() {
            if c.try_wait().ok().flatten().is_none() {
                // SIGTERM first: the shim stops its guests and exits cleanly.
                if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                    // SAFETY: kill(2) on our own child's pid, which we have not reaped.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                let until = Instant::now() + Duration::from_secs(5);
                while Instant::now() < until && c.try_wait().ok().flatten().is_none() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if let Err(e) = ip(&["netns", "del", &self.ns]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Lines of the shim's stdout and stderr, as they come.
fn lines_of(child: &mut Child) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(format!("[stderr] {l}"));
            }
        });
    }
    rx
}

/// Waits for a line containing `what`; keeps every line in `seen`.
fn wait_for(rx: &Receiver<String>, what: &str, within: Duration, seen: &mut Vec<String>) -> bool {
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(what);
                seen.push(l);
                if hit {
                    return true;
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return false,
        }
    }
}

fn drain(rx: &Receiver<String>, seen: &mut Vec<String>) {
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.push(l);
    }
}

/// Moves the calling thread into network namespace `ns` (setns(2): a network
/// namespace is per thread, so the rest of the test process stays where it is).
fn enter_netns(ns: &str) -> Result<(), String> {
    let f = File::open(format!("/run/netns/{ns}")).map_err(|e| format!("open netns: {e}"))?;
    // SAFETY: `f` is an open namespace file; CLONE_NEWNET matches its type.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("setns: {}", std::io::Error::last_os_error()))
    }
}

fn connect(port: u16) -> Result<TcpStream, String> {
    let addr = SocketAddr::from((GUEST_IP, port));
    let mut last = String::new();
    // The first SYN may wait on ARP through the switch; retry a few times.
    for _ in 0..5 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    Err(format!("connect {addr}: {last}"))
}

/// The host-side client: an HTTP GET / and a TCP echo round trip.
fn client(ns: &str) -> Result<(String, Vec<u8>), String> {
    enter_netns(ns)?;
    let mut http = connect(80)?;
    http.write_all(b"GET / HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("http write: {e}"))?;
    let mut page = Vec::new();
    http.read_to_end(&mut page)
        .map_err(|e| format!("http read: {e}"))?;
    let page = String::from_utf8_lossy(&page).into_owned();

    let mut echo = connect(7)?;
    let msg = b"exitless tap echo: 0123456789\n";
    echo.write_all(msg)
        .map_err(|e| format!("echo write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    echo.read_exact(&mut back)
        .map_err(|e| format!("echo read: {e}"))?;
    drop(echo);
    Ok((page, back))
}

fn wait_exit(c: &mut Child, within: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Everything the test needs; panics saying what is missing. Returns the image.
fn preconditions() -> PathBuf {
    need!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "it must run as root (network namespaces, TAP)"
    );
    need!(
        Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success()),
        "`ip` (iproute2) is not installed"
    );
    need!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing"
    );
    need!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing"
    );
    let image = std::env::var_os("EXITLESS_TCP_ECHO_IMAGE").map(PathBuf::from);
    need!(
        image.is_some(),
        "set EXITLESS_TCP_ECHO_IMAGE to the tcp-echo guest image"
    );
    let image = image.unwrap_or_default();
    need!(
        image.is_file(),
        "EXITLESS_TCP_ECHO_IMAGE={} is not a file",
        image.display()
    );

    image
}

#[test]
#[ignore = "needs root, ip(8), /dev/kvm and EXITLESS_TCP_ECHO_IMAGE"]
fn host_linux_talks_http_and_tcp_echo_to_a_guest_through_the_tap() {
    let image = preconditions();
    let ns = format!("exitless-tap-{}", std::process::id());
    if let Err(e) = ip(&["netns", "add", &ns]) {
        panic!("tap test cannot run: {e}");
    }
    let mut guard = Cleanup {
        ns: ns.clone(),
        shim: None,
    };
    let stats = std::env::temp_dir().join(format!("{ns}-stats.json"));
    let spec = format!(
        "name=echo,kernel={},vcpus=1,cmdline=ip=10.0.77.2/24 serve.max_connections=2",
        image.display()
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, SHIM, "--tap", TAP, "--timeout", "120"])
        .arg("--stats-json")
        .arg(&stats)
        .args(["--guest", &spec])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("tap test cannot run: starting the shim: {e}"));
    let rx = lines_of(&mut child);
    guard.shim = Some(child);
    let mut seen = Vec::new();
    let fail = |why: String, rx: &Receiver<String>, seen: &mut Vec<String>| -> ! {
        drain(rx, seen);
        panic!("{why}\n---- host-shim output ----\n{}", seen.join("\n"));
    };

    // The shim creates the TAP before the guests start; address it and bring it up.
    let until = Instant::now() + Duration::from_secs(10);
    while ip(&["-n", &ns, "link", "show", TAP]).is_err() {
        if Instant::now() > until {
            fail(format!("TAP {TAP} never appeared in {ns}"), &rx, &mut seen);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for args in [
        &["-n", &ns, "addr", "add", HOST_ADDR, "dev", TAP][..],
        &["-n", &ns, "link", "set", TAP, "up"][..],
    ] {
        if let Err(e) = ip(args) {
            fail(e, &rx, &mut seen);
        }
    }
    if !wait_for(&rx, READY, Duration::from_secs(40), &mut seen) {
        fail("the guest never said it listens".into(), &rx, &mut seen);
    }

    let ns2 = ns.clone();
    let result = std::thread::spawn(move || client(&ns2))
        .join()
        .unwrap_or_else(|_| Err("client thread panicked".into()));
    let (page, echoed) = match result {
        Ok(r) => r,
        Err(e) => fail(format!("host client: {e}"), &rx, &mut seen),
    };
    if !page.starts_with("HTTP/1.1 200 OK\r\n") || !page.contains("\r\n\r\n<") {
        fail(format!("HTTP GET / answered {page:?}"), &rx, &mut seen);
    }
    if echoed != b"exitless tap echo: 0123456789\n" {
        fail(
            format!("echo returned {:?}", String::from_utf8_lossy(&echoed)),
            &rx,
            &mut seen,
        );
    }

    // Two connections served: the guest exits 0, and so does the shim.
    let ended = guard
        .shim
        .as_mut()
        .and_then(|c| wait_exit(c, Duration::from_secs(30)));
    drain(&rx, &mut seen);
    if ended.is_none_or(|s| !s.success()) {
        fail(format!("shim ended with {ended:?}"), &rx, &mut seen);
    }
    check_stats(&stats, &page).unwrap_or_else(|e| fail(e, &rx, &mut seen));
}

/// The shim's own account: frames through the TAP both ways, the guest's exit 0.
fn check_stats(stats: &std::path::Path, page: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(stats).unwrap_or_default();
    let _ = std::fs::remove_file(stats);
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("stats JSON: {e}: {text}"))?;
    let tap = &v["tap"];
    let n = |k: &str| tap[k].as_u64().unwrap_or(0);
    if tap["name"] != TAP || n("rx_packets") == 0 || n("tx_packets") == 0 {
        return Err(format!("TAP counters: {tap}"));
    }
    if v["guests"][0]["exit_status"] != 0 {
        return Err(format!("guest: {}", v["guests"][0]));
    }
    eprintln!(
        "tap: {} frames host->guests, {} guests->host; page {} bytes; echo ok",
        n("rx_packets"),
        n("tx_packets"),
        page.len()
    );
    Ok(())
}
