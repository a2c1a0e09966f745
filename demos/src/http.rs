//! The smallest HTTP/1.0-style responder the demo needs: one page for `GET /`,
//! 404 for other paths, 400 for anything that is not a GET, 431 for a request
//! head longer than [`MAX_REQUEST`] (a client must not make the server
//! buffer without end).

use alloc::format;
use alloc::vec::Vec;

/// The page the `http` demo serves.
pub const PAGE: &str = "<!doctype html>\n<title>Exitless</title>\n<h1>Hello from an Exitless unikernel</h1>\n<p>Served by smoltcp in ring 3 over virtio-net.</p>\n";

/// The longest request head the server reads; past it, it answers 431.
pub const MAX_REQUEST: usize = 8 * 1024;

/// True once the request head (up to the blank line) has arrived.
#[must_use]
pub fn request_complete(req: &[u8]) -> bool {
    req.windows(4).any(|w| w == b"\r\n\r\n") || req.windows(2).any(|w| w == b"\n\n")
}

/// The full response for a request head.
#[must_use]
pub fn response(req: &[u8]) -> Vec<u8> {
    if req.len() > MAX_REQUEST {
        return reply("431 Request Header Fields Too Large", "request too large\n");
    }
    let line = req.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let (status, body) = match (words.next(), words.next()) {
        (Some(b"GET"), Some(b"/" | b"/index.html")) => ("200 OK", PAGE),
        (Some(b"GET"), Some(_)) => ("404 Not Found", "not found\n"),
        _ => ("400 Bad Request", "bad request\n"),
    };
    reply(status, body)
}

fn reply(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &[u8]) -> &str {
        core::str::from_utf8(v).unwrap()
    }

    #[test]
    fn get_root_serves_the_page_with_its_length() {
        let r = response(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = text(&r);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains(&format!("Content-Length: {}\r\n", PAGE.len())));
        assert!(r.ends_with(PAGE));
    }

    #[test]
    fn other_paths_and_methods() {
        assert!(text(&response(b"GET /nope HTTP/1.1\r\n\r\n")).starts_with("HTTP/1.1 404"));
        assert!(text(&response(b"POST / HTTP/1.1\r\n\r\n")).starts_with("HTTP/1.1 400"));
        assert!(text(&response(b"")).starts_with("HTTP/1.1 400"));
    }

    #[test]
    fn an_endless_head_is_refused() {
        let mut req = b"GET / HTTP/1.1\r\nX: ".to_vec();
        req.resize(MAX_REQUEST + 1, b'a');
        assert!(text(&response(&req)).starts_with("HTTP/1.1 431"));
    }

    #[test]
    fn request_head_detection() {
        assert!(!request_complete(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(request_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(request_complete(b"GET /\n\n"));
    }
}
