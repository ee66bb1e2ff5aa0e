//! The hub's transport on the controller's HTTP port: an axum router fragment.
//!
//! - `POST /api/v1/hub/publish`: body is one signed [`Envelope`] as JSON. 202 `{"delivered": N}`;
//!   refusals are JSON `{"error": "...", "reason": "..."}`: 413 `oversized`, 400 `malformed`,
//!   401 `unsigned` / `unknown_sender` / `bad_signature` / `replayed` / `out_of_order`,
//!   403 `forbidden_topic` (topics under `control.` are the controller's alone).
//! - `GET /api/v1/hub/subscribe?sender=&service=&role=&status=&topic=`: server-sent events, one
//!   `event: message` per envelope (`id` = `sender:seq`, data = the envelope's JSON), and a last
//!   `event: disconnected` with `{"reason": ...}` when the hub cuts the subscription.
//!   With `subscriber_auth`, the request must carry [`SUBSCRIBE_AUTH_HEADER`]: base64 of an
//!   envelope signed by the subscriber on topic [`SUBSCRIBE_TOPIC`] (see
//!   [`crate::Signer::subscribe_token`]); it is verified like any message, so a token is single-use.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use futures_util::stream::{self, Stream};

use crate::envelope::{Rejection, Verifier};
use crate::hub::{Backend, Filter, Subscription};

/// Topics under this prefix may be published only by the controller.
pub const CONTROL_TOPIC_PREFIX: &str = "control.";

/// Header carrying a subscriber's signed token.
pub const SUBSCRIBE_AUTH_HEADER: &str = "x-understudy-hub-auth";
pub use crate::envelope::SUBSCRIBE_TOPIC;

/// The sender id a balancer subscribes as (its config feed), with its balancer key.
pub fn balancer_subscriber(service: &str) -> String {
    format!("balancer.{service}")
}

/// What the hub's routes share.
pub struct HubHttp {
    pub backend: Arc<dyn Backend>,
    pub verifier: Arc<Mutex<Verifier>>,
    /// The controller's sender id: the only one allowed on `control.*` topics.
    pub controller_id: String,
    /// Queue length of each SSE subscriber.
    pub subscriber_capacity: usize,
    /// Subscribers must prove who they are with a signed token.
    pub subscriber_auth: bool,
}

pub fn router(state: Arc<HubHttp>) -> Router {
    Router::new()
        .route("/api/v1/hub/publish", post(publish))
        .route("/api/v1/hub/subscribe", get(subscribe))
        .with_state(state)
}

/// A refused publish or subscribe: the message and its metric reason.
#[derive(Debug, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Refusal {
    pub error: String,
    /// `oversized`, `malformed`, `unsigned`, `unknown_sender`, `bad_signature`, `replayed`,
    /// `out_of_order`, `forbidden_topic` or `hub_unavailable`.
    pub reason: String,
}

/// `POST /api/v1/hub/publish` accepted the envelope.
#[derive(Debug, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Delivered {
    /// Subscribers it was handed to.
    pub delivered: usize,
}

fn refused(status: StatusCode, error: String, reason: &str) -> Response {
    let reason = reason.to_string();
    (status, Json(Refusal { error, reason })).into_response()
}

fn refusal(rejection: &Rejection) -> Response {
    let status = match rejection {
        Rejection::Oversized { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::Malformed(_) => StatusCode::BAD_REQUEST,
        Rejection::ForbiddenTopic { .. } => StatusCode::FORBIDDEN,
        Rejection::Unsigned
        | Rejection::UnknownSender(_)
        | Rejection::BadSignature(_)
        | Rejection::Replayed { .. }
        | Rejection::OutOfOrder { .. } => StatusCode::UNAUTHORIZED,
    };
    refused(status, rejection.to_string(), rejection.reason())
}

/// The hub's routes in the controller's OpenAPI document.
#[cfg(feature = "openapi")]
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(publish, subscribe),
    components(schemas(crate::envelope::Envelope, Refusal, Delivered))
)]
pub struct HubApi;

#[cfg_attr(feature = "openapi", utoipa::path(
    post,
    path = "/api/v1/hub/publish",
    tag = "hub",
    description = "Publishes one signed envelope; no bearer token: the sender's signature is the \
        credential.",
    request_body = crate::envelope::Envelope,
    responses(
        (status = 202, description = "Accepted and handed to the subscribers", body = Delivered),
        (status = 400, description = "`malformed`: not an envelope", body = Refusal),
        (status = 401, description = "`unsigned`, `unknown_sender`, `bad_signature`, `replayed` \
            or `out_of_order`", body = Refusal),
        (status = 403, description = "`forbidden_topic`: `control.*` is the controller's", body = Refusal),
        (status = 413, description = "`oversized`", body = Refusal),
        (status = 503, description = "`hub_unavailable`: the backend refused it", body = Refusal),
    ),
))]
async fn publish(State(state): State<Arc<HubHttp>>, body: Body) -> Response {
    let limit = state
        .verifier
        .lock()
        .expect("verifier lock poisoned")
        .max_bytes();
    // Read at most limit + 1 bytes, so an oversized body is refused without being buffered whole.
    let raw = match to_bytes(body, limit + 1).await {
        Ok(raw) => raw,
        Err(_) => {
            let rejection = Rejection::Oversized {
                size: limit + 1,
                limit,
            };
            state
                .verifier
                .lock()
                .expect("verifier lock poisoned")
                .count(&rejection);
            return refusal(&rejection);
        }
    };
    let verified = {
        let mut verifier = state.verifier.lock().expect("verifier lock poisoned");
        verifier
            .verify_bytes(&raw, Instant::now())
            .and_then(|envelope| {
                if envelope.topic.starts_with(CONTROL_TOPIC_PREFIX)
                    && envelope.sender != state.controller_id
                {
                    let rejection = Rejection::ForbiddenTopic {
                        sender: envelope.sender,
                        topic: envelope.topic,
                    };
                    verifier.count(&rejection);
                    Err(rejection)
                } else {
                    Ok(envelope)
                }
            })
    };
    match verified {
        Err(rejection) => refusal(&rejection),
        Ok(envelope) => match state.backend.publish(envelope).await {
            Ok(delivered) => (StatusCode::ACCEPTED, Json(Delivered { delivered })).into_response(),
            Err(e) => refused(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
                "hub_unavailable",
            ),
        },
    }
}

/// Verifies a subscribe token: base64 of a signed envelope on [`SUBSCRIBE_TOPIC`].
fn check_subscriber(state: &HubHttp, headers: &HeaderMap) -> Result<String, Rejection> {
    let mut verifier = state.verifier.lock().expect("verifier lock poisoned");
    let Some(token) = headers.get(SUBSCRIBE_AUTH_HEADER) else {
        verifier.count(&Rejection::Unsigned);
        return Err(Rejection::Unsigned);
    };
    let raw = match BASE64.decode(token.as_bytes()) {
        Ok(raw) => raw,
        Err(_) => {
            let rejection = Rejection::Malformed(format!("{SUBSCRIBE_AUTH_HEADER} is not base64"));
            verifier.count(&rejection);
            return Err(rejection);
        }
    };
    let envelope = verifier.verify_bytes(&raw, Instant::now())?;
    if envelope.topic != SUBSCRIBE_TOPIC {
        let rejection = Rejection::ForbiddenTopic {
            sender: envelope.sender,
            topic: envelope.topic,
        };
        verifier.count(&rejection);
        return Err(rejection);
    }
    Ok(envelope.sender)
}

#[cfg_attr(feature = "openapi", utoipa::path(
    get,
    path = "/api/v1/hub/subscribe",
    tag = "hub",
    description = "Server-sent events: one `message` event per envelope matching every filter \
        given, and a last `disconnected` event when the hub cuts the subscription.",
    params(
        Filter,
        ("x-understudy-hub-auth" = Option<String>, Header, description = "Base64 of an envelope \
            signed by the subscriber on topic `hub.subscribe`; required when the hub is set with \
            `subscriber_auth`"),
    ),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "`malformed`: a bad filter or token", body = Refusal),
        (status = 401, description = "No token, or one refused", body = Refusal),
        (status = 403, description = "`forbidden_topic`: the token is not a subscribe token", body = Refusal),
        (status = 503, description = "`hub_unavailable`", body = Refusal),
    ),
))]
async fn subscribe(
    State(state): State<Arc<HubHttp>>,
    headers: HeaderMap,
    filter: Result<Query<Filter>, QueryRejection>,
) -> Response {
    // axum's own rejection is plain text; every refusal of the hub is JSON.
    let Query(filter) = match filter {
        Ok(filter) => filter,
        Err(e) => {
            let error = format!("bad subscribe filter: {}", e.body_text());
            return refused(StatusCode::BAD_REQUEST, error, "malformed");
        }
    };
    if state.subscriber_auth {
        match check_subscriber(&state, &headers) {
            Ok(sender) => tracing::debug!(%sender, "hub subscriber authenticated"),
            Err(rejection) => return refusal(&rejection),
        }
    }
    match state
        .backend
        .subscribe(filter, state.subscriber_capacity)
        .await
    {
        Ok(subscription) => Sse::new(events(subscription))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
        Err(e) => refused(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
            "hub_unavailable",
        ),
    }
}

fn events(subscription: Subscription) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(Some(subscription), |state| async move {
        let mut subscription = state?;
        match subscription.recv().await {
            Some(envelope) => {
                let event = Event::default()
                    .event("message")
                    .id(format!("{}:{}", envelope.sender, envelope.seq))
                    .data(serde_json::to_string(&*envelope).unwrap_or_default());
                Some((Ok(event), Some(subscription)))
            }
            None => {
                let reason = subscription
                    .disconnect_reason()
                    .map(|r| r.as_str())
                    .unwrap_or("closed");
                let event = Event::default()
                    .event("disconnected")
                    .data(serde_json::json!({ "reason": reason }).to_string());
                Some((Ok(event), None))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Keyring, SecretKey, Signer};
    use crate::hub::EmbeddedHub;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use prometheus::Registry;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes(vec![b; 32]).unwrap()
    }

    fn setup(max_bytes: usize) -> (Arc<HubHttp>, Arc<EmbeddedHub>, Registry) {
        let registry = Registry::new();
        let mut ring = Keyring::new();
        ring.insert("m1", key(1)).unwrap();
        ring.insert("controller", key(9)).unwrap();
        let verifier = Verifier::new(ring, max_bytes, &registry).unwrap();
        let hub = Arc::new(EmbeddedHub::new(&registry).unwrap());
        let state = Arc::new(HubHttp {
            backend: hub.clone(),
            verifier: Arc::new(Mutex::new(verifier)),
            controller_id: "controller".into(),
            subscriber_capacity: 16,
            subscriber_auth: false,
        });
        (state, hub, registry)
    }

    async fn post(state: &Arc<HubHttp>, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
        let response = router(state.clone())
            .oneshot(
                Request::post("/api/v1/hub/publish")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn publish_answers_each_case_with_its_status_and_reason() {
        let (state, hub, _registry) = setup(1024);
        let mut sub = hub.subscribe_now(Filter::default(), 8).unwrap();
        let mut m1 = Signer::starting_at("m1", key(1), 1).unwrap();
        let good = m1.sign("state", json!({"service": "media", "status": "running"}));
        let (status, body) = post(&state, serde_json::to_vec(&good).unwrap()).await;
        assert_eq!(
            (status, body["delivered"].as_u64()),
            (StatusCode::ACCEPTED, Some(1))
        );
        assert_eq!(*sub.recv().await.unwrap(), good);

        let (status, body) = post(&state, serde_json::to_vec(&good).unwrap()).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("replayed"))
        );

        let (status, body) = post(&state, b"[1,2".to_vec()).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (StatusCode::BAD_REQUEST, Some("malformed"))
        );

        let mut unsigned = m1.sign("state", json!({}));
        unsigned.signature = None;
        let (status, body) = post(&state, serde_json::to_vec(&unsigned).unwrap()).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unsigned"))
        );

        let mut forger = Signer::starting_at("m1", key(2), 100).unwrap();
        let forged = forger.sign("state", json!({}));
        let (status, body) = post(&state, serde_json::to_vec(&forged).unwrap()).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("bad_signature"))
        );

        let (status, body) = post(&state, vec![b' '; 5000]).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("oversized"))
        );

        let spoof = m1.sign("control.balancer-config", json!({"version": 1}));
        let (status, body) = post(&state, serde_json::to_vec(&spoof).unwrap()).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (StatusCode::FORBIDDEN, Some("forbidden_topic"))
        );
        let mut controller = Signer::starting_at("controller", key(9), 1).unwrap();
        let config = controller.sign("control.balancer-config", json!({"version": 1}));
        let (status, _) = post(&state, serde_json::to_vec(&config).unwrap()).await;
        assert_eq!(status, StatusCode::ACCEPTED);

        // The hub was not disturbed: only the two accepted messages reached the subscriber.
        assert_eq!(sub.recv().await.unwrap().topic, "control.balancer-config");
        assert!(sub.try_recv().is_none());
    }

    #[tokio::test]
    async fn subscribe_refuses_unknown_filter_fields() {
        let (state, _hub, _registry) = setup(1024);
        let response = router(state)
            .oneshot(
                Request::get("/api/v1/hub/subscribe?colour=red")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON refusal");
        assert_eq!(body["reason"], "malformed");
        assert!(body["error"].as_str().unwrap().contains("colour"), "{body}");
    }

    #[tokio::test]
    async fn subscribe_with_auth_needs_a_fresh_signed_token() {
        let (state, _hub, _registry) = setup(1024);
        let state = Arc::new(HubHttp {
            backend: state.backend.clone(),
            verifier: state.verifier.clone(),
            controller_id: "controller".into(),
            subscriber_capacity: 4,
            subscriber_auth: true,
        });
        let get = |token: Option<String>| {
            let mut request = Request::get("/api/v1/hub/subscribe?service=media");
            if let Some(token) = token {
                request = request.header(SUBSCRIBE_AUTH_HEADER, token);
            }
            router(state.clone()).oneshot(request.body(Body::empty()).unwrap())
        };
        let reason = |response: Response| async move {
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            (status, body["reason"].as_str().unwrap().to_string())
        };
        let r = get(None).await.unwrap();
        assert_eq!(
            reason(r).await,
            (StatusCode::UNAUTHORIZED, "unsigned".into())
        );

        let mut m1 = Signer::starting_at("m1", key(1), 1).unwrap();
        let token = m1.subscribe_token();
        let r = get(Some(token.clone())).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = get(Some(token)).await.unwrap();
        assert_eq!(
            reason(r).await,
            (StatusCode::UNAUTHORIZED, "replayed".into())
        );

        let mut forger = Signer::starting_at("m1", key(3), 50).unwrap();
        let r = get(Some(forger.subscribe_token())).await.unwrap();
        assert_eq!(
            reason(r).await,
            (StatusCode::UNAUTHORIZED, "bad_signature".into())
        );
        let r = get(Some("%%%".into())).await.unwrap();
        assert_eq!(
            reason(r).await,
            (StatusCode::BAD_REQUEST, "malformed".into())
        );
        // A message signed for another topic is no subscribe token.
        let other = m1.sign("machine.state", json!({}));
        let r = get(Some(BASE64.encode(serde_json::to_vec(&other).unwrap())))
            .await
            .unwrap();
        assert_eq!(
            reason(r).await,
            (StatusCode::FORBIDDEN, "forbidden_topic".into())
        );
    }

    #[tokio::test]
    async fn subscribe_streams_filtered_events_over_a_real_socket() {
        let (state, hub, _registry) = setup(4096);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, router(state)).await.unwrap();
        });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                b"GET /api/v1/hub/subscribe?service=media&role=active HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n",
            )
            .await
            .unwrap();
        // Wait until the subscription is registered before publishing.
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        assert!(
            text.contains("200 OK") && text.contains("text/event-stream"),
            "{text}"
        );

        let mut m1 = Signer::starting_at("m1", key(1), 1).unwrap();
        let other = m1.sign("state", json!({"service": "router", "role": "active"}));
        let wanted = m1.sign(
            "state",
            json!({"service": "media", "role": "active", "status": "down"}),
        );
        assert_eq!(hub.publish_now(other).unwrap(), 0);
        assert_eq!(hub.publish_now(wanted).unwrap(), 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !text.contains("\"status\":\"down\"") {
            let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "stream ended early: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(text.contains("event: message"), "{text}");
        assert!(text.contains("id: m1:2"), "{text}");
        assert!(!text.contains("router"), "{text}");

        hub.close();
        while !text.contains("event: disconnected") {
            let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "stream ended before the disconnect event: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(text.contains("hub_closed"), "{text}");
        server.abort();
    }
}
