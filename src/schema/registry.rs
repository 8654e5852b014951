//! Writer schemas by id: a Confluent Schema Registry client and a file-backed source, behind one cache.
//!
//! Errors are split by what the caller should do: [`RegistryError::NotFound`] is a property of the
//! record (it goes to the dead-letter topic as `unknown_schema`); everything else is the registry's
//! problem and is retried, never blamed on the record.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::RwLock;

use crate::config::{RegistryAccess, RegistryAuth, RegistrySource};
use crate::schema::references;

/// A registry answer larger than this is refused (schemas are kilobytes; this bounds memory).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// At most this many schemas are fetched to resolve one schema's references (a hostile or broken
/// registry cannot make a replica fetch without end).
const MAX_REFERENCED_SCHEMAS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry says the id does not exist (HTTP 404, error code 40403) or no file holds it.
    #[error("schema id {id} not found: {message}")]
    NotFound { id: u32, message: String },
    /// The schema exists but is not Avro (e.g. PROTOBUF or JSON).
    #[error("schema id {id} has type {schema_type}, only AVRO is supported")]
    NotAvro { id: u32, schema_type: String },
    /// The registry has no such subject or version (404 with 40401 or 40402).
    #[error("subject {subject:?} not found: {message}")]
    SubjectNotFound { subject: String, message: String },
    /// The operation needs a Confluent registry (a folder of `<id>.avsc` files has no subjects).
    #[error("{0} needs a Confluent schema registry, not a folder of schema files")]
    NoSubjects(&'static str),
    /// Network error, timeout, 5xx or throttling: try again later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The client cannot be built from its settings (a CA or key file that is not PEM): names the
    /// variable; fails start-up.
    #[error("{0}")]
    Setup(String),
    /// Any other refusal (bad credentials, malformed answer): retried, but needs an operator.
    #[error("schema registry answered HTTP {status} (error code {code:?}): {message}")]
    Unexpected {
        status: u16,
        code: Option<i64>,
        message: String,
    },
}

impl RegistryError {
    /// Every value of [`Self::kind`].
    pub const KINDS: [&'static str; 7] = [
        "not_found",
        "not_avro",
        "subject_not_found",
        "no_subjects",
        "setup",
        "unavailable",
        "unexpected",
    ];

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::NotFound { .. } => "not_found",
            RegistryError::NotAvro { .. } => "not_avro",
            RegistryError::SubjectNotFound { .. } => "subject_not_found",
            RegistryError::NoSubjects(_) => "no_subjects",
            RegistryError::Setup(_) => "setup",
            RegistryError::Unavailable(_) => "unavailable",
            RegistryError::Unexpected { .. } => "unexpected",
        }
    }

    /// Whether waiting and asking again can help. Record-level errors are not retryable.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            RegistryError::NotFound { .. }
                | RegistryError::NotAvro { .. }
                | RegistryError::SubjectNotFound { .. }
                | RegistryError::NoSubjects(_)
                | RegistryError::Setup(_)
        )
    }
}

/// Confluent's `GET /schemas/ids/{id}` answer.
#[derive(serde::Deserialize)]
struct SchemaResponse {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

/// A named type the schema uses that lives in another subject.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Reference {
    /// The type's full name as the schema uses it.
    pub name: String,
    pub subject: String,
    pub version: i32,
}

/// Confluent's `GET /subjects/{subject}/versions/{version}` answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SubjectVersion {
    pub subject: String,
    pub version: i32,
    pub id: u32,
    pub schema: String,
    #[serde(rename = "schemaType", default)]
    pub schema_type: Option<String>,
    /// As the registry gave them; [`ConfluentClient::version`] has already written the referenced
    /// types into `schema`.
    #[serde(default)]
    pub references: Vec<Reference>,
}

/// Confluent's error body, e.g. `{"error_code": 40403, "message": "Schema not found"}`.
#[derive(serde::Deserialize)]
struct ErrorResponse {
    error_code: Option<i64>,
    message: Option<String>,
}

/// A Confluent Schema Registry REST client (only what Strata needs).
pub struct ConfluentClient {
    base_url: String,
    auth: RegistryAuth,
    http: reqwest::Client,
    /// Referenced subject versions (immutable once registered), by (subject, version).
    referenced: Mutex<HashMap<(String, i32), Arc<SubjectVersion>>>,
}

/// A PEM file's bytes, or a setup error naming the variable.
fn read_pem(var: &str, path: &Path) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path)
        .map_err(|e| RegistryError::Setup(format!("{var}={}: cannot read it: {e}", path.display())))
}

impl ConfluentClient {
    /// A client without credentials or TLS settings of its own (the system's trust store).
    pub fn new(base_url: &str) -> Result<Self, RegistryError> {
        Self::with_access(base_url, &RegistryAccess::default())
    }

    /// A client with the credentials and TLS material of `access`, read and checked now.
    pub fn with_access(base_url: &str, access: &RegistryAccess) -> Result<Self, RegistryError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5));
        if let Some(ca) = &access.ca_location {
            const VAR: &str = "STRATA_SCHEMA_REGISTRY_SSL_CA_LOCATION";
            let certificates = reqwest::Certificate::from_pem_bundle(&read_pem(VAR, ca)?)
                .map_err(|e| RegistryError::Setup(format!("{VAR}={}: {e}", ca.display())))?;
            if certificates.is_empty() {
                return Err(RegistryError::Setup(format!(
                    "{VAR}={}: no PEM certificate in it",
                    ca.display()
                )));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let Some((certificate, key)) = &access.identity {
            let mut pem = read_pem(
                "STRATA_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION",
                certificate,
            )?;
            pem.push(b'\n');
            pem.extend(read_pem("STRATA_SCHEMA_REGISTRY_SSL_KEY_LOCATION", key)?);
            // The error names the files, never their content.
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                RegistryError::Setup(format!(
                    "STRATA_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION={} with \
                     STRATA_SCHEMA_REGISTRY_SSL_KEY_LOCATION={}: not a PEM certificate and \
                     unencrypted private key ({e})",
                    certificate.display(),
                    key.display()
                ))
            })?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(|e| {
            RegistryError::Setup(format!("building the registry's HTTP client: {e}"))
        })?;
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            auth: access.auth.clone(),
            http,
            referenced: Mutex::new(HashMap::new()),
        })
    }

    /// `GET path` with the registry's media type and auth; returns the status and a bounded body.
    async fn get(&self, path: &str) -> Result<(u16, Vec<u8>), RegistryError> {
        let url = format!("{}{path}", self.base_url);
        let mut request = self
            .http
            .get(&url)
            .header("Accept", "application/vnd.schemaregistry.v1+json");
        request = match &self.auth {
            RegistryAuth::None => request,
            // `user:password`; a bare user has an empty password.
            RegistryAuth::Basic(user_info) => match user_info.expose().split_once(':') {
                Some((user, password)) => request.basic_auth(user, Some(password)),
                None => request.basic_auth(user_info.expose(), Some("")),
            },
            RegistryAuth::Bearer(token) => request.bearer_auth(token.expose()),
        };
        let mut response = request
            .send()
            .await
            .map_err(|e| RegistryError::Unavailable(describe_send_error(&e)))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?
        {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(RegistryError::Unexpected {
                    status,
                    code: None,
                    message: format!("answer larger than {MAX_RESPONSE_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }

    /// A 200 answer parsed as `T`, or the error its status and body mean. `not_found` builds the
    /// error for a 404 (a record-level or subject-level fact, never retried).
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        not_found: impl FnOnce(String) -> RegistryError,
    ) -> Result<T, RegistryError> {
        let (status, body) = self.get(path).await?;
        if status == 200 {
            return serde_json::from_slice(&body).map_err(|e| RegistryError::Unexpected {
                status,
                code: None,
                message: format!("malformed answer to {path}: {e}"),
            });
        }
        let error: Option<ErrorResponse> = serde_json::from_slice(&body).ok();
        let code = error.as_ref().and_then(|e| e.error_code);
        let message = error
            .and_then(|e| e.message)
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned());
        match (status, code) {
            // 40401 subject, 40402 version, 40403 schema not found.
            (404, Some(40401..=40403)) | (404, None) => Err(not_found(message)),
            (408 | 429, _) | (500..=599, _) => Err(RegistryError::Unavailable(format!(
                "HTTP {status}: {message}"
            ))),
            _ => Err(RegistryError::Unexpected {
                status,
                code,
                message,
            }),
        }
    }

    pub async fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        let parsed: SchemaResponse = self
            .get_json(&format!("/schemas/ids/{id}"), |message| {
                RegistryError::NotFound { id, message }
            })
            .await?;
        match parsed.schema_type.as_deref() {
            None | Some("AVRO") => {}
            Some(other) => {
                return Err(RegistryError::NotAvro {
                    id,
                    schema_type: other.to_string(),
                })
            }
        }
        self.resolve(parsed.schema, &parsed.references)
            .await
            .map_err(|e| match e {
                // A writer whose referenced subject is gone cannot be read: the record's fault.
                RegistryError::SubjectNotFound { message, .. } => {
                    RegistryError::NotFound { id, message }
                }
                other => other,
            })
    }

    /// `schema` with the named types of its references (and theirs, recursively) written into it.
    async fn resolve(
        &self,
        schema: String,
        references: &[Reference],
    ) -> Result<String, RegistryError> {
        if references.is_empty() {
            return Ok(schema);
        }
        let mut library = HashMap::new();
        let mut seen = HashSet::new();
        let mut pending: Vec<Reference> = references.to_vec();
        while let Some(reference) = pending.pop() {
            if !seen.insert((reference.subject.clone(), reference.version)) {
                continue;
            }
            if seen.len() > MAX_REFERENCED_SCHEMAS {
                return Err(RegistryError::Unexpected {
                    status: 200,
                    code: None,
                    message: format!("more than {MAX_REFERENCED_SCHEMAS} referenced schemas"),
                });
            }
            let found = self.referenced_version(&reference).await?;
            let types =
                references::named_types(&found.schema).map_err(|e| RegistryError::Unexpected {
                    status: 200,
                    code: None,
                    message: format!(
                        "referenced subject {:?} version {}: {e}",
                        reference.subject, reference.version
                    ),
                })?;
            for (name, definition) in types {
                match library.get(&name) {
                    Some(existing) if existing != &definition => {
                        return Err(RegistryError::Unexpected {
                            status: 200,
                            code: None,
                            message: format!(
                                "named type {name} is defined differently by two referenced schemas"
                            ),
                        })
                    }
                    _ => {
                        library.insert(name, definition);
                    }
                }
            }
            pending.extend(found.references.iter().cloned());
        }
        references::inline(&schema, &library).map_err(|e| RegistryError::Unexpected {
            status: 200,
            code: None,
            message: format!("schema with references: {e}"),
        })
    }

    /// A referenced subject version as registered (its own references not yet written in),
    /// cached: a registered version never changes.
    async fn referenced_version(
        &self,
        reference: &Reference,
    ) -> Result<Arc<SubjectVersion>, RegistryError> {
        let key = (reference.subject.clone(), reference.version);
        let cached = self
            .referenced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        if let Some(hit) = cached {
            return Ok(hit);
        }
        // Confluent's API takes -1 for the newest version; that one is not cached.
        let found: SubjectVersion = self
            .get_subject_version(&reference.subject, &reference.version.to_string())
            .await?;
        let found = Arc::new(found);
        if reference.version >= 0 {
            self.referenced
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, found.clone());
        }
        Ok(found)
    }

    /// `GET /subjects`: every subject name.
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        self.get_json("/subjects", |message| RegistryError::Unexpected {
            status: 404,
            code: None,
            message,
        })
        .await
    }

    /// `GET /subjects/{subject}/versions`: the subject's version numbers, oldest first.
    pub async fn versions(&self, subject: &str) -> Result<Vec<i32>, RegistryError> {
        let path = format!("/subjects/{}/versions", encode_segment(subject));
        self.get_json(&path, |message| RegistryError::SubjectNotFound {
            subject: subject.to_string(),
            message,
        })
        .await
    }

    /// `GET /subjects/{subject}/versions/{version}` (`version` is a number or `latest`), with
    /// the types of its references written into its schema.
    pub async fn version(
        &self,
        subject: &str,
        version: &str,
    ) -> Result<SubjectVersion, RegistryError> {
        let mut found = self.get_subject_version(subject, version).await?;
        found.schema = self
            .resolve(std::mem::take(&mut found.schema), &found.references)
            .await
            .map_err(|e| match e {
                // A missing *referenced* subject is not this subject missing: the version exists
                // and cannot be read (`schemas check` must not take it for a new subject).
                RegistryError::SubjectNotFound { subject, message } => RegistryError::Unexpected {
                    status: 404,
                    code: None,
                    message: format!("referenced subject {subject:?}: {message}"),
                },
                other => other,
            })?;
        Ok(found)
    }

    /// `GET /subjects/{subject}/versions/{version}` as the registry answers it.
    async fn get_subject_version(
        &self,
        subject: &str,
        version: &str,
    ) -> Result<SubjectVersion, RegistryError> {
        let path = format!(
            "/subjects/{}/versions/{}",
            encode_segment(subject),
            encode_segment(version)
        );
        let parsed: SubjectVersion = self
            .get_json(&path, |message| RegistryError::SubjectNotFound {
                subject: subject.to_string(),
                message,
            })
            .await?;
        match parsed.schema_type.as_deref() {
            None | Some("AVRO") => Ok(parsed),
            Some(other) => Err(RegistryError::NotAvro {
                id: parsed.id,
                schema_type: other.to_string(),
            }),
        }
    }
}

/// A failed request in words an operator can act on: TLS trust and certificate problems are
/// named as such (reqwest's top-level message only says "error sending request").
fn describe_send_error(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    let lower = text.to_ascii_lowercase();
    if lower.contains("unknownissuer") || lower.contains("invalid peer certificate") {
        format!("TLS: the registry's certificate is not trusted (STRATA_SCHEMA_REGISTRY_SSL_CA_LOCATION): {text}")
    } else if lower.contains("certificate") || lower.contains("handshake") || lower.contains("tls")
    {
        format!("TLS handshake with the registry failed: {text}")
    } else {
        text
    }
}

/// One path segment, percent-encoded (subject names may hold any character).
fn encode_segment(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Schemas as files `<dir>/<id>.avsc`: the demo and air-gapped deployments.
pub struct DirectorySource {
    dir: PathBuf,
}

impl DirectorySource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub async fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        let path = self.dir.join(format!("{id}.avsc"));
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(RegistryError::NotFound {
                id,
                message: format!("no file {}", path.display()),
            }),
            Err(e) => Err(RegistryError::Unavailable(format!(
                "reading {}: {e}",
                path.display()
            ))),
        }
    }
}

enum Source {
    Confluent(ConfluentClient),
    Directory(DirectorySource),
}

/// Writer schemas by id with a cache: a schema id is immutable in a registry, so an answer is kept forever.
pub struct SchemaRegistry {
    source: Source,
    cache: RwLock<HashMap<u32, Arc<str>>>,
}

impl SchemaRegistry {
    pub fn from_config(source: &RegistrySource) -> Result<Self, RegistryError> {
        let source = match source {
            RegistrySource::Confluent { url, access } => {
                Source::Confluent(ConfluentClient::with_access(url, access)?)
            }
            RegistrySource::Directory(dir) => Source::Directory(DirectorySource::new(dir)),
        };
        Ok(Self {
            source,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// One attempt: the cached schema, or one request to the source.
    pub async fn schema_by_id(&self, id: u32) -> Result<Arc<str>, RegistryError> {
        if let Some(hit) = self.cache.read().await.get(&id) {
            return Ok(hit.clone());
        }
        let text: Arc<str> = match &self.source {
            Source::Confluent(client) => client.schema_by_id(id).await?,
            Source::Directory(dir) => dir.schema_by_id(id).await?,
        }
        .into();
        self.cache.write().await.insert(id, text.clone());
        Ok(text)
    }

    fn confluent(&self, what: &'static str) -> Result<&ConfluentClient, RegistryError> {
        match &self.source {
            Source::Confluent(client) => Ok(client),
            Source::Directory(_) => Err(RegistryError::NoSubjects(what)),
        }
    }

    /// The subject's newest version (never cached: it is how new versions are found).
    pub async fn latest(&self, subject: &str) -> Result<SubjectVersion, RegistryError> {
        let found = self
            .confluent("STRATA_READER_SCHEMA=latest")?
            .version(subject, "latest")
            .await?;
        self.cache
            .write()
            .await
            .insert(found.id, found.schema.as_str().into());
        Ok(found)
    }

    /// Every version of a subject, oldest first (for `strata schemas check`).
    pub async fn all_versions(&self, subject: &str) -> Result<Vec<SubjectVersion>, RegistryError> {
        let client = self.confluent("listing subject versions")?;
        let mut out = Vec::new();
        for version in client.versions(subject).await? {
            out.push(client.version(subject, &version.to_string()).await?);
        }
        Ok(out)
    }

    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        self.confluent("listing subjects")?.subjects().await
    }
}
