//! Who is calling the admin API, and what they may touch.
//!
//! Two admin credentials exist: the static bootstrap token (`auth.admin_token`, a
//! platform administrator without a tenant) and bearer JWTs verified with the configured
//! key (`auth.jwt`), carrying `role` and, for tenant roles, `tenant_id` claims. The filter's
//! ingest credential is a third, separate secret that no admin extractor accepts.
//!
//! Handlers declare what they need by extractor: [`PlatformAdmin`] (tenants, the fleet),
//! [`Manager`] (a tenant's agents and policies), [`AuditReader`] (the audit log, auditors
//! included). Every tenant-scoped query takes [`Principal::scope`]; a resource of another
//! tenant is then simply not found (404), so ids do not leak.

use super::ApiError;
use crate::app::AppState;
use crate::config::{Jwt, JwtAlgorithm};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Every tenant; creates tenants.
    PlatformAdmin,
    /// One tenant's agents and policies, and its audit log.
    Admin,
    /// One tenant's audit log, read only.
    Auditor,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`, or `bootstrap` for the static admin token (for logs and audit).
    pub subject: String,
    pub role: Role,
    /// The caller's tenant; `None` only for platform administrators.
    pub tenant: Option<Uuid>,
}

/// The claims of an admin API JWT. `exp` is required (checked by the verifier).
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    role: Role,
    #[serde(default)]
    tenant_id: Option<Uuid>,
}

// === impl Principal ===

impl Principal {
    /// The tenant every query is limited to; `None` (all tenants) for platform admins.
    pub fn scope(&self) -> Option<Uuid> {
        match self.role {
            Role::PlatformAdmin => None,
            Role::Admin | Role::Auditor => self.tenant,
        }
    }

    /// The tenant a new resource is created in: the caller's own, or for a platform admin
    /// the `tenant_id` of the request. A tenant caller naming another tenant gets the same
    /// answer as for a tenant that does not exist.
    pub fn tenant_for_create(&self, requested: Option<Uuid>) -> Result<Uuid, ApiError> {
        match (self.scope(), requested) {
            (None, Some(tenant)) => Ok(tenant),
            (None, None) => Err(ApiError::field(
                "tenant_id",
                "is required for a platform administrator",
            )),
            (Some(own), None) => Ok(own),
            (Some(own), Some(tenant)) if tenant == own => Ok(own),
            (Some(_), Some(_)) => Err(ApiError::field("tenant_id", "no such tenant")),
        }
    }

    /// Checks a tenant named in a query against the caller's scope: `Some(tenant)` to
    /// filter by, `None` for all (platform admins only). Another tenant is not found.
    pub fn filter_tenant(&self, requested: Option<Uuid>) -> Result<Option<Uuid>, ApiError> {
        match (self.scope(), requested) {
            (None, requested) => Ok(requested),
            (Some(own), None) => Ok(Some(own)),
            (Some(own), Some(tenant)) if tenant == own => Ok(Some(own)),
            (Some(_), Some(_)) => Err(ApiError::NotFound),
        }
    }

    fn bootstrap() -> Self {
        Self {
            subject: "bootstrap".to_owned(),
            role: Role::PlatformAdmin,
            tenant: None,
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let auth = &state.settings.auth;
        if constant_time_eq(token.as_bytes(), auth.admin_token.expose().as_bytes()) {
            return Ok(Principal::bootstrap());
        }
        let verifier = JwtVerifier::from_settings(&auth.jwt)
            .map_err(|problem| ApiError::Internal(format!("jwt settings: {problem}")))?
            .ok_or(ApiError::Unauthorized)?;
        verifier.verify(token)
    }
}

/// A platform administrator: tenants and the Envoy fleet.
pub struct PlatformAdmin(pub Principal);

/// A platform administrator or a tenant admin: agents and policies.
pub struct Manager(pub Principal);

/// Anyone who may read a tenant's audit log: every role, within its tenant. A
/// `tenant_id` in the query string must be the caller's own (platform admins: any), else
/// the request is answered 404, as for a tenant that does not exist.
pub struct AuditReader(pub Principal);

impl FromRequestParts<AppState> for PlatformAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        match principal.role {
            Role::PlatformAdmin => Ok(Self(principal)),
            Role::Admin | Role::Auditor => Err(ApiError::Forbidden(
                "this operation needs the platform-admin role".into(),
            )),
        }
    }
}

impl FromRequestParts<AppState> for Manager {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        match principal.role {
            Role::PlatformAdmin | Role::Admin => Ok(Self(principal)),
            Role::Auditor => Err(ApiError::Forbidden(
                "the auditor role has read-only access to the audit log".into(),
            )),
        }
    }
}

impl FromRequestParts<AppState> for AuditReader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if let Some(own) = principal.scope()
            && !only_tenant(&parts.uri, own)
        {
            return Err(ApiError::NotFound);
        }
        Ok(Self(principal))
    }
}

/// Whether every `tenant_id` of the query string (decoded as the handlers' query
/// extractors decode it) is `own`. A query that does not decode, or a `tenant_id` that is
/// not a UUID, is not.
fn only_tenant(uri: &axum::http::Uri, own: Uuid) -> bool {
    let Ok(axum::extract::Query(pairs)) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
    else {
        return false;
    };
    pairs
        .iter()
        .filter(|(key, _)| key == "tenant_id")
        .all(|(_, value)| Uuid::try_parse(value).is_ok_and(|tenant| tenant == own))
}

/// Verifies admin API JWTs with the configured algorithm and key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

// === impl JwtVerifier ===

impl JwtVerifier {
    /// `Ok(None)` while no key is configured (only the bootstrap token works then); an
    /// error names what is wrong with the settings.
    pub fn from_settings(jwt: &Jwt) -> Result<Option<Self>, String> {
        let (algorithm, key) = match jwt.algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = jwt.secret.expose();
                if secret.is_empty() {
                    return Ok(None);
                }
                if secret.len() < 32 {
                    return Err("the HS256 secret must be at least 32 bytes".into());
                }
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                )
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 => {
                let pem = jwt.public_key_pem.trim();
                if pem.is_empty() {
                    return Ok(None);
                }
                if jwt.algorithm == JwtAlgorithm::Rs256 {
                    let key = DecodingKey::from_rsa_pem(pem.as_bytes())
                        .map_err(|e| format!("public_key_pem is not an RSA public key: {e}"))?;
                    (Algorithm::RS256, key)
                } else {
                    let key = DecodingKey::from_ec_pem(pem.as_bytes())
                        .map_err(|e| format!("public_key_pem is not an EC public key: {e}"))?;
                    (Algorithm::ES256, key)
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = jwt.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if jwt.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[jwt.issuer.as_str()]);
        }
        if jwt.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[jwt.audience.as_str()]);
        }
        Ok(Some(Self { key, validation }))
    }

    /// The principal a token stands for; 401 for a bad signature, a wrong algorithm, an
    /// expired token, or claims that do not make a principal (a tenant role without a
    /// tenant).
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                tracing::debug!(error = %e, "bearer token rejected");
                ApiError::Unauthorized
            })?;
        let claims = data.claims;
        let tenant = match (claims.role, claims.tenant_id) {
            (Role::PlatformAdmin, tenant) => tenant,
            (Role::Admin | Role::Auditor, Some(tenant)) => Some(tenant),
            (Role::Admin | Role::Auditor, None) => return Err(ApiError::Unauthorized),
        };
        Ok(Principal {
            subject: claims.sub.unwrap_or_default(),
            role: claims.role,
            tenant,
        })
    }
}

/// The bearer token of the request; 401 without one.
pub fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn hs256() -> JwtVerifier {
        let jwt = Jwt {
            secret: Secret::new(SECRET),
            ..Jwt::default()
        };
        JwtVerifier::from_settings(&jwt).unwrap().unwrap()
    }

    fn mint(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn exp() -> u64 {
        jsonwebtoken::get_current_timestamp() + 600
    }

    #[test]
    fn tenant_admin_token_is_scoped() {
        let tenant = Uuid::now_v7();
        let token = mint(
            json!({"sub": "alice", "role": "admin", "tenant_id": tenant, "exp": exp()}),
            SECRET,
        );
        let principal = hs256().verify(&token).unwrap();
        assert_eq!(principal.role, Role::Admin);
        assert_eq!(principal.scope(), Some(tenant));
        assert_eq!(principal.filter_tenant(None).unwrap(), Some(tenant));
        assert!(matches!(
            principal.filter_tenant(Some(Uuid::now_v7())),
            Err(ApiError::NotFound)
        ));
        assert!(principal.tenant_for_create(Some(Uuid::now_v7())).is_err());
    }

    #[test]
    fn bad_tokens_are_unauthorized() {
        let tenant = Uuid::now_v7();
        let verifier = hs256();
        for token in [
            // Wrong key.
            mint(
                json!({"role": "admin", "tenant_id": tenant, "exp": exp()}),
                "another-secret-another-secret-xx",
            ),
            // Expired.
            mint(
                json!({"role": "admin", "tenant_id": tenant, "exp": 1_000}),
                SECRET,
            ),
            // No expiry.
            mint(json!({"role": "admin", "tenant_id": tenant}), SECRET),
            // A tenant role without a tenant.
            mint(json!({"role": "auditor", "exp": exp()}), SECRET),
            // An unknown role.
            mint(
                json!({"role": "root", "tenant_id": tenant, "exp": exp()}),
                SECRET,
            ),
            "not.a.jwt".to_owned(),
        ] {
            assert!(
                matches!(verifier.verify(&token), Err(ApiError::Unauthorized)),
                "{token}"
            );
        }
    }

    #[test]
    fn audit_queries_name_only_the_callers_tenant() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let only_a = |query: String| {
            let uri: axum::http::Uri = format!("/api/v1/audit/entries?{query}").parse().unwrap();
            only_tenant(&uri, a)
        };
        assert!(only_a(format!("tenant_id={a}&limit=3")));
        assert!(only_a("limit=3".into()));
        assert!(!only_a(format!("tenant_id={b}")));
        assert!(!only_a(format!("tenant_id={a}&tenant_id={b}")));
        assert!(!only_a("tenant_id=nope".into()));
        // Percent-encoding does not smuggle another tenant past the check.
        let encoded: String = b.to_string().bytes().map(|c| format!("%{c:02X}")).collect();
        assert!(!only_a(format!("tenant%5Fid={encoded}")));
    }

    #[test]
    fn settings_fail_fast() {
        let short = Jwt {
            secret: Secret::new("short"),
            ..Jwt::default()
        };
        assert!(JwtVerifier::from_settings(&short).is_err());
        let bad_pem = Jwt {
            algorithm: JwtAlgorithm::Rs256,
            public_key_pem: "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----".into(),
            ..Jwt::default()
        };
        assert!(JwtVerifier::from_settings(&bad_pem).is_err());
        assert!(
            JwtVerifier::from_settings(&Jwt::default())
                .unwrap()
                .is_none()
        );
    }
}
