//! JWTs for `/rest/v1`, as PostgREST takes them: HS256 tokens signed with the configured
//! secret (`[api] jwt_secret_env`), whose `role` claim names the Postgres role the request's
//! query runs as; a request without one runs as `anon_role`.
//!
//! Only HS256 is accepted (a token naming `none` or another algorithm is refused, whatever
//! its signature); `exp` and `nbf` are checked when present. The signature is checked with
//! aws-lc-rs' constant-time HMAC verification. No token or claim is ever logged.

use base64::Engine as _;
use lakesync_engine::config::JwtSettings;
use lakesync_postgres::query::Role;
use serde_json::Value;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a token was refused (PostgREST's codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// PGRST301: not a valid token for this secret.
    Invalid(&'static str),
    /// PGRST303: past its `exp`.
    Expired,
    /// PGRST302: no token and no anonymous role.
    AnonymousDisabled,
}

/// The role `token` (or, without one, the anonymous role) runs as.
pub fn role(settings: &JwtSettings, token: Option<&str>, now_s: i64) -> Result<Role, JwtError> {
    let Some(token) = token else {
        return settings.anon_role.clone().map(|name| Role { name, claims: None }).ok_or(JwtError::AnonymousDisabled);
    };
    let claims = verify(settings.secret.expose().as_bytes(), token, now_s)?;
    let name = match claims.get("role") {
        Some(Value::String(r)) if !r.is_empty() => r.clone(),
        Some(_) => return Err(JwtError::Invalid("the role claim is not a string")),
        None => settings.anon_role.clone().ok_or(JwtError::Invalid("the token has no role claim"))?,
    };
    Ok(Role { name, claims: Some(Value::Object(claims).to_string()) })
}

/// The claims of `token` if it is an HS256 JWT signed with `secret` and valid at `now_s`.
pub fn verify(secret: &[u8], token: &str, now_s: i64) -> Result<serde_json::Map<String, Value>, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Invalid("not a JWT (three base64url parts)"));
    };
    let decode = |part: &str| B64.decode(part.trim_end_matches('=')).map_err(|_| JwtError::Invalid("bad base64url"));
    let head: Value = serde_json::from_slice(&decode(header)?).map_err(|_| JwtError::Invalid("bad header"))?;
    if head.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(JwtError::Invalid("the algorithm is not HS256"));
    }
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let signed = &token[..header.len() + 1 + payload.len()];
    aws_lc_rs::hmac::verify(&key, signed.as_bytes(), &decode(signature)?)
        .map_err(|_| JwtError::Invalid("the signature does not match the secret"))?;
    let claims: serde_json::Map<String, Value> =
        serde_json::from_slice(&decode(payload)?).map_err(|_| JwtError::Invalid("the claims are not a JSON object"))?;
    let time =
        |name: &str| claims.get(name).map(|v| v.as_f64().ok_or(JwtError::Invalid("a time claim is not a number")));
    if let Some(exp) = time("exp").transpose()? {
        if (now_s as f64) >= exp {
            return Err(JwtError::Expired);
        }
    }
    if let Some(nbf) = time("nbf").transpose()? {
        if (now_s as f64) < nbf {
            return Err(JwtError::Invalid("the token is not valid yet (nbf)"));
        }
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HS256 token of `claims`, signed with `secret`.
    pub fn sign(secret: &[u8], claims: &Value) -> String {
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = B64.encode(claims.to_string());
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
        let tag = aws_lc_rs::hmac::sign(&key, format!("{header}.{payload}").as_bytes());
        format!("{header}.{payload}.{}", B64.encode(tag.as_ref()))
    }

    #[test]
    fn a_token_is_taken_only_when_signed_with_the_secret_hs256_and_in_time() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let token = sign(secret, &serde_json::json!({"role": "app_user", "exp": 2000, "sub": "u1"}));
        assert_eq!(verify(secret, &token, 1000).unwrap()["role"], "app_user");
        assert_eq!(verify(secret, &token, 2000), Err(JwtError::Expired));
        assert!(matches!(verify(b"another secret, also 32 bytes long", &token, 1000), Err(JwtError::Invalid(_))));
        // Claims changed after signing.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64.encode(r#"{"role":"postgres"}"#);
        parts[1] = &forged;
        assert!(matches!(verify(secret, &parts.join("."), 1000), Err(JwtError::Invalid(_))));
        // `alg: none` is refused whatever follows.
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), B64.encode(r#"{"role":"postgres"}"#));
        assert_eq!(verify(secret, &none, 1000), Err(JwtError::Invalid("the algorithm is not HS256")));
        let nbf = sign(secret, &serde_json::json!({"role": "r", "nbf": 5000}));
        assert!(matches!(verify(secret, &nbf, 1000), Err(JwtError::Invalid(_))));
    }

    #[test]
    fn the_role_claim_or_the_anonymous_role_decides() {
        let secret = "0123456789abcdef0123456789abcdef";
        let settings = JwtSettings {
            secret: lakesync_engine::config::Secret::new(secret.into()),
            anon_role: Some("web_anon".into()),
        };
        assert_eq!(role(&settings, None, 0).unwrap(), Role { name: "web_anon".into(), claims: None });
        let token = sign(secret.as_bytes(), &serde_json::json!({"role": "app_user"}));
        assert_eq!(role(&settings, Some(&token), 0).unwrap().name, "app_user");
        let closed = JwtSettings { anon_role: None, ..settings };
        assert_eq!(role(&closed, None, 0), Err(JwtError::AnonymousDisabled));
    }
}
