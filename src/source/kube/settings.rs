//! Where to connect and how to authenticate: [`Settings`], from the source config and the
//! process environment ([`Env`]), the first way that applies in a fixed order.
//!
//! Owns: that order (explicit `server`, kubeconfig, in-cluster, MetaServer), the
//! explicit files that override what the chosen way says (`caFile`, `tokenFile`,
//! `clientCert`/`clientKey`), reading those files, and refusing https without a CA (edgeproxy
//! carries no public root store and never connects unverified). It never opens a connection
//! (`client` does), and secrets stay in [`Secret`], out of `Debug` output.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::error::{ClientError, ErrorKind};
use super::kubeconfig::{self, KeySource, PemSource};
use super::secret::Secret;
use crate::source::{SourceConfig, SourceKind};

/// The process environment the settings are read from; tests build their own.
#[derive(Clone, Debug, Default)]
pub struct Env {
    /// `$KUBECONFIG`.
    pub kubeconfig: Option<OsString>,
    /// `$KUBERNETES_SERVICE_HOST` / `$KUBERNETES_SERVICE_PORT`.
    pub service_host: Option<String>,
    pub service_port: Option<String>,
    /// Normally `/var/run/secrets/kubernetes.io/serviceaccount`.
    pub serviceaccount_dir: PathBuf,
}

/// Where a pod's service-account token and CA live.
pub const SERVICEACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl Env {
    pub fn from_process() -> Env {
        Env {
            kubeconfig: std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()),
            service_host: std::env::var("KUBERNETES_SERVICE_HOST").ok().filter(|v| !v.is_empty()),
            service_port: std::env::var("KUBERNETES_SERVICE_PORT").ok().filter(|v| !v.is_empty()),
            serviceaccount_dir: PathBuf::from(SERVICEACCOUNT_DIR),
        }
    }
}

/// How requests are authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    None,
    Token(Secret),
    /// Re-read whenever the file changes (bound service-account tokens rotate).
    TokenFile(PathBuf),
}

/// Resolved connection settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where these came from (`--server`, `kubeconfig FILE, context X`, `in-cluster`,
    /// `MetaServer`), for logs and errors.
    pub origin: String,
    /// Base URL without a trailing `/`.
    pub server: String,
    /// PEM roots for https. Required for https unless `insecure`.
    pub ca_pem: Option<Vec<u8>>,
    /// Only ever set from a kubeconfig that says `insecure-skip-tls-verify: true`.
    pub insecure: bool,
    /// PEM certificate chain and PEM private key.
    pub client_cert: Option<(Vec<u8>, Secret)>,
    pub auth: Auth,
    /// To be logged at warn level by the caller.
    pub warnings: Vec<String>,
}

/// Read a file the settings name (a CA, a client certificate or key, a token file); failing is a
/// [`ErrorKind::Config`] error naming it.
pub(super) fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::new(ErrorKind::Config, format!("{what} {}: cannot read: {e}", path.display())))
}

impl Settings {
    /// Connection settings from the source config, in this order: an explicit `server`; a
    /// kubeconfig (`kubeconfig`, then `$KUBECONFIG`); in-cluster (`KUBERNETES_SERVICE_HOST`/`PORT`
    /// and the service-account files); the MetaServer URL. Explicit `tokenFile`, `caFile`,
    /// `clientCert`/`clientKey` override what the chosen way says.
    pub fn from_source(cfg: &SourceConfig, env: &Env) -> Result<Settings, ClientError> {
        let mut s = match &cfg.kind {
            SourceKind::File(p) => {
                return Err(ClientError::new(
                    ErrorKind::Config,
                    format!("the source is the file {}, not a Kubernetes API", p.display()),
                ))
            }
            SourceKind::MetaServer => metaserver(cfg),
            SourceKind::Kube => {
                if let Some(server) = &cfg.server {
                    Settings {
                        origin: "--server".into(),
                        server: server.clone(),
                        ca_pem: None,
                        insecure: false,
                        client_cert: None,
                        auth: Auth::None,
                        warnings: Vec::new(),
                    }
                } else if let Some(paths) = kubeconfig_paths(cfg, env) {
                    from_kubeconfig(&paths)?
                } else if let (Some(host), Some(port)) = (&env.service_host, &env.service_port) {
                    let host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
                    let dir = &env.serviceaccount_dir;
                    Settings {
                        origin: format!("in-cluster ({})", dir.display()),
                        server: format!("https://{host}:{port}"),
                        ca_pem: Some(read_file("service-account CA", &dir.join("ca.crt"))?),
                        insecure: false,
                        client_cert: None,
                        auth: Auth::TokenFile(dir.join("token")),
                        warnings: Vec::new(),
                    }
                } else {
                    metaserver(cfg)
                }
            }
        };
        // Explicit files override whatever the chosen way said.
        if let Some(p) = &cfg.ca_file {
            s.ca_pem = Some(read_file("caFile", p)?);
        }
        if let Some(p) = &cfg.token_file {
            s.auth = Auth::TokenFile(p.clone());
        }
        if let (Some(c), Some(k)) = (&cfg.client_cert, &cfg.client_key) {
            s.client_cert = Some((read_file("clientCert", c)?, Secret::new(read_file("clientKey", k)?)));
        }
        s.server = s.server.trim_end_matches('/').to_string();
        if s.server.starts_with("https://") && s.ca_pem.is_none() && !s.insecure {
            return Err(ClientError::new(
                ErrorKind::Config,
                format!(
                    "{}: {} is https but no CA is given (caFile, or certificate-authority in the kubeconfig); \
                 edgeproxy carries no public root store and never connects unverified",
                    s.origin, s.server
                ),
            ));
        }
        if !(s.server.starts_with("https://") || s.server.starts_with("http://")) {
            return Err(ClientError::new(
                ErrorKind::Config,
                format!("{}: {:?} is not an http(s) URL", s.origin, s.server),
            ));
        }
        Ok(s)
    }
}

fn metaserver(cfg: &SourceConfig) -> Settings {
    Settings {
        origin: "MetaServer".into(),
        server: cfg.meta_server.clone(),
        ca_pem: None,
        insecure: false,
        client_cert: None,
        auth: Auth::None,
        warnings: Vec::new(),
    }
}

fn kubeconfig_paths(cfg: &SourceConfig, env: &Env) -> Option<Vec<PathBuf>> {
    if let Some(p) = &cfg.kubeconfig {
        return Some(vec![p.clone()]);
    }
    let list = env.kubeconfig.as_ref()?;
    let paths: Vec<PathBuf> = std::env::split_paths(list).filter(|p| !p.as_os_str().is_empty()).collect();
    (!paths.is_empty()).then_some(paths)
}

fn from_kubeconfig(paths: &[PathBuf]) -> Result<Settings, ClientError> {
    let k = kubeconfig::load(paths).map_err(|e| ClientError::new(ErrorKind::Config, e.to_string()))?;
    let label = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
    let origin = format!("kubeconfig {label}, {}", k.origin);
    let pem = |what: &str, src: &PemSource| match src {
        PemSource::Data(d) => Ok(d.clone()),
        PemSource::File(p) => read_file(what, p),
    };
    let ca_pem = match (&k.ca, k.insecure) {
        (Some(src), false) => Some(pem("certificate-authority", src)?),
        _ => None,
    };
    let client_cert = match (&k.client_cert, &k.client_key) {
        (Some(c), Some(key)) => {
            let key = match key {
                KeySource::Data(s) => s.clone(),
                KeySource::File(p) => Secret::new(read_file("client-key", p)?),
            };
            Some((pem("client-certificate", c)?, key))
        }
        _ => None,
    };
    let auth = match (&k.token, &k.token_file) {
        (Some(t), _) => Auth::Token(t.clone()),
        (None, Some(p)) => Auth::TokenFile(p.clone()),
        (None, None) => Auth::None,
    };
    Ok(Settings { origin, server: k.server, ca_pem, insecure: k.insecure, client_cert, auth, warnings: k.warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ep-settings-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn cfg() -> SourceConfig {
        Config::defaults().source
    }

    #[test]
    fn order_explicit_kubeconfig_incluster_metaserver() {
        let d = tmpdir("order");
        std::fs::write(d.join("ca.crt"), "CA").unwrap();
        std::fs::write(d.join("token"), "tok\n").unwrap();
        let kc = d.join("kc");
        std::fs::write(&kc, "clusters: [{name: c, cluster: {server: 'http://from-kubeconfig:8080'}}]\ncontexts: [{name: x, context: {cluster: c}}]\n").unwrap();
        let env = Env {
            kubeconfig: Some(kc.clone().into_os_string()),
            service_host: Some("10.96.0.1".into()),
            service_port: Some("443".into()),
            serviceaccount_dir: d.clone(),
        };
        let mut c = cfg();
        c.server = Some("http://explicit:1".into());
        assert_eq!(Settings::from_source(&c, &env).unwrap().server, "http://explicit:1");
        c.server = None;
        let s = Settings::from_source(&c, &env).unwrap();
        assert_eq!(s.server, "http://from-kubeconfig:8080");
        assert!(s.origin.contains("kubeconfig"), "{}", s.origin);
        let env2 = Env { kubeconfig: None, ..env.clone() };
        let s = Settings::from_source(&c, &env2).unwrap();
        assert_eq!(s.server, "https://10.96.0.1:443");
        assert_eq!(s.ca_pem.as_deref(), Some(&b"CA"[..]));
        assert_eq!(s.auth, Auth::TokenFile(d.join("token")));
        let env3 = Env { service_host: None, ..env2.clone() };
        let s = Settings::from_source(&c, &env3).unwrap();
        assert_eq!((s.server.as_str(), s.origin.as_str()), ("http://127.0.0.1:10550", "MetaServer"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn https_without_ca_is_refused() {
        let mut c = cfg();
        c.server = Some("https://10.0.0.1:6443".into());
        let e = Settings::from_source(&c, &Env::default()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Config);
        assert!(e.message.contains("no CA is given"), "{e}");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let s = Settings {
            origin: "x".into(),
            server: "http://h".into(),
            ca_pem: None,
            insecure: false,
            client_cert: Some((b"cert".to_vec(), Secret::new(b"PRIVATE-KEY-BYTES".to_vec()))),
            auth: Auth::Token(Secret::new(b"TOKEN-VALUE".to_vec())),
            warnings: vec![],
        };
        let d = format!("{s:?}");
        assert!(!d.contains("PRIVATE-KEY-BYTES") && !d.contains("TOKEN-VALUE"), "{d}");
    }
}
