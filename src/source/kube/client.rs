//! A small blocking GET client for one API server, on ureq 3 + rustls (ring).
//!
//! Owns: TLS setup from [`Settings`] (always explicit roots; never a silent fallback to an
//! unverified connection), bearer tokens (a token file is re-read when it changes), response
//! bodies read as they arrive or with a size limit, and turning transport failures into
//! [`ClientError`]s that say what failed. Where to connect is decided before (`settings`); it
//! never decodes objects (`objects`, `watch`), never retries or backs off (`reflector` and
//! `driver` decide that), and never puts a secret in a log line or in `Debug` output.
//!
//! Timeouts: a connect timeout, and a per-read timeout that is the idle timeout of a watch. There
//! is deliberately no total-body timeout: a watch is a body that lasts minutes.

use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig, TlsProvider};

use super::error::{ClientError, ErrorKind};
use super::secret::Secret;
use super::settings::{read_file, Auth, Settings};
use super::watch::Status;

/// Timeouts for a [`Client`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Longest silence on an open connection (response headers or body) before the request
    /// fails with [`ErrorKind::Timeout`]. This is the watch idle timeout.
    pub idle_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        // Bookmarks arrive about once a minute on a real API server.
        ClientOptions { connect_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(90) }
    }
}

static PROVIDER: Once = Once::new();

/// Install rustls' ring provider as the process default, once.
pub fn install_crypto_provider() {
    PROVIDER.call_once(|| {
        // Fails only if another provider was installed first, which is fine too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The cached bearer token of a token file.
struct TokenCache {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    checked: Option<Instant>,
    token: Option<Secret>,
}

/// How often the token file's metadata is looked at, at most.
const TOKEN_RECHECK: Duration = Duration::from_secs(1);

impl TokenCache {
    fn current(&mut self) -> Result<Secret, ClientError> {
        let fresh = self.checked.is_some_and(|t| t.elapsed() < TOKEN_RECHECK);
        if let (true, Some(t)) = (fresh, &self.token) {
            return Ok(t.clone());
        }
        let meta = std::fs::metadata(&self.path).map_err(|e| {
            ClientError::new(ErrorKind::Config, format!("token file {}: cannot read: {e}", self.path.display()))
        })?;
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
        if self.stamp != Some(stamp) || self.token.is_none() {
            let bytes = read_file("token file", &self.path)?;
            let trimmed = bytes.trim_ascii();
            if trimmed.is_empty() {
                return Err(ClientError::new(
                    ErrorKind::Config,
                    format!("token file {} is empty", self.path.display()),
                ));
            }
            if trimmed.iter().any(|b| !b.is_ascii_graphic()) {
                return Err(ClientError::new(
                    ErrorKind::Config,
                    format!("token file {} holds characters a bearer token cannot have", self.path.display()),
                ));
            }
            if self.token.is_some() {
                log::info!("token file {} changed; using the new token", self.path.display());
            }
            self.token = Some(Secret::new(trimmed.to_vec()));
            self.stamp = Some(stamp);
        }
        self.checked = Some(Instant::now());
        Ok(self.token.clone().expect("set above"))
    }
}

enum AuthState {
    None,
    Token(Secret),
    File(Mutex<TokenCache>),
}

/// A blocking GET client for one API server. Cheap to clone (shares the connection pool).
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: Arc<str>,
    origin: Arc<str>,
    auth: Arc<AuthState>,
    /// Told of every request: its verb (`LIST`, `WATCH`, `GET`), the HTTP code (`None`: no
    /// response) and the time to the response head.
    observer: Option<Observer>,
}

/// See [`Client::observed`].
pub type Observer = Arc<dyn Fn(&'static str, Option<u16>, Duration) + Send + Sync>;

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("server", &self.base).field("origin", &self.origin).finish_non_exhaustive()
    }
}

fn pem_certs(what: &str, pem: &[u8]) -> Result<Vec<Certificate<'static>>, ClientError> {
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item {
            Ok(PemItem::Certificate(c)) => out.push(c),
            Ok(_) => {}
            Err(e) => return Err(ClientError::new(ErrorKind::Config, format!("{what}: not valid PEM: {e}"))),
        }
    }
    if out.is_empty() {
        return Err(ClientError::new(ErrorKind::Config, format!("{what}: holds no PEM certificate")));
    }
    Ok(out)
}

/// Per connection and layer (TCP, TLS): what ureq reads into and writes from.
const INPUT_BUFFER: usize = 32 * 1024;
const OUTPUT_BUFFER: usize = 16 * 1024;

impl Client {
    pub fn new(settings: &Settings, opts: &ClientOptions) -> Result<Client, ClientError> {
        install_crypto_provider();
        let https = settings.server.starts_with("https://");
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_per_read(Some(opts.idle_timeout))
            .timeout_per_write(Some(opts.idle_timeout))
            .user_agent(concat!("edgeproxy/", env!("CARGO_PKG_VERSION")))
            .max_redirects(0)
            // ureq's default is 128 KiB each way, zero-filled, on both the TCP and the TLS layer
            // of every connection: 512 KiB of RSS per open watch. A response header (the only
            // thing that must fit whole) is under 1 KiB from an API server, a request (path,
            // continue token, bearer token) a few KiB, a TLS record at most 16 KiB.
            .input_buffer_size(INPUT_BUFFER)
            .output_buffer_size(OUTPUT_BUFFER)
            .max_response_header_size(INPUT_BUFFER);
        if https || settings.client_cert.is_some() {
            // Always explicit roots: ureq panics on its default (bundled) roots when they are not
            // compiled in, and a public root store is the wrong trust anchor for a cluster anyway.
            let roots = match (&settings.ca_pem, settings.insecure) {
                (_, true) => Vec::new(),
                (Some(pem), false) => pem_certs(&format!("{}: CA", settings.origin), pem)?,
                (None, false) => {
                    return Err(ClientError::new(ErrorKind::Config, format!("{}: https needs a CA", settings.origin)))
                }
            };
            let mut tls = TlsConfig::builder()
                .provider(TlsProvider::Rustls)
                .root_certs(RootCerts::new_with_certs(&roots))
                .disable_verification(settings.insecure);
            if let Some((cert, key)) = &settings.client_cert {
                let chain = pem_certs(&format!("{}: client certificate", settings.origin), cert)?;
                let key = PrivateKey::from_pem(key.expose()).map_err(|e| {
                    ClientError::new(
                        ErrorKind::Config,
                        format!("{}: client key is not a usable PEM private key: {e}", settings.origin),
                    )
                })?;
                tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
            }
            builder = builder.tls_config(tls.build());
        }
        let auth = match &settings.auth {
            Auth::None => AuthState::None,
            Auth::Token(t) => AuthState::Token(t.clone()),
            Auth::TokenFile(p) => {
                let mut cache = TokenCache { path: p.clone(), stamp: None, checked: None, token: None };
                cache.current()?; // fail early on a missing or empty token file
                AuthState::File(Mutex::new(cache))
            }
        };
        Ok(Client {
            agent: builder.build().into(),
            base: settings.server.as_str().into(),
            origin: settings.origin.as_str().into(),
            auth: Arc::new(auth),
            observer: None,
        })
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Interrupt requests in flight on every clone of this client (used at shutdown).
    pub fn shutdown(&self) {
        self.agent.clone().shutdown();
    }

    /// `GET {server}{path_and_query}`. Any status is a response; only transport failures and
    /// unusable settings are errors.
    pub fn get(&self, path_and_query: &str) -> Result<Response, ClientError> {
        self.get_with(path_and_query, None)
    }

    /// [`Client::get`] whose reads may stay silent up to `read_timeout` (a watch: the server
    /// sends nothing on a quiet resource until `timeoutSeconds`), instead of the idle timeout.
    /// The same client, telling `observer` of every request.
    pub fn observed(mut self, observer: Observer) -> Client {
        self.observer = Some(observer);
        self
    }

    pub fn get_with(&self, path_and_query: &str, read_timeout: Option<Duration>) -> Result<Response, ClientError> {
        let started = std::time::Instant::now();
        let result = self.request(path_and_query, read_timeout);
        if let Some(observe) = &self.observer {
            let verb = match path_and_query {
                p if p.contains("watch=1") || p.contains("watch=true") => "WATCH",
                p if p.contains("limit=") => "LIST",
                _ => "GET",
            };
            observe(verb, result.as_ref().ok().map(|r| r.status), started.elapsed());
        }
        result
    }

    fn request(&self, path_and_query: &str, read_timeout: Option<Duration>) -> Result<Response, ClientError> {
        let url = format!("{}{}", self.base, path_and_query);
        let mut req = self.agent.get(&url).header("Accept", "application/json");
        if let Some(t) = read_timeout {
            req = req.config().timeout_per_read(Some(t)).build();
        }
        match &*self.auth {
            AuthState::None => {}
            AuthState::Token(t) => req = req.header("Authorization", bearer(t)?),
            AuthState::File(cache) => {
                let t = cache.lock().unwrap_or_else(|p| p.into_inner()).current()?;
                req = req.header("Authorization", bearer(&t)?);
            }
        }
        let resp = req.call().map_err(|e| describe(&self.base, e))?;
        let status = resp.status().as_u16();
        Ok(Response { status, body: resp.into_body().into_reader(), server: self.base.clone() })
    }
}

fn bearer(t: &Secret) -> Result<String, ClientError> {
    let s = std::str::from_utf8(t.expose())
        .map_err(|_| ClientError::new(ErrorKind::Config, "the bearer token is not UTF-8"))?;
    Ok(format!("Bearer {s}"))
}

/// A response whose body is read as it arrives.
pub struct Response {
    pub status: u16,
    body: ureq::BodyReader<'static>,
    server: Arc<str>,
}

impl Response {
    /// Read the whole body, failing past `limit` bytes.
    pub fn read_limited(mut self, limit: usize) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = self.read(&mut buf).map_err(|e| describe_io(&self.server, e))?;
            if n == 0 {
                return Ok(out);
            }
            if out.len() + n > limit {
                return Err(ClientError::new(
                    ErrorKind::Body,
                    format!("{}: response body is larger than the {limit}-byte limit", self.server),
                ));
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// The `metav1.Status` of an error response, as far as it can be read (64 KiB at most).
    pub fn status_body(self) -> Status {
        let code = self.status;
        let bytes = self.read_limited(64 * 1024).unwrap_or_default();
        let mut s: Status = serde_json::from_slice(&bytes).unwrap_or_default();
        if s.code == 0 {
            s.code = code;
        }
        if s.message.is_empty() {
            s.message = plain_message(&bytes);
        }
        s
    }

    pub fn server(&self) -> &str {
        &self.server
    }
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf)
    }
}

/// A message from a body that is not a `Status` (a proxy's page, a TLS port answering plain
/// HTTP): its text, printable characters only, cut to 200; with a hint when the port speaks TLS.
fn plain_message(bytes: &[u8]) -> String {
    let text: String =
        String::from_utf8_lossy(bytes).chars().map(|c| if c.is_control() { ' ' } else { c }).take(200).collect();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.to_ascii_lowercase().contains("https server") {
        return format!("{text} (the port speaks TLS: use an https:// URL)");
    }
    if text.is_empty() {
        return "(no message in the response body)".into();
    }
    text
}

/// Turn an I/O error from reading a body into a [`ClientError`].
pub fn describe_io(server: &str, e: io::Error) -> ClientError {
    describe(server, ureq::Error::from(e))
}

/// Say what failed, with the server, never with a secret.
pub fn describe(server: &str, e: ureq::Error) -> ClientError {
    match e {
        ureq::Error::Timeout(t) => ClientError::new(ErrorKind::Timeout, format!("{server}: timed out ({t})")),
        ureq::Error::Rustls(r) => tls_error(server, &r),
        ureq::Error::Tls(m) => ClientError::new(ErrorKind::Tls, format!("{server}: TLS error: {m}")),
        ureq::Error::Io(io) => {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return tls_error(server, r);
            }
            let kind = match io.kind() {
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorKind::Timeout,
                _ => ErrorKind::Transport,
            };
            ClientError::new(kind, format!("{server}: {io}"))
        }
        ureq::Error::ConnectionFailed => ClientError::new(ErrorKind::Transport, format!("{server}: connection failed")),
        ureq::Error::HostNotFound => ClientError::new(ErrorKind::Transport, format!("{server}: host not found")),
        ureq::Error::BadUri(u) => ClientError::new(ErrorKind::Config, format!("{server}: bad URL: {u}")),
        ureq::Error::BodyExceedsLimit(n) => {
            ClientError::new(ErrorKind::Body, format!("{server}: response body is larger than {n} bytes"))
        }
        other => ClientError::new(ErrorKind::Transport, format!("{server}: {other}")),
    }
}

fn tls_error(server: &str, e: &rustls::Error) -> ClientError {
    let hint = match e {
        rustls::Error::InvalidCertificate(_) => {
            " (the server's certificate does not verify against the configured CA; edgeproxy does not fall back to an unverified connection)"
        }
        rustls::Error::AlertReceived(_) => " (the server refused the handshake; check the client certificate)",
        _ => "",
    };
    ClientError::new(ErrorKind::Tls, format!("{server}: TLS handshake failed: {e}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bodies_make_a_message() {
        // What Go's HTTPS server answers to plain HTTP (kube-apiserver on its TLS port).
        let m = plain_message(b"Client sent an HTTP request to an HTTPS server.\n");
        assert_eq!(m, "Client sent an HTTP request to an HTTPS server. (the port speaks TLS: use an https:// URL)");
        assert_eq!(plain_message(b""), "(no message in the response body)");
        assert_eq!(plain_message(b"a\x1b[31mb\nc"), "a [31mb c");
        assert_eq!(plain_message(&[b'x'; 500]).len(), 200);
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ep-client-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn token_file_is_reread_when_it_changes() {
        let d = tmpdir("tok");
        let p = d.join("token");
        std::fs::write(&p, "first\n").unwrap();
        let mut cache = TokenCache { path: p.clone(), stamp: None, checked: None, token: None };
        assert_eq!(cache.current().unwrap().expose(), b"first");
        std::fs::write(&p, "second-token\n").unwrap();
        cache.checked = None; // as if TOKEN_RECHECK had passed
        assert_eq!(cache.current().unwrap().expose(), b"second-token");
        std::fs::write(&p, "\n").unwrap();
        cache.checked = None;
        assert!(cache.current().unwrap_err().message.contains("is empty"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
