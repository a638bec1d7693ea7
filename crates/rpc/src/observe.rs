//! Observing how calls end: a tower layer that reports each call's gRPC path,
//! final status code and duration to a callback (metrics).
//!
//! A gRPC status arrives either in the response headers (a "trailers-only"
//! error answer) or in the trailers after the body, so the response body is
//! wrapped to catch the trailers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use tonic::Code;

/// Called once per finished call.
pub type Observer = Arc<dyn Fn(&str, Code, Duration) + Send + Sync>;

#[derive(Clone)]
pub struct ObserveLayer {
    observer: Observer,
}

impl ObserveLayer {
    pub fn new(observer: Observer) -> Self {
        ObserveLayer { observer }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ObserveService {
            inner,
            observer: self.observer.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    observer: Observer,
}

fn code_of(headers: &http::HeaderMap) -> Option<Code> {
    grpc_status(headers).map(|(code, _)| code)
}

/// The gRPC status carried by `headers` (response headers of a trailers-only
/// response, or trailers), if any.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<(Code, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    Some((Code::from_i32(code), message))
}

/// Undoes the percent-encoding gRPC applies to `grpc-message`.
fn percent_decode(bytes: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<S, B, R> tower::Service<http::Request<B>> for ObserveService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Body + Send + 'static,
{
    type Response = http::Response<ObservedBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let observer = self.observer.clone();
        let path: Arc<str> = req.uri().path().into();
        let start = Instant::now();
        Box::pin(async move {
            let resp = inner.call(req).await?;
            let pending = match code_of(resp.headers()) {
                Some(code) => {
                    observer(&path, code, start.elapsed());
                    None
                }
                None => Some(Pending {
                    observer,
                    path,
                    start,
                }),
            };
            Ok(resp.map(|inner| ObservedBody { inner, pending }))
        })
    }
}

struct Pending {
    observer: Observer,
    path: Arc<str>,
    start: Instant,
}

impl Pending {
    fn finish(self, code: Code) {
        (self.observer)(&self.path, code, self.start.elapsed());
    }
}

/// The response body, passed through; reports the status from the trailers,
/// or CANCELLED if the body is dropped before them.
pub struct ObservedBody<R> {
    inner: R,
    pending: Option<Pending>,
}

impl<R> Drop for ObservedBody<R> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(Code::Cancelled);
        }
    }
}

impl<R: Default> Default for ObservedBody<R> {
    fn default() -> Self {
        ObservedBody {
            inner: R::default(),
            pending: None,
        }
    }
}

impl<R: Body + Unpin> Body for ObservedBody<R> {
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<R::Data>, R::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(t) = f.trailers_ref()
                    && let Some(p) = this.pending.take()
                {
                    p.finish(code_of(t).unwrap_or(Code::Unknown));
                }
            }
            Some(Err(_)) => {
                if let Some(p) = this.pending.take() {
                    p.finish(Code::Unknown);
                }
            }
            None => {
                if let Some(p) = this.pending.take() {
                    p.finish(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_from_headers() {
        let mut h = http::HeaderMap::new();
        assert!(grpc_status(&h).is_none());
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static("bad %22thing%22 100%25"),
        );
        let (code, msg) = grpc_status(&h).expect("status");
        assert_eq!(code, Code::InvalidArgument);
        assert_eq!(msg, "bad \"thing\" 100%");
        assert_eq!(percent_decode(b"50%"), "50%");
    }
}
