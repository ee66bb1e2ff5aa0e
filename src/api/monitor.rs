//! The monitor's routes: where it stands and its recent actions.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use crate::core::monitor::ActionRecord;
use crate::runtime::controller::Core;
use crate::runtime::monitor::MonitorView;

/// `GET /api/v1/monitor`.
#[utoipa::path(
    get,
    path = "/api/v1/monitor",
    tag = "monitor",
    responses((status = 200, description = "Machines held out and draining", body = MonitorView))
)]
pub async fn view_route(State(core): State<Arc<Core>>) -> Json<MonitorView> {
    Json(core.monitor_view())
}

/// `GET /api/v1/monitor/actions`: the most recent actions, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/monitor/actions",
    tag = "monitor",
    responses((status = 200, description = "The most recent actions, oldest first",
        body = [ActionRecord]))
)]
pub async fn actions_route(State(core): State<Arc<Core>>) -> Json<Vec<ActionRecord>> {
    Json(core.monitor_actions())
}
