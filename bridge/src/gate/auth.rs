//! Device authentication: password hashes, client certificates, and the
//! decision with its CONNACK code.
//!
//! Passwords are never stored in clear: `gate.auth.users` holds Argon2id PHC
//! strings made by `vigil hash-password`. Verification runs on the blocking
//! pool, at most [`MAX_CONCURRENT_VERIFIES`] at a time, so a burst of CONNECTs
//! cannot starve the relay. An unknown username costs the same as a wrong
//! password, so usernames cannot be probed by timing.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tokio::sync::Semaphore;

use super::GateError;
use super::config::{AuthConfig, AuthRequire, User};

/// Password checks running at once.
pub const MAX_CONCURRENT_VERIFIES: usize = 2;

/// Hashes `password` for `gate.auth.users` (Argon2id, random salt, the
/// crate's default cost: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, GateError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| GateError::Auth(format!("cannot hash the password: {e}")))
}

/// What a refused device is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong username or password (3.1.1 code 4, MQTT 5 0x86).
    BadCredentials,
    /// Not allowed: missing credentials or certificate, or CN mismatch
    /// (3.1.1 code 5, MQTT 5 0x87).
    NotAuthorized,
    /// Empty, reserved or unusable client id (3.1.1 code 2, MQTT 5 0x85).
    BadClientId,
    /// The protocol level is not 3.1.1 or 5 (3.1.1 code 1, MQTT 5 0x84).
    BadProtocol,
}

impl Refusal {
    /// The MQTT 3.1.1 CONNACK return code.
    pub fn v4_code(self) -> u8 {
        match self {
            Refusal::BadProtocol => 1,
            Refusal::BadClientId => 2,
            Refusal::BadCredentials => 4,
            Refusal::NotAuthorized => 5,
        }
    }

    /// The MQTT 5 CONNACK reason code.
    pub fn v5_code(self) -> u8 {
        match self {
            Refusal::BadProtocol => 0x84,
            Refusal::BadClientId => 0x85,
            Refusal::BadCredentials => 0x86,
            Refusal::NotAuthorized => 0x87,
        }
    }
}

/// A verified client certificate's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
}

impl PeerCert {
    /// Reads the subject CN of a DER certificate (already verified by rustls).
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("cannot parse the client certificate: {e}"))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        Ok(Self { common_name })
    }
}

/// Checks credentials against the configured accounts.
pub struct Authenticator {
    require: AuthRequire,
    users: HashMap<String, Arc<str>>,
    permits: Arc<Semaphore>,
    require_cn_match: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("require", &self.require)
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

/// Costs an unknown username as much as a known one.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2t8rmr7KCYDYKDbc0ozMB3uq4JkQ4M9iHlHl+QLGbT0";

impl Authenticator {
    /// Validates every hash; an unusable one is an error naming its user.
    pub fn new(config: &AuthConfig, require_cn_match: bool) -> Result<Self, GateError> {
        let mut users = HashMap::new();
        for User {
            username,
            password_hash,
        } in &config.users
        {
            PasswordHash::new(password_hash).map_err(|e| {
                GateError::Auth(format!(
                    "gate.auth.users: the password_hash of `{username}` is not a PHC string ({e}); \
                     make one with `vigil hash-password`"
                ))
            })?;
            if users
                .insert(username.clone(), Arc::from(password_hash.as_str()))
                .is_some()
            {
                return Err(GateError::Auth(format!(
                    "gate.auth.users: `{username}` is listed twice"
                )));
            }
        }
        if matches!(
            config.require,
            AuthRequire::Password | AuthRequire::PasswordAndCertificate
        ) && users.is_empty()
        {
            return Err(GateError::Auth(
                "gate.auth.require asks for a password but gate.auth.users is empty; \
                 add users (hashes from `vigil hash-password`) or change gate.auth.require"
                    .into(),
            ));
        }
        Ok(Self {
            require: config.require,
            users,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_VERIFIES)),
            require_cn_match,
        })
    }

    /// Decides whether a device may connect. `login` is the username and
    /// password it sent; `cert` its verified client certificate, if any.
    pub async fn check(
        &self,
        client_id: &str,
        login: Option<(&str, &str)>,
        cert: Option<&PeerCert>,
    ) -> Result<(), (Refusal, String)> {
        let password = match login {
            Some((user, pass)) => Some(self.verify(user, pass).await),
            None => None,
        };
        if password == Some(false) {
            return Err((
                Refusal::BadCredentials,
                "wrong username or password".to_string(),
            ));
        }
        if self.require_cn_match
            && let Some(cert) = cert
            && cert.common_name.as_deref() != Some(client_id)
        {
            return Err((
                Refusal::NotAuthorized,
                format!(
                    "client certificate CN {:?} does not match the client id (gate.tls.require_cn_match)",
                    cert.common_name.as_deref().unwrap_or("")
                ),
            ));
        }
        let has_password = password == Some(true);
        let has_cert = cert.is_some();
        let ok = match self.require {
            AuthRequire::None => true,
            AuthRequire::Password => has_password,
            AuthRequire::Certificate => has_cert,
            AuthRequire::PasswordOrCertificate => has_password || has_cert,
            AuthRequire::PasswordAndCertificate => has_password && has_cert,
        };
        if ok {
            Ok(())
        } else {
            let missing = match (self.require, has_password, has_cert) {
                (AuthRequire::Certificate, _, _) => "no client certificate",
                (AuthRequire::Password, _, _) => "no username and password",
                (AuthRequire::PasswordAndCertificate, true, false) => "no client certificate",
                (AuthRequire::PasswordAndCertificate, false, _) => "no username and password",
                _ => "neither a password nor a client certificate",
            };
            Err((
                Refusal::NotAuthorized,
                format!("{missing} (gate.auth.require = {:?})", self.require),
            ))
        }
    }

    async fn verify(&self, user: &str, pass: &str) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.clone(), true),
            None => (Arc::from(DUMMY_HASH), false),
        };
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return false;
        };
        let pass = zeroize::Zeroizing::new(pass.to_string());
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|parsed| {
                argon2::Argon2::default()
                    .verify_password(pass.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        ok && known
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(require: AuthRequire, cn: bool) -> Authenticator {
        let hash = hash_password("s3cret").unwrap();
        let config = AuthConfig {
            require,
            users: vec![User {
                username: "monitor".into(),
                password_hash: hash,
            }],
        };
        Authenticator::new(&config, cn).unwrap()
    }

    #[tokio::test]
    async fn passwords() {
        let a = auth(AuthRequire::Password, false);
        assert!(
            a.check("d", Some(("monitor", "s3cret")), None)
                .await
                .is_ok()
        );
        let (r, _) = a
            .check("d", Some(("monitor", "nope")), None)
            .await
            .unwrap_err();
        assert_eq!((r.v4_code(), r.v5_code()), (4, 0x86));
        let (r, _) = a
            .check("d", Some(("nobody", "s3cret")), None)
            .await
            .unwrap_err();
        assert_eq!(r, Refusal::BadCredentials);
        let (r, why) = a.check("d", None, None).await.unwrap_err();
        assert_eq!((r.v4_code(), r.v5_code()), (5, 0x87));
        assert!(why.contains("no username"), "{why}");
    }

    #[tokio::test]
    async fn certificates_and_cn() {
        let cert = PeerCert {
            common_name: Some("bed-1".into()),
        };
        let a = auth(AuthRequire::Certificate, true);
        assert!(a.check("bed-1", None, Some(&cert)).await.is_ok());
        let (r, why) = a.check("bed-2", None, Some(&cert)).await.unwrap_err();
        assert_eq!(r, Refusal::NotAuthorized);
        assert!(why.contains("CN"), "{why}");
        assert!(a.check("bed-1", None, None).await.is_err());
        let a = auth(AuthRequire::PasswordOrCertificate, false);
        assert!(a.check("x", None, Some(&cert)).await.is_ok());
        assert!(
            a.check("x", Some(("monitor", "s3cret")), None)
                .await
                .is_ok()
        );
        assert!(a.check("x", None, None).await.is_err());
        let a = auth(AuthRequire::PasswordAndCertificate, false);
        assert!(
            a.check("x", Some(("monitor", "s3cret")), None)
                .await
                .is_err()
        );
        assert!(
            a.check("x", Some(("monitor", "s3cret")), Some(&cert))
                .await
                .is_ok()
        );
        let a = auth(AuthRequire::None, false);
        assert!(a.check("x", None, None).await.is_ok());
        assert!(a.check("x", Some(("monitor", "bad")), None).await.is_err());
    }

    #[test]
    fn bad_hashes_name_the_user() {
        let config = AuthConfig {
            require: AuthRequire::Password,
            users: vec![User {
                username: "pump-3".into(),
                password_hash: "hunter2".into(),
            }],
        };
        let e = Authenticator::new(&config, false).unwrap_err().to_string();
        assert!(
            e.contains("pump-3") && e.contains("vigil hash-password"),
            "{e}"
        );
        let e = Authenticator::new(
            &AuthConfig {
                require: AuthRequire::Password,
                users: vec![],
            },
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("users is empty"), "{e}");
    }

    #[test]
    fn dummy_hash_parses() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }
}
