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

/// A tcp-echo guest under the shim with its TAP in a fresh network
/// namespace, addressed and up, the guest listening; `kind` names the
/// namespace, `mem` is the guest's RAM, `cmdline` is appended to its
/// command line.
struct Running {
    ns: String,
    guard: Cleanup,
    rx: Receiver<String>,
    seen: Vec<String>,
    stats: PathBuf,
}

impl Running {
    fn start(kind: &str, mem: &str, cmdline: &str) -> Self {
        let image = preconditions();
        let ns = format!("exitless-{kind}-{}", std::process::id());
        if let Err(e) = ip(&["netns", "add", &ns]) {
            panic!("tap test cannot run: {e}");
        }
        let mut guard = Cleanup {
            ns: ns.clone(),
            shim: None,
        };
        let stats = std::env::temp_dir().join(format!("{ns}-stats.json"));
        let spec = format!(
            "name=echo,kernel={},vcpus=1,mem={mem},cmdline=ip=10.0.77.2/24 {cmdline}",
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
        let mut run = Self {
            ns,
            guard,
            rx,
            seen: Vec::new(),
            stats,
        };
        // The shim creates the TAP before the guests start; address it and bring it up.
        let until = Instant::now() + Duration::from_secs(10);
        while ip(&["-n", &run.ns, "link", "show", TAP]).is_err() {
            if Instant::now() > until {
                run.fail(&format!("TAP {TAP} never appeared in {}", run.ns));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let ns = run.ns.clone();
        for args in [
            &["-n", &ns, "addr", "add", HOST_ADDR, "dev", TAP][..],
            &["-n", &ns, "link", "set", TAP, "up"][..],
        ] {
            if let Err(e) = ip(args) {
                run.fail(&e);
            }
        }
        if !wait_for(&run.rx, READY, Duration::from_secs(40), &mut run.seen) {
            run.fail("the guest never said it listens");
        }
        run
    }

    /// Fails the test with `why` and everything the shim printed.
    fn fail(&mut self, why: &str) -> ! {
        drain(&self.rx, &mut self.seen);
        panic!(
            "{why}\n---- host-shim output ----\n{}",
            self.seen.join("\n")
        );
    }

    /// Waits for the guest to exit and the shim with it; fails unless both
    /// ended with status 0.
    fn expect_clean_exit(&mut self) {
        let ended = self
            .guard
            .shim
            .as_mut()
            .and_then(|c| wait_exit(c, Duration::from_secs(30)));
        drain(&self.rx, &mut self.seen);
        if ended.is_none_or(|s| !s.success()) {
            self.fail(&format!("shim ended with {ended:?}"));
        }
    }
}

#[test]
#[ignore = "needs root, ip(8), /dev/kvm and EXITLESS_TCP_ECHO_IMAGE"]
fn host_linux_talks_http_and_tcp_echo_to_a_guest_through_the_tap() {
    let mut run = Running::start("tap", "256M", "serve.max_connections=2");
    let ns = run.ns.clone();
    let result = std::thread::spawn(move || client(&ns))
        .join()
        .unwrap_or_else(|_| Err("client thread panicked".into()));
    let (page, echoed) = match result {
        Ok(r) => r,
        Err(e) => run.fail(&format!("host client: {e}")),
    };
    if !page.starts_with("HTTP/1.1 200 OK\r\n") || !page.contains("\r\n\r\n<") {
        run.fail(&format!("HTTP GET / answered {page:?}"));
    }
    if echoed != b"exitless tap echo: 0123456789\n" {
        run.fail(&format!(
            "echo returned {:?}",
            String::from_utf8_lossy(&echoed)
        ));
    }

    // Two connections served: the guest exits 0, and so does the shim.
    run.expect_clean_exit();
    let stats = run.stats.clone();
    if let Err(e) = check_stats(&stats, &format!("page {} bytes", page.len())) {
        run.fail(&e);
    }
}

/// The shim's own account: frames through the TAP both ways, the guest's
/// exit 0; `what` is what the clients saw, for the closing line.
fn check_stats(stats: &std::path::Path, what: &str) -> Result<(), String> {
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
        "tap: {} frames host->guests, {} guests->host; {what}",
        n("rx_packets"),
        n("tx_packets"),
    );
    Ok(())
}

/// Clients of each kind the parallel test opens at the same time.
const PARALLEL: usize = 64;

/// How each parallel client's connections went, counted by outcome.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    refused: usize,
    reset: usize,
    other: Vec<String>,
}

impl Tally {
    fn add(&mut self, r: Result<(), std::io::Error>, who: &str) {
        match r {
            Ok(()) => self.ok += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => self.refused += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => self.reset += 1,
            Err(e) => self.other.push(format!("{who}: {e}")),
        }
    }
}

/// Client `i`'s payload: a few KiB, its length and bytes its own.
fn payload(i: usize) -> Vec<u8> {
    let len = 2048 + i * 97;
    (0..len)
        .map(|j| u8::try_from((j * 31 + i * 7 + j / 251) % 256).unwrap_or(0))
        .collect()
}

/// An error that says which check failed, as an `io::Error` (kind `Other`).
fn mismatch(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

/// Connects without retrying: a refusal must show, not be papered over.
fn connect_once(port: u16) -> std::io::Result<TcpStream> {
    let s =
        TcpStream::connect_timeout(&SocketAddr::from((GUEST_IP, port)), Duration::from_secs(20))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// Client `i` of kind `port`: connect, wait until every client of the run is
/// connected (`all`), then echo its payload or GET the page and check it.
fn parallel_client(
    ns: &str,
    port: u16,
    i: usize,
    all: &std::sync::Barrier,
) -> Result<(), std::io::Error> {
    enter_netns(ns).map_err(mismatch)?;
    let connected = connect_once(port);
    // Everyone waits here, connected or not, so that the barrier never hangs.
    all.wait();
    let mut s = connected?;
    if port == 7 {
        let data = payload(i);
        s.write_all(&data)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        if back != data {
            let first = back.iter().zip(&data).position(|(a, b)| a != b);
            return Err(mismatch(format!(
                "echo client {i}: {} bytes back of {}, first difference at {first:?}",
                back.len(),
                data.len()
            )));
        }
    } else {
        s.write_all(format!("GET / HTTP/1.1\r\nHost: guest\r\nX-Client: {i}\r\n\r\n").as_bytes())?;
        let mut page = Vec::new();
        s.read_to_end(&mut page)?;
        let page = String::from_utf8_lossy(&page);
        if !page.starts_with("HTTP/1.1 200 OK\r\n")
            || !page.contains("Hello from an Exitless unikernel")
        {
            return Err(mismatch(format!("HTTP client {i}: answered {page:?}")));
        }
    }
    Ok(())
}

/// Runs `PARALLEL` clients of kind `port` from namespace `ns`, all connected
/// at the same time before any sends.
fn parallel_round(ns: &str, port: u16) -> Tally {
    let all = std::sync::Arc::new(std::sync::Barrier::new(PARALLEL));
    let threads: Vec<_> = (0..PARALLEL)
        .map(|i| {
            let (ns, all) = (ns.to_owned(), all.clone());
            std::thread::spawn(move || parallel_client(&ns, port, i, &all))
        })
        .collect();
    let mut tally = Tally::default();
    for (i, t) in threads.into_iter().enumerate() {
        let r = t
            .join()
            .unwrap_or_else(|_| Err(mismatch(format!("client {i} panicked"))));
        tally.add(r, &format!("port {port} client {i}"));
    }
    tally
}

/// The guest's closing `report:` line, parsed: connections served and the
/// most open at once, listener-full and out-of-memory events, closed
/// connections that never ended.
fn guest_report(seen: &[String]) -> Option<(u64, u64, u64, u64, u64)> {
    let line = seen
        .iter()
        .find(|l| l.contains("report: tcp-echo served"))?;
    eprintln!("tap: guest {line}");
    let after = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((
        after("served")?,
        after("at most")?,
        after("listener full")?,
        after("out of memory")?,
        after("aborted,")?,
    ))
}

#[test]
#[ignore = "needs root, ip(8), /dev/kvm and EXITLESS_TCP_ECHO_IMAGE"]
fn sixty_four_parallel_echo_and_http_clients_are_all_served() {
    // One warm-up connection (ARP, the first SYN), then each kind's round.
    let total = 1 + 2 * PARALLEL;
    // 32 MiB of RAM, a 7 MiB heap: the smallest guest the guide promises
    // 64 connections at once (32 KiB of buffers each) plus the backlogs.
    let mut run = Running::start("ptcp", "32M", &format!("serve.max_connections={total}"));
    let ns = run.ns.clone();
    let warm = std::thread::spawn(move || client_warm_up(&ns))
        .join()
        .unwrap_or_else(|_| Err("warm-up thread panicked".into()));
    if let Err(e) = warm {
        run.fail(&format!("warm-up echo: {e}"));
    }
    let mut lines = Vec::new();
    for (port, kind) in [(7, "echo"), (80, "HTTP")] {
        let t = parallel_round(&run.ns, port);
        let line = format!(
            "{kind}: {} of {PARALLEL} parallel clients served, {} refused, {} reset, {} other failures",
            t.ok,
            t.refused,
            t.reset,
            t.other.len()
        );
        eprintln!("tap: {line}");
        if t.ok != PARALLEL || t.refused + t.reset > 0 || !t.other.is_empty() {
            run.fail(&format!("{line}: {:?}", t.other));
        }
        lines.push(line);
    }
    run.expect_clean_exit();
    match guest_report(&run.seen) {
        Some((served, peak, full, oom, closing)) => {
            let want = u64::try_from(total).unwrap_or(u64::MAX);
            let parallel = u64::try_from(PARALLEL).unwrap_or(u64::MAX);
            if served != want || peak < parallel || full != 0 || oom != 0 || closing != 0 {
                run.fail(&format!(
                    "guest report: served {served} (want {want}), at most {peak} at once (want >= {parallel}), listener full {full}, out of memory {oom}, still closing {closing} (want 0, 0, 0)"
                ));
            }
        }
        None => run.fail("the guest printed no report line"),
    }
    let stats = run.stats.clone();
    if let Err(e) = check_stats(&stats, &lines.join("; ")) {
        run.fail(&e);
    }
}

/// One echo round trip, retried while the first SYN waits on ARP.
fn client_warm_up(ns: &str) -> Result<(), String> {
    enter_netns(ns)?;
    let mut s = connect(7)?;
    s.write_all(b"warm-up\n").map_err(|e| e.to_string())?;
    let mut back = [0u8; 8];
    s.read_exact(&mut back).map_err(|e| e.to_string())?;
    if &back != b"warm-up\n" {
        return Err(format!("echoed {back:?}"));
    }
    Ok(())
}
