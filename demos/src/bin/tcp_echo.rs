//! TCP echo on port 7 and a one-page HTTP server on port 80, for clients
//! nobody here wrote (`nc`, `curl`), many at a time: each port is a
//! `TcpListener` whose backlog the stack re-arms as clients arrive, and every
//! accepted connection is served from one poll loop. Kernel command line:
//! `ip=…/…` or `dhcp`, `[serve.max_connections=N]` to exit after N
//! connections (tests use it), `[serve.max_clients=N]` connections at once
//! per port (default 128, at least 8; each costs 32 KiB of heap).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    extern crate alloc;

    use alloc::vec::Vec;
    use core::time::Duration;
    use demos::APP_ERROR;
    use demos::http;
    use guest_kernel::println;
    use guest_kernel::rt::net::{
        CLOSE_LINGER, Net, SocketError, TcpListener, TcpOptions, TcpStream,
    };
    use guest_kernel::rt::start::system;
    use guest_kernel::rt::time::Instant;

    guest_kernel::entry!(main);

    const ECHO_PORT: u16 = 7;
    const HTTP_PORT: u16 = 80;

    /// What a connection is for, and how far it got.
    enum Kind {
        Echo,
        Http {
            request: Vec<u8>,
            /// The response, once the request head is in, and how much of it was written.
            response: Option<(Vec<u8>, usize)>,
        },
    }

    struct Conn {
        stream: TcpStream,
        kind: Kind,
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
        let Some(opts) = listen_options() else {
            return APP_ERROR;
        };
        let mut listeners = Vec::new();
        for port in [ECHO_PORT, HTTP_PORT] {
            match TcpListener::bind(&mut net, port, opts) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    println!("tcp-echo: cannot listen on {port}: {e}");
                    return APP_ERROR;
                }
            }
        }
        log::info!(
            "tcp-echo: TCP echo on {ECHO_PORT}, HTTP on {HTTP_PORT} (up to {} clients each, {} KiB buffers each way)",
            opts.max_connections,
            opts.rx_buffer / 1024
        );
        let mut conns: Vec<Conn> = Vec::new();
        let mut served = 0u64;
        let mut peak = 0usize;
        loop {
            net.poll();
            for l in &listeners {
                while let Ok(stream) = l.accept(&mut net) {
                    log::debug!(
                        "tcp-echo: port {} accepted {:?} ({})",
                        l.local_port(),
                        stream.peer_addr(),
                        stream.state(&mut net)
                    );
                    let kind = if l.local_port() == ECHO_PORT {
                        Kind::Echo
                    } else {
                        Kind::Http {
                            request: Vec::new(),
                            response: None,
                        }
                    };
                    conns.push(Conn { stream, kind });
                }
            }
            peak = peak.max(conns.len());
            let mut i = 0;
            while i < conns.len() {
                if step(&mut net, &mut conns[i]) {
                    let conn = conns.swap_remove(i);
                    log::debug!(
                        "tcp-echo: {:?} done in {} ({} so far)",
                        conn.stream.peer_addr(),
                        conn.stream.state(&mut net),
                        served + 1
                    );
                    conn.stream.close(&mut net);
                    served += 1;
                } else {
                    i += 1;
                }
            }
            if max_connections.is_some_and(|m| served >= m) {
                finish(&mut net, &listeners, served, peak);
                return 0;
            }
            // Sends what the streams wrote, then sleeps: one exit does both.
            net.poll_wait(Instant::now().checked_add(Duration::from_secs(1)));
        }
    }

    /// The listeners' options: the defaults, with `serve.max_clients`.
    fn listen_options() -> Option<TcpOptions> {
        let defaults = TcpOptions::default();
        let max_connections = match system()
            .cmdline
            .get("serve.max_clients")
            .map(str::parse::<usize>)
        {
            None => defaults.max_connections,
            Some(Ok(n)) if n >= defaults.backlog => n,
            Some(_) => {
                println!(
                    "tcp-echo: serve.max_clients must be a number of at least {} (the listen backlog)",
                    defaults.backlog
                );
                return None;
            }
        };
        Some(TcpOptions {
            max_connections,
            ..defaults
        })
    }

    /// Lets the last data and FINs go out and be acknowledged before the VM
    /// ends, then prints the report line. A fixed pause is too short when
    /// the host is busy, so it waits for the closing streams themselves
    /// (each ends by CLOSE_LINGER at the latest).
    fn finish(net: &mut Net, listeners: &[TcpListener], served: u64, peak: usize) {
        let until = Instant::now().checked_add(CLOSE_LINGER + Duration::from_secs(1));
        while net.socket_stats().closing > 0 && until.is_some_and(|u| Instant::now() < u) {
            net.poll_wait(Instant::now().checked_add(Duration::from_millis(100)));
        }
        let (echo, web) = (listeners[0].stats(net), listeners[1].stats(net));
        let sockets = net.socket_stats();
        println!(
            "report: tcp-echo served {served} connections (at most {peak} at once): echo accepted {}, HTTP accepted {}; listener full {} times, out of memory {} times; {} sockets reclaimed, {} lingering closes aborted, {} still closing",
            echo.accepted,
            web.accepted,
            echo.full + web.full,
            echo.out_of_memory + web.out_of_memory + sockets.out_of_memory,
            sockets.reclaimed,
            sockets.linger_aborts,
            sockets.closing,
        );
    }

    /// Advances one connection; true when it is finished and may be closed.
    fn step(net: &mut Net, conn: &mut Conn) -> bool {
        let mut buf = [0u8; 2048];
        match &mut conn.kind {
            Kind::Echo => loop {
                // Take only what the send buffer can echo now, however
                // little: the rest waits in the receive buffer, and reading
                // more than can be sent would need a buffer of our own.
                let room = conn.stream.write_room(net).min(buf.len());
                if room == 0 {
                    // Nothing can be written: once the peer is gone too
                    // (a reset), there is nothing left to do.
                    return !conn.stream.is_connected(net);
                }
                match conn.stream.read(net, &mut buf[..room]) {
                    Ok(0) => return true,
                    Ok(n) => {
                        if conn.stream.write(net, &buf[..n]) != Ok(n) {
                            // Room was checked: only a vanished connection
                            // takes less, and then nothing is left to echo to.
                            return true;
                        }
                    }
                    Err(_) => return false,
                }
            },
            Kind::Http { request, response } => {
                if response.is_none() {
                    loop {
                        match conn.stream.read(net, &mut buf) {
                            Ok(0) => return true,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                            Err(_) => break,
                        }
                        if request.len() > http::MAX_REQUEST {
                            break;
                        }
                    }
                    if request.len() > http::MAX_REQUEST || http::request_complete(request) {
                        *response = Some((http::response(request), 0));
                    }
                }
                let Some((bytes, sent)) = response else {
                    return false;
                };
                while *sent < bytes.len() {
                    match conn.stream.write(net, &bytes[*sent..]) {
                        Ok(n) => *sent += n,
                        Err(SocketError::WouldBlock) => return false,
                        Err(_) => return true,
                    }
                }
                true
            }
        }
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("tcp-echo is a guest image: boot it with `cargo xtask qemu --image tcp-echo`");
    std::process::exit(2);
}
