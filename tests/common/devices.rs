//! An in-process balancer with the devices module behind an offload
//! listener (the `Runtime::start_with_modules` entry for embedders), and a
//! device client: enrolment with a real CSR, HTTPS with the issued client
//! certificate, the command WebSocket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetgate::module::devices::ca::DeviceCa;
use fleetgate::module::Registry;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::free_addr;
use super::pki::{client_config, Ca, Leaf};
use super::web::tls_connect;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub struct DevicesLb {
    pub dir: PathBuf,
    pub front: SocketAddr,
    pub admin: SocketAddr,
    pub server_ca: Ca,
    pub runtime: Arc<fleetgate::runtime::Runtime>,
    admin_task: tokio::task::JoinHandle<()>,
}

impl Drop for DevicesLb {
    fn drop(&mut self) {
        self.admin_task.abort();
    }
}

/// A balancer whose offload listener on `front` routes `/api/v1/` to the
/// devices module (server certificate `server.pem`, device CA in
/// `data/devices`). `global` goes into `[global]`, `module_extra` into
/// `[module.devices]`; `admin` is the admin address (or `{admin}` for
/// `Balancer::start`).
pub fn config(global: &str, admin: &str, front: SocketAddr, module_extra: &str) -> String {
    format!(
        r#"[global]
data_dir = "data"
{global}

[admin]
bind = "{admin}"

[[listener]]
name = "devices"
bind = "{front}"
mode = "offload"
tls = {{ cert = "server.pem", key = "server.key", client_auth = "optional", client_ca = "data/devices/device-ca.pem" }}

  [[listener.route]]
  name = "api"
  path_prefix = "/api/v1/"
  module = "devices"

[module.devices]
kind = "devices"
admin_token = "{ADMIN_TOKEN}"
heartbeat_interval = "60s"
heartbeat_jitter = "30s"
{module_extra}
"#
    )
}

/// A `fleetgate run` process serving the devices module: its data
/// directory, a generated server certificate (`localhost`), devices
/// verified by the module's CA; `module_extra` is appended to the
/// `[module.devices]` table (a shared store, the node name...). The admin
/// address is left to `Balancer::start`.
pub fn process_config(
    data: &Path,
    front: SocketAddr,
    admin_token: &str,
    module_extra: &str,
) -> String {
    format!(
        r#"[global]
data_dir = "{data}"

[admin]
bind = "{{admin}}"

[[listener]]
name = "devices"
bind = "{front}"
mode = "offload"
tls = {{ cert = "auto", auto_names = ["localhost"], client_auth = "optional", client_ca = "module:devices" }}

  [[listener.route]]
  name = "api"
  path_prefix = "/api/v1/"
  module = "devices"

[module.devices]
kind = "devices"
admin_token = "{admin_token}"
{module_extra}
"#,
        data = data.display()
    )
}

/// `process_config` for one balancer of a fleet sharing a PostgreSQL store.
pub fn shared_store_config(
    data: &Path,
    node: &str,
    front: SocketAddr,
    store_url: &str,
    admin_token: &str,
    module_extra: &str,
) -> String {
    let extra = format!(
        "node = \"{node}\"\nstore = {{ kind = \"postgres\", url = \"{store_url}\" }}\n{module_extra}"
    );
    process_config(data, front, admin_token, &extra)
}

impl DevicesLb {
    /// Start in `dir` (created by the caller: tests that share a CA or a
    /// data directory pass the same one). `module_extra` is appended to
    /// the `[module.devices]` table.
    pub async fn start(dir: &Path, module_extra: &str) -> DevicesLb {
        let server_ca = Ca::new(dir, "server");
        server_ca.server(dir, "server", &["localhost"]);
        // The listener's client_ca is read when the config loads, before
        // the module creates its CA: create it first, as the module would.
        let data = dir.join("data/devices");
        std::fs::create_dir_all(&data).unwrap();
        DeviceCa::load_or_create(&data, "devices").unwrap();
        let front = free_addr();
        let admin = free_addr();
        let node = dir.file_name().unwrap().to_string_lossy();
        let config = config(
            "",
            &admin.to_string(),
            front,
            &format!("node = \"{node}\"\n{module_extra}"),
        );
        let path = dir.join("fleetgate.toml");
        std::fs::write(&path, config).unwrap();
        let mut registry = Registry::new();
        registry.register("devices", fleetgate::module::devices::factory());
        let plan = fleetgate::config::load_with(&path, &registry).expect("config loads");
        let metrics = Arc::new(fleetgate::metrics::Metrics::new());
        let runtime = fleetgate::runtime::Runtime::start_with_modules(plan, metrics, &registry)
            .await
            .expect("runtime starts");
        let listener = fleetgate::admin::bind(admin).await.unwrap();
        let admin_task = tokio::spawn(fleetgate::admin::serve(listener, runtime.clone()));
        DevicesLb {
            dir: dir.to_path_buf(),
            front,
            admin,
            server_ca,
            runtime,
            admin_task,
        }
    }

    /// One admin API call (bearer token unless `token` says otherwise).
    pub async fn admin_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let tcp = TcpStream::connect(self.admin).await.unwrap();
        let mut headers = vec![];
        if let Some(t) = token {
            headers.push(("authorization".to_string(), format!("Bearer {t}")));
        }
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        send(
            TokioIo::new(tcp),
            method,
            &format!("/modules/devices/{path}"),
            &headers,
            body,
        )
        .await
    }

    pub async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.admin_as(Some(ADMIN_TOKEN), method, path, body).await
    }

    pub fn tls(&self, device: Option<&Device>) -> Arc<rustls::ClientConfig> {
        client_config(&self.server_ca, device.map(|d| &d.leaf), &[b"http/1.1"])
    }

    /// One device API call over TLS, with `device`'s certificate if given.
    pub async fn call(
        &self,
        device: Option<&Device>,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> (u16, Value) {
        let tls = tls_connect(self.front, "localhost", self.tls(device))
            .await
            .unwrap();
        send(TokioIo::new(tls), method, path, &[], body).await
    }

    pub async fn call_json(
        &self,
        device: &Device,
        method: &str,
        path: &str,
        body: &Value,
    ) -> (u16, Value) {
        let body = Some(("application/json", body.to_string().into_bytes()));
        self.call(Some(device), method, path, body).await
    }

    /// Create a token and enrol a new device with it.
    pub async fn enrol(&self, name: &str) -> Device {
        let (s, t) = self
            .admin("POST", "tokens", Some(&serde_json::json!({"uses": 1})))
            .await;
        assert_eq!(s, 201, "{t}");
        self.enrol_with(t["secret"].as_str().unwrap(), name)
            .await
            .expect("enrolment")
    }

    pub async fn enrol_with(&self, token: &str, name: &str) -> Result<Device, (u16, Value)> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let body = serde_json::json!({"token": token, "csr": csr, "name": name});
        let (s, v) = self
            .call(
                None,
                "POST",
                "/api/v1/enrol",
                Some(("application/json", body.to_string().into_bytes())),
            )
            .await;
        if s != 201 {
            return Err((s, v));
        }
        let cert_pem = v["certificate"].as_str().unwrap().to_string();
        let der = pem_der(&cert_pem);
        let leaf = Leaf {
            cert_pem,
            key_pem: key.serialize_pem(),
            der,
            key_der: key.serialize_der(),
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
        };
        Ok(Device {
            id: v["device_id"].as_str().unwrap().to_string(),
            fingerprint: v["fingerprint"].as_str().unwrap().to_string(),
            leaf,
        })
    }

    /// Open the command channel as `device`.
    pub async fn channel(&self, device: &Device) -> Channel {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tls = tls_connect(self.front, "localhost", self.tls(Some(device)))
            .await
            .unwrap();
        let req = "wss://localhost/api/v1/commands/ws"
            .into_client_request()
            .unwrap();
        let (ws, resp) = tokio_tungstenite::client_async(req, tls)
            .await
            .expect("websocket handshake");
        assert_eq!(resp.status(), 101);
        Channel { ws }
    }
}

pub struct Device {
    pub id: String,
    pub fingerprint: String,
    pub leaf: Leaf,
}

pub struct Channel {
    pub ws: tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
}

impl Channel {
    /// The next text message as JSON (pings are answered by the library).
    pub async fn next(&mut self, within: std::time::Duration) -> Option<Value> {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg {
                Ok(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                    return Some(serde_json::from_str(&t).unwrap())
                }
                Ok(tokio_tungstenite::tungstenite::Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    pub async fn send(&mut self, v: Value) {
        use futures_util::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::text(v.to_string()))
            .await
            .unwrap();
    }
}

pub fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

async fn send<S>(
    io: TokioIo<S>,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<(&str, Vec<u8>)>,
) -> (u16, Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let bytes = match body {
        Some((ct, b)) => {
            req = req.header("content-type", ct);
            b
        }
        None => Vec::new(),
    };
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(bytes))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, value)
}
