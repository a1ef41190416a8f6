//! Certificate tooling behind `shoal certs` and `shoal dev`: a cluster CA, node
//! certificates (valid as TLS server and client, named for the node plus the
//! shared client-port name `shoal`), and client certificates, each carrying
//! a [`Role`] as a subject alternative name (see [`Role::san`]).
//!
//! The CA's distinguished name is fixed, so issuing needs only the CA key:
//! the issuer is rebuilt from the same parameters and key, which yields the
//! same issuer name and key identifier as the stored CA certificate.
//!
//! A node's key file also holds the cluster's context key (a
//! `SHOAL CONTEXT KEY` PEM block, see [`crate::version::ContextKey`]): 32
//! random bytes kept beside the CA key (`context.key`), copied into every
//! node key the CA directory issues, so all its nodes hold the same one and
//! the operator has nothing more to hand out.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use shoal_client::proto::Role;

use crate::version::{ContextKey, CONTEXT_SECRET_BYTES};

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
    write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
    context_block(dir).map(drop)
}

/// The label of the context key's PEM block in a node's key file.
const CONTEXT_KEY_LABEL: &str = "SHOAL CONTEXT KEY";

/// The file beside `ca.key` holding the cluster's context key.
const CONTEXT_KEY_FILE: &str = "context.key";

/// The context key's block from CA directory `ca_dir`, made (random) on
/// first use, so CA directories from before context keys get one.
fn context_block(ca_dir: &Path) -> Result<String, CertError> {
    let path = ca_dir.join(CONTEXT_KEY_FILE);
    if path.exists() {
        let block = read(&path)?;
        context_key(block.as_bytes(), &path)?;
        return Ok(block);
    }
    if !ca_dir.join("ca.key").exists() {
        return Err(CertError::Invalid(format!(
            "{} holds no CA (ca.key): the context key is made beside it",
            ca_dir.display()
        )));
    }
    let mut secret = [0u8; CONTEXT_SECRET_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| CertError::Invalid("the system's random source failed".into()))?;
    let block = pem::encode_config(
        &pem::Pem::new(CONTEXT_KEY_LABEL, secret),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    replace(&path, &block, None)?;
    Ok(block)
}

/// The context key in a node's key file (`path`, for errors).
pub fn context_key(key_pem: &[u8], path: &Path) -> Result<ContextKey, CertError> {
    let blocks = pem::parse_many(key_pem)
        .map_err(|e| CertError::Invalid(format!("{}: {e}", path.display())))?;
    let secret = blocks
        .iter()
        .find(|b| b.tag() == CONTEXT_KEY_LABEL)
        .ok_or_else(|| {
            CertError::Invalid(format!(
                "{} holds no {CONTEXT_KEY_LABEL} block, which seals the causal contexts \
                 clients get: add the cluster's with `shoal certs context-key --dir CA_DIR \
                 --key {}` (it keeps the TLS key), or issue the node's certificate again \
                 with `shoal certs node`",
                path.display(),
                path.display()
            ))
        })?;
    let secret: &[u8; CONTEXT_SECRET_BYTES] = secret.contents().try_into().map_err(|_| {
        CertError::Invalid(format!(
            "{}: the {CONTEXT_KEY_LABEL} block is not {CONTEXT_SECRET_BYTES} bytes",
            path.display()
        ))
    })?;
    Ok(ContextKey::new(secret))
}

/// Adds the context key of CA directory `ca_dir` to node key file
/// `key_path` (one issued before key files held it, or by another PKI); a
/// file holding one is left as it is, and one holding a malformed one is
/// refused. The file keeps its owner and mode, and is replaced whole
/// ([`replace`]), so a crash leaves the old or the new one.
pub fn add_context_key(ca_dir: &Path, key_path: &Path) -> Result<(), CertError> {
    let pem = read(key_path)?;
    match context_key(pem.as_bytes(), key_path) {
        Ok(_) => return Ok(()),
        Err(e) if pem.contains(CONTEXT_KEY_LABEL) => {
            return Err(CertError::Invalid(format!(
                "{e}: the file holds a malformed {CONTEXT_KEY_LABEL} block; \
                 remove it, then run this again"
            )))
        }
        Err(_) => {}
    }
    let meta = std::fs::metadata(key_path).map_err(|source| CertError::Io {
        path: key_path.to_path_buf(),
        source,
    })?;
    let sep = if pem.ends_with('\n') { "" } else { "\n" };
    let contents = format!("{pem}{sep}{}", context_block(ca_dir)?);
    replace(key_path, &contents, Some(&meta))
}

/// Writes `path` whole: a new file beside it (0600, or `like`'s owner and
/// mode), synced, renamed over it, and the directory synced. On failure
/// the file beside it, a copy of key material, is removed.
fn replace(path: &Path, contents: &str, like: Option<&std::fs::Metadata>) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut temp = path.as_os_str().to_owned();
    temp.push(".new");
    let temp = PathBuf::from(temp);
    // A stale one (an earlier run cut short) could have another mode.
    let _ = std::fs::remove_file(&temp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        if let Some(m) = like {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
            f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(io(e));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))
        .and_then(|d| d.sync_all())
        .map_err(io)
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
    let context = match kind {
        Kind::Node => context_block(ca_dir)?,
        Kind::Client(_) => String::new(),
    };
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
        &format!("{}{context}", key.serialize_pem()),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_entry() -> std::collections::BTreeMap<shoal_ring::NodeId, crate::version::ContextEntry> {
        let e = crate::version::ContextEntry {
            counter: 1,
            at: Some(5),
        };
        [(shoal_ring::NodeId::from_u128(1), e)]
            .into_iter()
            .collect()
    }

    fn node_key(ca: &Path, out: &Path, name: &str) -> Vec<u8> {
        issue(ca, out, name, Kind::Node, &[], None).unwrap();
        std::fs::read(out.join(format!("{name}.key"))).unwrap()
    }

    /// Every node a CA directory issues holds the same context key, and
    /// the TLS key still loads from the same file; another CA's nodes hold
    /// another.
    #[test]
    fn nodes_of_one_ca_share_the_context_key() {
        let (ca, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        create_ca(ca.path()).unwrap();
        create_ca(other.path()).unwrap();
        let p = Path::new("x.key");
        let a = context_key(&node_key(ca.path(), ca.path(), "a"), p).unwrap();
        let b = context_key(&node_key(ca.path(), ca.path(), "b"), p).unwrap();
        let c = context_key(&node_key(other.path(), other.path(), "c"), p).unwrap();
        let entries = one_entry();
        let sealed = a.seal(b"k", &entries);
        assert_eq!(b.open(b"k", &sealed, 10).unwrap().vector.len(), 1);
        assert!(c.open(b"k", &sealed, 10).is_err());
        let pem = node_key(ca.path(), ca.path(), "d");
        shoal_client::tls::parse_key(&pem).expect("the TLS key loads");
    }

    /// A key file from before context keys: refused at start with what to
    /// do; `add_context_key` mends it with the CA directory's, once, and
    /// makes that if the directory is from before context keys too.
    #[test]
    fn a_key_file_without_the_context_key_is_refused_until_mended() {
        let ca = tempfile::tempdir().unwrap();
        create_ca(ca.path()).unwrap();
        std::fs::remove_file(ca.path().join(CONTEXT_KEY_FILE)).unwrap();
        let path = ca.path().join("old.key");
        std::fs::write(&path, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let e = context_key(&std::fs::read(&path).unwrap(), &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shoal certs node"), "{e}");
        add_context_key(ca.path(), &path).unwrap();
        add_context_key(ca.path(), &path).unwrap();
        let mended = std::fs::read(&path).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&mended)
                .matches(CONTEXT_KEY_LABEL)
                .count(),
            2
        );
        let key = context_key(&mended, &path).unwrap();
        let fresh = context_key(&node_key(ca.path(), ca.path(), "n"), &path).unwrap();
        let sealed = key.seal(b"k", &one_entry());
        assert_eq!(fresh.open(b"k", &sealed, 10).unwrap().vector.len(), 1);
        shoal_client::tls::parse_key(&mended).expect("the TLS key still loads");
    }

    /// The mend keeps the key file's mode (a node reading it through its
    /// group still can), and refuses a file whose block is malformed
    /// rather than append a second one the node would never read
    /// (review, helper-105).
    #[test]
    fn the_mend_keeps_the_files_mode_and_refuses_a_malformed_block() {
        use std::os::unix::fs::PermissionsExt;
        let ca = tempfile::tempdir().unwrap();
        create_ca(ca.path()).unwrap();
        let path = ca.path().join("old.key");
        std::fs::write(&path, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        add_context_key(ca.path(), &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let short = pem::encode(&pem::Pem::new(CONTEXT_KEY_LABEL, vec![1u8; 5]));
        let bad = ca.path().join("bad.key");
        let tls = KeyPair::generate().unwrap().serialize_pem();
        std::fs::write(&bad, format!("{tls}{short}")).unwrap();
        let e = add_context_key(ca.path(), &bad).unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&bad).unwrap(),
            format!("{tls}{short}")
        );
    }

    /// A stale file beside the target does not pass its mode on, and a
    /// replacement that fails leaves no copy of the key beside it
    /// (review, helper-108).
    #[test]
    fn a_replacement_leaves_no_stray_copy_of_the_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("context.key");
        let temp = dir.path().join("context.key.new");
        std::fs::write(&temp, "stale").unwrap();
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o644)).unwrap();
        replace(&path, "secret", None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret");
        let blocked = dir.path().join("a-directory");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), "x").unwrap();
        assert!(replace(&blocked, "secret", None).is_err());
        assert!(!dir.path().join("a-directory.new").exists());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_789), (2026, 12, 2));
        assert_eq!(civil(-1), (1969, 12, 31));
    }
}
