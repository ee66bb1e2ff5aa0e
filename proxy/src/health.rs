//! Whether each machine answers. Machines run no Understudy code, so the balancer finds out itself:
//! every `limits.health_interval` it probes each machine address of its running config, with
//! `GET {health_path}` when the config names one (an answer in 200..=399 passes), else with a TCP
//! connect. A job whose connection to the machine fails counts as a failed probe too, so a machine
//! that went away is known within `limits.health_fall` jobs, not only at the next round.
//!
//! A `failing` active machine gets no new caller job while another active machine does not fail;
//! copies still go to a failing simulation machine, so that the judge sees v2's failures. The
//! state travels in every stats report (`MachineStatus::health`), where the controller shows it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use understudy_wire::MachineHealth;

/// The health of one machine address, shared by every config version that names it.
pub(crate) struct Health {
    /// Read on every pick: the one field the job path looks at.
    failing: AtomicBool,
    /// Failures in a row since the last pass.
    failures: AtomicU32,
    fall: u32,
    view: Mutex<View>,
}

#[derive(Clone, Default)]
struct View {
    state: MachineHealth,
    reason: Option<String>,
}

/// A change of state, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    NowFailing(String),
    Recovered,
}

impl Health {
    pub(crate) fn new(fall: u32) -> Self {
        Health {
            failing: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            fall: fall.max(1),
            view: Mutex::new(View::default()),
        }
    }

    pub(crate) fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// A probe passed: the machine answers again at once.
    pub(crate) fn passed(&self) -> Option<Change> {
        self.failures.store(0, Ordering::Relaxed);
        let mut view = self.view.lock().expect("health view");
        let was = view.state;
        *view = View {
            state: MachineHealth::Answering,
            reason: None,
        };
        self.failing.store(false, Ordering::Relaxed);
        (was == MachineHealth::Failing).then_some(Change::Recovered)
    }

    /// A probe (or a job's connection) failed for `reason`.
    pub(crate) fn failed(&self, reason: String) -> Option<Change> {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let mut view = self.view.lock().expect("health view");
        if failures < self.fall {
            // Not failing yet; the reason is kept for the report of a machine never seen answer.
            view.reason = (view.state != MachineHealth::Answering).then_some(reason);
            return None;
        }
        let was = view.state;
        *view = View {
            state: MachineHealth::Failing,
            reason: Some(reason.clone()),
        };
        self.failing.store(true, Ordering::Relaxed);
        (was != MachineHealth::Failing).then_some(Change::NowFailing(reason))
    }

    /// The state and, while not answering, the last failure's reason.
    pub(crate) fn view(&self) -> (MachineHealth, Option<String>) {
        let view = self.view.lock().expect("health view").clone();
        (view.state, view.reason)
    }
}

impl Change {
    /// Logs the change of the machines `ids` at `address`: a warning when they stop answering.
    pub(crate) fn log(&self, service: &str, ids: &str, address: SocketAddr) {
        match self {
            Change::NowFailing(reason) => {
                tracing::warn!(%service, machine = %ids, %address, "machine failing: {reason}")
            }
            Change::Recovered => {
                tracing::info!(%service, machine = %ids, %address, "machine answering again")
            }
        }
    }
}

/// One probe of `address`: `GET path` when given (an answer in 200..=399 passes), else a TCP
/// connect. The error names the address and what went wrong.
pub(crate) async fn probe(
    address: SocketAddr,
    path: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connecting to {address}: {e}"))?;
        match path {
            None => Ok(()),
            Some(path) => get(tcp, address, path).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(match path {
            Some(path) => format!("GET {path} on {address}: no answer within {timeout:?}"),
            None => format!("connecting to {address}: no answer within {timeout:?}"),
        }),
    }
}

async fn get(tcp: TcpStream, address: SocketAddr, path: &str) -> Result<(), String> {
    let fail = |what: String| format!("GET {path} on {address}: {what}");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| fail(e.to_string()))?;
    // The connection ends with the probe (`Connection: close`), so its task ends with it too.
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, address.to_string())
        .header(http::header::USER_AGENT, "understudy-health-probe")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = answer.status();
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(fail(format!("answered {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_fails_after_fall_failures_in_a_row_and_answers_after_one_pass() {
        let health = Health::new(2);
        assert_eq!(health.view().0, MachineHealth::Unknown);
        assert_eq!(health.failed("refused".into()), None);
        assert!(!health.is_failing(), "one failure is not enough");
        assert_eq!(
            health.view(),
            (MachineHealth::Unknown, Some("refused".into()))
        );
        assert_eq!(
            health.failed("refused again".into()),
            Some(Change::NowFailing("refused again".into()))
        );
        assert!(health.is_failing());
        assert_eq!(health.failed("still".into()), None, "reported once");
        assert_eq!(
            health.view(),
            (MachineHealth::Failing, Some("still".into()))
        );
        assert_eq!(health.passed(), Some(Change::Recovered));
        assert!(!health.is_failing());
        assert_eq!(health.view(), (MachineHealth::Answering, None));
        assert_eq!(health.failed("blip".into()), None);
        assert_eq!(
            health.view(),
            (MachineHealth::Answering, None),
            "one failure of an answering machine changes nothing shown"
        );
        assert_eq!(health.passed(), None);
        assert_eq!(
            health.failed("a".into()),
            None,
            "the count restarted at the pass"
        );
    }

    #[tokio::test]
    async fn probes_name_the_address_and_the_cause() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = probe(closed, None, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            e.contains(&closed.to_string()) && e.contains("refused"),
            "{e}"
        );

        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route(
                "/sick",
                axum::routing::get(|| async { http::StatusCode::SERVICE_UNAVAILABLE }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        probe(up, None, Duration::from_secs(1)).await.unwrap();
        probe(up, Some("/ok"), Duration::from_secs(1))
            .await
            .unwrap();
        let e = probe(up, Some("/sick"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            format!("GET /sick on {up}: answered 503 Service Unavailable")
        );
        let e = probe(up, Some("/missing"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.ends_with("answered 404 Not Found"), "{e}");
    }

    #[tokio::test]
    async fn a_machine_that_accepts_and_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mute = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let e = probe(mute, Some("/healthz"), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(e, format!("GET /healthz on {mute}: no answer within 200ms"));
    }
}
