//! `metroctl dashboard`: a local web page over the cluster, with the
//! operator's own credentials (as `kubectl proxy` or `nomad ui` do).
//! Nothing new runs on the nodes: the page talks to this process, which
//! calls the cluster's gRPC API like any other metroctl command.
//!
//! Because the page acts as the operator, this server trusts no request by
//! its network origin alone:
//! - it listens on loopback unless `--insecure-listen` says otherwise;
//! - the Host header must name the listening address (a DNS-rebinding page
//!   has its own host name);
//! - every API call carries the session token, which only the page served
//!   by this process knows (a random value per run, embedded in the page;
//!   other origins cannot read it); actions (POST) take it in a header only,
//!   must be JSON (no cross-origin form can send that without a preflight,
//!   which is never answered) and, when the browser names an Origin, must
//!   come from this one;
//! - the page's Content-Security-Policy allows only its own scripts, and the
//!   page writes cluster data (labels are user input) as text, never HTML.
//!
//! Assets are embedded: the page works offline and needs no build step.

mod api;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::conn::Ctx;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Where the page's token goes in index.html.
const TOKEN_PLACEHOLDER: &str = "{{SESSION_TOKEN}}";

/// Header that carries the session token on API calls.
pub const TOKEN_HEADER: &str = "x-dashboard-token";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub struct Dashboard {
    pub ctx: Ctx,
    /// A channel to the curator leader, kept between calls; dropped when a
    /// call finds it no longer leads.
    channel: tokio::sync::Mutex<Option<tonic::transport::Channel>>,
    token: String,
    /// Host header values accepted (None: any, with --insecure-listen).
    hosts: Option<Vec<String>>,
    /// The Origin a same-origin request names.
    origins: Vec<String>,
}

/// `metroctl dashboard [--listen ADDR] [--insecure-listen]`.
pub async fn run(ctx: Ctx, listen: SocketAddr, insecure_listen: bool) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() && !insecure_listen {
        bail!(
            "--listen {listen} is not a loopback address: the dashboard acts with your credentials, \
             so anyone who reaches it can act as you; pass --insecure-listen as well if that is \
             what you want"
        );
    }
    // Fail now, not in the browser, without credentials or a cluster.
    ctx.client_identity()?;
    ctx.cluster_ca().await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    if insecure_listen && !listen.ip().is_loopback() {
        eprintln!(
            "metroctl: WARNING: the dashboard listens on {addr}, not on loopback: whoever reaches it \
             and learns its URL acts with your credentials. Plain HTTP: the session token travels \
             in clear text."
        );
    }
    let mut hosts = vec![addr.to_string()];
    if addr.ip().is_loopback() {
        hosts.push(format!("localhost:{}", addr.port()));
    }
    let origins = hosts.iter().map(|h| format!("http://{h}")).collect();
    let dashboard = Arc::new(Dashboard {
        ctx,
        channel: Default::default(),
        token: session_token()?,
        hosts: (!insecure_listen).then_some(hosts),
        origins,
    });
    let app = router(dashboard);
    println!("Dashboard: http://{addr}/  (Ctrl-C to stop)");
    use std::io::Write;
    std::io::stdout().flush()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// 32 random bytes from the OS, hex.
fn session_token() -> anyhow::Result<String> {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness for the session token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn router(dashboard: Arc<Dashboard>) -> axum::Router {
    use axum::routing::{get, post};
    let api = axum::Router::new()
        .route("/nodes/watch", get(api::watch_nodes))
        .route("/cluster", get(api::cluster))
        .route("/audit", get(api::audit))
        .route("/nodes/{id}/logs", get(api::logs))
        .route("/nodes/{id}/approve", post(api::approve))
        .route("/nodes/{id}/labels", post(api::labels))
        .route("/nodes/{id}/roles", post(api::roles))
        .layer(axum::middleware::from_fn_with_state(
            dashboard.clone(),
            check_token,
        ));
    axum::Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .nest("/api", api)
        .layer(axum::middleware::from_fn_with_state(
            dashboard.clone(),
            check_host,
        ))
        .with_state(dashboard)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn index(State(d): State<Arc<Dashboard>>) -> Response {
    let page = INDEX_HTML.replace(TOKEN_PLACEHOLDER, &d.token);
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

pub fn refuse(code: StatusCode, message: impl Into<String>) -> Response {
    (
        code,
        axum::Json(serde_json::json!({ "error": message.into() })),
    )
        .into_response()
}

/// Every response: only for this host, with the page's security headers.
async fn check_host(State(d): State<Arc<Dashboard>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if let Some(hosts) = &d.hosts
        && !hosts.iter().any(|h| h == host)
    {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this dashboard answers only for {}; open it at that address",
                hosts.join(" or ")
            ),
        );
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// API calls: the session token; actions also same-origin JSON.
async fn check_token(State(d): State<Arc<Dashboard>>, req: Request, next: Next) -> Response {
    if let Err(why) = authorize_api(&d, req.method(), req.headers(), req.uri().query()) {
        return refuse(StatusCode::FORBIDDEN, why);
    }
    next.run(req).await
}

fn authorize_api(
    d: &Dashboard,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(), String> {
    let header_token = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    let token = if method == Method::GET {
        // EventSource cannot set headers: streams take it in the query.
        // (A hex token needs no percent-decoding.)
        header_token.map(str::to_string).or_else(|| {
            query?
                .split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .map(str::to_string)
        })
    } else {
        header_token.map(str::to_string)
    };
    if !token.is_some_and(|t| constant_time_eq(t.as_bytes(), d.token.as_bytes())) {
        return Err("missing or wrong session token: reload the dashboard page".into());
    }
    if method != Method::GET {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
            && !d.origins.iter().any(|o| o == origin)
        {
            return Err(format!(
                "cross-origin request from {:?} refused",
                origin.chars().take(80).collect::<String>()
            ));
        }
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/json"));
        if !json {
            return Err("actions must be sent as application/json".into());
        }
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dashboard() -> Dashboard {
        Dashboard {
            ctx: Ctx {
                config: crate::config::ConfigDir::locate(Some("/nonexistent".into()))
                    .expect("config"),
                endpoints_flag: None,
                assume_yes: false,
                accept_first_ca: false,
            },
            channel: Default::default(),
            token: "t0k3n".into(),
            hosts: Some(vec!["127.0.0.1:8080".into()]),
            origins: vec!["http://127.0.0.1:8080".into()],
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn api_calls_need_the_token_and_actions_same_origin_json() {
        let d = dashboard();
        let get = Method::GET;
        let post = Method::POST;
        assert!(authorize_api(&d, &get, &headers(&[]), None).is_err());
        assert!(authorize_api(&d, &get, &headers(&[]), Some("token=t0k3n")).is_ok());
        assert!(authorize_api(&d, &get, &headers(&[]), Some("token=t0k3m")).is_err());
        assert!(authorize_api(&d, &get, &headers(&[(TOKEN_HEADER, "t0k3n")]), None).is_ok());
        let json = ("content-type", "application/json");
        let token = (TOKEN_HEADER, "t0k3n");
        // Actions: the token only in the header.
        assert!(authorize_api(&d, &post, &headers(&[json]), Some("token=t0k3n")).is_err());
        assert!(authorize_api(&d, &post, &headers(&[json, token]), None).is_ok());
        // Not JSON (a form another site could post).
        let form = ("content-type", "application/x-www-form-urlencoded");
        assert!(authorize_api(&d, &post, &headers(&[form, token]), None).is_err());
        // Another origin.
        let evil = ("origin", "http://evil.example");
        let err = authorize_api(&d, &post, &headers(&[json, token, evil]), None)
            .expect_err("cross-origin");
        assert!(err.contains("cross-origin"), "{err}");
        let same = ("origin", "http://127.0.0.1:8080");
        assert!(authorize_api(&d, &post, &headers(&[json, token, same]), None).is_ok());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(session_token().expect("token").len(), 64);
    }
}
