//! Active health checks: probe every backend of a pool on an interval and
//! apply rise/fall before changing its state. Matters for active/standby
//! server farms where the standby keeps its port open with the application
//! stopped: only an HTTP probe tells them apart.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::backend::Backend;
use super::settings::{CheckKind, HealthPlan};

/// Start the probe loop of one backend; abort the handle to stop it. The
/// loop's rise/fall counts live as long as the task, which the pool keeps
/// for as long as the backend stays in it.
pub fn spawn(
    backend: Arc<Backend>,
    plan: HealthPlan,
    tls: Arc<rustls::ClientConfig>,
) -> JoinHandle<()> {
    tokio::spawn(probe_loop(backend, plan, tls))
}

async fn probe_loop(backend: Arc<Backend>, plan: HealthPlan, tls: Arc<rustls::ClientConfig>) {
    // Spread probes of many backends over the interval.
    let offset = plan.interval.mul_f64(fastrand::f64() * 0.5);
    tokio::time::sleep(offset).await;
    let (mut good, mut bad) = (0u32, 0u32);
    // A restarted probe (its check changed) goes on from the last verdict.
    let mut up = backend.check_up();
    let mut tick = tokio::time::interval(plan.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = tokio::time::timeout(plan.timeout, probe(&plan, backend.addr, &tls))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", plan.timeout)));
        backend.record_check(result.clone());
        match result {
            Ok(()) => {
                backend.metrics.checks_ok.inc();
                bad = 0;
                good += 1;
                if !up && good >= plan.rise {
                    up = true;
                    backend.set_check_up(true);
                }
            }
            Err(why) => {
                backend.metrics.checks_fail.inc();
                good = 0;
                bad += 1;
                if up && bad >= plan.fall {
                    up = false;
                    tracing::warn!(pool = %backend.pool, backend = %backend.addr, "health check failed {bad} times: {why}");
                    backend.set_check_up(false);
                }
            }
        }
    }
}

async fn probe(
    plan: &HealthPlan,
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let target = Target {
        kind: plan.kind,
        addr,
        path: &plan.path,
        expect: plan.expect,
        host: plan.host.as_deref(),
        server_name: plan.server_name.as_deref(),
        user_agent: "fleetgate-health-check",
    };
    probe_once(&target, tls).await
}

/// One probe target: shared by the balancer's health checks and the
/// agent's checks of its local servers.
pub struct Target<'a> {
    pub kind: CheckKind,
    pub addr: SocketAddr,
    pub path: &'a str,
    pub expect: u16,
    /// HTTP Host header (default: the address).
    pub host: Option<&'a str>,
    /// TLS SNI (default: the IP).
    pub server_name: Option<&'a str>,
    pub user_agent: &'static str,
}

/// Probe `t` once: a TCP connect, a completed TLS handshake, or an HTTP
/// GET answered with the expected status. The caller bounds the time.
pub async fn probe_once(t: &Target<'_>, tls: &Arc<rustls::ClientConfig>) -> Result<(), String> {
    let addr = t.addr;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    match t.kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Tls => {
            let name = t
                .server_name
                .map_or_else(|| addr.ip().to_string(), str::to_string);
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| format!("server_name: {e}"))?;
            tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, stream)
                .await
                .map(|_| ())
                .map_err(|e| format!("TLS handshake: {e}"))
        }
        CheckKind::Http => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("http: {e}"))?;
            let driver = tokio::spawn(conn);
            let host = t.host.map_or_else(|| addr.to_string(), str::to_string);
            let req = hyper::Request::get(t.path)
                .header(hyper::header::HOST, host)
                .header(hyper::header::USER_AGENT, t.user_agent)
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("request: {e}"))?;
            let res = sender.send_request(req).await;
            driver.abort();
            let status = res.map_err(|e| format!("http: {e}"))?.status().as_u16();
            if status == t.expect {
                Ok(())
            } else {
                Err(format!("status {status}, expected {}", t.expect))
            }
        }
    }
}

/// A TLS probe asks only "does the server complete a handshake?", as
/// HAProxy's `check-ssl verify none` does: the certificate is not judged
/// here (clients judge it end to end, or the upstream TLS settings do).
pub fn tls_probe_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(crate::tls::accept_any::AcceptAnyServerCert::new(
            provider,
        ))
        .with_no_client_auth()
}
