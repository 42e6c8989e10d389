//! The agent's HTTP endpoints: `/healthz` (the process serves), `/readyz` (the first full sync
//! is done and the source works), `/metrics` (Prometheus text) and `/status` (JSON, what
//! `status` prints).
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

/// 503 until the first full sync, and while the source fails (API server unreachable, watches
/// refused, a broken manifest): the data plane then serves a state that may be stale, which a
/// rollout should not take for healthy. The body says why.
async fn readyz(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    let problem = s.status().source_problem(crate::source::now_unix_ms());
    match (s.is_ready(), problem) {
        (true, None) => (StatusCode::OK, "ready\n".to_string()),
        (true, Some(p)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{p}; serving the last good state\n")),
        (false, None) => (StatusCode::SERVICE_UNAVAILABLE, "waiting for the first full sync\n".to_string()),
        (false, Some(p)) => (StatusCode::SERVICE_UNAVAILABLE, format!("waiting for the first full sync; {p}\n")),
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::source::SourceState;

    /// (status code, body) of a plain HTTP/1.1 GET, from a blocking thread.
    async fn get(addr: SocketAddr, path: &'static str) -> (u16, String) {
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).unwrap();
            let code = resp.split(' ').nth(1).unwrap().parse().unwrap();
            (code, resp.split_once("\r\n\r\n").unwrap().1.to_string())
        })
        .await
        .unwrap()
    }

    fn metric(text: &str, name: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    #[tokio::test]
    async fn readyz_says_when_the_api_server_is_unreachable_and_recovers() {
        let state = Arc::new(AgentState::new("kube".into()));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, state.clone()));
        let objects = Some(Arc::default());

        let (code, body) = get(addr, "/readyz").await;
        assert_eq!((code, body.as_str()), (503, "waiting for the first full sync\n"));

        // The first sync is done and the source works.
        state.set_ready_for_test();
        state.note_source(&SourceState { objects: objects.clone(), api_reachable: Some(true), ..Default::default() });
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_string()));
        assert_eq!(metric(&get(addr, "/metrics").await.1, "dataplane_agent_source_up"), Some(1.0));

        // The API server goes away.
        let failing = SourceState {
            objects: objects.clone(),
            last_error: Some("Service watch: no answer from the API server: connection refused".into()),
            failing_since_unix_ms: Some(crate::source::now_unix_ms() - 61_000),
            api_reachable: Some(false),
            relists: 1,
        };
        assert!(state.note_source(&failing).is_some());
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.starts_with("API server unreachable for 6"), "{body}");
        assert!(body.contains("connection refused; serving the last good state"), "{body}");
        let metrics = get(addr, "/metrics").await.1;
        assert_eq!(metric(&metrics, "dataplane_agent_source_up"), Some(0.0));
        assert_eq!(metric(&metrics, "dataplane_agent_source_errors_total"), Some(1.0));
        assert!(metrics.contains("# HELP dataplane_agent_source_up 1 while the source works"), "{metrics}");
        let status: serde_json::Value = serde_json::from_str(&get(addr, "/status").await.1).unwrap();
        assert_eq!((status["api_reachable"].clone(), status["source_healthy"].clone()), (false.into(), false.into()));

        // It is back.
        state.note_source(&SourceState { objects, api_reachable: Some(true), relists: 2, ..Default::default() });
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_string()));
        assert_eq!(metric(&get(addr, "/metrics").await.1, "dataplane_agent_source_up"), Some(1.0));
    }
}
