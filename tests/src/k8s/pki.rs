//! The control plane's certificates, made fresh for every control plane: a CA, the API server's
//! serving certificate, an admin client certificate (group `system:masters`) and the service
//! account signing key. ECDSA P-256 throughout; the API server accepts it for all four uses.
use std::{fs, net::IpAddr, path::Path};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

/// Files written by [`write`], relative to the control plane's directory.
pub const CA_CERT: &str = "ca.crt";
pub const SERVING_CERT: &str = "apiserver.crt";
pub const SERVING_KEY: &str = "apiserver.key";
pub const ADMIN_CERT: &str = "admin.crt";
pub const ADMIN_KEY: &str = "admin.key";
pub const SA_KEY: &str = "sa.key";
pub const SA_PUB: &str = "sa.pub";

#[derive(Debug)]
pub struct PkiError(pub String);

impl std::fmt::Display for PkiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PkiError {}

fn e(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |err| PkiError(format!("{what}: {err}"))
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    if let Some(o) = org {
        d.push(DnType::OrganizationName, o);
    }
    d
}

/// Writes every file into `dir`. The serving certificate names `ips` and the in-cluster DNS names
/// of the `kubernetes` Service.
pub fn write(dir: &Path, ips: &[IpAddr]) -> Result<(), PkiError> {
    let ca_key = KeyPair::generate().map_err(e("CA key"))?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = dn("dpt-test-ca", None);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).map_err(e("CA certificate"))?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"];
    let mut serving = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(e("serving names"))?;
    serving.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    serving.distinguished_name = dn("kube-apiserver", None);
    let serving_key = KeyPair::generate().map_err(e("serving key"))?;
    let serving_cert = serving.signed_by(&serving_key, &issuer).map_err(e("serving certificate"))?;

    let mut admin = CertificateParams::default();
    admin.distinguished_name = dn("dpt-admin", Some("system:masters"));
    let admin_key = KeyPair::generate().map_err(e("admin key"))?;
    let admin_cert = admin.signed_by(&admin_key, &issuer).map_err(e("admin certificate"))?;

    let sa_key = KeyPair::generate().map_err(e("service account key"))?;
    for (name, pem) in [
        (CA_CERT, ca_cert.pem()),
        (SERVING_CERT, serving_cert.pem()),
        (SERVING_KEY, serving_key.serialize_pem()),
        (ADMIN_CERT, admin_cert.pem()),
        (ADMIN_KEY, admin_key.serialize_pem()),
        (SA_KEY, sa_key.serialize_pem()),
        (SA_PUB, sa_key.public_key_pem()),
    ] {
        fs::write(dir.join(name), pem).map_err(|err| PkiError(format!("write {name}: {err}")))?;
    }
    Ok(())
}
