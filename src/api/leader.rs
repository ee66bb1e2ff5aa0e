//! Who leads: `GET /api/v1/leader`, and the layer that sends mutations on a standby to the leader
//! (503 and the leader's URL) before anything is read or changed.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::runtime::controller::{Core, LeaderView};

/// What a standby answers a mutation: why, and where to send it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NotLeader {
    pub error: String,
    /// The leading controller's admin URL (null while nobody leads).
    pub leader: Option<String>,
}

/// How long a caller should wait before asking again when nobody leads.
const RETRY_AFTER_SECONDS: &str = "1";

/// `route_layer` middleware: lets a request through only while this controller leads.
pub async fn require_leader(
    State(core): State<Arc<Core>>,
    request: Request,
    next: Next,
) -> Response {
    if core.is_leading() {
        return next.run(request).await;
    }
    let leader = core.leader_url();
    let error = match &leader {
        Some(url) => format!("this controller stands by; send changes to the leader at {url}"),
        None => "this controller stands by and no controller leads yet; ask again".to_string(),
    };
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(NotLeader {
            error,
            leader: leader.clone(),
        }),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::RETRY_AFTER,
        header::HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    if let Some(Ok(value)) = leader.map(|url| header::HeaderValue::from_str(&url)) {
        headers.insert(header::LOCATION, value);
    }
    response
}

#[utoipa::path(
    get,
    path = "/api/v1/leader",
    tag = "controller",
    responses((status = 200, description = "This controller's role (leader or standby), its \
        fencing epoch and the lease as last read from the store", body = LeaderView))
)]
pub async fn leader(State(core): State<Arc<Core>>) -> Json<LeaderView> {
    Json(core.leader_view())
}
