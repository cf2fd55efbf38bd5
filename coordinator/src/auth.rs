//! Tokens: HS256 JWTs carrying [`Claims`], the secret they are signed with, and the axum
//! extractor that turns an `Authorization: Bearer` header into a checked caller.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use tabgrid_shared::claims::{Claims, Role};

use crate::error::ApiError;
use crate::server::AppState;

/// Name of the secret file created in the data dir on a first start.
pub const SECRET_FILE: &str = "jwt-secret";

/// The signing secret. Wrapped so it never reaches a log.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// The secret as text (as it is stored).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// A fresh random secret (256 bits, hex).
    pub fn generate() -> Secret {
        let bytes: [u8; 32] = rand::random();
        Secret(
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes(),
        )
    }

    /// The secret from `TABGRID_JWT_SECRET` if given, else the data dir's file, created on
    /// a first start. Returns whether it was just created (so the caller prints an admin
    /// token once).
    pub fn load_or_create(env: Option<String>, data_dir: &Path) -> anyhow::Result<(Secret, bool)> {
        if let Some(value) = env.filter(|v| !v.is_empty()) {
            return Ok((Secret(value.into_bytes()), false));
        }
        let path = data_dir.join(SECRET_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let trimmed = String::from_utf8_lossy(&bytes).trim().to_owned();
                anyhow::ensure!(!trimmed.is_empty(), "{} is empty", path.display());
                Ok((Secret(trimmed.into_bytes()), false))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("creating data dir {}", data_dir.display()))?;
                let secret = Secret::generate();
                crate::files::write_atomic(&path, &secret.0, true)
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok((secret, true))
            }
            Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// Signs and checks tokens.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing bearer token: send `Authorization: Bearer <JWT>`")]
    Missing,
    #[error("token has expired")]
    Expired,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is malformed: {0}")]
    Malformed(String),
}

impl Keys {
    pub fn new(secret: &Secret) -> Keys {
        Keys {
            encoding: EncodingKey::from_secret(&secret.0),
            decoding: DecodingKey::from_secret(&secret.0),
        }
    }

    /// Mints a token for `subject` with `role`, valid for `ttl`.
    pub fn mint(&self, subject: &str, role: Role, ttl: Duration) -> String {
        let now = unix_now();
        let claims = Claims {
            sub: subject.to_owned(),
            role,
            exp: now + ttl.as_secs().max(1),
            iat: now,
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims (tests mint expired tokens this way).
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// Checks signature, algorithm and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|err| {
                use jsonwebtoken::errors::ErrorKind;
                match err.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::InvalidSignature => TokenError::BadSignature,
                    _ => TokenError::Malformed(err.to_string()),
                }
            })
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A caller whose token checked out.
#[derive(Clone, Debug)]
pub struct Caller(pub Claims);

impl Caller {
    /// Refuses callers whose role is not among `roles`.
    pub fn require(&self, roles: &[Role], what: &str) -> Result<(), ApiError> {
        if roles.contains(&self.0.role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "role {} may not {what}",
                self.0.role.name()
            )))
        }
    }

    pub fn is_admin(&self) -> bool {
        self.0.role == Role::Admin
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let result = match bearer(&parts.headers) {
            None => Err(TokenError::Missing),
            Some(token) => state.keys.verify(token),
        };
        result.map(Caller).map_err(|err| {
            state.grid.metrics().auth_failure();
            ApiError::Unauthorized(err.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_verify_and_refuse() {
        let keys = Keys::new(&Secret::new("s3cret"));
        let token = keys.mint("ada", Role::Submitter, Duration::from_secs(60));
        let claims = keys.verify(&token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.role), ("ada", Role::Submitter));

        let other = Keys::new(&Secret::new("other"));
        assert_eq!(other.verify(&token), Err(TokenError::BadSignature));

        let expired = keys.sign(&Claims {
            sub: "ada".into(),
            role: Role::Admin,
            exp: unix_now() - 3600,
            iat: 0,
        });
        assert_eq!(keys.verify(&expired), Err(TokenError::Expired));
        assert!(matches!(keys.verify("nope"), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn secret_is_created_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = Secret::load_or_create(None, dir.path()).unwrap();
        assert!(created);
        let (again, created) = Secret::load_or_create(None, dir.path()).unwrap();
        assert!(!created);
        assert_eq!(first.0, again.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (env, created) = Secret::load_or_create(Some("x".into()), dir.path()).unwrap();
        assert!(!created);
        assert_eq!(env.0, b"x");
    }
}
