//! A minimal HTTP/1.1 client for HeadCNI's three peers (tailscaled's LocalAPI over a unix
//! socket, Headscale and the Kubernetes API over TCP or TLS): one connection per request,
//! a deadline on the whole exchange and a cap on the answer's size ([`Endpoint::send`]), or,
//! for a Kubernetes watch, a deadline on the answer's head and a cap on each line of a body
//! read as it arrives ([`Endpoint::open`]). The rates are a few requests a minute, so nothing
//! is pooled.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("connecting to {target}: {source}")]
    Connect { target: String, source: std::io::Error },
    #[error("TLS handshake with {target}: {source}")]
    Tls { target: String, source: std::io::Error },
    #[error("{target}: {source}")]
    Http { target: String, source: hyper::Error },
    #[error("{target}: no answer within {0:?}", timeout)]
    Timeout { target: String, timeout: Duration },
    #[error("{target}: answer larger than {limit} bytes")]
    TooLarge { target: String, limit: usize },
    #[error("TLS setup: {0}")]
    TlsSetup(String),
}

impl ClientError {
    /// The server could not be reached at all (as opposed to answering badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Tls { .. } | Self::Timeout { .. })
    }
}

#[derive(Clone)]
enum Transport {
    Tcp { host: String, port: u16 },
    Tls { host: String, port: u16, connector: tokio_rustls::TlsConnector, server_name: ServerName<'static> },
    Unix { path: PathBuf },
}

/// Where requests go: a transport, the Host header and a path prefix.
#[derive(Clone)]
pub struct Endpoint {
    transport: Transport,
    host_header: String,
    base_path: String,
    display: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// One request. Header values that carry secrets must be marked sensitive by the caller.
pub struct HttpRequest {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Vec<u8>>,
    pub timeout: Duration,
    pub limit: usize,
}

impl HttpRequest {
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
            timeout: Duration::from_secs(10),
            limit: 4 << 20,
        }
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn json(mut self, body: &serde_json::Value) -> Self {
        self.body = Some(body.to_string().into_bytes());
        self.headers.push((hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json")));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    /// The body as text for an error message: trimmed and cut short.
    pub fn snippet(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        let mut out: String = text.chars().take(300).collect();
        if text.chars().count() > 300 {
            out.push('…');
        }
        out
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

impl Endpoint {
    /// An http:// or https:// base URL. `tls` is required for https.
    pub fn from_url(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::Url { url: url.to_string(), reason: reason.to_string() };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme_str().ok_or_else(|| bad("no scheme (http:// or https://)"))?;
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not supported"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        let host_header = authority.as_str().to_string();
        let display = url.trim_end_matches('/').to_string();
        let transport = match scheme {
            "http" => Transport::Tcp { host, port: authority.port_u16().unwrap_or(80) },
            "https" => {
                let config = tls.ok_or_else(|| bad("https needs a TLS configuration"))?;
                let server_name =
                    ServerName::try_from(host.clone()).map_err(|_| bad("host is not a valid TLS name"))?;
                Transport::Tls {
                    host,
                    port: authority.port_u16().unwrap_or(443),
                    connector: tokio_rustls::TlsConnector::from(config),
                    server_name,
                }
            }
            _ => return Err(bad("the scheme must be http or https")),
        };
        Ok(Self { transport, host_header, base_path, display })
    }

    /// A unix socket; `host_header` is sent as the Host of every request.
    pub fn unix(path: &Path, host_header: &str) -> Self {
        Self {
            transport: Transport::Unix { path: path.to_path_buf() },
            host_header: host_header.to_string(),
            base_path: String::new(),
            display: path.display().to_string(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.transport, Transport::Tls { .. })
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let target = self.display.clone();
        match &self.transport {
            Transport::Unix { path } => tokio::net::UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn Io>)
                .map_err(|source| ClientError::Connect { target, source }),
            Transport::Tcp { host, port } => tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map(|s| Box::new(s) as Box<dyn Io>)
                .map_err(|source| ClientError::Connect { target, source }),
            Transport::Tls { host, port, connector, server_name } => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|source| ClientError::Connect { target: target.clone(), source })?;
                let tls = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|source| ClientError::Tls { target, source })?;
                Ok(Box::new(tls))
            }
        }
    }

    /// Sends one request and reads the whole answer, within the request's deadline.
    pub async fn send(&self, req: HttpRequest) -> Result<Response, ClientError> {
        let target = self.display.clone();
        let timeout = req.timeout;
        let limit = req.limit;
        let exchange = async {
            let stream = self.open_inner(req).await?;
            stream.collect(limit).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { target, timeout }),
        }
    }

    /// Sends one request and answers as soon as the status line and headers are in (within the
    /// request's deadline); the body is then read piece by piece (a Kubernetes watch). The
    /// request's limit applies to each line of the body.
    pub async fn open(&self, req: HttpRequest) -> Result<StreamingResponse, ClientError> {
        let target = self.display.clone();
        let timeout = req.timeout;
        match tokio::time::timeout(timeout, self.open_inner(req)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { target, timeout }),
        }
    }

    async fn open_inner(&self, req: HttpRequest) -> Result<StreamingResponse, ClientError> {
        let target = self.display.clone();
        let http_err = |source| ClientError::Http { target: target.clone(), source };
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http_err)?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = format!("{}{}", self.base_path, req.path);
        let mut builder = hyper::Request::builder().method(req.method).uri(path);
        if let Some(headers) = builder.headers_mut() {
            headers.insert(
                hyper::header::HOST,
                HeaderValue::from_str(&self.host_header).unwrap_or(HeaderValue::from_static("localhost")),
            );
            headers.insert(
                hyper::header::USER_AGENT,
                HeaderValue::from_static(concat!("headcni/", env!("CARGO_PKG_VERSION"))),
            );
            for (name, value) in req.headers {
                headers.insert(name, value);
            }
        }
        let body = Full::new(Bytes::from(req.body.unwrap_or_default()));
        let request =
            builder.body(body).map_err(|e| ClientError::Url { url: target.clone(), reason: e.to_string() })?;
        let response = sender.send_request(request).await.map_err(http_err)?;
        Ok(StreamingResponse {
            status: response.status(),
            body: Some(response.into_body()),
            buf: Vec::new(),
            line_limit: req.limit,
            done: false,
            target,
            conn,
        })
    }
}

/// An answer whose body is still arriving. Dropping it closes the connection.
pub struct StreamingResponse {
    pub status: StatusCode,
    body: Option<hyper::body::Incoming>,
    buf: Vec<u8>,
    line_limit: usize,
    done: bool,
    target: String,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for StreamingResponse {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl StreamingResponse {
    /// The rest of the body, up to `limit` bytes.
    pub async fn collect(mut self, limit: usize) -> Result<Response, ClientError> {
        let target = self.target.clone();
        let mut bytes = std::mem::take(&mut self.buf);
        if let Some(body) = self.body.take() {
            let collected =
                Limited::new(body, limit).collect().await.map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(source) => ClientError::Http { target: target.clone(), source: *source },
                    Err(_) => ClientError::TooLarge { target: target.clone(), limit },
                })?;
            bytes.extend_from_slice(&collected.to_bytes());
        }
        Ok(Response { status: self.status, body: Bytes::from(bytes) })
    }

    /// The next non-empty line of the body (without its newline); `None` at the end. A last
    /// line without a newline is answered too. The caller bounds the wait.
    pub async fn next_line(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                if pos > self.line_limit {
                    return Err(ClientError::TooLarge { target: self.target.clone(), limit: self.line_limit });
                }
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.buf.len() > self.line_limit {
                return Err(ClientError::TooLarge { target: self.target.clone(), limit: self.line_limit });
            }
            let Some(body) = self.body.as_mut().filter(|_| !self.done) else {
                return Ok((!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf)));
            };
            match body.frame().await {
                None => self.done = true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(source)) => return Err(ClientError::Http { target: self.target.clone(), source }),
            }
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// Certificates from PEM text (a CA bundle).
pub fn parse_certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ClientError::TlsSetup(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::TlsSetup(format!("{what}: no PEM certificate found")));
    }
    Ok(certs)
}

/// A private key from PEM text.
pub fn parse_private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, ClientError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| ClientError::TlsSetup(format!("{what}: {e}")))
}

/// A client TLS configuration (ring only) trusting `cas`, plus the public web roots when
/// `web_roots` is set, optionally presenting a client certificate.
pub fn tls_config(
    cas: Vec<CertificateDer<'static>>,
    web_roots: bool,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    if web_roots {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for ca in cas {
        roots.add(ca).map_err(|e| ClientError::TlsSetup(format!("CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::TlsSetup(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client_auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| ClientError::TlsSetup(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
pub(crate) mod testserver {
    //! An in-process HTTP server on a unix socket or TCP port serving canned answers and
    //! recording the requests it got.
    use super::*;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use std::sync::Mutex;

    #[derive(Debug, Clone)]
    pub struct Seen {
        pub method: Method,
        pub path: String,
        pub headers: hyper::HeaderMap,
        pub body: Vec<u8>,
    }

    pub type Handler = Arc<dyn Fn(&Seen) -> (u16, String) + Send + Sync>;

    pub struct Server {
        pub seen: Arc<Mutex<Vec<Seen>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve_conn<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
        stream: S,
        handler: Handler,
        seen: Arc<Mutex<Vec<Seen>>>,
    ) {
        let svc = service_fn(move |req: hyper::Request<Incoming>| {
            let handler = handler.clone();
            let seen = seen.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                let path = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
                let s = Seen { method: parts.method, path, headers: parts.headers, body };
                let (status, text) = handler(&s);
                seen.lock().unwrap().push(s);
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder().status(status).body(Full::new(Bytes::from(text))).unwrap(),
                )
            }
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
    }

    pub fn unix(path: &Path, handler: Handler) -> Server {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_conn(stream, handler.clone(), s.clone()));
            }
        });
        Server { seen, task }
    }

    /// A TLS server with the given certificate chain and key (PEM); answers its port.
    pub async fn tls(handler: Handler, chain_pem: &[u8], key_pem: &[u8]) -> (Server, u16) {
        let chain = parse_certificates(chain_pem, "chain").unwrap();
        let key = parse_private_key(key_pem, "key").unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, handler, s) = (acceptor.clone(), handler.clone(), s.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve_conn(tls, handler, s).await;
                    }
                });
            }
        });
        (Server { seen, task }, port)
    }

    pub async fn tcp(handler: Handler) -> (Server, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_conn(stream, handler.clone(), s.clone()));
            }
        });
        (Server { seen, task }, url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        for (url, needle) in [
            ("headscale.example.com", "scheme"),
            ("ftp://h", "http or https"),
            ("https://user:pw@h", "credentials"),
            ("http://h/?x=1", "query"),
            ("https://h", "TLS configuration"),
        ] {
            let err = Endpoint::from_url(url, None).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
        let e = Endpoint::from_url("http://10.0.0.1:8080/prefix/", None).unwrap();
        assert_eq!(e.base_path, "/prefix");
        assert_eq!(e.host_header, "10.0.0.1:8080");
        let e = Endpoint::from_url("http://[fd00::1]/", None).unwrap();
        assert!(matches!(e.transport, Transport::Tcp { ref host, port: 80 } if host == "fd00::1"));
    }

    #[tokio::test]
    async fn round_trip_with_limits_and_timeouts() {
        let handler: testserver::Handler = Arc::new(|s| match s.path.as_str() {
            "/big" => (200, "x".repeat(5000)),
            _ => (201, format!("{} {}", s.method, s.path)),
        });
        let (server, url) = testserver::tcp(handler).await;
        let ep = Endpoint::from_url(&url, None).unwrap();
        let r = ep.send(HttpRequest::new(Method::POST, "/a?b=c").json(&serde_json::json!({"k": 1}))).await.unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(&r.body[..], b"POST /a?b=c");
        assert_eq!(server.seen.lock().unwrap()[0].body, b"{\"k\":1}");
        let err = ep.send(HttpRequest::new(Method::GET, "/big").limit(100)).await.unwrap_err();
        assert!(matches!(err, ClientError::TooLarge { .. }), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let missing = Endpoint::unix(&dir.path().join("nope.sock"), "local");
        let err = missing.send(HttpRequest::new(Method::GET, "/")).await.unwrap_err();
        assert!(err.is_unreachable(), "{err}");
    }

    #[tokio::test]
    async fn a_streamed_body_is_read_line_by_line() {
        let handler: testserver::Handler = Arc::new(|s| match s.path.as_str() {
            "/long" => (200, format!("{}\nshort\n", "x".repeat(500))),
            _ => (200, "one\r\n\n two \nlast".into()),
        });
        let (_server, url) = testserver::tcp(handler).await;
        let ep = Endpoint::from_url(&url, None).unwrap();
        let mut r = ep.open(HttpRequest::new(Method::GET, "/w")).await.unwrap();
        assert_eq!(r.status, 200);
        let mut lines = Vec::new();
        while let Some(line) = r.next_line().await.unwrap() {
            lines.push(String::from_utf8(line).unwrap());
        }
        assert_eq!(lines, vec!["one", " two ", "last"], "blank lines skipped, CRLF and a last line without one");
        let mut r = ep.open(HttpRequest::new(Method::GET, "/long").limit(100)).await.unwrap();
        assert!(matches!(r.next_line().await.unwrap_err(), ClientError::TooLarge { limit: 100, .. }));
        let r = ep.open(HttpRequest::new(Method::GET, "/long")).await.unwrap();
        assert_eq!(r.collect(1000).await.unwrap().body.len(), 507);
    }

    #[test]
    fn tls_config_needs_real_certificates() {
        assert!(parse_certificates(b"not pem", "ca").is_err());
        assert!(tls_config(Vec::new(), true, None).is_ok());
    }
}
