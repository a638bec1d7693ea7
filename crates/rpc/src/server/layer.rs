//! The per-call half of [`super::Limits`], as the outermost tower layer of
//! every server: counts the connection's open streams (for its idle
//! timeout), refuses request messages over the size limit with
//! RESOURCE_EXHAUSTED, and cuts over-long status messages.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

use super::Limits;
use super::accept::{ConnInfo, StreamGuard};

#[derive(Clone)]
pub struct LimitsLayer {
    max_request_message: usize,
    max_status_message: usize,
}

impl LimitsLayer {
    pub fn new(limits: &Limits) -> Self {
        LimitsLayer {
            max_request_message: limits.max_request_message,
            max_status_message: limits.max_status_message,
        }
    }
}

impl<S> tower::Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LimitsService {
            inner,
            limits: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LimitsService<S> {
    inner: S,
    limits: LimitsLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for LimitsService<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<R>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R: Body<Data = Bytes> + Unpin + Send + 'static,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits.clone();
        let (mut parts, body) = req.into_parts();
        let deadline = grpc_timeout(&parts.headers);
        let guard = match parts.extensions.get::<ConnInfo>().cloned() {
            Some(info) => {
                // tonic's own accessors (peer_certs, remote_addr) and the
                // AuthLayer read the TLS connection info.
                parts.extensions.insert(info.tls);
                Some(info.activity.stream_started())
            }
            None => None,
        };
        let body = tonic::body::Body::new(CheckedRequest {
            inner: body,
            limit: limits.max_request_message,
            prefix: [0; 5],
            have: 0,
            remaining: 0,
        });
        let req = http::Request::from_parts(parts, body);
        Box::pin(async move {
            let call = inner.call(req);
            let resp = match deadline {
                Some(timeout) => match tokio::time::timeout(timeout, call).await {
                    Ok(resp) => resp?,
                    Err(_) => {
                        return Ok(Status::deadline_exceeded(format!(
                            "the call's deadline ({timeout:?}, from grpc-timeout) passed before its response"
                        ))
                        .into_http());
                    }
                },
                None => call.await?,
            };
            let (mut parts, body) = resp.into_parts();
            cap_status(&mut parts.headers, limits.max_status_message);
            let body = tonic::body::Body::new(CheckedResponse {
                inner: body,
                max_status_message: limits.max_status_message,
                _stream: guard,
            });
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// The client's deadline for the response (gRPC over HTTP/2: `grpc-timeout`
/// is at most 8 digits and a unit). Like tonic's server, it bounds the wait
/// for the response to start; a stream's messages run on. A malformed value
/// is ignored rather than refused, as grpc-go and tonic do.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request body, passed through while its gRPC length prefixes (1 byte
/// of flags, 4 of length) are read; a message over the limit ends the body
/// with RESOURCE_EXHAUSTED, which tonic's decoder hands to the handler.
struct CheckedRequest<B> {
    inner: B,
    limit: usize,
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to pass.
    remaining: u64,
}

impl<B> CheckedRequest<B> {
    fn check(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.remaining -= skip as u64;
                data = &data[skip..];
                continue;
            }
            self.prefix[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if self.have == self.prefix.len() {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                if len as u64 > self.limit as u64 {
                    return Err(Status::resource_exhausted(format!(
                        "the request message is {len} bytes; this server accepts at most {} bytes",
                        self.limit
                    )));
                }
                self.remaining = len as u64;
            }
        }
        Ok(())
    }
}

impl<B> Body for CheckedRequest<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.check(data)
                {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Status::from_error(e.into())))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body, passed through with its trailers' status message
/// capped; the connection counts the stream as open until this is dropped.
struct CheckedResponse<R> {
    inner: R,
    max_status_message: usize,
    _stream: Option<StreamGuard>,
}

impl<R> Body for CheckedResponse<R>
where
    R: Body<Data = Bytes> + Unpin,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    cap_status(&mut trailers, this.max_status_message);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))),
            Some(Err(e)) => Poll::Ready(Some(Err(Status::from_error(e.into())))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Cuts the `grpc-message` in `headers` to at most `max` bytes (decoded),
/// keeping the code, details and metadata.
fn cap_status(headers: &mut http::HeaderMap, max: usize) {
    let too_long = headers.get("grpc-message").is_some_and(|m| m.len() > max);
    if !too_long {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let message = status.message();
    if message.len() <= max {
        return;
    }
    let mut cut = max;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let capped = Status::with_details_and_metadata(
        status.code(),
        format!("{}… ({} bytes, cut)", &message[..cut], message.len()),
        status.details().to_vec().into(),
        status.metadata().clone(),
    );
    headers.remove("grpc-message");
    if capped.add_header(headers).is_err() {
        tracing::debug!("could not re-encode a capped status message");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(limit: usize) -> CheckedRequest<()> {
        CheckedRequest {
            inner: (),
            limit,
            prefix: [0; 5],
            have: 0,
            remaining: 0,
        }
    }

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn messages_within_the_limit_pass_in_any_chunking() {
        let mut stream = message(10);
        stream.extend(message(0));
        stream.extend(message(100));
        for chunk in [1, 2, 3, 5, 7, 64, 1000] {
            let mut c = checked(100);
            for part in stream.chunks(chunk) {
                c.check(part).expect("within the limit");
            }
            assert_eq!((c.have, c.remaining), (0, 0), "chunks of {chunk}");
        }
    }

    #[test]
    fn a_message_over_the_limit_is_resource_exhausted_at_its_prefix() {
        let mut stream = message(10);
        stream.extend_from_slice(&[0, 0, 0, 0, 101]);
        for chunk in [1, 4, 15] {
            let mut c = checked(100);
            let err = stream
                .chunks(chunk)
                .find_map(|part| c.check(part).err())
                .expect("refused");
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        }
    }

    #[test]
    fn long_status_messages_are_cut_and_keep_their_code() {
        let mut headers = http::HeaderMap::new();
        Status::invalid_argument(format!("bad label {}", "é".repeat(5000)))
            .add_header(&mut headers)
            .expect("encode");
        cap_status(&mut headers, 100);
        let status = Status::from_header_map(&headers).expect("status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().len() < 150, "{}", status.message());
        assert!(status.message().starts_with("bad label é"));

        let mut short = http::HeaderMap::new();
        Status::not_found("short")
            .add_header(&mut short)
            .expect("encode");
        let before = short.clone();
        cap_status(&mut short, 100);
        assert_eq!(short, before);
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        use std::time::Duration;
        let parse = |v: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "grpc-timeout",
                http::HeaderValue::from_str(v).expect("value"),
            );
            grpc_timeout(&headers)
        };
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "10", "123456789S", "1x", "-1S", "1.5S", " 1S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn a_call_past_its_grpc_timeout_gets_deadline_exceeded() {
        use std::time::Duration;
        use tower::{Layer, ServiceExt};
        let slow = tower::service_fn(|req: http::Request<tonic::body::Body>| async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let service = LimitsLayer::new(&super::super::Limits::default()).layer(slow);
        let call = |path: &str, timeout: Option<&str>| {
            let mut req = http::Request::builder().uri(path);
            if let Some(t) = timeout {
                req = req.header("grpc-timeout", t);
            }
            let req = req.body(tonic::body::Body::empty()).expect("request");
            service.clone().oneshot(req)
        };
        let resp = call("/slow", Some("20m")).await.expect("a response");
        let status = Status::from_header_map(resp.headers()).expect("a status in the headers");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        let resp = call("/fast", Some("1H")).await.expect("a response");
        assert!(
            Status::from_header_map(resp.headers()).is_none(),
            "a call within its deadline is answered by the service"
        );
    }
}
