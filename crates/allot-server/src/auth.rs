//! Optional bearer-token authentication for `/v1` and `/metrics`.

use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The token requests must present, if any.
#[derive(Clone)]
pub(crate) struct Auth {
    token: Option<Arc<str>>,
}

impl Auth {
    pub(crate) fn new(token: Option<String>) -> Self {
        Auth {
            token: token.map(Arc::from),
        }
    }

    /// Whether `header` (the Authorization value) carries the token.
    /// The comparison takes the same time whatever the bytes (only the
    /// length can tell).
    pub(crate) fn check(&self, header: Option<&[u8]>) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let Some(value) = header else {
            return Err(ApiError::unauthenticated(
                "missing `Authorization: Bearer <token>` header",
            ));
        };
        let given = value
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| value[7..].trim_ascii())
            .ok_or_else(|| {
                ApiError::unauthenticated("the Authorization header must be `Bearer <token>`")
            })?;
        if bool::from(given.ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError::unauthenticated("invalid bearer token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_the_bearer_token() {
        let open = Auth::new(None);
        assert!(open.check(None).is_ok());
        let a = Auth::new(Some("s3cret".into()));
        assert!(a.check(Some(b"Bearer s3cret")).is_ok());
        assert!(a.check(Some(b"bearer s3cret")).is_ok());
        assert!(a.check(None).is_err());
        assert!(a.check(Some(b"Bearer s3cre")).is_err());
        assert!(a.check(Some(b"Bearer s3cretx")).is_err());
        assert!(a.check(Some(b"Basic s3cret")).is_err());
        assert!(a.check(Some(b"Bearer")).is_err());
        assert!(a.check(Some(b"s3cret")).is_err());
    }
}
