//! The HTTP/1.1 server on `DIR/api.sock`: hyper on the API process's one-thread tokio
//! runtime. Bounds: [`MAX_CONNECTIONS`] at once (one more is answered 503 and closed), the
//! request head within [`HEAD_TIMEOUT`] and at most [`MAX_HEAD`] bytes, a body within
//! [`BODY_TIMEOUT`] and at most [`MAX_BODY`] bytes. A client past a bound gets a 4xx (or is
//! dropped at the deadline); nothing it does reaches the VM.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};

use crate::model::ErrorBody;
use crate::watch::Watch;

/// Connections served at once (a `GET /events` reader holds one for as long as it reads).
pub const MAX_CONNECTIONS: usize = 256;
/// A request head (request line and headers) must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head; a larger one is answered 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body; a larger one is answered 413.
pub const MAX_BODY: usize = 64 * 1024;
/// A request body must arrive within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

pub type ApiBody = Pin<Box<dyn Body<Data = Bytes, Error = Infallible> + Send>>;

/// Accepts and serves connections until the process ends.
pub async fn serve(listener: UnixListener, watch: Arc<Watch>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: wait a little instead of spinning.
                log::warn!("api: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => {
                let watch = Arc::clone(&watch);
                tokio::spawn(async move {
                    connection(stream, watch).await;
                    drop(slot);
                });
            }
            Err(_) => {
                tokio::spawn(refuse(stream));
            }
        }
    }
}

/// Over [`MAX_CONNECTIONS`]: one 503 and the connection closes.
async fn refuse(mut stream: UnixStream) {
    let body =
        format!("{{\"error\":\"more than {MAX_CONNECTIONS} connections at once; try again\"}}");
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
}

async fn connection(stream: UnixStream, watch: Arc<Watch>) {
    let service = hyper::service::service_fn(move |request| {
        let watch = Arc::clone(&watch);
        async move {
            let response = crate::routes::handle(&watch, request).await;
            watch.count_request(response.status().as_u16());
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        log::debug!("api: connection ended: {e}");
    }
}

/// The body of a request, bounded in size and time.
pub async fn read_body(body: Incoming) -> Result<Bytes, Response<ApiBody>> {
    let limited = Limited::new(body, MAX_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {BODY_TIMEOUT:?}"),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY} bytes"),
        )),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

pub fn full(
    status: StatusCode,
    content_type: &'static str,
    data: impl Into<Bytes>,
) -> Response<ApiBody> {
    let mut response = Response::new(Box::pin(Full::new(data.into())) as ApiBody);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<ApiBody> {
    match serde_json::to_vec(value) {
        Ok(mut data) => {
            data.push(b'\n');
            full(status, "application/json", data)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        ),
    }
}

pub fn error(status: StatusCode, message: String) -> Response<ApiBody> {
    let message = message.replace('\n', " ");
    json(status, &ErrorBody { error: message })
}

/// `GET /events`: newline-delimited JSON, one event a line, until the VM ends or the client
/// goes. A reader that falls [`crate::watch`]'s backlog behind gets an `events_lost` line.
pub fn event_stream(watch: &Arc<Watch>) -> Response<ApiBody> {
    let mut events = watch.events.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let ended = watch.exit().is_some();
    tokio::spawn(async move {
        if ended {
            return;
        }
        loop {
            let line = match events.recv().await {
                Ok(line) => line,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let lost = format!("{{\"event\":\"events_lost\",\"count\":{n}}}\n");
                    if tx.send(Bytes::from(lost)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Bytes::from(line.text.clone())).await.is_err() || line.last {
                return;
            }
        }
    });
    let mut response = Response::new(Box::pin(EventBody { rx }) as ApiBody);
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

struct EventBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|line| line.map(|data| Ok(Frame::data(data))))
    }
}
