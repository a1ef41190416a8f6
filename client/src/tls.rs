//! TLS set-up shared by the SDK and the node: PEM loading, the QUIC client
//! configuration and the endpoints' UDP sockets. Only TLS 1.3 (QUIC requires it) with the `ring` provider.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// The `ring` crypto provider every Shoal TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM document.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Config(format!("certificate PEM is malformed: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config("no certificate found in PEM".into()));
    }
    Ok(certs)
}

/// Parses the first private key in a PEM document.
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| Error::Config(format!("private key PEM is malformed: {e}")))?
        .ok_or_else(|| Error::Config("no private key found in PEM".into()))
}

/// A root store holding the cluster CA.
pub fn root_store(ca_pem: &[u8]) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("CA certificate rejected: {e}")))?;
    }
    Ok(roots)
}

/// Transport settings for long-lived connections: keep-alives so an idle
/// connection stays open, and an idle timeout that notices a dead peer.
pub fn transport_config(idle_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = base_transport(idle_timeout);
    t.max_concurrent_bidi_streams(4096u32.into());
    Arc::new(t)
}

/// Keep-alives and the idle timeout, to build on.
pub fn base_transport(idle_timeout: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.keep_alive_interval(Some(idle_timeout / 4));
    // Each side finds the largest datagram its path carries, up to
    // MAX_UDP_PAYLOAD (see there), and the other side accepts.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    // Asks the peer to acknowledge every ACK_EVERY-th packet, or
    // ACK_DELAY after the first it has not acknowledged (QUIC's ACK
    // frequency extension), not every second packet or 25 ms after: with
    // many requests in flight most datagrams arrive on their own, and
    // every second one drew a datagram carrying nothing but an ACK, a
    // send and a wake-up each.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold((ACK_EVERY - 1).into());
    ack.max_ack_delay(Some(ACK_DELAY));
    t.ack_frequency_config(Some(ack));
    t
}

/// A connection's peer acknowledges every this many packets, or
/// [`ACK_DELAY`] after the first one it has not acknowledged. Workload a,
/// closed loop, 30 s cells side by side: 28,569 / 28,748 ops/s
/// acknowledging every second packet, 28,952 / 29,290 every ninth
/// (bench/README.md, tenth look).
pub const ACK_EVERY: u32 = 9;

/// How long a peer may hold an ACK back. Short, because a sender whose
/// congestion window is full waits for it: quinn's window holds as few
/// as two datagrams (a new or idle connection with jumbo datagrams, or
/// after persistent congestion), and with the default 25 ms a 64 KiB
/// answer between peers took 26 ms acknowledging every second packet,
/// 53 ms every ninth, and takes 7 ms with this.
pub const ACK_DELAY: Duration = Duration::from_millis(2);

/// The largest UDP payload a connection's MTU discovery tries: as large as
/// a datagram can be when quinn sends a full batch of them in one GSO send
/// ([`QUINN_GSO_BATCH`] datagrams, which the kernel takes only up to 64
/// KiB with the IPv6 and UDP headers): 6,548 bytes. On a path that
/// carries them (loopback, and data-centre networks with jumbo frames) a
/// datagram holds four and a half times the frames of an Ethernet-sized
/// one, and each datagram costs the sender a syscall and the receiver a
/// wake-up. A larger bound, a jumbo frame's 8,952 bytes, made bursts of
/// eight or more datagrams too large for one send: the kernel refused
/// them and quinn-udp dropped them silently (it takes `EMSGSIZE` for a lost
/// MTU probe), so a warmed-up connection lost every full burst. A path
/// that carries less is found out by the discovery (quinn binary-searches
/// from 1200 bytes and backs off on loss), so the bound is safe anywhere.
/// The other side must accept datagrams this large
/// ([`jumbo_endpoint_config`]): the node's endpoints do; the SDK's keep
/// quinn's 1472-byte default (its receive buffers grow with the size), so
/// a node's answers to a client stay in Ethernet-sized datagrams.
pub const MAX_UDP_PAYLOAD: u16 = ((u16::MAX as usize - IPV6_UDP_HEADERS) / QUINN_GSO_BATCH) as u16;

/// The most datagrams quinn 0.11 sends in one GSO send
/// (`MAX_TRANSMIT_SEGMENTS` in its `connection.rs`).
const QUINN_GSO_BATCH: usize = 10;

/// An IPv6 header and a UDP header.
const IPV6_UDP_HEADERS: usize = 40 + 8;

/// An endpoint that accepts datagrams of up to [`MAX_UDP_PAYLOAD`] bytes.
pub fn jumbo_endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("within quinn's 1200..=65527");
    config
}

/// The UDP receive buffer every QUIC endpoint asks for, a node's and the
/// SDK's. The kernel's default (208 KiB) holds fewer than 200 handshake
/// datagrams: a thousand clients connecting at once to a node, or a node's
/// answering handshakes arriving at once at one SDK endpoint, overflow it,
/// and a handshake whose datagrams are dropped again and again backs off
/// until its idle timeout (the flood test took 21-90 s instead of 5, and
/// failed). Linux caps the request at `net.core.rmem_max` unless the
/// process may pass it (`CAP_NET_ADMIN`); other systems refuse a request
/// over their cap, and a smaller one is asked instead.
pub const RECEIVE_BUFFER_BYTES: usize = 4 << 20;

/// A UDP socket bound to `addr` for a QUIC endpoint: dual-stack when `addr`
/// is IPv6 (where the system allows it, as quinn's own endpoints), with a
/// receive buffer of [`RECEIVE_BUFFER_BYTES`] asked for. Returns beside it
/// the receive buffer granted, in the bytes asked for (Linux reports twice
/// what it was asked), when the system tells: a caller can then say that
/// `net.core.rmem_max` capped it. A buffer refused costs only datagrams
/// dropped under a burst, never the socket.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, Option<usize>)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        if let Err(e) = socket.set_only_v6(false) {
            tracing::debug!(error = %e, "no dual-stack UDP socket");
        }
    }
    let mut ask = RECEIVE_BUFFER_BYTES;
    while let Err(e) = socket.set_recv_buffer_size(ask) {
        tracing::debug!(error = %e, ask, "UDP receive buffer refused");
        ask /= 2;
        if ask < 64 << 10 {
            break;
        }
    }
    let granted = match receive_buffer(&socket) {
        #[cfg(target_os = "linux")]
        Some(g) if g < RECEIVE_BUFFER_BYTES && force_receive_buffer(&socket) => {
            receive_buffer(&socket)
        }
        other => other,
    };
    socket.bind(&addr.into())?;
    Ok((socket.into(), granted))
}

/// The receive buffer of `socket`, in the bytes a program asks for.
fn receive_buffer(socket: &socket2::Socket) -> Option<usize> {
    let reported = socket.recv_buffer_size().ok()?;
    // Linux doubles what it is asked, for its own bookkeeping.
    Some(if cfg!(any(target_os = "linux", target_os = "android")) {
        reported / 2
    } else {
        reported
    })
}

/// Sets the receive buffer past `net.core.rmem_max` (`SO_RCVBUFFORCE`),
/// which only a process with `CAP_NET_ADMIN` may; whether it was set.
#[cfg(target_os = "linux")]
fn force_receive_buffer(socket: &socket2::Socket) -> bool {
    use std::os::fd::AsRawFd;
    let bytes = RECEIVE_BUFFER_BYTES as libc::c_int;
    // SAFETY: an open socket, and a c_int option value of its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// A QUIC endpoint bound to `addr` on a socket from [`udp_socket`]
/// (quinn's own constructors keep the kernel's default buffer), serving
/// incoming connections when `server` is given; with the receive buffer
/// granted (see [`udp_socket`]).
pub fn endpoint(
    addr: SocketAddr,
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<(quinn::Endpoint, Option<usize>)> {
    let (socket, granted) = udp_socket(addr)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    let endpoint = quinn::Endpoint::new(config, server, socket, runtime)?;
    Ok((endpoint, granted))
}

/// A QUIC endpoint for outgoing connections only, bound to `addr` (see
/// [`endpoint`]).
pub fn client_endpoint(addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    Ok(endpoint(addr, quinn::EndpointConfig::default(), None)?.0)
}

/// A QUIC client configuration trusting `ca_pem`, presenting `identity` (a
/// certificate chain and key) when given, speaking `alpn`.
pub fn quic_client_config(
    ca_pem: &[u8],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .with_root_certificates(root_store(ca_pem)?);
    let mut tls = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::Config(format!("client certificate rejected: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| Error::Config(format!("TLS config unusable for QUIC: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config(idle_timeout));
    Ok(config)
}

/// Why the node closed a connection because of this client's certificate,
/// in words a user can act on, if that is what `e` is: the TLS alert the
/// node sent during the handshake (no certificate, another CA, expired), or
/// its refusal of a certificate that grants no role.
pub fn refusal(e: &quinn::ConnectionError) -> Option<String> {
    let why = match e {
        quinn::ConnectionError::ConnectionClosed(close) => {
            let foreign = "the node does not trust this client's certificate: it was not \
                           issued by the cluster CA";
            let alerts: [(u8, &str); 6] = [
                (
                    116,
                    "the node requires a client certificate from the cluster CA and this \
                     client presented none",
                ),
                (48, foreign),
                // A CA with the same name but another key: the signature fails.
                (51, foreign),
                (45, "the node says this client's certificate has expired"),
                (42, "the node refused this client's certificate"),
                (46, "the node refused this client's certificate"),
            ];
            let alert = (0..=u8::MAX)
                .find(|a| close.error_code == quinn::TransportErrorCode::crypto(*a))?;
            alerts
                .iter()
                .find(|(known, _)| *known == alert)
                .map_or_else(
                    || {
                        format!(
                            "the node refused this client's certificate (TLS alert {alert}: {e})"
                        )
                    },
                    |(_, why)| why.to_string(),
                )
        }
        quinn::ConnectionError::ApplicationClosed(close) if close.error_code == 2u32.into() => {
            format!(
                "the node refused this client: {}",
                String::from_utf8_lossy(&close.reason)
            )
        }
        _ => return None,
    };
    Some(format!(
        "{why} (issue one with `shoal certs client --name NAME --role ROLE`; the CLI and \
         the SDK's ClientConfig::from_dir read client.pem and client.key from the cluster \
         directory, where `shoal dev` writes an admin one)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thousand clients' Initial datagrams (1,200 bytes each) arriving at
    /// once wait in an endpoint's socket until it reads them; the kernel's
    /// default buffer keeps fewer than 200 and drops the rest.
    #[test]
    fn a_burst_of_a_thousand_handshake_datagrams_waits_in_an_endpoints_socket() {
        let local: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let (rx, granted) = udp_socket(local).expect("endpoint socket");
        if granted.is_none_or(|g| g < RECEIVE_BUFFER_BYTES) {
            eprintln!("the system caps the buffer at {granted:?} bytes: not tried");
            return;
        }
        let tx = std::net::UdpSocket::bind(local).expect("sending socket");
        let to = rx.local_addr().expect("address");
        for _ in 0..1000 {
            tx.send_to(&[7u8; 1200], to).expect("send");
        }
        rx.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 2048];
        let mut kept = 0;
        while rx.recv(&mut buf).is_ok() {
            kept += 1;
        }
        assert_eq!(kept, 1000, "datagrams kept of a burst of 1,000");
    }

    /// quinn sends a burst of datagrams in one GSO send of up to
    /// [`QUINN_GSO_BATCH`]; the kernel refuses a send whose datagrams add
    /// up to more than 64 KiB, and quinn-udp then drops the whole burst
    /// without a word (it takes `EMSGSIZE` for a lost MTU probe). A full
    /// batch of the largest datagrams must go out.
    #[test]
    fn a_full_batch_of_the_largest_datagrams_goes_out_in_one_send() {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(rx) = std::net::UdpSocket::bind(local) else {
                eprintln!("no loopback at {local}: not tried");
                continue;
            };
            let tx = std::net::UdpSocket::bind(local).expect("sending socket");
            let state = quinn::udp::UdpSocketState::new((&tx).into()).expect("socket state");
            let segments = state.max_gso_segments().min(QUINN_GSO_BATCH);
            let size = usize::from(MAX_UDP_PAYLOAD);
            let contents = vec![0u8; size * segments];
            let transmit = quinn::udp::Transmit {
                destination: rx.local_addr().expect("address"),
                ecn: None,
                contents: &contents,
                segment_size: (segments > 1).then_some(size),
                src_ip: None,
            };
            if let Err(e) = state.try_send((&tx).into(), &transmit) {
                panic!("{segments} datagrams of {size} bytes to {local}: {e}");
            }
        }
    }
}
