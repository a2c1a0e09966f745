//! The API's socket and connections: a Unix socket served by hyper (HTTP/1.1)
//! on one thread with a single-threaded tokio runtime, with every resource a
//! client can make the shim spend bounded: connections at once, header size
//! and count, body size, and the time a client may take to send its headers
//! or its body (an idle keep-alive connection is closed when that time runs
//! out waiting for its next request).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

use super::limits::{
    HEADER_TIMEOUT, MAX_BODY, MAX_CONNECTIONS, MAX_HEADER_BYTES, MAX_HEADERS, QUEUE, STOP_GRACE,
};
use super::model::Command;
use super::routes;

#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    #[error("--api-sock {path}: another process is serving this socket")]
    InUse { path: String },
    #[error("--api-sock {path}: exists and is not a socket; remove it or pick another path")]
    NotSocket { path: String },
    #[error("--api-sock {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The running API thread; [`ApiServer::stop`] ends it and removes the socket.
pub struct ApiServer {
    /// What clients ask of the owner of the guests.
    pub commands: Receiver<Command>,
    stop: Arc<Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

/// Removes a socket a dead shim left behind; refuses anything else.
fn clear_stale(path: &Path) -> Result<(), ApiStartError> {
    let name = || path.display().to_string();
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ApiStartError::NotSocket { path: name() });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ApiStartError::InUse { path: name() });
    }
    std::fs::remove_file(path).map_err(|source| ApiStartError::Io {
        path: name(),
        source,
    })?;
    info!(path = %path.display(), "removed a stale API socket");
    Ok(())
}

impl ApiServer {
    /// Binds `path` (mode 0600: the socket lets its client run guests) and
    /// starts serving it on a thread of its own.
    ///
    /// # Errors
    /// The path is in use, not a socket, or cannot be bound.
    pub fn start(path: &Path) -> Result<Self, ApiStartError> {
        let io = |source| ApiStartError::Io {
            path: path.display().to_string(),
            source,
        };
        clear_stale(path)?;
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let stop = Arc::new(Notify::new());
        let stop2 = stop.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(io)?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Api);
                runtime.block_on(serve(listener, tx, &stop2));
            })
            .map_err(io)?;
        info!(path = %path.display(), "API listening");
        Ok(Self {
            commands: rx,
            stop,
            thread: Some(thread),
            path: path.to_owned(),
        })
    }

    /// Stops serving (open connections are closed) and removes the socket.
    pub fn stop(mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(listener: std::os::unix::net::UnixListener, tx: SyncSender<Command>, stop: &Notify) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("API socket cannot be served: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            () = stop.notified() => {
                // Answers already given (a shutdown's own) reach their
                // clients: wait a little for the open connections to end.
                let all = MAX_CONNECTIONS as u32;
                let _ = tokio::time::timeout(STOP_GRACE, slots.acquire_many(all)).await;
                return;
            }
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: wait a little instead of spinning.
                    warn!("API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::guest_log!(
                warn,
                "API client refused: {MAX_CONNECTIONS} connections are open already"
            );
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| routes::handle(req, tx.clone()));
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_headers(MAX_HEADERS)
                .max_buf_size(MAX_HEADER_BYTES.max(8192) + MAX_BODY)
                .max_header_size(MAX_HEADER_BYTES);
            // A client that breaks the protocol only ends its own connection.
            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
            drop(slot);
        });
    }
}
