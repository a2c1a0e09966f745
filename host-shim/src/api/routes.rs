//! The API's endpoints: each request checked (path, method, body size and
//! JSON), turned into a [`Command`] for the owner of the guests, and its
//! answer (or a 4xx naming the problem) sent back as JSON.

use std::convert::Infallible;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::warn;

use super::limits::{BODY_TIMEOUT, MAX_BODY};
use super::model::{ActionBody, ApiError, Command, ErrorBody};
use super::prometheus;
use crate::spec::{self, GuestSpec};

/// How long a request waits for the owner of the guests (which builds or
/// stops one guest at a time).
const REPLY_TIMEOUT: Duration = Duration::from_mins(2);

type Answer = Response<Full<Bytes>>;

fn json<T: Serialize>(status: u16, body: &T) -> Answer {
    let text = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: &ApiError) -> Answer {
    json(
        e.status,
        &ErrorBody {
            error: e.message.clone(),
        },
    )
}

/// A 405 naming the methods the path takes.
fn wrong_method(method: &Method, path: &str, allow: &'static str) -> Result<Answer, ApiError> {
    Err(ApiError::new(
        405,
        format!("{method} is not allowed on {path}; use {allow}"),
    ))
}

/// Reads a body of at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`].
async fn body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_big = || ApiError::new(413, format!("request body larger than {MAX_BODY} bytes"));
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_big());
    }
    let limited = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            408,
            format!(
                "request body not received within {}s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("reading the body: {e}"))),
    }
}

/// A JSON body as `T`: malformed JSON and unknown or mistyped keys are 400s
/// naming what is wrong.
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad_request(format!("malformed JSON body: {e}"))
            }
            Category::Data => ApiError::bad_request(format!("bad {what}: {e}")),
        }
    })
}

/// Sends `make(reply)` to the owner of the guests and waits for its answer.
async fn ask<T>(
    tx: &SyncSender<Command>,
    make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Command,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    match tx.try_send(make(reply)) {
        Ok(()) => crate::mainwake::wake(),
        Err(TrySendError::Full(_)) => {
            return Err(ApiError::new(503, "the shim is busy; retry"));
        }
        Err(TrySendError::Disconnected(_)) => {
            return Err(ApiError::new(503, "the shim is shutting down"));
        }
    }
    match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ApiError::new(503, "the shim is shutting down")),
        Err(_) => Err(ApiError::new(504, "the shim did not answer in time")),
    }
}

async fn route(req: Request<Incoming>, tx: &SyncSender<Command>) -> Result<Answer, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["guests"] => match method {
            Method::GET => Ok(json(200, &ask(tx, Command::List).await?)),
            _ => wrong_method(&method, &path, "GET"),
        },
        ["guests", name] => {
            let name = (*name).to_owned();
            spec::check_name(&name).map_err(ApiError::bad_request)?;
            match method {
                Method::PUT => {
                    let bytes = body(req).await?;
                    let mut spec: GuestSpec = parse(&bytes, "guest spec")?;
                    if spec.name.as_ref().is_some_and(|n| *n != name) {
                        return Err(ApiError::bad_request(format!(
                            "the body names guest {:?} but the path {name:?}; leave `name` out \
                             or make them agree",
                            spec.name.unwrap_or_default()
                        )));
                    }
                    spec.name = Some(name.clone());
                    let info = ask(tx, |reply| Command::Create { name, spec, reply }).await?;
                    Ok(json(201, &info))
                }
                Method::DELETE => Ok(json(
                    200,
                    &ask(tx, |reply| Command::Delete { name, reply }).await?,
                )),
                Method::GET => {
                    let list = ask(tx, Command::List).await?;
                    list.guests
                        .into_iter()
                        .find(|g| g.name == name)
                        .map(|g| json(200, &g))
                        .ok_or_else(|| ApiError::not_found(format!("no guest named {name:?}")))
                }
                _ => wrong_method(&method, &path, "GET, PUT or DELETE"),
            }
        }
        ["guests", name, "stats"] => match method {
            Method::GET => {
                let name = (*name).to_owned();
                Ok(json(
                    200,
                    &ask(tx, |reply| Command::Stats { name, reply }).await?,
                ))
            }
            _ => wrong_method(&method, &path, "GET"),
        },
        ["metrics"] => match method {
            Method::GET => {
                let prom = match query.as_str() {
                    "" | "format=json" => false,
                    "format=prometheus" => true,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "unknown query {other:?}; use format=json or format=prometheus"
                        )));
                    }
                };
                let doc = ask(tx, Command::Metrics).await?;
                if prom {
                    let mut r = Response::new(Full::new(Bytes::from(prometheus::render(&doc))));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "text/plain; version=0.0.4; charset=utf-8",
                        ),
                    );
                    Ok(r)
                } else {
                    Ok(json(200, &doc))
                }
            }
            _ => wrong_method(&method, &path, "GET"),
        },
        ["actions"] => match method {
            Method::PUT => {
                let bytes = body(req).await?;
                let action: ActionBody = parse(&bytes, "action")?;
                ask(tx, Command::Shutdown).await?;
                Ok(json(202, &action))
            }
            _ => wrong_method(&method, &path, "PUT"),
        },
        _ => Err(ApiError::not_found(format!(
            "no endpoint {path}; the endpoints are /guests, /guests/{{name}}, \
             /guests/{{name}}/stats, /metrics and /actions (docs/api.yaml)"
        ))),
    }
}

/// One request: its answer, and one log line when it was refused.
///
/// # Errors
/// Never: every failure is an HTTP answer.
pub async fn handle(req: Request<Incoming>, tx: SyncSender<Command>) -> Result<Answer, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    Ok(match route(req, &tx).await {
        Ok(a) => a,
        Err(e) => {
            if e.status >= 500 {
                warn!(%method, %path, status = e.status, "API request failed: {}", e.message);
            } else {
                // A client's mistakes are its own business, but each is
                // logged once (rate-limited: a client can send many).
                crate::guest_log!(
                    info,
                    %method, %path, status = e.status,
                    "API request refused: {}", e.message
                );
            }
            let mut a = error(&e);
            if e.status == 405 {
                let allow = match path.trim_matches('/').split('/').count() {
                    2 => "GET, PUT, DELETE",
                    _ if path.trim_matches('/') == "actions" => "PUT",
                    _ => "GET",
                };
                a.headers_mut()
                    .insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
            }
            a
        }
    })
}
