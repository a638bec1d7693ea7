//! Certificates from the network (Escrow's and RegisterNode's self-signed
//! client certificates, node certificates): parsing and verifying arbitrary
//! or damaged bytes never panics, and nothing the signer did not sign
//! verifies.

use metropolis_api::testing::props;
use metropolis_api::testing::proptest::prelude::*;
use metropolis_identity::{
    CertificateAuthority, generate_key, parse_certificate, self_signed_certificate,
    verify_self_signed, verify_signed_by,
};

/// A valid certificate with up to three bytes changed (index, xor mask).
fn damaged(der: Vec<u8>) -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let len = der.len();
    prop::collection::vec((0..len, 1u8..=255), 1..4).prop_map(move |flips| {
        let mut bad = der.clone();
        for (i, x) in flips {
            bad[i] ^= x;
        }
        (der.clone(), bad)
    })
}

#[test]
fn props_arbitrary_bytes_are_not_certificates() {
    let ca = CertificateAuthority::generate().expect("ca");
    props(
        "certificate parsing of arbitrary bytes",
        prop::collection::vec(any::<u8>(), 0..2048),
        |bytes| {
            if let Ok(cert) = parse_certificate(&bytes) {
                prop_assert!(verify_self_signed(&cert).is_err());
                prop_assert!(
                    verify_signed_by(&cert, ca.cert_der(), time::OffsetDateTime::now_utc())
                        .is_err()
                );
            }
            Ok(())
        },
    );
}

#[test]
fn props_damaged_self_signed_certificates_do_not_verify() {
    let key = generate_key();
    let der = self_signed_certificate(&key, "").expect("self-signed");
    props(
        "damaged self-signed certificates",
        damaged(der),
        |(good, bad)| {
            if let Ok(cert) = parse_certificate(&bad)
                && verify_self_signed(&cert).is_ok()
            {
                // Only bytes outside what is signed may differ (e.g. the
                // outer algorithm identifier); the key must be the signer's.
                let original = parse_certificate(&good).expect("original");
                prop_assert_eq!(cert.public_key, original.public_key);
            }
            Ok(())
        },
    );
}

#[test]
fn props_damaged_node_certificates_do_not_verify() {
    let ca = CertificateAuthority::generate().expect("ca");
    let key = generate_key();
    let der = ca
        .issue_node_certificate(
            key.verifying_key().as_bytes(),
            std::time::Duration::from_secs(86_400),
        )
        .expect("node certificate");
    props("damaged node certificates", damaged(der), |(good, bad)| {
        if let Ok(cert) = parse_certificate(&bad)
            && verify_signed_by(&cert, ca.cert_der(), time::OffsetDateTime::now_utc()).is_ok()
        {
            let original = parse_certificate(&good).expect("original");
            prop_assert_eq!(cert.public_key, original.public_key);
            prop_assert_eq!(cert.common_name, original.common_name);
        }
        Ok(())
    });
}
