//! The simulated device's side of the devices API: TLS client
//! configurations, a minimal HTTP/1.1 keep-alive client (one connection
//! per device, no task per connection), enrolment with a fresh key and
//! CSR, the command WebSocket, and the admin API.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use fleetgate::tls::accept_any::AcceptAnyServerCert;

/// Why a simulated request failed; `kind()` is what the report counts.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("HTTP {0}: {1}")]
    Status(u16, String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("WebSocket: {0}")]
    WebSocket(String),
}

impl SimError {
    /// A short, stable label for counting errors by kind.
    pub fn kind(&self) -> String {
        match self {
            SimError::Connect(e) => format!("connect ({:?})", e.kind()),
            SimError::Tls(_) => "tls handshake".into(),
            SimError::Io(e) => format!("io ({:?})", e.kind()),
            SimError::Closed => "closed by server".into(),
            SimError::Timeout => "timeout".into(),
            SimError::Status(s, _) => format!("http {s}"),
            SimError::Protocol(_) => "protocol".into(),
            SimError::WebSocket(_) => "websocket".into(),
        }
    }
}

pub type SimResult<T> = Result<T, SimError>;

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// How the simulator checks the balancer's server certificate.
#[derive(Clone)]
pub enum Trust {
    Roots(Arc<RootCertStore>),
    /// Accept any server certificate (`--insecure`; loopback only).
    Insecure,
}

impl Trust {
    /// The CA certificates (or the self-signed server certificate) in a PEM file.
    pub fn from_pem_file(path: &Path) -> anyhow::Result<Trust> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let mut roots = RootCertStore::empty();
        for der in pem_blocks(&text, "CERTIFICATE") {
            roots
                .add(CertificateDer::from(der))
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            anyhow::bail!("{}: no certificate found", path.display());
        }
        Ok(Trust::Roots(Arc::new(roots)))
    }
}

/// The DER contents of each `-----BEGIN {label}-----` block.
pub fn pem_blocks(text: &str, label: &str) -> Vec<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let Some(stop) = after.find(&end) else { break };
        let b64: String = after[..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64) {
            out.push(der);
        }
        rest = &after[stop + end.len()..];
    }
    out
}

/// A client configuration: the server check from `trust`, and the
/// device's certificate and key when it has them. Each device gets its
/// own small session cache (a resumed TLS 1.3 session carries the client
/// identity of the original one, so caches must not be shared).
pub fn client_config(
    trust: &Trust,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let p = provider();
    let b = ClientConfig::builder_with_provider(p.clone()).with_safe_default_protocol_versions()?;
    let b = match trust {
        Trust::Roots(r) => b.with_root_certificates(r.clone()),
        Trust::Insecure => b
            .dangerous()
            .with_custom_certificate_verifier(AcceptAnyServerCert::new(p)),
    };
    let mut c = match identity {
        Some((chain, key)) => b.with_client_auth_cert(chain, key)?,
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c.resumption = Resumption::in_memory_sessions(2);
    Ok(Arc::new(c))
}

/// Where the devices API is.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// SNI and certificate name (the shipped auto certificate is for `localhost`).
    pub server_name: ServerName<'static>,
    pub trust: Trust,
    /// For requests without a client certificate (enrolment).
    pub anonymous: Arc<ClientConfig>,
    pub timeout: Duration,
}

impl Target {
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        trust: Trust,
        timeout: Duration,
    ) -> anyhow::Result<Target> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| anyhow::anyhow!("server name {server_name:?}: {e}"))?;
        let anonymous = client_config(&trust, None)?;
        Ok(Target {
            addr,
            server_name,
            trust,
            anonymous,
            timeout,
        })
    }

    fn host(&self) -> String {
        match &self.server_name {
            ServerName::DnsName(d) => d.as_ref().to_string(),
            other => other.to_str().into_owned(),
        }
    }

    /// A TLS connection, with the identity in `config`.
    pub async fn tls(&self, config: &Arc<ClientConfig>) -> SimResult<TlsStream<TcpStream>> {
        let fut = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(SimError::Connect)?;
            let _ = tcp.set_nodelay(true);
            TlsConnector::from(config.clone())
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(SimError::Tls)
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| SimError::Timeout)?
    }

    /// An HTTP/1.1 keep-alive connection over TLS.
    pub async fn connect(&self, config: &Arc<ClientConfig>) -> SimResult<DeviceConn> {
        let tls = self.tls(config).await?;
        Ok(HttpConn::new(tls, self.host(), self.timeout))
    }

    /// Enrol a new device: fresh P-256 key, CSR, `POST /api/v1/enrol`.
    pub async fn enrol(&self, token: &str, name: &str) -> SimResult<Identity> {
        let (csr, key_der) = make_csr(name)?;
        let body = serde_json::json!({"token": token, "csr": csr, "name": name}).to_string();
        let mut conn = self.connect(&self.anonymous).await?;
        let r = conn
            .request(
                "POST",
                "/api/v1/enrol",
                Some(("application/json", body.as_bytes())),
            )
            .await?;
        r.expect(201)?;
        let v = r.json()?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| SimError::Protocol(format!("enrol answer without {k}")))
        };
        let cert_pem = field("certificate")?;
        let der = pem_blocks(&cert_pem, "CERTIFICATE")
            .into_iter()
            .next()
            .ok_or_else(|| SimError::Protocol("enrol answer: no certificate PEM".into()))?;
        let config = client_config(
            &self.trust,
            Some((
                vec![CertificateDer::from(der)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            )),
        )
        .map_err(|e| SimError::Protocol(format!("client certificate: {e}")))?;
        Ok(Identity {
            device_id: field("device_id")?,
            fingerprint: field("fingerprint")?,
            config,
        })
    }

    /// Open the command WebSocket as `identity`.
    pub async fn websocket(&self, identity: &Identity) -> SimResult<DeviceWs> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tls = self.tls(&identity.config).await?;
        let req = format!("wss://{}/api/v1/commands/ws", self.host())
            .into_client_request()
            .map_err(|e| SimError::WebSocket(e.to_string()))?;
        // tungstenite's default buffers (128 KiB read, allocated at once)
        // would make the simulator, not the balancer, the limit on how
        // many channels one machine can hold.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (ws, resp) = tokio::time::timeout(
            self.timeout,
            tokio_tungstenite::client_async_with_config(req, tls, Some(config)),
        )
        .await
        .map_err(|_| SimError::Timeout)?
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => SimError::Status(
                r.status().as_u16(),
                String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
            ),
            e => SimError::WebSocket(e.to_string()),
        })?;
        if resp.status() != 101 {
            return Err(SimError::Status(resp.status().as_u16(), String::new()));
        }
        Ok(ws)
    }
}

pub type DeviceConn = HttpConn<TlsStream<TcpStream>>;
pub type DeviceWs = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

/// A fresh P-256 key and a CSR for it (PEM), plus the key as PKCS#8 DER.
pub fn make_csr(name: &str) -> SimResult<(String, Vec<u8>)> {
    let err = |e: rcgen::Error| SimError::Protocol(format!("making the CSR: {e}"));
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .map_err(err)?
        .pem()
        .map_err(err)?;
    Ok((csr, key.serialize_der()))
}

/// An enrolled device: what it needs to call in.
#[derive(Clone)]
pub struct Identity {
    // What enrolment answered: the simulator calls in with `config` alone;
    // tests check the balancer's records against these.
    #[allow(dead_code)]
    pub device_id: String,
    #[allow(dead_code)]
    pub fingerprint: String,
    pub config: Arc<ClientConfig>,
}

/// A response: status and the whole body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> SimResult<Value> {
        serde_json::from_slice(&self.body)
            .map_err(|e| SimError::Protocol(format!("answer is not JSON: {e}")))
    }

    /// `Err(Status)` unless the status is `want`.
    pub fn expect(&self, want: u16) -> SimResult<()> {
        if self.status == want {
            Ok(())
        } else {
            Err(SimError::Status(
                self.status,
                String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(200)
                    .collect(),
            ))
        }
    }
}

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 * 1024 * 1024;

/// A minimal HTTP/1.1 client connection: one request at a time, kept
/// alive. It owns its stream, so holding thousands costs no tasks.
pub struct HttpConn<S> {
    io: S,
    buf: Vec<u8>,
    host: String,
    timeout: Duration,
    /// The server said `Connection: close` (or the body ran to EOF).
    pub closed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HttpConn<S> {
    pub fn new(io: S, host: String, timeout: Duration) -> HttpConn<S> {
        HttpConn {
            io,
            buf: Vec::new(),
            host,
            timeout,
            closed: false,
        }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> SimResult<Response> {
        self.request_with(method, path, &[], body).await
    }

    /// One request (with extra headers) and its response, within the timeout.
    pub async fn request_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> SimResult<Response> {
        if self.closed {
            return Err(SimError::Closed);
        }
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(method, path, headers, body)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.closed = true;
                Err(e)
            }
            Err(_) => {
                self.closed = true;
                Err(SimError::Timeout)
            }
        }
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> SimResult<Response> {
        let mut req = Vec::with_capacity(160 + body.map_or(0, |b| b.1.len()));
        let _ = write!(req, "{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        for (k, v) in headers {
            let _ = write!(req, "{k}: {v}\r\n");
        }
        match body {
            Some((ct, b)) => {
                let _ = write!(
                    req,
                    "content-type: {ct}\r\ncontent-length: {}\r\n\r\n",
                    b.len()
                );
                req.extend_from_slice(b);
            }
            None if method == "GET" || method == "HEAD" => req.extend_from_slice(b"\r\n"),
            None => req.extend_from_slice(b"content-length: 0\r\n\r\n"),
        }
        self.io.write_all(&req).await?;
        self.io.flush().await?;
        self.read_response(method == "HEAD").await
    }

    async fn fill(&mut self) -> SimResult<()> {
        if self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(8192);
        }
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) => Err(SimError::Closed),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(SimError::Closed),
            Err(e) => Err(SimError::Io(e)),
        }
    }

    async fn read_response(&mut self, head_only: bool) -> SimResult<Response> {
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(SimError::Protocol("response head too large".into()));
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| SimError::Protocol("response head is not UTF-8".into()))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| SimError::Protocol(format!("bad status line {status_line:?}")))?;
        let (mut length, mut chunked) = (None, false);
        for line in lines {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(
                    v.parse::<usize>()
                        .map_err(|_| SimError::Protocol("bad content-length".into()))?,
                );
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                self.closed = true;
            }
        }
        self.buf.drain(..head_end);
        let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
        let body = if no_body {
            Vec::new()
        } else if chunked {
            self.read_chunked().await?
        } else if let Some(n) = length {
            if n > MAX_BODY {
                return Err(SimError::Protocol("response body too large".into()));
            }
            while self.buf.len() < n {
                self.fill().await?;
            }
            self.buf.drain(..n).collect()
        } else {
            // Until EOF.
            loop {
                match self.fill().await {
                    Ok(()) if self.buf.len() <= MAX_BODY => {}
                    Ok(()) => return Err(SimError::Protocol("response body too large".into())),
                    Err(SimError::Closed) => break,
                    Err(e) => return Err(e),
                }
            }
            self.closed = true;
            std::mem::take(&mut self.buf)
        };
        if self.buf.is_empty() {
            // Idle connections keep no buffer.
            self.buf = Vec::new();
        }
        Ok(Response { status, body })
    }

    async fn read_chunked(&mut self) -> SimResult<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(p) = find(&self.buf, b"\r\n") {
                    break p;
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(SimError::Protocol("bad chunk size line".into()));
                }
                self.fill().await?;
            };
            let line = std::str::from_utf8(&self.buf[..line_end]).unwrap_or("");
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| SimError::Protocol("bad chunk size".into()))?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                loop {
                    if let Some(p) = find(&self.buf, b"\r\n") {
                        let empty = p == 0;
                        self.buf.drain(..p + 2);
                        if empty {
                            return Ok(body);
                        }
                        continue;
                    }
                    self.fill().await?;
                }
            }
            if body.len() + size > MAX_BODY {
                return Err(SimError::Protocol("response body too large".into()));
            }
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The devices module's admin API (plain HTTP on the admin listener).
#[derive(Clone)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token: String,
    /// The module's name (`[module.NAME]`): paths are `/modules/NAME/...`.
    pub module: String,
    pub timeout: Duration,
}

impl Admin {
    /// One call on a fresh connection: `(status, JSON body)` (a body that
    /// is not JSON comes back as a JSON string).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> SimResult<(u16, Value)> {
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| SimError::Timeout)?
            .map_err(SimError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let mut conn = HttpConn::new(tcp, self.addr.to_string(), self.timeout);
        let auth = format!("Bearer {}", self.token);
        let text = body.map(Value::to_string);
        let r = conn
            .request_with(
                method,
                &format!("/modules/{}/{}", self.module, path.trim_start_matches('/')),
                &[("authorization", &auth), ("connection", "close")],
                text.as_deref().map(|t| ("application/json", t.as_bytes())),
            )
            .await?;
        let v = serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()));
        Ok((r.status, v))
    }

    /// Like `call`, but only `want` is a success.
    pub async fn expect(
        &self,
        want: u16,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> SimResult<Value> {
        let (s, v) = self.call(method, path, body).await?;
        if s != want {
            return Err(SimError::Status(s, v.to_string()));
        }
        Ok(v)
    }

    /// Enrolment token secrets for `devices` enrolments (a token allows at
    /// most 1,000,000 uses, so more devices get several tokens).
    pub async fn enrolment_tokens(&self, devices: usize, label: &str) -> SimResult<Vec<String>> {
        const MAX_USES: usize = 1_000_000;
        let mut out = Vec::new();
        let mut left = devices;
        while left > 0 {
            let uses = left.min(MAX_USES);
            let v = self
                .expect(
                    201,
                    "POST",
                    "tokens",
                    Some(&serde_json::json!({"label": label, "uses": uses, "expires_in": "1d"})),
                )
                .await?;
            let secret = v["secret"]
                .as_str()
                .ok_or_else(|| SimError::Protocol("token answer without secret".into()))?;
            out.push(secret.to_string());
            left -= uses;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_length_and_chunked_responses_on_one_connection() {
        let (client, mut server) = tokio::io::duplex(4096);
        let srv = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let _ = server.read(&mut buf).await.unwrap();
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            let _ = server.read(&mut buf).await.unwrap();
            server
                .write_all(
                    b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
                )
                .await
                .unwrap();
        });
        let mut c = HttpConn::new(client, "localhost".into(), Duration::from_secs(5));
        let r = c.request("GET", "/a", None).await.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        let r = c
            .request("POST", "/b", Some(("application/json", b"{}")))
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"abcde"[..]));
        srv.await.unwrap();
    }

    #[test]
    fn pem_blocks_decode() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let two = format!("{}\n{}", cert.pem(), cert.pem());
        let blocks = pem_blocks(&two, "CERTIFICATE");
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0], cert.der().to_vec());
    }
}
