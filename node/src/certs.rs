//! Certificate tooling behind `shoal certs` and `shoal dev`: a cluster CA, node
//! certificates (valid as TLS server and client, named for the node plus the
//! shared client-port name `shoal`), and client certificates, each carrying
//! a [`Role`] as a subject alternative name (see [`Role::san`]).
//!
//! The CA's distinguished name is fixed, so issuing needs only the CA key:
//! the issuer is rebuilt from the same parameters and key, which yields the
//! same issuer name and key identifier as the stored CA certificate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use shoal_client::proto::Role;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Shoal cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates `ca.pem` and `ca.key` in `dir`, refusing to overwrite a CA.
pub fn create_ca(dir: &Path) -> Result<(), CertError> {
    if dir.join("ca.key").exists() {
        return Err(CertError::Invalid(format!(
            "{} already holds a CA key; not overwriting it",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    write(&dir.join("ca.pem"), &cert.pem(), false)?;
    write(&dir.join("ca.key"), &key.serialize_pem(), true)
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A node: serves both ports and dials peers.
    Node,
    /// An application or operator talking to the client port, with what it
    /// may do there.
    Client(Role),
}

/// The civil date (year, month, day) `days` days after 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

/// Issues `NAME.pem` and `NAME.key` in `out_dir`, signed by the CA in `ca_dir`,
/// valid from yesterday for `days` days (negative: already expired, for
/// tests), or from 1975 to 4096 when `days` is `None`.
pub fn issue(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    kind: Kind,
    ips: &[IpAddr],
    days: Option<i64>,
) -> Result<(), CertError> {
    if rustls::pki_types::ServerName::try_from(name).is_err() || name.contains('/') {
        return Err(CertError::Invalid(format!(
            "{name:?} is not a valid DNS-style name"
        )));
    }
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut sans = vec![name.to_string()];
    match kind {
        Kind::Node => {
            sans.push(shoal_client::client::CLIENT_SERVER_NAME.to_string());
            sans.push("localhost".to_string());
        }
        Kind::Client(role) => sans.push(role.san()),
    }
    let mut params = CertificateParams::new(sans)?;
    if let Some(days) = days {
        let today = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 86_400) as i64;
        let date = |d: i64| {
            let (y, m, day) = civil(d);
            rcgen::date_time_ymd(y, m, day)
        };
        params.not_before = date(today - 1 + days.min(0) * 2);
        params.not_after = date(today + days);
    }
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match kind {
        Kind::Node => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Kind::Client(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out_dir).map_err(|source| CertError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    write(&out_dir.join(format!("{name}.pem")), &cert.pem(), false)?;
    write(
        &out_dir.join(format!("{name}.key")),
        &key.serialize_pem(),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::civil;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_789), (2026, 12, 2));
        assert_eq!(civil(-1), (1969, 12, 31));
    }
}
