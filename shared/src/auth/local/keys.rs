//! The embedded issuer's RS256 key: created once in the data dir, read by every process that
//! shares it, and served as a JWKS to the verifier.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use sha2::{Digest, Sha256};

use crate::auth::{Claims, JwksSource};
use crate::{Error, Result};

const KEY_FILE: &str = "jwt-signing.pem";

/// The signing key and its public JWKS.
pub struct SigningKey {
    encoding: EncodingKey,
    kid: String,
    jwks: serde_json::Value,
}

impl SigningKey {
    /// Loads the key from `dir`, creating it first if there is none. Two processes starting
    /// together agree on one key: the file is published with a hard link, which fails if
    /// another process got there first, and then that key is read.
    pub fn load_or_create(dir: &Path) -> Result<SigningKey> {
        crate::private_fs::private_dir(dir)?;
        let path = dir.join(KEY_FILE);
        if !path.exists() {
            let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| Error::internal("generating the signing key", e))?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| Error::internal("encoding the signing key", e))?;
            let tmp = dir.join(format!("{KEY_FILE}.{}", uuid::Uuid::new_v4().simple()));
            write_private(&tmp, pem.as_bytes())?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
        }
        Self::from_pem(&std::fs::read_to_string(&path)?)
    }

    fn from_pem(pem: &str) -> Result<SigningKey> {
        let key = RsaPrivateKey::from_pkcs8_pem(pem)
            .map_err(|e| Error::config("signing key is not a PKCS#8 RSA key", e))?;
        let n = URL_SAFE_NO_PAD.encode(key.n().to_bytes_be());
        let e = URL_SAFE_NO_PAD.encode(key.e().to_bytes_be());
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(n.as_bytes()))[..16].to_string();
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|e| Error::config("signing key", e))?;
        let jwks = serde_json::json!({
            "keys": [{ "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": n, "e": e }]
        });
        Ok(SigningKey {
            encoding,
            kid,
            jwks,
        })
    }

    /// The public keys as a JSON Web Key Set document.
    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn sign(&self, claims: &Claims) -> Result<String> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| Error::internal("signing a token", e))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)?.write_all(bytes)?;
    Ok(())
}

/// Serves the key set of the key file in a directory; rereads it on every fetch so that a key
/// replaced on disk is picked up on the next unknown `kid`.
pub struct KeyDirJwks {
    pub dir: PathBuf,
}

#[async_trait]
impl JwksSource for KeyDirJwks {
    async fn fetch(&self) -> Result<JwkSet> {
        let dir = self.dir.clone();
        let key = tokio::task::spawn_blocking(move || SigningKey::load_or_create(&dir))
            .await
            .map_err(|e| Error::internal("loading the signing key", e))??;
        Ok(serde_json::from_value(key.jwks.clone())?)
    }
}
