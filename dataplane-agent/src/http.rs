//! The agent's HTTP endpoints: `/healthz` (the process serves), `/readyz` (the first full sync
//! is done), `/metrics` (Prometheus text) and `/status` (JSON, what `status` prints).
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::agent::AgentState;

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    if s.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the first full sync\n".to_string())
    }
}

async fn metrics(State(s): State<Arc<AgentState>>) -> axum::response::Response {
    // Encoding reads the data path's counter maps (syscalls, one per Service frontend): not on
    // an async worker, which the sync loop shares.
    match tokio::task::spawn_blocking(move || s.metrics.encode()).await {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the metrics failed: {e}\n")).into_response(),
    }
}

async fn status(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], serde_json::to_string_pretty(&s.status()).unwrap_or_default())
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding the HTTP listener on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds first (so a taken port is an error at start-up, not a log line later), then serves.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr, source })
}

pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AgentState>) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}
