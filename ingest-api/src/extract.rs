//! Extractors, so that no handler parses headers or formats an error by hand.
//!
//! - [`AppJson`], [`AppQuery`], [`AppPath`]: axum's own, with rejections turned into
//!   [`ApiError`]s.
//! - [`Caller`]: the authenticated user, put in the request by the auth middleware.
//! - [`Claim`]: the call's `Idempotency-Key`, if any, and the ids derived from it.
//! - [`Trace`]: the ids that follow a request into the queue and the worker's logs.
//! - [`ClientAddr`]: where the request came from, for the sign-in throttle.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use shared::auth::AuthUser;
use shared::ids::Ids;

use crate::error::ApiError;
use crate::middleware::IdempotencyClaim;
use crate::AppState;

/// A JSON body, which must be an object (as every body in the OpenAPI document is).
pub struct AppJson<T>(pub T);

impl<T, S> FromRequest<S> for AppJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(Object(value)) = axum::Json::<Object<T>>::from_request(req, state).await?;
        Ok(AppJson(value))
    }
}

/// `T` read from a JSON object only: serde's derived structs also take a JSON array (their
/// fields in order; `[]` for a struct whose fields all have defaults).
struct Object<T>(T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
            .map(Object)
    }
}

impl<T: serde::Serialize> IntoResponse for AppJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct AppQuery<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct AppPath<T>(pub T);

/// The verified caller of a `/v1` request.
#[derive(Debug, Clone)]
pub struct Caller(pub AuthUser);

impl Caller {
    pub fn id(&self) -> &str {
        &self.0.user_id
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<AuthUser>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| ApiError::Unauthorized("authentication required".into()))
    }
}

/// The `Idempotency-Key` claimed for this call, if it has one (see
/// [`crate::middleware::idempotency`]).
#[derive(Debug, Clone)]
pub struct Claim(pub Option<IdempotencyClaim>);

impl Claim {
    /// Where the ids of what this call creates come from: derived from the key when there is
    /// one, so a retry after a crash derives the same ones.
    pub fn ids(&self, user_id: &str) -> Ids {
        match &self.0 {
            Some(c) => Ids::Keyed {
                user_id: user_id.to_owned(),
                key: c.key.clone(),
                first_ms: c.first_ms,
            },
            None => Ids::Fresh,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Claim {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Claim(parts.extensions.get::<IdempotencyClaim>().cloned()))
    }
}

/// The ids that tie a queued job to the HTTP call that queued it: set as message attributes,
/// logged by the worker.
#[derive(Debug, Clone)]
pub struct Trace {
    /// `x-request-id`, set (or kept) by the request-id layer.
    pub http_request_id: String,
    pub trace_id: String,
}

/// The trace a call belongs to: the `Root` of the ALB's `X-Amzn-Trace-Id`, else the trace id of a
/// W3C `traceparent`, else a new one. Values that do not look like ids are ignored, so a client
/// cannot put arbitrary text into message attributes and logs.
pub fn trace_id(headers: &HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let amzn = header("x-amzn-trace-id").and_then(|v| {
        v.split(';')
            .find_map(|part| part.trim().strip_prefix("Root="))
            .map(str::to_owned)
    });
    let w3c = || {
        header("traceparent").and_then(|v| {
            let mut parts = v.split('-');
            match (parts.next(), parts.next()) {
                (Some(_version), Some(id)) if id.len() == 32 => Some(id.to_owned()),
                _ => None,
            }
        })
    };
    amzn.or_else(w3c)
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

impl Trace {
    pub fn of(headers: &HeaderMap) -> Trace {
        Trace {
            http_request_id: headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            trace_id: trace_id(headers),
        }
    }
}

/// Longest `x-request-id` taken from a client.
const MAX_REQUEST_ID_LEN: usize = 64;

/// Whether a client's `x-request-id` is a plain id: 1 to 64 of `A-Z a-z 0-9 . _ -`. Anything
/// else (spaces, `key=value` text, kilobytes) would be forged into logs, echoed and queued.
pub fn safe_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Layer function: drops an `x-request-id` that is not [`safe_request_id`], so the request-id
/// layer makes a new one.
pub async fn drop_unsafe_request_id(mut req: axum::extract::Request) -> axum::extract::Request {
    let unsafe_id = req
        .headers()
        .get_all("x-request-id")
        .iter()
        .enumerate()
        .any(|(i, v)| i > 0 || !safe_request_id(v.as_bytes()));
    if unsafe_id {
        req.headers_mut().remove("x-request-id");
    }
    req
}

/// Layer function: works out the request's `Trace` once, so that the log span and the queued
/// message carry the same (possibly new) trace id.
pub async fn tag_trace(mut req: axum::extract::Request) -> axum::extract::Request {
    let trace = Trace::of(req.headers());
    req.extensions_mut().insert(trace);
    req
}

impl<S: Send + Sync> FromRequestParts<S> for Trace {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Trace>()
            .cloned()
            .unwrap_or_else(|| Trace::of(&parts.headers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_trace_id_comes_from_the_load_balancer_then_w3c_else_is_new() {
        let alb = headers(&[(
            "x-amzn-trace-id",
            "Self=1-67891234-12456789abcdef012345678;Root=1-67891233-abcdef012345678912345678",
        )]);
        assert_eq!(trace_id(&alb), "1-67891233-abcdef012345678912345678");
        let w3c = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        assert_eq!(trace_id(&w3c), "4bf92f3577b34da6a3ce929d0e0e4736");
        let junk = headers(&[("x-amzn-trace-id", "Root=<script>")]);
        let made = trace_id(&junk);
        assert_eq!(made.len(), 32);
        assert_ne!(made, trace_id(&HeaderMap::new()), "a new id each time");
    }
}

/// The client's address: the peer's, or, when the API is told to trust its load balancer, the
/// last entry of `X-Forwarded-For` (the one the balancer appended; earlier entries are the
/// client's to forge). `None` when neither is known (a router driven in-process).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if state.options.trust_forwarded_for {
            let forwarded = parts
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .and_then(|ip| ip.trim().parse().ok());
            if forwarded.is_some() {
                return Ok(ClientAddr(forwarded));
            }
        }
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
        Ok(ClientAddr(peer.map(|c| c.0.ip())))
    }
}
