//! The API socket (`--api-sock`) as a client meets it: the real shim binary,
//! requests over its Unix socket, answers and the shim's own state checked.
//!
//! The tests without a guest image run with every `cargo test` (they need
//! `/dev/kvm`, and fail without it). The ones that run guests are ignored by
//! default and need the udp-pingpong image in `EXITLESS_PINGPONG_IMAGE` (and
//! the in-guest test image in `EXITLESS_KTEST_IMAGE`);
//! `cargo xtask test --leg api` builds it and runs them. When anything they
//! need is missing they fail and say what: they never pass without a guest.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SHIM: &str = env!("CARGO_BIN_EXE_host-shim");
/// Guests created and removed in a row by the resource test.
const CYCLES: usize = 12;

/// The shim under test: killed when the test ends, pass or fail.
struct Shim {
    child: Option<Child>,
    sock: PathBuf,
    dir: PathBuf,
}

impl Shim {
    /// Starts the shim with `--api-sock` in a directory of its own, plus `args`;
    /// returns once the socket answers.
    fn start(tag: &str, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("shim-api-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let child = Command::new(SHIM)
            .arg("--api-sock")
            .arg(&sock)
            .args(args)
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .expect("the shim starts");
        let mut me = Self {
            child: Some(child),
            sock,
            dir,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&me.sock).is_err() {
            if let Some(status) = me.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the shim ended ({status}) before serving: {}", me.stderr());
            }
            assert!(Instant::now() < until, "no API socket: {}", me.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    /// One request on a connection of its own; the status and the body.
    fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.raw(&format!(
            "{method} {path} HTTP/1.1\r\nHost: shim\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    }

    fn raw(&self, request: &str) -> (u16, String) {
        let mut s = UnixStream::connect(&self.sock)
            .unwrap_or_else(|e| panic!("connect to the API socket: {e}; shim: {}", self.stderr()));
        s.set_read_timeout(Some(Duration::from_mins(1))).unwrap();
        // The shim may answer (413, 431) before it has read everything.
        let _ = s.write_all(request.as_bytes());
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP answer to {request:.80?}: {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    fn json(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, text) = self.call(method, path, body);
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: answer is no JSON ({e}): {text}"));
        (status, v)
    }

    /// Waits for the shim to exit; its exit code.
    fn wait(&mut self) -> i32 {
        let mut child = self.child.take().unwrap();
        let until = Instant::now() + Duration::from_mins(1);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the shim did not exit: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Asserts `status` and that the JSON error names `needle`.
fn refused(shim: &Shim, (method, path, body): (&str, &str, &str), status: u16, needle: &str) {
    let (got, text) = shim.call(method, path, body);
    assert_eq!(got, status, "{method} {path}: {text}");
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"));
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "{method} {path}: {msg:?} lacks {needle:?}"
    );
}

/// A request a client gets wrong: method, path, body, the status it must
/// get and a piece of the error that must name the problem.
type Case = (&'static str, &'static str, String, u16, &'static str);

/// Requests a client gets wrong; `not_elf` names a file that is no ELF
/// image, `huge` one larger than 4 MiB.
#[rustfmt::skip]
fn bad_request_cases(not_elf: &str, huge: &str) -> Vec<Case> {
    let elf_no_pvh = SHIM; // an ELF file, but no PVH entry note
    let kernel = |k: &str, more: &str| format!("{{\"kernel\": \"{k}\"{more}}}");
    let none = String::new;
    vec![
        ("PUT", "/guests/a", "{\"kernel\": ".into(), 400, "malformed JSON"),
        ("PUT", "/guests/a", "[1,2]".into(), 400, "guest spec"),
        ("PUT", "/guests/a", kernel(SHIM, ", \"colour\": \"red\""), 400, "unknown field `colour`"),
        ("PUT", "/guests/a", "{\"vcpus\": 1}".into(), 400, "kernel=PATH is required"),
        ("PUT", "/guests/a", kernel(not_elf, ""), 400, "not an ELF file"),
        ("PUT", "/guests/a", kernel(elf_no_pvh, ""), 400, "cannot be booted"),
        ("PUT", "/guests/a", kernel("/no/such/kernel", ""), 400, "does not exist"),
        ("PUT", "/guests/a", kernel(SHIM, ", \"vcpus\": 0"), 400, "vcpus=0"),
        ("PUT", "/guests/a", kernel(SHIM, ", \"mem\": \"9G\""), 400, "mem=9G"),
        ("PUT", "/guests/a", kernel(huge, ", \"mem\": \"4M\""), 400, "more than the guest's 4 MiB of RAM"),
        ("PUT", "/guests/a", kernel(SHIM, ", \"name\": \"b\""), 400, "the body names guest \"b\""),
        ("PUT", "/guests/a%20b", "{}".into(), 400, "guest name"),
        ("DELETE", "/guests/ghost", none(), 404, "no guest named \"ghost\""),
        ("GET", "/guests/ghost", none(), 404, "no guest named"),
        ("GET", "/guests/ghost/stats", none(), 404, "no guest named"),
        ("POST", "/guests", none(), 405, "POST is not allowed on /guests"),
        ("PATCH", "/guests/a", none(), 405, "use GET, PUT or DELETE"),
        ("GET", "/actions", none(), 405, "use PUT"),
        ("GET", "/metrics?format=xml", none(), 400, "format=prometheus"),
        ("GET", "/nowhere", none(), 404, "no endpoint /nowhere"),
        ("PUT", "/actions", "{\"action\": \"reboot\"}".into(), 400, "unknown variant `reboot`"),
        ("PUT", "/actions", "{}".into(), 400, "missing field `action`"),
    ]
}

#[test]
fn bad_requests_get_a_4xx_naming_the_problem_and_change_nothing() {
    let shim = Shim::start("bad", &[]);
    let not_elf = shim.dir.join("not-elf");
    std::fs::write(&not_elf, b"hello").unwrap();
    let huge = shim.dir.join("huge");
    // Sparse: 5 MiB long, nothing written.
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    let cases = bad_request_cases(&not_elf.display().to_string(), &huge.display().to_string());
    for (method, path, body, status, needle) in &cases {
        refused(&shim, (method, path, body), *status, needle);
    }
    // A body over the limit, declared and sent.
    let big = format!("{{\"cmdline\": \"{}\"}}", "x".repeat(70_000));
    refused(&shim, ("PUT", "/guests/a", &big), 413, "larger than 65536");
    // A header section over the limit: hyper's own 431.
    let (status, _) = shim.raw(&format!(
        "GET /guests HTTP/1.1\r\nHost: shim\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    ));
    assert_eq!(status, 431);
    // Garbage instead of HTTP: a 400 from hyper, the connection closed.
    let (status, _) = shim.raw("HELLO\r\n\r\n");
    assert_eq!(status, 400);
    // Nothing was created and the shim still serves.
    let (status, v) = shim.json("GET", "/guests", "");
    assert_eq!(
        (status, v["guests"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let err = shim.stderr();
    assert!(
        err.contains("API request refused: malformed JSON body"),
        "{err}"
    );
}

#[test]
fn a_shutdown_action_ends_the_shim_with_status_0_and_removes_the_socket() {
    let mut shim = Shim::start("shutdown", &[]);
    let (status, v) = shim.json("PUT", "/actions", "{\"action\": \"shutdown\"}");
    assert_eq!((status, v["action"].as_str()), (202, Some("shutdown")));
    assert_eq!(shim.wait(), 0, "{}", shim.stderr());
    assert!(!shim.sock.exists(), "the socket is removed");
    assert!(shim.stderr().contains("API: shutdown asked for"));
}

#[test]
fn sigterm_ends_a_serving_shim_with_status_0() {
    let mut shim = Shim::start("sigterm", &[]);
    // SAFETY: kill(2) on the child this test started and has not reaped.
    let rc = unsafe { libc::kill(shim.pid().cast_signed(), libc::SIGTERM) };
    assert_eq!(rc, 0);
    assert_eq!(shim.wait(), 0, "{}", shim.stderr());
    assert!(shim.stderr().contains("stop signal"));
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let shim = Shim::start("stale", &[]);
    // A second shim on the same, live socket is refused with a usage error.
    let out = Command::new(SHIM)
        .arg("--api-sock")
        .arg(&shim.sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("another process is serving"), "{err}");
    // A path that is no socket is left alone.
    let file = shim.dir.join("plain");
    std::fs::write(&file, b"keep me").unwrap();
    let out = Command::new(SHIM)
        .arg("--api-sock")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn connections_are_bounded_and_idle_ones_closed() {
    let shim = Shim::start("conns", &[]);
    // Let the start-up probe's connection end first.
    std::thread::sleep(Duration::from_millis(300));
    // 20 clients that send nothing: 16 are held, the others closed at once.
    let clients: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&shim.sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut held = Vec::new();
    let mut closed = 0;
    for c in clients {
        c.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        match (&c).read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => held.push(c),
            _ => closed += 1,
        }
    }
    assert_eq!((held.len(), closed), (16, 4));
    // Idle clients are closed by the server (the header timeout), which
    // frees their slots: a read sees the end of the stream, not our timeout.
    let first = &held[0];
    first.set_nonblocking(false).unwrap();
    first
        .set_read_timeout(Some(Duration::from_mins(1)))
        .unwrap();
    let mut byte = [0u8; 1];
    let n = (&*first)
        .read(&mut byte)
        .expect("closed by the shim, not timed out");
    assert_eq!(n, 0);
    drop(held);
    // The server sees the others' ends on its next turn; then it serves again.
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = shim.call("GET", "/guests", "");
    assert_eq!(status, 200);
    assert!(
        shim.stderr().contains("API client refused"),
        "{}",
        shim.stderr()
    );
}

// ---- With a guest image (ignored by default; `cargo xtask test --leg api`) ----

/// The udp-pingpong image the leg built; fails naming the variable when unset.
fn pingpong_image() -> String {
    let image = std::env::var("EXITLESS_PINGPONG_IMAGE").unwrap_or_else(|_| {
        panic!("EXITLESS_PINGPONG_IMAGE is not set: run `cargo xtask test --leg api`")
    });
    assert!(Path::new(&image).is_file(), "no guest image at {image}");
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests run guests and need /dev/kvm"
    );
    image
}

fn server_spec(k: &str, ip: &str) -> String {
    format!("{{\"kernel\": \"{k}\", \"cmdline\": \"pingpong.role=server ip={ip}/24\"}}")
}

/// Polls `GET /guests` until guest `name` has ended; its entry.
fn wait_ended(shim: &Shim, name: &str) -> serde_json::Value {
    let until = Instant::now() + Duration::from_mins(2);
    loop {
        let (_, v) = shim.json("GET", &format!("/guests/{name}"), "");
        if v["state"] == "ended" {
            return v;
        }
        assert!(
            Instant::now() < until,
            "{name} did not end: {}",
            shim.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for guest `name`'s console (the shim's stdout) to show `text`.
fn wait_console(shim: &Shim, name: &str, text: &str) {
    let until = Instant::now() + Duration::from_mins(2);
    let prefix = format!("{name}|");
    while !shim
        .stdout()
        .lines()
        .any(|l| l.starts_with(&prefix) && l.contains(text))
    {
        assert!(
            Instant::now() < until,
            "{name} never said {text:?}: {}",
            shim.stdout()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls guest `name`'s stats until its guest code reached main.
fn wait_main(shim: &Shim, name: &str) {
    let until = Instant::now() + Duration::from_mins(2);
    loop {
        let (status, v) = shim.json("GET", &format!("/guests/{name}/stats"), "");
        assert_eq!(status, 200, "{v}");
        if v["guest_main_us"].is_number() {
            return;
        }
        assert!(
            Instant::now() < until,
            "{name} never reached main: {}",
            shim.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs EXITLESS_PINGPONG_IMAGE and /dev/kvm: cargo xtask test --leg api"]
fn a_client_created_through_the_api_pings_a_command_line_server() {
    let k = pingpong_image();
    let mut shim = Shim::start(
        "pingpong",
        &[
            "--guest",
            &format!("name=server,kernel={k},cmdline=pingpong.role=server ip=10.0.0.1/24"),
        ],
    );
    let client = format!(
        "{{\"kernel\": \"{k}\", \"vcpus\": 1, \"mem\": \"128M\", \"cmdline\": \
         \"pingpong.role=client ip=10.0.0.2/24 pingpong.peer=10.0.0.1 pingpong.count=200\"}}"
    );
    let (status, v) = shim.json("PUT", "/guests/client", &client);
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        (v["state"].as_str(), v["mem_mib"].as_u64()),
        (Some("running"), Some(128))
    );
    // The same name again is refused while it exists.
    refused(
        &shim,
        ("PUT", "/guests/client", &client),
        409,
        "exists already",
    );
    let end = wait_ended(&shim, "client");
    assert_eq!(end["exit_status"], 0, "{end}: {}", shim.stdout());
    assert!(
        shim.stdout().contains("sent 200 received 200 lost 0"),
        "{}",
        shim.stdout()
    );
    // Its stats count what it sent and received through its NIC.
    let (_, client_stats) = shim.json("GET", "/guests/client/stats", "");
    let nic = &client_stats["nics"][0];
    assert!(nic["tx_packets"].as_u64().unwrap() >= 200, "{nic}");
    assert!(nic["rx_packets"].as_u64().unwrap() >= 200, "{nic}");
    // The whole document, as JSON and as Prometheus text.
    let (_, m) = shim.json("GET", "/metrics", "");
    assert_eq!(m["guests"].as_array().map(Vec::len), Some(2), "{m}");
    assert_eq!(m["switch"]["ports"], 2, "{m}");
    let (status, text) = shim.call("GET", "/metrics?format=prometheus", "");
    assert_eq!(status, 200);
    assert!(text.contains("exitless_switch_ports 2\n"), "{text}");
    assert!(
        text.contains("exitless_guests_nics_tx_packets{guest=\"client\",nic=\"client-net0\"}"),
        "{text}"
    );
    // The command line's guest ends with the shim only.
    refused(
        &shim,
        ("DELETE", "/guests/server", ""),
        409,
        "came from the command line",
    );
    let (status, report) = shim.json("DELETE", "/guests/client", "");
    assert_eq!(
        (status, report["exit_status"].as_u64()),
        (200, Some(0)),
        "{report}"
    );
    let (_, m) = shim.json("GET", "/metrics", "");
    assert_eq!(m["switch"]["ports"], 1, "{m}");
    let (status, _) = shim.call("PUT", "/actions", "{\"action\": \"shutdown\"}");
    assert_eq!(status, 202);
    // The server was stopped by the shutdown, the client exited 0: success.
    assert_eq!(shim.wait(), 0, "{}", shim.stderr());
    let err = shim.stderr();
    assert!(err.contains("API: guest created and started"), "{err}");
    assert!(err.contains("API: guest stopped and removed"), "{err}");
}

/// The shim's open files, by fd number and what they are.
fn fd_links(shim: &Shim) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{}/fd", shim.pid()))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some(format!(
                "{}:{}",
                e.file_name().to_string_lossy(),
                target.display()
            ))
        })
        .collect()
}

/// What a guest holds in the shim process: threads, open files (but sockets), shared
/// mappings (guest RAM and every mechanism's pages are `MAP_SHARED`; the
/// allocator's and the threads' stacks are private), and switch ports.
fn holdings(shim: &Shim) -> (usize, usize, usize, u64) {
    let pid = shim.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let shared = maps
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(1)
                .is_some_and(|perms| perms.ends_with('s'))
        })
        .count();
    let (_, m) = shim.json("GET", "/metrics", "");
    (threads, fds, shared, m["switch"]["ports"].as_u64().unwrap())
}

#[test]
#[ignore = "needs EXITLESS_PINGPONG_IMAGE and /dev/kvm: cargo xtask test --leg api"]
fn creating_and_deleting_many_times_gives_everything_back() {
    let k = pingpong_image();
    let mut shim = Shim::start("cycles", &[]);
    // A guest that lives on through the cycles: its share stays, the rest goes.
    let (status, v) = shim.json("PUT", "/guests/keeper", &server_spec(&k, "10.0.0.9"));
    assert_eq!(status, 201, "{v}");
    // Fully up, its NIC's worker started: what it holds stays the same from here.
    wait_console(&shim, "keeper", "server on UDP");
    let before = holdings(&shim);
    let fds0 = fd_links(&shim);
    assert_eq!(before.3, 1, "one switch port: the keeper's");
    for i in 0..CYCLES {
        let name = format!("g{i}");
        let spec = format!(
            "{{\"kernel\": \"{k}\", \"vcpus\": 2, \"mem\": \"64M\", \"cmdline\": \
             \"pingpong.role=server ip=10.0.0.{}/24\"}}",
            i + 20
        );
        let (status, v) = shim.json("PUT", &format!("/guests/{name}"), &spec);
        assert_eq!(status, 201, "cycle {i}: {v}");
        // Running: its guest code reached main, and it holds more than before.
        wait_main(&shim, &name);
        let during = holdings(&shim);
        assert!(
            during.0 > before.0 && during.2 > before.2,
            "cycle {i}: {during:?} vs {before:?}"
        );
        assert_eq!(during.3, 2, "cycle {i}: its switch port");
        let (status, report) = shim.json("DELETE", &format!("/guests/{name}"), "");
        assert_eq!(status, 200, "cycle {i}: {report}");
        assert_eq!(
            report["outcome"], "stopped: removed through the API",
            "{report}"
        );
        // Settled: a file glibc opens for a moment (it reads a /proc file
        // when it trims an arena after the guest's memory went) is no holding.
        let mut after = holdings(&shim);
        for _ in 0..50 {
            if after == before {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            after = holdings(&shim);
        }
        let fds_now = fd_links(&shim);
        let more: Vec<_> = fds_now.iter().filter(|f| !fds0.contains(f)).collect();
        let less: Vec<_> = fds0.iter().filter(|f| !fds_now.contains(f)).collect();
        assert_eq!(
            after, before,
            "cycle {i}: after DELETE; new fds {more:?}, gone {less:?}"
        );
    }
    let (_, list) = shim.json("GET", "/guests", "");
    assert_eq!(list["guests"].as_array().map(Vec::len), Some(1), "{list}");
    let (status, _) = shim.call("PUT", "/actions", "{\"action\": \"shutdown\"}");
    assert_eq!(status, 202);
    assert_eq!(shim.wait(), 0, "{}", shim.stderr());
    let removed = shim
        .stderr()
        .matches("API: guest stopped and removed")
        .count();
    assert_eq!(removed, CYCLES);
}

#[test]
#[ignore = "needs EXITLESS_PINGPONG_IMAGE and /dev/kvm: cargo xtask test --leg api"]
fn a_run_from_a_config_file_pings_and_exits_0() {
    let k = pingpong_image();
    let dir = std::env::temp_dir().join(format!("shim-config-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("shim.toml");
    let stats = dir.join("stats.json");
    std::fs::write(
        &file,
        format!(
            r#"# Two guests and the options of `cargo xtask run`'s demo.
pin = "sidecore"
stats-json = "{}"
timeout = 120
end-on-failure = true

[[guest]]
name = "server"
kernel = "{k}"
cmdline = "pingpong.role=server ip=10.0.0.1/24"

[[guest]]
name = "client"
kernel = "{k}"
cmdline = "pingpong.role=client ip=10.0.0.2/24 pingpong.peer=10.0.0.1 pingpong.count=100"
"#,
            stats.display()
        ),
    )
    .unwrap();
    let out = Command::new(SHIM)
        .arg("--config")
        .arg(&file)
        .arg("--quiet")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("sent 100 received 100 lost 0"), "{stdout}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let names: Vec<_> = doc["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["server", "client"]);
    // The file's pin policy was applied: under sidecore guest g's boot vCPU
    // runs on CPU g modulo all CPUs but the last.
    let ncpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let shared = i64::try_from((ncpus.max(1) - 1).max(1)).unwrap();
    let cpus: Vec<_> = doc["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["vcpus"][0]["host_cpu"].as_i64().unwrap())
        .collect();
    assert_eq!(cpus, [0, 1 % shared], "{doc}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs EXITLESS_KTEST_IMAGE and /dev/kvm: cargo xtask test --leg api"]
fn the_in_guest_suite_passes_in_a_guest_created_through_the_api() {
    let k = std::env::var("EXITLESS_KTEST_IMAGE").unwrap_or_else(|_| {
        panic!("EXITLESS_KTEST_IMAGE is not set: run `cargo xtask test --leg api`")
    });
    assert!(Path::new(&k).is_file(), "no guest image at {k}");
    // The test-only hypercalls, as the guest-shim leg offers them; VM queues
    // stay off (they take their guests at start only).
    let mut shim = Shim::start("ktest", &["--test-hypercalls"]);
    let spec = format!("{{\"kernel\": \"{k}\", \"vcpus\": 2, \"mem\": \"256M\"}}");
    let (status, v) = shim.json("PUT", "/guests/ktest", &spec);
    assert_eq!(status, 201, "{v}");
    let end = wait_ended(&shim, "ktest");
    let out = shim.stdout();
    assert_eq!(end["exit_status"], 0, "{end}: {out}");
    let summary = out
        .lines()
        .filter_map(|l| l.strip_prefix("ktest| "))
        .find(|l| l.contains(" passed, ") && l.ends_with(" skipped"))
        .unwrap_or_else(|| panic!("no test summary: {out}"));
    let passed: u32 = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(summary.contains(" 0 failed,") && passed > 0, "{summary}");
    // Every mechanism a command-line guest is offered (M1 to M4) was offered
    // to this one: the only tests skipped are those for what this shim was
    // not asked for (VM queues, the notification benchmark, a spare doorbell
    // range) or that check a mechanism's absence.
    for line in out.lines().filter(|l| l.contains("... skipped: ")) {
        let why = line.split("... skipped: ").nth(1).unwrap_or_default();
        assert!(
            why.starts_with("not offered: M5 VM queues")
                || why.starts_with("not asked for:")
                || why.ends_with("(the test checks its absence)"),
            "skipped for want of an offer a command-line guest gets: {line}"
        );
    }
    let (status, _) = shim.call("PUT", "/actions", "{\"action\": \"shutdown\"}");
    assert_eq!(status, 202);
    assert_eq!(shim.wait(), 0, "{}", shim.stderr());
}
