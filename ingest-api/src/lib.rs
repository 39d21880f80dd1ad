//! # ingest-api — the HTTP front door
//!
//! Validates who is calling and what they sent, records the request, puts a job on the right
//! queue and answers `202` at once; later serves the results by poll, long poll and server-sent
//! events. It never calls a model: that is the workers' job, on the other side of the queue.
//!
//! Layout:
//! - [`router`]      every route and the layers around them (the API map is in this file).
//! - [`handlers`]    one module per resource; short functions of extractors.
//! - [`extract`]     JSON/path/query extractors with our errors, and the `Caller` extractor.
//! - [`middleware`]  authentication and rate limit, idempotency keys, request metrics, the
//!   log of server errors.
//! - [`error`]       `ApiError`, the one error type, and its JSON shape.
//! - [`openapi`]     the OpenAPI 3.1 document served at `/openapi.json`.
//! - [`options`]     [`ApiOptions`], the plain limits and timeouts the binary hands in.
//! - [`slots`]       the per-user cap on event streams and long polls.
//! - [`throttle`]    lockouts of failed sign-ins and refreshes, per account and per address.
//! - [`token_cache`] the LRU of verified access tokens.
//! - [`serve`]       the accept loop: header-read, idle and body timeouts, connection limit,
//!   graceful shutdown.

// Functions stay short enough to read at once (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

pub mod error;
pub mod extract;
pub mod handlers;
pub mod middleware;
pub mod openapi;
pub mod options;
pub mod slots;
pub mod throttle;
pub mod token_cache;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Request};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, patch, post, put};
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use shared::ports::Ports;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::handlers::{auth, batches, conversations, events, ops, pages, personas, requests, sync};
pub use crate::options::ApiOptions;
use crate::slots::Slots;
use crate::throttle::Throttle;
use crate::token_cache::TokenCache;

/// Everything a handler may reach. axum clones the state for every handler and middleware of
/// every request, so it is one `Arc` (one counter to bump) around [`Shared`]; fields read
/// through it (`state.ports.store`).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    /// The backend's adapters, as built at start-up.
    pub ports: Ports,
    pub options: ApiOptions,
    pub limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    /// Failed sign-ins and refreshes, per account and per address.
    pub throttle: Arc<Throttle>,
    /// Access tokens already verified (of admitted requests).
    pub tokens: TokenCache,
    /// Event streams and long polls open, per user.
    pub slots: Arc<Slots>,
    /// Cancelled on shutdown: ends event streams and long polls so the server can drain.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// The sign-in throttle of the configured thresholds.
    pub fn throttle_for(options: &ApiOptions) -> Arc<Throttle> {
        Arc::new(Throttle::new(
            options.auth_failures_per_account,
            options.auth_failures_per_address,
        ))
    }

    /// The per-user limiter for the configured rate, if any.
    pub fn limiter_for(options: &ApiOptions) -> Option<Arc<DefaultKeyedRateLimiter<String>>> {
        let per_minute = NonZeroU32::new(options.rate_limit_per_minute)?;
        // Bursts up to a tenth of the minute's allowance (at least 10) are allowed.
        let burst =
            NonZeroU32::new((options.rate_limit_per_minute / 10).max(10)).unwrap_or(per_minute);
        Some(Arc::new(RateLimiter::keyed(
            Quota::per_minute(per_minute).allow_burst(burst),
        )))
    }
}

/// The routes behind authentication (and idempotency keys).
fn authenticated_routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/personas", post(personas::create).get(personas::list))
        .route("/v1/personas/batch", post(batches::create))
        .route(
            "/v1/personas/{id}",
            get(personas::get)
                .patch(personas::edit)
                .delete(personas::delete),
        )
        .route("/v1/batches", get(batches::list))
        .route("/v1/batches/{id}", get(batches::get))
        .route("/v1/batches/{id}/results", get(batches::results))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route(
            "/v1/conversations",
            post(conversations::create).get(conversations::list),
        )
        .route(
            "/v1/conversations/{id}",
            get(conversations::get)
                .patch(conversations::rename)
                .delete(conversations::delete),
        )
        .route(
            "/v1/conversations/{id}/messages",
            post(conversations::post_message).get(conversations::list_messages),
        )
        .route(
            "/v1/conversations/{id}/messages/{message_id}",
            patch(conversations::edit),
        )
        .route("/v1/conversations/{id}/rewind", post(conversations::rewind))
        .route(
            "/v1/conversations/{id}/memory",
            get(conversations::get_memory).put(conversations::put_memory),
        )
        .route(
            "/v1/conversations/{id}/messages/{message_id}/regenerate",
            post(conversations::regenerate),
        )
        .route(
            "/v1/conversations/{id}/messages/{message_id}/selected",
            put(conversations::select),
        )
        .route("/v1/auth/signout/all", post(auth::sign_out_everywhere))
        .route("/v1/requests/{id}", get(requests::get))
        .route("/v1/requests/{id}/cancel", post(requests::cancel))
        .route("/v1/events", get(events::stream))
        .route("/v1/sync", get(sync::sync))
        // Layers run outside-in: authenticate (added last) runs before idempotency. Route
        // layers: a method a route does not have is answered `405` before either runs (an
        // `Idempotency-Key` is never claimed for a request no handler takes).
        .route_layer(from_fn_with_state(state.clone(), middleware::idempotency))
        .route_layer(from_fn_with_state(state.clone(), middleware::authenticate))
}

/// The span of one request: method, path and ids.
fn http_span(req: &Request<axum::body::Body>) -> tracing::Span {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let trace_id = req
        .extensions()
        .get::<extract::Trace>()
        .map(|t| t.trace_id.as_str())
        .unwrap_or_default();
    // The path only: the query may hold an access token.
    tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), http_request_id = %id, %trace_id)
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let public = Router::new()
        .route("/v1/auth/signup", post(auth::sign_up))
        .route("/v1/auth/confirm", post(auth::confirm))
        .route("/v1/auth/signin", post(auth::sign_in))
        .route("/v1/auth/refresh", post(auth::refresh))
        .route("/v1/auth/signout", post(auth::sign_out))
        .route("/.well-known/jwks.json", get(ops::jwks))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/openapi.json", get(ops::openapi))
        .route("/", get(pages::index))
        .route("/app.js", get(pages::app_js))
        .route("/app.css", get(pages::app_css))
        .route("/docs", get(pages::docs))
        .route("/docs/init.js", get(pages::docs_init))
        .route("/docs/swagger-ui-bundle.js", get(pages::docs_bundle))
        .route("/docs/swagger-ui.css", get(pages::docs_css))
        .route("/docs/LICENSE", get(pages::docs_licence))
        .route("/docs/NOTICE", get(pages::docs_notice))
        .route(
            "/docs/swagger-ui-bundle.js.LICENSE.txt",
            get(pages::docs_bundle_licences),
        );
    // With an address of its own (`CHARACTERBOT_METRICS_LISTEN`), `/metrics` is served only
    // there: the public listener answers it `404`.
    let public = if !state.options.metrics_on_own_listener {
        public.route("/metrics", get(ops::metrics))
    } else {
        public
    };
    public
        .merge(authenticated_routes(&state))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .route_layer(from_fn_with_state(state.clone(), middleware::track))
        .layer(axum::middleware::from_fn(middleware::log_server_errors))
        .layer(DefaultBodyLimit::max(state.options.max_body_bytes))
        .layer(from_fn_with_state(
            state.clone(),
            middleware::refuse_large_bodies,
        ))
        // A body that stops arriving ends the request with `408` instead of holding it.
        .layer(RequestBodyTimeoutLayer::new(
            state.options.body_read_timeout.max(Duration::from_secs(1)),
        ))
        .layer(TraceLayer::new_for_http().make_span_with(http_span))
        .layer(axum::middleware::map_request(extract::tag_trace))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // Outermost: a client's `x-request-id` that is not a plain id is dropped (and a new
        // one made) before anything logs, echoes or queues it.
        .layer(axum::middleware::map_request(
            extract::drop_unsafe_request_id,
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .with_state(state)
}

/// Serves the API on `listener` until `state.shutdown` is cancelled, then drains.
///
/// Written out with hyper's own connection builder rather than `axum::serve`, which has no
/// timer and so no timeouts: a client could open connections and never finish (or never
/// start) its headers, and hold them as long as it liked.
///
/// Before it takes connections it starts the event bus's intake for this instance (on AWS, an
/// inbox subscribed to the events topic), and after draining it waits for the intake to remove
/// what it set up.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    middleware::spawn_limiter_housekeeping(&state);
    let intake = state
        .ports
        .events
        .listen(state.shutdown.clone())
        .await
        .map_err(std::io::Error::other)?;
    tracing::info!(addr = %listener.local_addr()?, "api listening");
    let served = serve_router(listener, router(state.clone()), &state).await;
    // The intake stops on the same shutdown; if serving failed, stop it here.
    state.shutdown.cancel();
    let _ = intake.await;
    served
}

/// Serves `/metrics` alone on `listener` (the `CHARACTERBOT_METRICS_LISTEN` address), with the
/// same timeouts and shutdown as the API.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: AppState,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    let app = Router::new()
        .route("/metrics", get(ops::metrics))
        .with_state(state.clone());
    serve_router(listener, app, &state).await
}

/// HTTP/1 and HTTP/2 with the header-read (and idle) timeout on both.
fn connection_builder(
    header_timeout: Duration,
) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(header_timeout)
        .keep_alive_timeout(header_timeout);
    builder
}

/// The router of one connection, with the peer's address for the `ConnectInfo` extractor.
fn with_peer(
    app: Router,
    peer: std::net::SocketAddr,
) -> impl tower::Service<
    axum::http::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    app.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        req.map(axum::body::Body::new)
    })
}

async fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    state: &AppState,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioIo;

    let shutdown = state.shutdown.clone();
    let header_timeout = state
        .options
        .header_read_timeout
        .max(Duration::from_secs(1));
    let max_connections = state.options.max_connections;
    let builder = connection_builder(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Past the connection limit a new connection is closed at once: the client sees a
        // reset and retries, and the server keeps serving those it has.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection limit reached; closing a new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(with_peer(app.clone(), peer));
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // The builder reads the first bytes to tell HTTP/1 from HTTP/2 before any of
            // hyper's timers run: a connection that sends nothing is dropped here. (`peek`, not
            // `readable`: the latter may wake with nothing to read.)
            let mut first = [0u8; 1];
            tokio::select! {
                // Not yet a connection to drain: shutdown need not wait for it.
                _ = stopping.cancelled() => return,
                peeked = tokio::time::timeout(header_timeout, stream.peek(&mut first)) => {
                    if !matches!(peeked, Ok(Ok(n)) if n > 0) {
                        return;
                    }
                }
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    // Stop accepting; let the connections in flight finish their requests (streams and long
    // polls end on the same cancellation).
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
