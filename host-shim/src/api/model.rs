//! What crosses the API socket (typed JSON bodies) and what the API thread
//! asks of the thread that owns the guests ([`Command`]).

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::spec::GuestSpec;

/// An error answer: its HTTP status and the body `{"error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    #[must_use]
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    #[must_use]
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
    #[must_use]
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }
    #[must_use]
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }
}

/// The body of every 4xx/5xx answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: String,
}

/// One guest in `GET /guests` and the answer to `PUT /guests/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestInfo {
    pub name: String,
    /// `running` or `ended`.
    pub state: GuestState,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub kernel: String,
    /// How it ended ("exit status 0", "interrupted", ...), or "running".
    pub outcome: String,
    /// The guest's exit status, once it exited through the exit hypercall.
    pub exit_status: Option<u32>,
    /// Given on the command line (or in --config) rather than through the API.
    pub from_command_line: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestState {
    Running,
    Ended,
}

/// `GET /guests`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestList {
    pub guests: Vec<GuestInfo>,
}

/// `PUT /actions`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Stop every guest, write the stats JSON, exit.
    Shutdown,
}

/// The answer to a command, sent back to the waiting request.
pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// What the API thread asks of the owner of the guests. Every guest-changing
/// request goes through here, one at a time, on the thread that started the
/// command line's guests.
pub enum Command {
    List(Reply<GuestList>),
    /// The spec is checked (keys, values, the kernel image) before it is sent.
    Create {
        name: String,
        spec: GuestSpec,
        reply: Reply<GuestInfo>,
    },
    /// Stop, join and free a guest; answers with its final report.
    Delete {
        name: String,
        reply: Reply<serde_json::Value>,
    },
    /// One guest's report so far.
    Stats {
        name: String,
        reply: Reply<serde_json::Value>,
    },
    /// The whole stats document so far (what `--stats-json` writes at exit).
    Metrics(Reply<serde_json::Value>),
    Shutdown(Reply<()>),
}
