//! Reading kubeconfig files: the current context's cluster and user, as connection settings.
//!
//! Owns: YAML parsing (yaml-rust2), `$KUBECONFIG`-style merging of several files (first file to
//! define a name or the current context wins, as kubectl does), resolving relative paths against
//! the file that names them, and decoding the `-data` fields. It never opens a connection and never
//! logs: warnings (such as `insecure-skip-tls-verify`) are returned for the caller to print, and
//! secrets come back wrapped in [`Secret`], which never prints its contents.
//!
//! Supported user shapes: `token`, `tokenFile`, `client-certificate[-data]` + `client-key[-data]`,
//! and no credentials at all (MetaServer). `exec`, `auth-provider` and `username`/`password` users
//! fail with a clear "not supported" error.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use yaml_rust2::{Yaml, YamlLoader};

use super::secret::Secret;

/// A kubeconfig problem, naming the file and the entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeconfigError {
    /// The file (or list of files) read.
    pub file: String,
    pub message: String,
}

impl fmt::Display for KubeconfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kubeconfig {}: {}", self.file, self.message)
    }
}

impl std::error::Error for KubeconfigError {}

/// PEM bytes, or the file they are in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PemSource {
    Data(Vec<u8>),
    File(PathBuf),
}

/// What the current context says about how to reach the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeconfigSettings {
    /// `kubeconfig FILE, context NAME`: for log lines and errors.
    pub origin: String,
    pub server: String,
    pub ca: Option<PemSource>,
    /// `insecure-skip-tls-verify: true`, written in the file.
    pub insecure: bool,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    pub client_cert: Option<PemSource>,
    /// The key itself is a secret; a path is not.
    pub client_key: Option<KeySource>,
    /// Things the caller should log at warn level (never containing secrets).
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Data(Secret),
    File(PathBuf),
}

static EMPTY: Yaml = Yaml::Null;

/// One named entry and the directory of the file it came from (relative paths resolve there).
struct Entry<'a> {
    name: &'a str,
    body: &'a Yaml,
    dir: PathBuf,
}

/// Read and merge kubeconfig files (`$KUBECONFIG` may list several, `:`-separated), then resolve
/// the current context. Missing files in a list are skipped, as kubectl does; a list with no
/// readable file is an error.
pub fn load(paths: &[PathBuf]) -> Result<KubeconfigSettings, KubeconfigError> {
    let label = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
    let mut docs: Vec<(PathBuf, Yaml)> = Vec::new();
    for p in paths {
        let text = match crate::capped::read_text(p, MAX_KUBECONFIG_BYTES as u64) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && paths.len() > 1 => continue,
            Err(e) => {
                return Err(KubeconfigError { file: p.display().to_string(), message: format!("cannot read: {e}") })
            }
        };
        let doc = parse_one(&text).map_err(|message| KubeconfigError { file: p.display().to_string(), message })?;
        let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
        docs.push((dir, doc));
    }
    if docs.is_empty() {
        return Err(KubeconfigError { file: label, message: "none of these files exists".into() });
    }
    settings_of(&docs).map_err(|message| KubeconfigError { file: label, message })
}

/// Parse kubeconfig text (for tests and for callers that already hold the text); relative paths
/// resolve against `dir`.
pub fn from_str(text: &str, dir: &Path) -> Result<KubeconfigSettings, String> {
    let doc = parse_one(text)?;
    settings_of(&[(dir.to_path_buf(), doc)])
}

/// The largest kubeconfig we read (real ones, certificates embedded, are a few KiB).
pub const MAX_KUBECONFIG_BYTES: usize = 1 << 20;
/// Most YAML nodes and deepest nesting a kubeconfig may have.
const MAX_NODES: usize = 20_000;
const MAX_DEPTH: usize = 32;

/// Refuses what no kubeconfig needs and what makes YAML a bomb, before building any tree: aliases
/// (`*name`: "billion laughs" expands a few hundred bytes into gigabytes, since the loader copies
/// each aliased node), more than [`MAX_NODES`] nodes, nesting deeper than [`MAX_DEPTH`].
fn refuse_bombs(text: &str) -> Result<(), String> {
    use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
    use yaml_rust2::scanner::Marker;
    #[derive(Default)]
    struct Scan {
        nodes: usize,
        depth: usize,
        problem: Option<String>,
    }
    impl MarkedEventReceiver for Scan {
        fn on_event(&mut self, ev: Event, mark: Marker) {
            if self.problem.is_some() {
                return;
            }
            let at = || format!("line {} column {}", mark.line(), mark.col() + 1);
            match ev {
                Event::Alias(_) => {
                    self.problem = Some(format!("YAML alias at {}: aliases are not accepted in a kubeconfig", at()));
                }
                Event::SequenceStart(..) | Event::MappingStart(..) => {
                    self.depth += 1;
                    self.nodes += 1;
                    if self.depth > MAX_DEPTH {
                        self.problem = Some(format!("nested deeper than {MAX_DEPTH} levels at {}", at()));
                    }
                }
                Event::SequenceEnd | Event::MappingEnd => self.depth = self.depth.saturating_sub(1),
                Event::Scalar(..) => self.nodes += 1,
                _ => {}
            }
            if self.problem.is_none() && self.nodes > MAX_NODES {
                self.problem = Some(format!("more than {MAX_NODES} YAML nodes (at {})", at()));
            }
        }
    }
    if text.len() > MAX_KUBECONFIG_BYTES {
        return Err(format!("is {} bytes; a kubeconfig may have at most {MAX_KUBECONFIG_BYTES}", text.len()));
    }
    let mut scan = Scan::default();
    Parser::new_from_str(text).load(&mut scan, true).map_err(|e| format!("not valid YAML: {e}"))?;
    scan.problem.map_or(Ok(()), Err)
}

fn parse_one(text: &str) -> Result<Yaml, String> {
    refuse_bombs(text)?;
    let mut docs = YamlLoader::load_from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    match docs.len() {
        0 => Ok(Yaml::Hash(Default::default())),
        1 => {
            let d = docs.remove(0);
            match d {
                Yaml::Hash(_) => Ok(d),
                Yaml::Null => Ok(Yaml::Hash(Default::default())),
                _ => Err("the top level is not a mapping".into()),
            }
        }
        n => Err(format!("holds {n} YAML documents; expected one")),
    }
}

/// The named entries of a top-level list (`clusters`, `users`, `contexts`), first name wins.
fn entries<'a>(docs: &'a [(PathBuf, Yaml)], list: &str, inner: &str) -> Result<Vec<Entry<'a>>, String> {
    let mut out: Vec<Entry<'a>> = Vec::new();
    for (dir, doc) in docs {
        let v = &doc[list];
        if v.is_badvalue() || v.is_null() {
            continue;
        }
        let items = v.as_vec().ok_or_else(|| format!("{list}: not a list"))?;
        for (i, item) in items.iter().enumerate() {
            let name = item["name"].as_str().ok_or_else(|| format!("{list}[{i}].name: missing or not a string"))?;
            if out.iter().any(|e| e.name == name) {
                continue;
            }
            let body = &item[inner];
            let body = match body {
                // `- name: edgemesh` with no `user:` at all is an entry with nothing set.
                Yaml::BadValue | Yaml::Null => &EMPTY,
                Yaml::Hash(_) => body,
                _ => return Err(format!("{list}[{i}] ({name}): `{inner}` is not a mapping")),
            };
            out.push(Entry { name, body, dir: dir.clone() });
        }
    }
    Ok(out)
}

fn string(body: &Yaml, field: &str, what: &str) -> Result<Option<String>, String> {
    match &body[field] {
        Yaml::BadValue | Yaml::Null => Ok(None),
        Yaml::String(s) if s.is_empty() => Ok(None),
        Yaml::String(s) => Ok(Some(s.clone())),
        // YAML turns bare numbers and booleans into non-strings; names like `1234` are valid.
        Yaml::Integer(i) => Ok(Some(i.to_string())),
        _ => Err(format!("{what}.{field}: not a string")),
    }
}

fn path_in(dir: &Path, p: String) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        p
    } else {
        dir.join(p)
    }
}

fn b64(what: &str, field: &str, data: &str) -> Result<Vec<u8>, String> {
    // kubeconfigs sometimes wrap long base64 lines; whitespace is not part of the data.
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .map_err(|e| format!("{what}.{field}: not valid base64: {e}"))
}

/// The settings of the current context: which context, then its cluster, then its user.
fn settings_of(docs: &[(PathBuf, Yaml)]) -> Result<KubeconfigSettings, String> {
    let clusters = entries(docs, "clusters", "cluster")?;
    let users = entries(docs, "users", "user")?;
    let contexts = entries(docs, "contexts", "context")?;
    let current =
        docs.iter().find_map(|(_, d)| d["current-context"].as_str().filter(|s| !s.is_empty())).map(str::to_string);
    let ctx_name = match current {
        Some(c) => c,
        None if contexts.len() == 1 => contexts[0].name.to_string(),
        None => return Err("no current-context is set (and there is not exactly one context to fall back to)".into()),
    };
    let ctx = contexts
        .iter()
        .find(|e| e.name == ctx_name)
        .ok_or_else(|| format!("current-context {ctx_name:?} is not among the contexts"))?;
    let cwhat = format!("context {ctx_name:?}");
    let cluster_name = string(ctx.body, "cluster", &cwhat)?.ok_or_else(|| format!("{cwhat} names no cluster"))?;
    let cluster = clusters
        .iter()
        .find(|e| e.name == cluster_name)
        .ok_or_else(|| format!("{cwhat}: cluster {cluster_name:?} is not among the clusters"))?;
    let user_name = string(ctx.body, "user", &cwhat)?;
    let user = match &user_name {
        None => None,
        Some(u) => Some(
            users.iter().find(|e| e.name == *u).ok_or_else(|| format!("{cwhat}: user {u:?} is not among the users"))?,
        ),
    };

    let mut settings = cluster_settings(&cluster_name, cluster)?;
    if let (Some(user), Some(user_name)) = (user, &user_name) {
        add_credentials(&mut settings, user_name, user)?;
    }
    settings.origin = format!("context {ctx_name:?}");
    Ok(settings)
}

/// The cluster's half of the settings: server, CA, `insecure-skip-tls-verify` and the warnings
/// they call for; no credentials yet.
fn cluster_settings(cluster_name: &str, cluster: &Entry<'_>) -> Result<KubeconfigSettings, String> {
    let mut warnings = Vec::new();
    let what = format!("cluster {cluster_name:?}");
    let c = cluster.body;
    let server = string(c, "server", &what)?.ok_or_else(|| format!("{what} has no server"))?;
    if !(server.starts_with("https://") || server.starts_with("http://")) {
        return Err(format!("{what}.server: {server:?} is not an http:// or https:// URL"));
    }
    let insecure = match &c["insecure-skip-tls-verify"] {
        Yaml::BadValue | Yaml::Null => false,
        Yaml::Boolean(b) => *b,
        _ => return Err(format!("{what}.insecure-skip-tls-verify: not true or false")),
    };
    let ca = match (string(c, "certificate-authority-data", &what)?, string(c, "certificate-authority", &what)?) {
        (Some(d), _) => Some(PemSource::Data(b64(&what, "certificate-authority-data", &d)?)),
        (None, Some(p)) => Some(PemSource::File(path_in(&cluster.dir, p))),
        (None, None) => None,
    };
    if insecure {
        warnings.push(format!(
            "{what} sets insecure-skip-tls-verify: the API server's certificate is NOT verified; \
             anyone on the path can impersonate it"
        ));
        if ca.is_some() {
            warnings.push(format!("{what}: certificate-authority is ignored because insecure-skip-tls-verify is set"));
        }
    }
    for unsupported in ["tls-server-name", "proxy-url"] {
        if string(c, unsupported, &what).ok().flatten().is_some() {
            warnings.push(format!("{what}.{unsupported} is not supported and is ignored"));
        }
    }
    Ok(KubeconfigSettings {
        origin: String::new(),
        server,
        ca,
        insecure,
        token: None,
        token_file: None,
        client_cert: None,
        client_key: None,
        warnings,
    })
}

/// The user's half: a token, a token file or a client certificate and key (plugins and basic
/// authentication are refused by name).
fn add_credentials(settings: &mut KubeconfigSettings, user_name: &str, user: &Entry<'_>) -> Result<(), String> {
    let what = format!("user {user_name:?}");
    let u = user.body;
    if !u["exec"].is_badvalue() && !u["exec"].is_null() {
        let cmd = u["exec"]["command"].as_str().unwrap_or("?");
        return Err(format!(
            "{what} uses an exec credential plugin ({cmd}), which edgeproxy does not support; \
             give it a token, tokenFile or client certificate instead"
        ));
    }
    if !u["auth-provider"].is_badvalue() && !u["auth-provider"].is_null() {
        let name = u["auth-provider"]["name"].as_str().unwrap_or("?");
        return Err(format!(
            "{what} uses the auth-provider plugin {name:?}, which edgeproxy does not support; \
             give it a token, tokenFile or client certificate instead"
        ));
    }
    if string(u, "username", &what)?.is_some() || string(u, "password", &what)?.is_some() {
        return Err(format!("{what}: basic authentication (username/password) is not supported"));
    }
    settings.token = string(u, "token", &what)?.map(|t| Secret::new(t.into_bytes()));
    settings.token_file = string(u, "tokenFile", &what)?.map(|p| path_in(&user.dir, p));
    settings.client_cert = match (string(u, "client-certificate-data", &what)?, string(u, "client-certificate", &what)?)
    {
        (Some(d), _) => Some(PemSource::Data(b64(&what, "client-certificate-data", &d)?)),
        (None, Some(p)) => Some(PemSource::File(path_in(&user.dir, p))),
        (None, None) => None,
    };
    settings.client_key = match (string(u, "client-key-data", &what)?, string(u, "client-key", &what)?) {
        (Some(d), _) => Some(KeySource::Data(Secret::new(b64(&what, "client-key-data", &d)?))),
        (None, Some(p)) => Some(KeySource::File(path_in(&user.dir, p))),
        (None, None) => None,
    };
    if settings.client_cert.is_some() != settings.client_key.is_some() {
        return Err(format!("{what}: client-certificate and client-key go together"));
    }
    Ok(())
}

#[cfg(test)]
#[path = "kubeconfig_tests.rs"]
mod tests;
