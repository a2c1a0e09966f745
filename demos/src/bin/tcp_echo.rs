//! TCP echo on port 7 and a one-page HTTP server on port 80, for clients
//! nobody here wrote (`nc`, `curl`). Kernel command line: `ip=…/…` or `dhcp`,
//! `[serve.max_connections=N]` to exit after N connections (tests use it).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    extern crate alloc;

    use core::time::Duration;
    use demos::http;
    use guest_kernel::println;
    use guest_kernel::rt::net::Net;
    use guest_kernel::rt::start::system;
    use guest_kernel::rt::time::Instant;
    use smoltcp::iface::SocketHandle;
    use smoltcp::socket::tcp::State;

    guest_kernel::entry!(main);

    use demos::APP_ERROR;

    const ECHO_PORT: u16 = 7;
    const HTTP_PORT: u16 = 80;
    const BUFFER: usize = 16 * 1024;

    struct Service {
        port: u16,
        handle: SocketHandle,
        /// Request bytes seen on the current HTTP connection.
        request: alloc::vec::Vec<u8>,
        responded: bool,
        /// A peer connected since the socket last listened.
        connected: bool,
    }

    fn main() -> i32 {
        let c = &system().cmdline;
        let mut net = match Net::from_cmdline(0) {
            Ok(n) => n,
            Err(e) => {
                println!("tcp-echo: {e}");
                return APP_ERROR;
            }
        };
        let max_connections: Option<u64> =
            c.get("serve.max_connections").and_then(|s| s.parse().ok());
        let mut services = alloc::vec::Vec::new();
        for port in [ECHO_PORT, HTTP_PORT] {
            match net.tcp_listen(port, BUFFER) {
                Ok(handle) => services.push(Service {
                    port,
                    handle,
                    request: alloc::vec::Vec::new(),
                    responded: false,
                    connected: false,
                }),
                Err(e) => {
                    println!("tcp-echo: cannot listen on {port}: {e:?}");
                    return APP_ERROR;
                }
            }
        }
        log::info!("tcp-echo: TCP echo on {ECHO_PORT}, HTTP on {HTTP_PORT}");
        let mut served = 0u64;
        loop {
            net.poll();
            for s in &mut services {
                if step(&mut net, s) {
                    served += 1;
                    log::info!(
                        "tcp-echo: connection on port {} done ({served} so far)",
                        s.port
                    );
                }
            }
            net.poll();
            if max_connections.is_some_and(|m| served >= m) {
                println!("report: tcp-echo served {served} connections");
                // Let the last FIN/ACKs go out before the VM ends.
                let until = Instant::now().checked_add(Duration::from_millis(200));
                while until.is_some_and(|u| Instant::now() < u) {
                    net.poll();
                    net.wait(until);
                }
                return 0;
            }
            net.wait(Instant::now().checked_add(Duration::from_secs(1)));
        }
    }

    /// Advances one service; true when a connection just finished.
    fn step(net: &mut Net, s: &mut Service) -> bool {
        let sock = net.tcp(s.handle);
        if !matches!(sock.state(), State::Listen | State::Closed) {
            s.connected = true;
        }
        let mut buf = [0u8; 2048];
        if s.port == ECHO_PORT {
            // Take as much as the send buffer can echo now, however little:
            // waiting for a whole buffer's room would leave the receive
            // window shut while the last ACKs trickle in.
            while sock.can_recv() {
                let room = (sock.send_capacity() - sock.send_queue()).min(buf.len());
                if room == 0 {
                    break;
                }
                match sock.recv_slice(&mut buf[..room]) {
                    Ok(n) if n > 0 => {
                        let _ = sock.send_slice(&buf[..n]);
                    }
                    _ => break,
                }
            }
            if sock.state() == State::CloseWait && !sock.can_recv() && sock.send_queue() == 0 {
                sock.close();
            }
        } else {
            while let Ok(n @ 1..) = sock.recv_slice(&mut buf) {
                s.request.extend_from_slice(&buf[..n]);
            }
            if !s.responded && http::request_complete(&s.request) {
                let _ = sock.send_slice(&http::response(&s.request));
                sock.close();
                s.responded = true;
            }
        }
        // Once the connection is over, listen again (TimeWait is skipped: the
        // next client uses a new port anyway).
        if s.connected && matches!(sock.state(), State::Closed | State::TimeWait) {
            sock.abort();
            let _ = sock.listen(s.port);
            s.request.clear();
            s.responded = false;
            s.connected = false;
            return true;
        }
        false
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("tcp-echo is a guest image: boot it with `cargo xtask qemu --image tcp-echo`");
    std::process::exit(2);
}
