//! Downloads a node binary over http(s) into a file, bounded in size and
//! time, hashing it on the way.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Bounds of one download.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_bytes: u64,
    pub connect: Duration,
    /// Longest wait for the next piece of the body.
    pub stall: Duration,
    pub total: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: metropolis_api::update::MAX_BINARY_BYTES,
            connect: Duration::from_secs(10),
            stall: Duration::from_secs(30),
            total: Duration::from_secs(600),
        }
    }
}

#[derive(Debug)]
pub struct Fetched {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("binary_url {0}")]
    BadUrl(String),
    #[error("cannot fetch {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("{url} answered {status}{hint}")]
    Status {
        url: String,
        status: hyper::StatusCode,
        hint: &'static str,
    },
    #[error("{url} is {size} bytes; a node binary may be at most {limit} bytes")]
    TooLarge {
        url: String,
        size: String,
        limit: u64,
    },
    #[error("fetching {url} took longer than {}", humantime::format_duration(*.limit))]
    Timeout { url: String, limit: Duration },
    #[error("{url} sent nothing for {}", humantime::format_duration(*.limit))]
    Stalled { url: String, limit: Duration },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl FetchError {
    /// Whether the file itself was refused (as opposed to not reached).
    pub fn refused_content(&self) -> bool {
        matches!(self, FetchError::BadUrl(_) | FetchError::TooLarge { .. })
    }

    /// Whether this node failed to store it (a full disk, say).
    pub fn local(&self) -> bool {
        matches!(self, FetchError::Write { .. })
    }
}

/// Shortens user input quoted in errors.
fn brief(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Checks that `url` is an absolute http or https URL.
pub fn parse_url(url: &str) -> Result<hyper::Uri, FetchError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| FetchError::BadUrl(format!("{:?} is not a URL: {e}", brief(url))))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(FetchError::BadUrl(format!(
            "{:?} must be an http:// or https:// URL with a host",
            brief(url)
        ))),
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

/// An http and https client that trusts the system's certificate store.
fn client(limits: &Limits) -> Result<Client, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable or missing system certificates leave https unusable (the
    // handshake then says so), not http.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(limits.connect));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

/// Downloads `url` into `dest` (created mode 0700, replaced if present),
/// refusing more than `limits.max_bytes` before writing them.
pub async fn fetch(url: &str, dest: &Path, limits: &Limits) -> Result<Fetched, FetchError> {
    let uri = parse_url(url)?;
    let shown = brief(url);
    match tokio::time::timeout(limits.total, download(uri, &shown, dest, limits)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout {
            url: shown,
            limit: limits.total,
        }),
    }
}

async fn download(
    uri: hyper::Uri,
    shown: &str,
    dest: &Path,
    limits: &Limits,
) -> Result<Fetched, FetchError> {
    let client = client(limits).map_err(|e| FetchError::Unreachable {
        url: shown.to_string(),
        detail: format!("cannot set up TLS: {e}"),
    })?;
    let resp = client.get(uri).await.map_err(|e| FetchError::Unreachable {
        url: shown.to_string(),
        detail: error_chain(&e),
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            url: shown.to_string(),
            status,
            hint: if status.is_redirection() {
                " (redirects are not followed; give the final URL)"
            } else {
                ""
            },
        });
    }
    let too_large = |size: String| FetchError::TooLarge {
        url: shown.to_string(),
        size,
        limit: limits.max_bytes,
    };
    if let Some(len) = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limits.max_bytes
    {
        return Err(too_large(len.to_string()));
    }
    let write_err = |source| FetchError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(dest)
        .await
        .map_err(write_err)?;
    let mut body = resp.into_body();
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(limits.stall, body.frame()).await {
            Err(_) => {
                return Err(FetchError::Stalled {
                    url: shown.to_string(),
                    limit: limits.stall,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(FetchError::Unreachable {
                    url: shown.to_string(),
                    detail: format!("the download broke off: {}", error_chain(&e)),
                });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > limits.max_bytes {
            return Err(too_large(format!("more than {}", limits.max_bytes)));
        }
        hasher.update(&data);
        file.write_all(&data).await.map_err(write_err)?;
    }
    file.sync_all().await.map_err(write_err)?;
    Ok(Fetched {
        bytes: total,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// An error and its causes on one line (hyper's own message is terse:
/// "client error (Connect)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Answers every connection with `response` (raw HTTP/1.1).
    async fn serve(response: Vec<u8>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let response = response.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(&response).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        format!("http://{addr}/node")
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn limits(max: u64) -> Limits {
        Limits {
            max_bytes: max,
            connect: Duration::from_secs(5),
            stall: Duration::from_millis(500),
            total: Duration::from_secs(20),
        }
    }

    #[tokio::test]
    async fn downloads_and_hashes() {
        let url = serve(ok(b"hello")).await;
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("f");
        let got = fetch(&url, &dest, &limits(1024)).await.expect("fetch");
        assert_eq!(got.bytes, 5);
        assert_eq!(got.sha256, hex::encode(Sha256::digest(b"hello")));
        assert_eq!(std::fs::read(&dest).expect("read"), b"hello");
    }

    #[tokio::test]
    async fn refuses_a_claimed_size_over_the_limit_before_reading() {
        let url = serve(
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\nconnection: close\r\n\r\nxx"
                .to_vec(),
        )
        .await;
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("f");
        let e = fetch(&url, &dest, &limits(1024))
            .await
            .expect_err("too large");
        assert!(matches!(e, FetchError::TooLarge { .. }), "{e}");
        assert!(e.refused_content());
        assert!(!dest.exists(), "nothing written");
    }

    #[tokio::test]
    async fn refuses_a_body_that_grows_over_the_limit() {
        let mut resp =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
        for _ in 0..8 {
            resp.extend_from_slice(b"100\r\n");
            resp.extend_from_slice(&[b'x'; 256]);
            resp.extend_from_slice(b"\r\n");
        }
        resp.extend_from_slice(b"0\r\n\r\n");
        let url = serve(resp).await;
        let tmp = tempfile::tempdir().expect("tmp");
        let e = fetch(&url, &tmp.path().join("f"), &limits(1024))
            .await
            .expect_err("too large");
        assert!(e.to_string().contains("more than 1024"), "{e}");
    }

    #[tokio::test]
    async fn reports_status_unreachable_stalls_and_bad_urls() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("f");
        let url = serve(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()).await;
        let e = fetch(&url, &dest, &limits(10)).await.expect_err("404");
        assert!(e.to_string().contains("404"), "{e}");
        let url =
            serve(b"HTTP/1.1 302 Found\r\nlocation: /x\r\ncontent-length: 0\r\n\r\n".to_vec())
                .await;
        let e = fetch(&url, &dest, &limits(10)).await.expect_err("302");
        assert!(e.to_string().contains("redirects are not followed"), "{e}");

        // Nothing listens on a port just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let e = fetch(&format!("http://127.0.0.1:{port}/x"), &dest, &limits(10))
            .await
            .expect_err("unreachable");
        assert!(matches!(e, FetchError::Unreachable { .. }), "{e}");
        assert!(!e.refused_content());

        // Headers, then silence.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nab")
                    .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        let e = fetch(&format!("http://{addr}/x"), &dest, &limits(1000))
            .await
            .expect_err("stalled");
        assert!(matches!(e, FetchError::Stalled { .. }), "{e}");

        for bad in ["ftp://host/x", "/just/a/path", "not a url", "http:///x"] {
            let e = fetch(bad, &dest, &limits(10)).await.expect_err(bad);
            assert!(matches!(e, FetchError::BadUrl(_)), "{bad}: {e}");
        }
    }
}
