//! Operational endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document and the
//! embedded issuer's JWKS.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;
use shared::domain::RequestKind;
use shared::metrics::QueueLabels;

use crate::error::ApiError;
use crate::extract::AppJson;
use crate::AppState;

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200)))]
pub async fn healthz() -> AppJson<serde_json::Value> {
    AppJson(json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/readyz", tag = "ops", responses((status = 200), (status = 503)))]
pub async fn readyz(State(state): State<AppState>) -> Result<AppJson<serde_json::Value>, ApiError> {
    state.ports.store.ping().await?;
    for kind in RequestKind::ALL {
        state.ports.queue(kind).stats().await?;
    }
    Ok(AppJson(json!({ "status": "ready" })))
}

#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, content_type = "application/openmetrics-text", description = "Prometheus/OpenMetrics text")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    for kind in RequestKind::ALL {
        let queue = state.ports.queue(kind);
        if let Ok(stats) = queue.stats().await {
            for (s, n) in [
                ("visible", stats.visible),
                ("in_flight", stats.in_flight),
                ("dead", stats.dead),
            ] {
                state
                    .ports
                    .metrics
                    .queue_messages
                    .get_or_create(&QueueLabels {
                        queue: queue.name().into(),
                        state: s.into(),
                    })
                    .set(n as i64);
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.ports.metrics.render(),
    )
}

#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, content_type = "application/json", description = "This document")))]
pub async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    AppJson(crate::openapi::document(&state.options))
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth", responses((status = 200), (status = 404)))]
pub async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    match &state.ports.jwks {
        Some(keys) => (StatusCode::OK, AppJson(keys.clone())).into_response(),
        None => ApiError::NotFound("key set").into_response(),
    }
}
