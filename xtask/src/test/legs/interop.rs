//! Interop with software nobody here wrote: our guests under QEMU's
//! virtio-net-pci on QEMU user networking, reached from the host through
//! `hostfwd` by Rust clients in this process and by `curl`.
//!
//! The clients speak only what the guests promise: the UDP server echoes any
//! datagram and exits on `exitless-pingpong-bye`; the TCP server echoes on
//! port 7 and answers HTTP GET on port 80, exiting after
//! `serve.max_connections` connections.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::infra::build;
use crate::infra::setup;
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::vmm::qemu::{self, Accel, Echo, Machine, Net};

/// The datagram that ends the UDP server (see `demos/src/pingpong.rs`).
const BYE: &[u8] = b"exitless-pingpong-bye";
/// The text the HTTP page carries (see `demos/src/http.rs`).
const PAGE_MARK: &str = "Hello from an Exitless unikernel";
/// How long a client keeps trying to reach a guest that is still booting.
const REACH: Duration = Duration::from_mins(1);

/// A free TCP/UDP port on loopback (released again before QEMU binds it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

fn guest_cfg(
    image: std::path::PathBuf,
    append: &str,
    hostfwd: Vec<String>,
    timeout: Duration,
) -> qemu::Config {
    qemu::Config {
        accel: Accel::Tcg,
        machine: Machine::Q35,
        smp: 2,
        mem_mib: 256,
        image,
        append: append.to_owned(),
        net: Net::User,
        hostfwd,
        netdev: None,
        mac: None,
        nic_options: Vec::new(),
        extra_args: Vec::new(),
        timeout,
    }
}

/// Sends `n` datagrams of varied sizes and checks each echo; then says bye.
fn udp_client(port: u16, n: usize) -> std::result::Result<usize, String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .map_err(|e| e.to_string())?;
    let to = ("127.0.0.1", port);
    let start = Instant::now();
    let mut echoed = 0;
    let mut buf = [0u8; 2048];
    let mut seq: u32 = 0;
    let mut sent: Vec<Vec<u8>> = Vec::new();
    while echoed < n {
        if start.elapsed() > REACH {
            return Err(format!(
                "only {echoed} of {n} datagrams came back within {} s",
                REACH.as_secs()
            ));
        }
        seq += 1;
        let len = 16 + (seq as usize * 37) % 1400;
        let payload: Vec<u8> = (0..len)
            .map(|i| (i as u32 ^ seq.wrapping_mul(2_654_435_761)) as u8)
            .collect();
        sock.send_to(&payload, to).map_err(|e| e.to_string())?;
        // The first datagrams may be lost while the guest boots: retry. An
        // echo of an earlier datagram that came after its wait ended (a
        // loaded host) is no error: skip it and keep waiting for this one.
        while let Ok((got, _)) = sock.recv_from(&mut buf) {
            if buf[..got] == payload[..] {
                echoed += 1;
                break;
            }
            if !sent.iter().any(|p: &Vec<u8>| buf[..got] == p[..]) {
                return Err(format!(
                    "datagram {seq}: the echo differs ({got} bytes back, {len} sent) and is none sent before"
                ));
            }
        }
        sent.push(payload);
    }
    for _ in 0..3 {
        let _ = sock.send_to(BYE, to);
        thread::sleep(Duration::from_millis(20));
    }
    Ok(echoed)
}

fn connect_retrying(port: u16) -> std::result::Result<TcpStream, String> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            // slirp accepts before the guest does: a dead guest shows up as an
            // immediate EOF, handled by the caller's check.
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > REACH => {
                return Err(format!("connect to 127.0.0.1:{port}: {e}"));
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Echoes `bytes` through the guest's TCP echo server and compares.
fn tcp_echo_client(port: u16, bytes: usize) -> std::result::Result<(), String> {
    let data: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
    let mut s = connect_retrying(port)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let writer = {
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let data = data.clone();
        thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&data)?;
            w.shutdown(Shutdown::Write)
        })
    };
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .map_err(|e| format!("reading the echo: {e}"))?;
    writer
        .join()
        .map_err(|_| "writer panicked".to_owned())?
        .map_err(|e| format!("sending: {e}"))?;
    if got == data {
        Ok(())
    } else {
        Err(format!(
            "echo of {bytes} bytes came back as {} different bytes",
            got.len()
        ))
    }
}

/// Fetches `/` with curl; returns the page when the status is 200.
fn curl_page(curl: &std::path::Path, port: u16) -> std::result::Result<String, String> {
    let start = Instant::now();
    loop {
        let out = Command::new(curl)
            .args([
                "-s",
                "-m",
                "10",
                "-w",
                "\n%{http_code}",
                &format!("http://127.0.0.1:{port}/"),
            ])
            .output()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some((body, code)) = text.rsplit_once('\n')
            && code.trim() == "200"
        {
            return Ok(body.to_owned());
        }
        if start.elapsed() > REACH {
            return Err(format!(
                "curl got no 200 within {} s (last: {})",
                REACH.as_secs(),
                text.trim()
            ));
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// A NIC QEMU builds without (enough) MSI-X vectors must be refused at
/// start-up with a clear message and the application-error status, never a
/// crash.
fn msix_refusals(timeout: Duration) -> Result<Vec<(String, bool)>> {
    let image = build::build_guest(build::find_image("udp-pingpong")?)?;
    let mut checks = Vec::new();
    for (option, expect) in [
        ("vectors=0", "no MSI-X capability"),
        ("vectors=2", "MSI-X vectors, 3 needed"),
    ] {
        let mut cfg = guest_cfg(
            image.clone(),
            "pingpong.role=server ip=10.0.2.15/24",
            Vec::new(),
            timeout,
        );
        cfg.nic_options = vec![option.to_owned()];
        let run = qemu::boot(
            &cfg,
            "interop-msix",
            &Echo::Protocol {
                prefix: format!("nic {option}"),
            },
        )?;
        let said = run.lines.iter().any(|l| l.text.contains(expect));
        let status_ok = run.exit == crate::vmm::exit::GuestExit::Status(4);
        checks.push((
            format!("a NIC with {option} is refused at start-up: `{expect}` on the console, status 4 (got {})", run.exit),
            said && status_ok,
        ));
        if !(said && status_ok) {
            run.print_post_mortem();
        }
    }
    Ok(checks)
}

/// Our guests under QEMU's virtio-net-pci reached by host clients.
pub struct QemuInterop;

impl Leg for QemuInterop {
    fn name(&self) -> &'static str {
        "interop"
    }

    fn about(&self) -> &'static str {
        "guests on QEMU virtio-net-pci (TCG, user net) reached by host Rust clients (UDP, TCP) and curl (HTTP)"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        match checks(opts.timeout) {
            Ok(checks) => LegRun::from_checks(&checks, Vec::new(), None),
            Err(e) => LegRun::broken(e.to_string()),
        }
    }
}

/// The interop checks: UDP echo and TCP echo from Rust clients, HTTP from curl.
fn checks(timeout: Duration) -> Result<Vec<(String, bool)>> {
    setup::ensure_qemu()?;
    let curl = setup::ensure_tool("curl", "curl")?;
    let mut checks = Vec::new();

    // UDP: the ping-pong server guest.
    let udp_image = build::build_guest(build::find_image("udp-pingpong")?)?;
    let port = free_port();
    let client = thread::spawn(move || udp_client(port, 50));
    let cfg = guest_cfg(
        udp_image,
        "pingpong.role=server pingpong.clients=1 ip=10.0.2.15/24 gw=10.0.2.2",
        vec![format!("udp:127.0.0.1:{port}-:7777")],
        timeout,
    );
    let run = qemu::boot(
        &cfg,
        "interop-udp",
        &Echo::Protocol {
            prefix: "udp-server".into(),
        },
    )?;
    let udp = client
        .join()
        .unwrap_or_else(|_| Err("client panicked".into()));
    checks.push((
        format!(
            "UDP: a host Rust client's 50 datagrams echoed by the guest ({})",
            udp.as_ref()
                .map_or_else(Clone::clone, |n| format!("{n} echoed"))
        ),
        udp.is_ok(),
    ));
    checks.push((
        format!(
            "UDP: the server guest exited with status 0 after the bye ({})",
            run.exit
        ),
        run.exit.passed(),
    ));
    if !run.exit.passed() {
        run.print_post_mortem();
    }

    // TCP: the echo + HTTP guest; exits after two connections.
    let tcp_image = build::build_guest(build::find_image("tcp-echo")?)?;
    let (echo_port, http_port) = (free_port(), free_port());
    let curl2 = curl.clone();
    let client = thread::spawn(move || {
        (
            tcp_echo_client(echo_port, 64 * 1024),
            curl_page(&curl2, http_port),
        )
    });
    let cfg = guest_cfg(
        tcp_image,
        "ip=10.0.2.15/24 gw=10.0.2.2 serve.max_connections=2",
        vec![
            format!("tcp:127.0.0.1:{echo_port}-:7"),
            format!("tcp:127.0.0.1:{http_port}-:80"),
        ],
        timeout,
    );
    let run = qemu::boot(
        &cfg,
        "interop-tcp",
        &Echo::Protocol {
            prefix: "tcp-server".into(),
        },
    )?;
    let (echo, page) = client
        .join()
        .unwrap_or_else(|_| (Err("client panicked".into()), Err("client panicked".into())));
    checks.push((
        format!(
            "TCP: 64 KiB echoed intact to a host Rust client{}",
            echo.as_ref()
                .err()
                .map_or_else(String::new, |e| format!(" ({e})"))
        ),
        echo.is_ok(),
    ));
    let page_ok = page.as_ref().is_ok_and(|p| p.contains(PAGE_MARK));
    checks.push((
        format!(
            "HTTP: curl fetched the page (200){}",
            page.as_ref()
                .err()
                .map_or_else(String::new, |e| format!(" ({e})"))
        ),
        page_ok,
    ));
    checks.push((
        format!(
            "TCP: the server guest exited with status 0 after two connections ({})",
            run.exit
        ),
        run.exit.passed(),
    ));
    if !run.exit.passed() {
        run.print_post_mortem();
    }
    checks.extend(msix_refusals(timeout)?);
    Ok(checks)
}
