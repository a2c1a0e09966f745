//! What one client can make the API spend, in one place: the server
//! enforces the connection and header limits, the routes the body's.

use std::time::Duration;

/// Clients served at once; one more is closed at once, with a (rate-limited) log line.
pub const MAX_CONNECTIONS: usize = 16;
/// A request's header section, in bytes, and its number of header lines.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
pub const MAX_HEADERS: usize = 64;
/// A request body, in bytes (a guest spec is well under 1 KiB).
pub const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send a request's headers (and so how long
/// an idle connection stays open), and then its body.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping server waits for open connections to end.
pub const STOP_GRACE: Duration = Duration::from_secs(1);
/// Commands waiting for the owner of the guests; more are answered 503.
pub const QUEUE: usize = 32;
