//! The PEM files metroctl keeps, PKCS#8 keys for etcd, and certificate fingerprints.

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use crate::IdentityError;

/// PEM block type of the owner key file (`owner-key.pem`), as upstream metroctl writes it.
pub const OWNER_KEY_PEM_TYPE: &str = "METROPOLIS INITIAL OWNER PRIVATE KEY";
/// PEM block type of certificates (`owner.pem`, `ca.pem`).
pub const CERTIFICATE_PEM_TYPE: &str = "CERTIFICATE";
/// PEM block type of PKCS#8 private keys ([`encode_pkcs8_key_pem`]).
pub const PKCS8_KEY_PEM_TYPE: &str = "PRIVATE KEY";

/// Unix line endings: the pem crate defaults to CRLF, which upstream (Go) never writes.
fn encode(tag: &str, contents: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, contents),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Parses the first PEM block of `input`, requiring type `expected`.
fn decode(input: &str, expected: &'static str) -> Result<Vec<u8>, IdentityError> {
    let block = pem::parse(input).map_err(|e| IdentityError::Pem(e.to_string()))?;
    if block.tag() != expected {
        return Err(IdentityError::WrongPemType {
            expected,
            found: block.tag().to_string(),
        });
    }
    Ok(block.into_contents())
}

/// Encodes an owner key as upstream metroctl stores it: the 32-byte seed followed by the
/// 32-byte public key (Go's `ed25519.PrivateKey` layout) in a
/// `METROPOLIS INITIAL OWNER PRIVATE KEY` block.
pub fn encode_owner_key_pem(key: &SigningKey) -> String {
    encode(OWNER_KEY_PEM_TYPE, &key.to_keypair_bytes())
}

/// Decodes an owner key written by [`encode_owner_key_pem`] or by upstream metroctl.
///
/// Rejects other block types, other lengths, and a public half that is not the public key of
/// the seed (a corrupt file would otherwise produce credentials for some other key).
pub fn decode_owner_key_pem(input: &str) -> Result<SigningKey, IdentityError> {
    let bytes = decode(input, OWNER_KEY_PEM_TYPE)?;
    let bytes: [u8; 64] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| IdentityError::WrongKeyLength(bytes.len()))?;
    // `from_keypair_bytes` does this check too, but its error does not say what is wrong.
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&bytes[..32]);
    let key = SigningKey::from_bytes(&seed);
    if key.verifying_key().as_bytes()[..] != bytes[32..] {
        return Err(IdentityError::KeyPairMismatch);
    }
    Ok(key)
}

/// The PKCS#8 `PRIVATE KEY` PEM of `key` (RFC 8410), as OpenSSL and Go's
/// `x509.ParsePKCS8PrivateKey` read it: for programs such as etcd that take a key file.
///
/// The result holds the private key; write it to owner-only files.
pub fn encode_pkcs8_key_pem(key: &SigningKey) -> String {
    // The encoding of an Ed25519 key is fixed (RFC 8410 section 7: version 0, algorithm
    // id-Ed25519, the seed as an OCTET STRING inside the privateKey OCTET STRING), so it is
    // written out here rather than through the pkcs8 crate, whose encoder is fallible.
    // The version 0 form without the public key is the one every Go and OpenSSL release
    // reads.
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&key.to_bytes());
    encode(PKCS8_KEY_PEM_TYPE, &der)
}

/// Everything of an Ed25519 PKCS#8 v1 private key before the 32-byte seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, // SEQUENCE, 46 bytes
    0x02, 0x01, 0x00, // INTEGER 0 (version)
    0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, // SEQUENCE { OID 1.3.101.112 (Ed25519) }
    0x04, 0x22, 0x04, 0x20, // OCTET STRING { OCTET STRING, 32 bytes }
];

/// PEM (`CERTIFICATE`) encoding of a DER certificate, as in `owner.pem` and `ca.pem`.
pub fn cert_to_pem(der: &[u8]) -> String {
    encode(CERTIFICATE_PEM_TYPE, der)
}

/// The DER bytes of the first PEM block of `input`, which must be a `CERTIFICATE`.
///
/// The DER itself is not checked here; see [`crate::parse_certificate`].
pub fn pem_to_cert_der(input: &str) -> Result<Vec<u8>, IdentityError> {
    decode(input, CERTIFICATE_PEM_TYPE)
}

/// SHA-256 fingerprint of a DER certificate in the form `openssl x509 -fingerprint -sha256`
/// prints (`AB:CD:...`), so that operators can compare it with what they see elsewhere.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate_key;

    #[test]
    fn owner_key_round_trip() {
        let key = generate_key();
        let pem = encode_owner_key_pem(&key);
        assert!(pem.starts_with("-----BEGIN METROPOLIS INITIAL OWNER PRIVATE KEY-----\n"));
        assert!(!pem.contains('\r'));
        let back = decode_owner_key_pem(&pem).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        let block = pem::parse(&pem).unwrap();
        assert_eq!(block.contents().len(), 64);
        assert_eq!(&block.contents()[..32], key.to_bytes());
        assert_eq!(&block.contents()[32..], key.verifying_key().as_bytes());
    }

    #[test]
    fn owner_key_wrong_type() {
        let key = generate_key();
        let pem = encode("PRIVATE KEY", &key.to_keypair_bytes());
        let err = decode_owner_key_pem(&pem).unwrap_err();
        assert!(matches!(err, IdentityError::WrongPemType { .. }), "{err}");
        assert!(err.to_string().contains("PRIVATE KEY"), "{err}");
    }

    #[test]
    fn owner_key_wrong_length() {
        let key = generate_key();
        let pem = encode(OWNER_KEY_PEM_TYPE, &key.to_bytes());
        let err = decode_owner_key_pem(&pem).unwrap_err();
        assert!(matches!(err, IdentityError::WrongKeyLength(32)), "{err}");
        assert!(err.to_string().contains("64 bytes"), "{err}");
    }

    #[test]
    fn owner_key_mismatched_public_half() {
        let key = generate_key();
        let other = generate_key();
        let mut bytes = key.to_keypair_bytes();
        bytes[32..].copy_from_slice(other.verifying_key().as_bytes());
        let pem = encode(OWNER_KEY_PEM_TYPE, &bytes);
        let err = decode_owner_key_pem(&pem).unwrap_err();
        assert!(matches!(err, IdentityError::KeyPairMismatch), "{err}");
    }

    #[test]
    fn owner_key_not_pem() {
        let err = decode_owner_key_pem("hello").unwrap_err();
        assert!(matches!(err, IdentityError::Pem(_)), "{err}");
    }

    #[test]
    fn certificate_pem_round_trip() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x01];
        let pem = cert_to_pem(&der);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(pem_to_cert_der(&pem).unwrap(), der);
        let key_pem = encode_owner_key_pem(&generate_key());
        assert!(matches!(
            pem_to_cert_der(&key_pem),
            Err(IdentityError::WrongPemType { .. })
        ));
    }

    #[test]
    fn pkcs8_key_pem() {
        use ed25519_dalek::pkcs8::DecodePrivateKey;

        let key = generate_key();
        let pem = encode_pkcs8_key_pem(&key);
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        assert!(pem.ends_with("-----END PRIVATE KEY-----\n"), "{pem}");
        assert!(!pem.contains('\r'));
        // RFC 8410 section 10.3's example has this header.
        let block = pem::parse(&pem).unwrap();
        let mut want = hex::decode("302e020100300506032b657004220420").unwrap();
        want.extend_from_slice(&key.to_bytes());
        assert_eq!(block.contents(), want);
        // An independent decoder (the pkcs8 crate) reads it back.
        let back = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
    }

    #[test]
    fn fingerprint_format() {
        // SHA-256 of the empty string.
        assert_eq!(
            fingerprint_sha256(b""),
            "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:\
             27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55"
        );
    }
}
